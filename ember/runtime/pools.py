"""Warm pools: sandboxes started ahead of time, handed out by ``Sandbox.create()`` at once.

A pool is a row (template, size, target count) in the registry; its members are ordinary
sandboxes in state ``pooled``, booted (or restored: a pre-baked template's snapshot, or the
template snapshot of the pool's template and size when one exists) and checked
with an agent hello, with no lifetime until handed out. Handing one out is one SQLite
transaction that flips it to ``running`` (:meth:`Store.claim_pooled`): no sandbox is ever
handed out twice, by any number of processes. The home's daemon refills pools (its
supervision thread); a pool therefore survives the process that configured it, and after
a host reboot the daemon marks dead members failed and boots new ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ember.errors import BadRequestError, EmberError, SnapshotError
from ember.locks import FileLock
from ember.runtime import supervisor, template_snapshots
from ember.runtime.agent_client import AgentClient
from ember.runtime.manager import SandboxDir, SandboxManager
from ember.runtime.spec import SandboxSpec, pool_key
from ember.store import PoolRecord, SandboxRecord, TemplateRecord

log = logging.getLogger("ember.pools")

MAX_POOL_SIZE = 256
READY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class PoolStatus:
    pool: PoolRecord
    ready: int  # pooled members waiting
    starting: int  # members being booted for it
    idle_pss_bytes: int  # host memory (PSS) of the ready members' VMM processes

    def to_json(self) -> dict[str, object]:
        return {**self.pool.to_json(), "ready": self.ready, "starting": self.starting,
                "idle_pss_bytes": self.idle_pss_bytes}


def set_pool(mgr: SandboxManager, template: str, size: int, *, vcpus: int | None = None,
             memory_mib: int | None = None, disk_mib: int | None = None) -> PoolRecord:
    """Create or resize the pool of ``template`` at that size; size 0 removes it."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_POOL_SIZE:
        raise BadRequestError(f"pool size must be between 0 and {MAX_POOL_SIZE}, not {size!r}")
    tpl = mgr.store.get_template(template)
    spec = SandboxSpec(template=template, vcpus=(vcpus if vcpus is not None
                              else int(tpl.config.get("vcpus", 1))),
                       memory_mib=(memory_mib if memory_mib is not None
                                       else int(tpl.config.get("memory_mib", 256))),
                       disk_mib=disk_mib)
    rec = PoolRecord(key=pool_key(template, spec.vcpus, spec.memory_mib, spec.disk_mib),
                     template=template, vcpus=spec.vcpus, memory_mib=spec.memory_mib,
                     disk_mib=spec.disk_mib, size=size, created_at=time.time())
    if size == 0:
        remove_pool(mgr, rec.key)
        return rec
    mgr.store.put_pool(rec)
    trim(mgr, rec)
    supervisor.ensure(mgr.paths)
    return rec


def remove_pool(mgr: SandboxManager, key: str) -> None:
    mgr.store.delete_pool(key)
    for rec in members(mgr, key):
        mgr.destroy(rec.id)


def members(mgr: SandboxManager, key: str) -> list[SandboxRecord]:
    return [r for r in mgr.store.list_sandboxes() if r.pool == key]


def trim(mgr: SandboxManager, pool: PoolRecord) -> None:
    """Destroy ready members beyond the pool's size."""
    ready = [r for r in members(mgr, pool.key) if r.state == "pooled"]
    for rec in ready[pool.size:]:
        mgr.destroy(rec.id)


def status(mgr: SandboxManager) -> list[PoolStatus]:
    out = []
    for pool in mgr.store.list_pools():
        mine = [r for r in mgr.list() if r.pool == pool.key]
        ready = [r for r in mine if r.state == "pooled"]
        out.append(PoolStatus(pool, len(ready), len(mine) - len(ready),
                              sum(pss_bytes(r.pid) for r in ready if r.pid)))
    return out


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def fill_one(mgr: SandboxManager) -> bool:
    """Start one member for the first pool below its size; True if one was started."""
    for pool in mgr.store.list_pools():
        have = [r for r in mgr.list() if r.pool == pool.key and r.state != "failed"]
        if len(have) >= pool.size:
            continue
        try:
            start_member(mgr, pool)
        except EmberError as err:
            log.warning("pool %s: cannot start a member: %s", pool.key, err)
            return False
        return True
    return False


def start_member(mgr: SandboxManager, pool: PoolRecord) -> SandboxRecord:
    """Boot (or restore) one sandbox for ``pool``, check its agent, park it as pooled."""
    tpl = mgr.store.get_template(pool.template)
    spec = SandboxSpec(template=pool.template, vcpus=pool.vcpus, memory_mib=pool.memory_mib,
                       disk_mib=pool.disk_mib, timeout=None)
    locks: list[FileLock] = []
    baked = tpl.config.get("snapshot")
    if baked:
        snap = mgr.store.get_snapshot(str(baked))
        rec = mgr.start_restore(snap, spec, locks, template_name=pool.template)
    else:
        rec = _from_template_snapshot(mgr, tpl, spec, locks) or mgr.start(spec, locks)
    try:
        mgr.store.update_sandbox(rec.id, pool=pool.key)
        asyncio.run(_check_agent(rec))
        mgr.set_state(rec.id, "pooled")
    except BaseException:
        mgr.destroy(rec.id)
        raise
    finally:
        locks[0].release()
    log.info("pool %s: %s ready", pool.key, rec.id)
    return mgr.store.get_sandbox(rec.id)


def _from_template_snapshot(mgr: SandboxManager, tpl: TemplateRecord, spec: SandboxSpec,
                            locks: list[FileLock]) -> SandboxRecord | None:
    """A member restored from the template snapshot of its template and size, when there
    is a good one (a pool does not make one: the first create does)."""
    try:
        key = template_snapshots.key_for(mgr, tpl, spec.vcpus, spec.memory_mib,
                                         template_snapshots.disk_label(spec.disk_mib))
    except EmberError:
        return None
    snap = template_snapshots.find(mgr, key)
    if snap is None:
        return None
    try:
        return mgr.start_restore(snap, spec, locks)
    except SnapshotError as err:
        template_snapshots.drop(mgr, snap, str(err))
        return None


async def _check_agent(rec: SandboxRecord) -> None:
    socket = str(SandboxDir(Path(rec.dir)).agent_socket)
    client = await AgentClient.connect(socket, timeout=READY_TIMEOUT_S, hostname=rec.id)
    await client.close()
