"""Making sure a home has its supervisor: the home's daemon (``ember daemon``).

The daemon enforces lifetimes, refills warm pools and reconciles the registry
(:func:`ember.runtime.reaper.supervise`, a thread of it). Whatever starts a sandbox or
configures a pool in a process that is not the daemon calls :func:`ensure`, which starts
the daemon, detached, unless one holds the home's daemon lock. Many processes may race
to start one: the daemon lock elects the winner and the others exit at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from ember.locks import FileLock
from ember.paths import Paths

#: A daemon started on demand (not by `ember daemon start` or systemd) stops after this
#: long with no sandbox and no pool, as the detached reaper it replaces did
#: (``EMBER_DAEMON_IDLE_S`` changes it).
ON_DEMAND_IDLE_S = 60.0


def on_demand_idle_s() -> float:
    try:
        return max(1.0, float(os.environ.get("EMBER_DAEMON_IDLE_S", ON_DEMAND_IDLE_S)))
    except ValueError:
        return ON_DEMAND_IDLE_S


def daemon_running(paths: Paths) -> bool:
    """Whether a daemon holds the home's lock (serving, or about to). Cheap: one flock
    attempt; true in the daemon itself."""
    if not paths.daemon_lock.exists():
        return False
    probe = FileLock(paths.daemon_lock)
    if probe.try_acquire():
        probe.release()
        return False
    return True


def spawn_daemon(paths: Paths, flags: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m ember.daemon.server`` for ``paths``' home, detached: its own
    session, no terminal, no inherited descriptors, stdio to ``logs/emberd.out``."""
    paths.ensure()
    paths.logs.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ember.daemon.server", *(flags or [])]
    env = {**os.environ, "EMBER_HOME": str(paths.home), "EMBER_CACHE": str(paths.cache)}
    if paths.ram != Paths(paths.home, paths.cache).ram:  # a RAM directory of its own
        env["EMBER_RAM_DIR"] = str(paths.ram)
    for k in ("EMBER_URL", "EMBER_API_KEY", "EMBER_LOCAL"):  # it works in-process, itself
        env.pop(k, None)
    with open(out_path(paths), "ab") as out:
        child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=out, close_fds=True, start_new_session=True, cwd="/")
    # Reaped whenever it exits (an idle daemon stops by itself) while this process lives,
    # so a long-running client keeps no zombie; if this process ends first, init adopts it.
    threading.Thread(target=child.wait, name="ember-daemon-reaper", daemon=True).start()
    return child


def out_path(paths: Paths) -> Path:
    """Where a started daemon's stdout and stderr go (its log is logs/ember.log)."""
    return paths.logs / "emberd.out"


def ensure(paths: Paths) -> None:
    """Start the home's daemon unless one runs; do not wait for it to answer."""
    if not daemon_running(paths):
        spawn_daemon(paths, ["--idle-exit", f"{on_demand_idle_s():g}"])
