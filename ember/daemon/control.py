"""Start, stop and find the daemon of a home from another process.

``start`` is idempotent and safe to race: whoever wins the flock serves, the others see
its socket answer. The daemon runs detached (its own session, no terminal, stdio to its
log), so that it outlives the command or SDK call that started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ember.errors import HostError
from ember.locks import FileLock
from ember.paths import Paths
from ember.runtime.supervisor import daemon_running, on_demand_idle_s, out_path, spawn_daemon
from ember.uds_http import uds_transport

START_WAIT_S = 30.0


@dataclass(frozen=True)
class DaemonStatus:
    running: bool
    pid: int | None
    socket: str
    version: str | None = None
    open_sandboxes: int = 0
    #: The cluster this home joined (``ember cluster``), as the daemon reports it.
    cluster: dict[str, object] | None = None

    def to_json(self) -> dict[str, object]:
        return {"running": self.running, "pid": self.pid, "socket": self.socket,
                "version": self.version, "open_sandboxes": self.open_sandboxes,
                "cluster": self.cluster}


def status(paths: Paths) -> DaemonStatus:
    sock = paths.daemon_socket
    probe = FileLock(paths.daemon_lock)
    if not paths.daemon_lock.exists() or probe.try_acquire():
        probe.release()
        return DaemonStatus(False, None, str(sock))
    pid = probe.holder()
    try:
        with httpx.Client(transport=uds_transport(str(sock)), timeout=5.0) as c:
            h = c.get("http://emberd/v1/health").json()
        cluster = h.get("cluster")
        return DaemonStatus(True, pid, str(sock), str(h.get("version")), int(h.get("open", 0)),
                            cluster if isinstance(cluster, dict) else None)
    except (httpx.HTTPError, ValueError):
        return DaemonStatus(True, pid, str(sock))  # starting, or stuck: the lock says alive


def start(paths: Paths, *, listen: str | None = None, tls_cert: str | None = None,
          tls_key: str | None = None, wait: float = START_WAIT_S,
          idle_exit: float | None = None, ports_domain: str | None = None) -> DaemonStatus:
    """Start the home's daemon unless one runs; return once it answers.

    A daemon that holds the lock but does not answer may be one just killed whose exit
    the kernel has not finished (a big process takes a moment to close its files): the
    lock is watched, and a daemon is started as soon as it is free. ``idle_exit``: the
    daemon stops by itself after that many seconds with no sandbox and no pool (how the
    SDK and the CLI start one on demand). ``ports_domain``: see :func:`serve`."""
    deadline = time.monotonic() + wait
    child: subprocess.Popen[bytes] | None = None
    out = out_path(paths)
    while time.monotonic() < deadline:
        st = status(paths)
        if st.running and st.version is not None:
            return st
        if not st.running:
            if child is not None and child.poll() is not None:
                raise HostError(f"the ember daemon exited at start (code {child.returncode})"
                                + _tail(out))
            if child is None:
                child = spawn_daemon(paths, _flags(listen, tls_cert, tls_key, idle_exit,
                                                   ports_domain))
        time.sleep(0.05)
    raise HostError(f"the ember daemon did not answer on {paths.daemon_socket} within {wait:g} s;"
                    f" see {out} and {paths.logs / 'ember.log'}" + _tail(out))


def ensure_running(paths: Paths) -> None:
    """Make sure the home's daemon serves, starting it if need be (what the SDK and the CLI
    do on first use). Cheap while one runs: one flock attempt and one stat."""
    if daemon_running(paths) and paths.daemon_socket.exists():
        return
    start(paths, idle_exit=on_demand_idle_s())


def revive(paths: Paths) -> None:
    """A client found the daemon's socket dead: wait out a dying daemon's lock and start
    a new one (unless another client did already), as on first use."""
    start(paths, idle_exit=on_demand_idle_s())


def _flags(listen: str | None, tls_cert: str | None, tls_key: str | None,
           idle_exit: float | None, ports_domain: str | None = None) -> list[str]:
    argv: list[str] = [] if idle_exit is None else ["--idle-exit", f"{idle_exit:g}"]
    for flag, value in (("--listen", listen), ("--tls-cert", tls_cert),
                        ("--tls-key", tls_key), ("--ports-domain", ports_domain)):
        if value:
            argv += [flag, str(Path(value).absolute())
                     if flag in ("--tls-cert", "--tls-key") else value]
    return argv


def _tail(out: Path) -> str:
    tail = out.read_text(errors="replace")[-1500:] if out.is_file() else ""
    return f"\n--- {out.name} ends ---\n{tail}" if tail.strip() else ""


def stop(paths: Paths, *, wait: float = 30.0) -> DaemonStatus:
    """Stop the home's daemon (SIGTERM; its sandboxes keep running)."""
    st = status(paths)
    if not st.running or st.pid is None:
        return st
    os.kill(st.pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        st = status(paths)
        if not st.running:
            return st
        time.sleep(0.05)
    raise HostError(f"the ember daemon (pid {st.pid}) did not stop within {wait:g} s")
