"""Per-sandbox confinement policy: the jail and the cgroup a sandbox's VMM runs in.

The mechanisms live in :mod:`ember.host` (jail, ids, cgroups); this module decides, for
one sandbox, which uid, which limits and which files. Root runs every VMM jailed and
limited; a non-root user cannot (no uid changes, no namespaces, no cgroups) and gets an
unjailed VMM with a warning, as ``ember doctor`` says. ``EMBER_JAIL=0`` turns the jail off
for debugging (never for untrusted code).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError
from ember.host.cgroup_detect import CgroupSupport, detect_cgroups
from ember.host.cgroups import CgroupLimits, SandboxCgroup, home_key, prune, sweep
from ember.host.ids import IdAllocator, chown_for, snapshot_gid
from ember.host.jail import JailSpec, jail_wanted
from ember.paths import Paths
from ember.store import SandboxRecord

log = logging.getLogger("ember.runtime")

MIB = 1 << 20
#: Host memory a sandbox's QEMU may use beyond guest RAM: its own heap, device buffers and
#: page cache for the disk, plus (under TCG) the translated-code cache of 64 MiB.
OVERHEAD_MIB = {"tcg": 192, "kvm": 96}
#: Tasks (processes and threads) in one sandbox's cgroup. QEMU runs a main loop, an RCU
#: thread, one thread per vCPU and a pool of up to 64 block I/O workers.
PIDS_MAX = 128
NOFILE = 1024
#: Host memory beyond ``memory_mib`` per isolation tier: a container's processes are the
#: workload itself (its memory is exactly ``memory_mib``); gVisor adds its Sentry (a Go
#: user-space kernel) and its gofer.
CONTAINER_OVERHEAD_MIB = {"container": 0, "gvisor": 128}
#: Tasks in a container sandbox's cgroup: the workload's processes and threads (crun),
#: or the Sentry's and gofer's threads (gVisor).
CONTAINER_PIDS_MAX = 256
#: Slack over the biggest file a VMM writes (its disk overlay, its RAM file or a saved
#: state), for qcow2 metadata.
FSIZE_SLACK_MIB = 64


@dataclass(frozen=True)
class Limits:
    cpus: float
    memory_mib: int
    pids: int
    fsize_mib: int


def limits_for(rec: SandboxRecord) -> Limits:
    if rec.isolation in CONTAINER_OVERHEAD_MIB:
        return Limits(cpus=float(rec.vcpus),
                      memory_mib=rec.memory_mib + CONTAINER_OVERHEAD_MIB[rec.isolation],
                      pids=CONTAINER_PIDS_MAX, fsize_mib=rec.disk_mib + FSIZE_SLACK_MIB)
    overhead = OVERHEAD_MIB.get(rec.accel, OVERHEAD_MIB["tcg"])
    return Limits(cpus=float(rec.vcpus), memory_mib=rec.memory_mib + overhead, pids=PIDS_MAX,
                  fsize_mib=max(rec.memory_mib, rec.disk_mib) + FSIZE_SLACK_MIB)


@functools.cache
def _cgroups() -> CgroupSupport:
    return detect_cgroups()


class Confinement:
    """Builds and tears down the jail and cgroup of the sandboxes of one ember home."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.enabled, self.reason = jail_wanted()
        self.ids = IdAllocator()
        self.key = home_key(paths.home)

    def cgroup(self, sandbox_id: str) -> SandboxCgroup | None:
        if not self.enabled:
            return None
        support = _cgroups()
        usable = any(c.usable for c in support.controllers)
        return SandboxCgroup(support, self.key, sandbox_id) if usable else None

    def prepare(self, rec: SandboxRecord, root: Path, *, writable: list[Path],
                shared_ram: Path | None = None, snapshot_ram: Path | None = None,
                log_path: Path) -> JailSpec | None:
        """Allocate a uid, create and limit the cgroup, and hand the sandbox's own files to
        that uid. ``writable`` files and directories must exist; ``shared_ram`` is created
        empty (QEMU sizes it). Returns None when jailing is off."""
        if not self.enabled:
            log.warning("sandbox %s runs unjailed: %s", rec.id, self.reason)
            return None
        limits = limits_for(rec)
        procs = self.prepare_cgroup(rec)
        uid = self.ids.allocate(root)
        for p in writable:
            chown_for(p, uid, uid, 0o700 if p.is_dir() else 0o600)
        if shared_ram is not None:
            shared_ram.touch(mode=0o600, exist_ok=False)
            chown_for(shared_ram, uid, uid, 0o600)
        groups: tuple[int, ...] = ()
        if snapshot_ram is not None:  # read-write for QEMU 7.2's private mapping
            gid = snapshot_gid()
            chown_for(snapshot_ram, 0, gid, 0o660)
            groups = (gid,)
        fsize = limits.fsize_mib * MIB
        return JailSpec(
            uid=uid, gid=uid, groups=groups, hostname=rec.id, root=self.paths.home / "jail",
            log=log_path, cgroup_procs=procs,
            rlimits=(("nofile", NOFILE, NOFILE), ("core", 0, 0), ("fsize", fsize, fsize),
                     ("nproc", limits.pids * 2, limits.pids * 2)),
        )

    def prepare_cgroup(self, rec: SandboxRecord) -> tuple[Path, ...]:
        """Create and limit the sandbox's cgroup; its ``cgroup.procs`` files (none when
        cgroups are unusable or confinement is off: then a warning is logged)."""
        limits = limits_for(rec)
        cg = self.cgroup(rec.id)
        if cg is None:
            log.warning("sandbox %s: no usable cgroup controller; no CPU, memory or pids "
                        "limits", rec.id)
            return ()
        try:
            ok = {c.name for c in cg.support.controllers if c.usable}
            cg.create().apply(CgroupLimits(
                cpus=limits.cpus if "cpu" in ok else None,
                memory_bytes=limits.memory_mib * MIB if "memory" in ok else None,
                pids_max=limits.pids if "pids" in ok else None))
        except EmberError:
            cg.destroy()
            raise
        return cg.procs_files

    def freezer_detail(self) -> str:
        """Why the cgroup freezer can or cannot be used here."""
        freezer = _cgroups().freezer
        return freezer.detail if freezer is not None else "not detected"

    def oom_killed(self, sandbox_id: str) -> bool:
        cg = self.cgroup(sandbox_id)
        try:
            return cg is not None and cg.oom_killed()
        except EmberError:
            return False

    def release(self, sandbox_id: str, root: Path) -> None:
        """Kill whatever is left in the sandbox's cgroup, remove it, free its uid."""
        cg = self.cgroup(sandbox_id)
        if cg is not None:
            try:
                cg.destroy()
            except EmberError as err:
                log.warning("sandbox %s: %s", sandbox_id, err)
        self.ids.release(root)

    def sweep(self, live: Callable[[], set[str]]) -> None:
        """Remove cgroups of sandboxes that no longer exist, and stale uid allocations.

        ``live`` (the ids of live sandboxes) is asked after the cgroups are listed (see
        :func:`ember.host.cgroups.sweep`): a row is registered before its cgroup is made."""
        if not self.enabled:
            return
        support = _cgroups()
        if any(c.usable for c in support.controllers):
            try:
                gone = sweep(support, self.key, live)
                if gone:
                    log.info("removed leftover cgroups of %s", ", ".join(gone))
                if not live():  # the home's own (empty) cgroup directories go too
                    prune(support, self.key)
            except EmberError as err:
                log.warning("cgroup sweep: %s", err)
        self.ids.sweep()
