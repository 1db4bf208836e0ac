"""Template snapshots: the booted, idle guest of a template and shape, kept so that a plain
create restores it instead of booting.

For each template and sandbox shape (vCPUs, memory, disk) ember keeps at most one current
snapshot of a freshly booted guest whose agent has answered and which has run nothing else.
It is an ordinary content-addressed snapshot (:mod:`ember.runtime.snapshots`: written in
staging, renamed, registered, verified before every restore) carrying two metadata entries:
``ember.template-snapshot`` (its *key*) and ``ember.disk`` (the disk size asked for).

The key is the hash of everything that makes the snapshot valid: template name and digest,
kernel, the agent sources, the QEMU build, the accelerator and the shape. When any of them
changes the key changes: the old snapshot is never restored again, and it is removed once
no live sandbox maps its RAM.

The first create of a key boots as before and, once the agent answers, snapshots that new
guest before handing it over (the guest has run nothing of the caller's yet, and the
snapshot carries no env, metadata or tenant); one process makes a key at a time (a lock
file per key), the others boot meanwhile. A snapshot that fails its checks is dropped and
the create boots.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import TYPE_CHECKING

from ember.engine.qemu.argv import device_model
from ember.errors import EmberError
from ember.locks import FileLock
from ember.paths import Paths
from ember.runtime import snapshots
from ember.runtime.states import LIVE_STATES
from ember.store import SnapshotRecord, TemplateRecord

if TYPE_CHECKING:
    from ember.runtime.manager import SandboxManager

log = logging.getLogger("ember.template_snapshots")

#: 2: the snapshot is taken after one command (a warm exec path); 3: that command goes
#: through the shell paths too (``sh -c``, ``bash -l -c``) and ends with a ``sync``; 4: the
#: guest's root is mounted with a 600 s journal commit (``argv.ROOT_FLAGS``: the kernel
#: command line, which the key does not otherwise see)
KEY_VERSION = 4
KEY_META = "ember.template-snapshot"
DISK_META = "ember.disk"
#: "1" on the template snapshots of guests with a NIC (what networked creates restore).
NIC_META = "ember.nic"
DEFAULT_DISK = "default"


@functools.cache
def _agent_hash() -> str:
    from ember.guest.image import agent_hash

    return agent_hash()


def disk_label(disk_mib: int | None) -> str:
    return DEFAULT_DISK if disk_mib is None else str(int(disk_mib))


def key_for(mgr: SandboxManager, template: TemplateRecord, vcpus: int, memory_mib: int,
            disk: str, *, nic: bool = False) -> str:
    """The key of the template snapshot for this template and shape (``nic``: a guest
    with a NIC, what networked creates restore), as this host would make it now (raises
    if the host cannot boot one: no kernel, no QEMU)."""
    fields = {
        "version": KEY_VERSION, "template": template.name, "digest": template.digest,
        "kernel": mgr.kernel().key, "agent": _agent_hash(), "vmm": mgr.engine.version(),
        "accel": mgr.accel.accel, "vcpus": vcpus, "memory_mib": memory_mib, "disk": disk,
        "device_model": device_model(mgr.accel, vcpus, memory_mib, network=nic),
        **({"nic": True} if nic else {}),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def is_template_snapshot(snap: SnapshotRecord) -> bool:
    return KEY_META in snap.metadata


def metadata(key: str, disk: str, nic: bool = False) -> dict[str, str]:
    """The metadata a template snapshot is registered with."""
    return {KEY_META: key, DISK_META: disk, **({NIC_META: "1"} if nic else {})}


def all_of(mgr: SandboxManager, template: str | None = None) -> list[SnapshotRecord]:
    """Every template snapshot (of ``template``), newest first."""
    found = [s for s in mgr.store.list_snapshots() if is_template_snapshot(s)
             and (template is None or s.template == template)]
    return sorted(found, key=lambda s: s.created_at, reverse=True)


def find(mgr: SandboxManager, key: str) -> SnapshotRecord | None:
    """The newest template snapshot registered under ``key``."""
    for snap in all_of(mgr):
        if snap.metadata.get(KEY_META) == key:
            return snap
    return None


def is_current(mgr: SandboxManager, snap: SnapshotRecord) -> bool:
    """Whether ``snap`` is what this host would make now for its template and shape."""
    try:
        tpl = mgr.store.get_template(snap.template)
        key = key_for(mgr, tpl, snap.vcpus, snap.memory_mib,
                      snap.metadata.get(DISK_META, DEFAULT_DISK),
                      nic=snap.metadata.get(NIC_META) == "1")
    except EmberError:
        return False  # its template, kernel or QEMU is gone
    return snap.metadata.get(KEY_META) == key and find(mgr, key) == snap


def maker_lock(paths: Paths, key: str) -> FileLock:
    """Held by the one process making the snapshot of ``key``."""
    paths.tmp.mkdir(parents=True, exist_ok=True)
    return FileLock(paths.tmp / f"template-snapshot-{key[:32]}.lock")


def release_maker(lock: FileLock) -> None:
    """Release a :func:`maker_lock` and remove its file (nothing stays in the home's tmp)."""
    snapshots.release_hold(lock)


def make(mgr: SandboxManager, sandbox_id: str, key: str, disk: str) -> SnapshotRecord:
    """Snapshot the just booted sandbox ``sandbox_id`` as the template snapshot ``key``
    (the caller holds :func:`maker_lock`), then drop the ones it supersedes."""
    nic = mgr.get(sandbox_id).network is not None
    taken = mgr.snapshot(sandbox_id, shared=metadata(key, disk, nic))
    snap = taken.record
    log.info("template snapshot %s of %s (%d vCPU, %d MiB) made in %.0f ms (guest paused "
             "%.0f ms)", snap.id[:12], snap.template, snap.vcpus, snap.memory_mib,
             taken.total_s * 1000, taken.pause_s * 1000)
    collect(mgr, snap.template)
    return snap


def collect(mgr: SandboxManager, template: str | None = None) -> list[str]:
    """Remove template snapshots (of ``template``) that are no longer current and that no
    live sandbox uses. Returns the ids removed."""
    removed = []
    for snap in all_of(mgr, template):
        if is_current(mgr, snap) or snapshots.users(mgr.store, snap.id, LIVE_STATES):
            continue
        try:
            snapshots.remove(mgr.paths, mgr.store, snap, LIVE_STATES)
            removed.append(snap.id)
        except EmberError as err:
            log.warning("cannot remove stale template snapshot %s: %s", snap.id[:12], err)
    return removed


def drop(mgr: SandboxManager, snap: SnapshotRecord, why: str) -> None:
    """A template snapshot failed its checks: remove it (now if nothing uses it, else once
    the last sandbox restored from it is gone, since a newer one replaces it)."""
    log.warning("template snapshot %s of %s is unusable (%s); dropping it", snap.id[:12],
                snap.template, why)
    if snapshots.users(mgr.store, snap.id, LIVE_STATES):
        return
    try:
        snapshots.remove(mgr.paths, mgr.store, snap, LIVE_STATES)
    except EmberError as err:
        log.warning("cannot remove template snapshot %s: %s", snap.id[:12], err)


def remove_all(mgr: SandboxManager, template: str | None = None) -> tuple[list[str], list[str]]:
    """Remove the template snapshots (of ``template``): returns (removed ids, ids kept
    because live sandboxes use them)."""
    removed, kept = [], []
    for snap in all_of(mgr, template):
        if snapshots.users(mgr.store, snap.id, LIVE_STATES):
            kept.append(snap.id)
            continue
        snapshots.remove(mgr.paths, mgr.store, snap, LIVE_STATES)
        removed.append(snap.id)
    return removed, kept
