"""The per-home supervisor ("reaper"): enforces lifetimes and refills warm pools while no
other ember process runs.

One reaper process per ember home (an flock on ``reaper.lock`` elects it) wakes up at the
next deadline (at least every few seconds), reconciles the registry (destroys expired
sandboxes, marks those whose VM died as failed and releases their resources), starts one
member for any warm pool below its size, and exits as soon as no live sandbox and no pool
is left, or when its home disappears. ``ensure_reaper`` starts it, detached, whenever a
sandbox is created or a pool configured.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from ember.locks import FileLock
from ember.paths import Paths

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


def run(paths: Paths) -> None:
    lock = FileLock(paths.home / "reaper.lock")
    if not lock.try_acquire():
        return
    from ember.runtime.manager import SandboxManager
    from ember.runtime.pools import fill_one
    from ember.runtime.states import LIVE_STATES

    mgr = SandboxManager(paths)
    try:
        while paths.db.exists():
            live = [r for r in mgr.list() if r.state in LIVE_STATES]
            pools = mgr.store.list_pools()
            if not live and not pools:
                return
            if pools and fill_one(mgr):
                continue
            now = time.time()
            deadlines = [r.expires_at - now for r in live if r.expires_at is not None]
            time.sleep(max(0.2, min([MAX_SLEEP_S, *deadlines])))
    except Exception:  # never leave a traceback on a detached process: log and stop
        log.exception("reaper stopped")
    finally:
        mgr.close()
        lock.release()


if __name__ == "__main__":
    from ember.logconfig import setup_logging

    run(setup_logging(verbose=False))
