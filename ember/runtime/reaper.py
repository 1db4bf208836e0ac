"""The per-home supervisor ("reaper"): enforces lifetimes and refills warm pools while no
other ember process runs.

One reaper process per ember home (an flock on ``reaper.lock`` elects it) wakes up at the
next deadline (at least every few seconds), reconciles the registry (destroys expired
sandboxes, marks those whose VM died as failed and releases their resources), starts one
member for any warm pool below its size, and exits as soon as no live sandbox and no pool
is left, or when its home disappears. ``ensure_reaper`` starts it, detached, whenever a
sandbox is created or a pool configured. While a daemon serves the home, the daemon holds
the lock and does this work itself (:func:`supervise`), so no detached reaper starts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ember.locks import FileLock
from ember.paths import Paths

if TYPE_CHECKING:
    from ember.runtime.manager import SandboxManager

log = logging.getLogger("ember.reaper")
MAX_SLEEP_S = 5.0


def ensure_reaper(paths: Paths) -> None:
    """Start the home's reaper unless one runs already (cheap: one flock attempt)."""
    probe = FileLock(paths.home / "reaper.lock")
    if not probe.try_acquire():
        return  # a reaper holds it
    probe.release()
    env = {**os.environ, "EMBER_HOME": str(paths.home), "EMBER_CACHE": str(paths.cache)}
    subprocess.Popen(  # detached: a new session, no inherited descriptors, no terminal
        [sys.executable, "-m", "ember.runtime.reaper"], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
        start_new_session=True, cwd="/",
    )


def step(mgr: SandboxManager) -> float | None:
    """One pass: reconcile, enforce lifetimes, start one pool member if one is missing.
    How long to sleep before the next pass, or None when nothing is left to watch."""
    from ember.runtime.pools import fill_one
    from ember.runtime.states import LIVE_STATES

    live = [r for r in mgr.list() if r.state in LIVE_STATES]
    pools = mgr.store.list_pools()
    if not live and not pools:
        return None
    if pools and fill_one(mgr):
        return 0.0
    now = time.time()
    deadlines = [r.expires_at - now for r in live if r.expires_at is not None]
    return max(0.2, min([MAX_SLEEP_S, *deadlines]))


def run(paths: Paths) -> None:
    """The detached reaper: until nothing is left to watch."""
    lock = FileLock(paths.home / "reaper.lock")
    if not lock.try_acquire():
        return
    from ember.runtime.manager import SandboxManager

    mgr = SandboxManager(paths)
    try:
        while paths.db.exists():
            if _daemon_serves(paths):  # it supervises the home now
                return
            pause = step(mgr)
            if pause is None:
                return
            time.sleep(pause)
    except Exception:  # never leave a traceback on a detached process: log and stop
        log.exception("reaper stopped")
    finally:
        mgr.close()
        lock.release()


def _daemon_serves(paths: Paths) -> bool:
    probe = FileLock(paths.daemon_lock)
    if not paths.daemon_lock.exists() or probe.try_acquire():
        probe.release()
        return False
    return True


def supervise(paths: Paths, stop: threading.Event,
              on_home_gone: Callable[[], None] | None = None) -> None:
    """The daemon's reaper: the same passes, in a thread of the daemon, for as long as the
    daemon runs (a detached reaper that still holds the lock is waited out). Holding the
    lock keeps ``ensure_reaper`` from starting a detached one."""
    lock = FileLock(paths.home / "reaper.lock")
    while not lock.try_acquire():
        if stop.wait(1.0):
            return
    from ember.runtime.manager import SandboxManager

    log.info("the daemon supervises %s", paths.home)
    mgr = SandboxManager(paths)
    try:
        while not stop.is_set() and paths.db.exists():
            try:
                pause = step(mgr)
            except Exception:  # one bad pass must not end supervision
                log.exception("supervision pass failed")
                pause = MAX_SLEEP_S
            stop.wait(MAX_SLEEP_S if pause is None else pause)
        if not stop.is_set() and on_home_gone is not None:  # its home was removed
            log.warning("%s is gone: stopping", paths.home)
            on_home_gone()
    finally:
        mgr.close()
        lock.release()


if __name__ == "__main__":
    from ember.logconfig import setup_logging

    run(setup_logging(verbose=False))
