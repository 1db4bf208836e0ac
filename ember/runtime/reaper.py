"""The per-home supervision ("reaper") that the daemon runs: lifetimes and warm pools.

:func:`supervise` runs in a thread of the home's daemon. It wakes up at the next deadline
(at least every few seconds), reconciles the registry (destroys expired sandboxes, pauses
those that asked for it, marks those whose VM died as failed and releases their
resources) and starts one member for any warm pool below its size. A process that starts
a sandbox or configures a pool makes sure the daemon runs
(:func:`ember.runtime.supervisor.ensure`); while no daemon runs, nothing ends lifetimes,
and the next daemon destroys what expired meanwhile on its first pass.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable

from ember.paths import Paths
from ember.runtime.manager import SandboxManager
from ember.runtime.pools import fill_one
from ember.runtime.states import LIVE_STATES

log = logging.getLogger("ember.reaper")
MAX_SLEEP_S = 5.0


def step(mgr: SandboxManager) -> float | None:
    """One pass: reconcile, enforce lifetimes, start one pool member if one is missing.
    How long to sleep before the next pass, or None when nothing is left to watch."""
    live = [r for r in mgr.list() if r.state in LIVE_STATES]
    pools = mgr.store.list_pools()
    if not live and not pools:
        return None
    if pools and fill_one(mgr):
        return 0.0
    now = time.time()
    deadlines = [r.expires_at - now for r in live if r.expires_at is not None]
    return max(0.2, min([MAX_SLEEP_S, *deadlines]))


def supervise(paths: Paths, stop: threading.Event,
              on_end: Callable[[], None] | None = None, *,
              idle_exit: float | None = None,
              busy: Callable[[], bool] | None = None) -> None:
    """The supervision loop, a thread of the daemon, for as long as the daemon runs (the
    daemon lock makes it the only one of its home). ``on_end`` is called when the home is
    removed under it, or, with ``idle_exit``, once nothing was left to watch (no live
    sandbox, no pool) for that many seconds: a daemon started on demand goes away, as
    the detached reaper it replaces did. ``busy``: whether work is in progress (a request,
    a template build), which is not idle either."""
    log.info("the daemon supervises %s", paths.home)
    mgr = SandboxManager(paths)
    idle_since: float | None = None
    try:
        while not stop.is_set() and paths.db.exists():
            try:
                pause = step(mgr)
            except Exception:  # one bad pass must not end supervision
                log.exception("supervision pass failed")
                pause = MAX_SLEEP_S
            if pause is not None or (busy is not None and busy()):
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif idle_exit is not None and time.monotonic() - idle_since >= idle_exit:
                log.info("nothing to watch for %g s: stopping", idle_exit)
                if on_end is not None:
                    on_end()
                return
            wait = MAX_SLEEP_S if pause is None else pause
            if idle_exit is not None and pause is None:
                wait = min(wait, max(0.2, idle_exit / 4))
            stop.wait(wait)
        if not stop.is_set():  # its home was removed under its sandboxes
            log.warning("%s is gone: stopping its sandboxes' processes and the daemon",
                        paths.home)
            try:
                mgr.confinement.sweep(set)  # no registry to manage them by any more
            except Exception:  # the daemon must stop all the same
                log.exception("stopping the processes of the removed home %s", paths.home)
            finally:
                shutil.rmtree(paths.ram, ignore_errors=True)  # their guest RAM files
                if on_end is not None:
                    on_end()
    finally:
        mgr.close()
