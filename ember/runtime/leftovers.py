"""Sweep what processes killed mid-operation leave outside any registry row.

Registry rows are reconciled one by one (``SandboxManager.list``); this module handles the
rest: a sandbox directory made just before its creator died (no row yet), snapshot staging
and unregistered snapshot directories, unused unnamed snapshots (a fork killed before its
clones were registered), overlay staging files, cgroups and jail uids of sandboxes that no
longer exist. Everything here is either protected by a lock its live owner holds or named
after a pid that is gone, so a sweep never takes what a live process is building.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ember.locks import FileLock, owner_gone
from ember.runtime import snapshots

if TYPE_CHECKING:
    from ember.runtime.manager import SandboxManager

#: A sandbox directory is made as ``.new-<creator pid>-<id>``, locked, then renamed to
#: ``<id>`` (``SandboxManager._new_sandbox_dir``).
NEW_DIR_PREFIX = ".new-"

log = logging.getLogger("ember.runtime")


def sweep_leftovers(mgr: SandboxManager, live_states: tuple[str, ...]) -> list[str]:
    """Remove every leftover of this home; returns what was removed, for the log."""
    removed: list[str] = []
    rows = {r.id for r in mgr.store.list_sandboxes()}
    if mgr.paths.sandboxes.is_dir():
        for d in mgr.paths.sandboxes.iterdir():
            if d.name in rows or not d.is_dir():
                continue
            if d.name.startswith(NEW_DIR_PREFIX):
                # Not yet locked by its creator: only the creator's death makes it a leftover.
                if owner_gone(d.name[len(NEW_DIR_PREFIX):].split("-", 1)[0]):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(f"sandbox directory {d.name}")
                continue
            lock = FileLock(d / "client.lock")
            try:
                if not lock.try_acquire():
                    continue  # its creator is alive and about to register it
            except FileNotFoundError:
                continue  # removed meanwhile
            try:
                if d.name not in {r.id for r in mgr.store.list_sandboxes()}:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(f"sandbox directory {d.name}")
            finally:
                lock.release()
    for sid in snapshots.sweep_orphans(mgr.paths, mgr.store, live_states):
        removed.append(f"snapshot {sid[:12]}")
    for staging in ("overlays", "agent-lib"):  # see overlays.py and guest/inject.py
        _sweep_dead_staging(mgr.paths.home / staging)
    mgr.confinement.sweep(lambda: {r.id for r in mgr.store.list_sandboxes()
                                   if r.state in live_states})
    alive = {r.id for r in mgr.store.list_sandboxes() if r.state in live_states}
    removed += [f"network of {sid}" for sid in mgr.network.sweep(alive)]
    if removed:
        log.info("removed leftovers of killed processes: %s", ", ".join(removed))
    return removed


def _sweep_dead_staging(directory: Path) -> None:
    """Remove ``.<name>.<pid>.<token>`` staging files and directories whose process is
    gone."""
    if not directory.is_dir():
        return
    for d in directory.iterdir():
        parts = d.name.split(".")
        if d.name.startswith(".") and len(parts) >= 3 and owner_gone(parts[2]):
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)
