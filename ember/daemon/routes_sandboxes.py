"""Sandbox lifecycle and snapshots: create, list, info, timeout, pause/resume, kill, logs,
ping, snapshot, fork, restore."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Path, Query, Request, Response

from ember.daemon import cluster_create
from ember.daemon.auth import Principal, own_snapshot
from ember.daemon.deps import Live, Meter, OwnedId, Quota, Who
from ember.daemon.models import (
    CreateRequest,
    ForkRequest,
    NetworkRequest,
    RestoreRequest,
    SnapshotRequest,
    TimeoutRequest,
)
from ember.engine.container import require_tier
from ember.sdk.async_sandbox import info_of, snapshot_info
from ember.sdk.dockerfile_build import is_step_snapshot
from ember.sdk.results import SandboxInfo
from ember.sdk.wire import to_json
from ember.store.records import TENANT_KEY

router = APIRouter(tags=["sandboxes"])
SnapRef = Path(pattern=r"^[A-Za-z0-9_.:-]{1,128}$", description="a snapshot name or id")


async def _info(live: Live, sandbox_id: str) -> dict[str, Any]:
    rec = await asyncio.to_thread(live.mgr.get, sandbox_id)
    return to_json(info_of(rec))


@router.post("/sandboxes", status_code=201)
async def create(body: CreateRequest, live: Live, meter: Meter, who: Who,
                 quotas: Quota, request: Request) -> dict[str, Any]:
    """A new sandbox, started from a pool, a pre-baked snapshot, its template snapshot or
    a boot (``boot: "cold"``: always a boot); answers once its agent does. 429 when the
    caller's tenant is at a quota."""
    placed = await cluster_create.decide(request, body, live, who)  # Ray's, on a cluster
    if placed.info is not None:
        return placed.info
    return await create_sandbox(body, live, meter, placed.who, quotas)


async def create_sandbox(body: CreateRequest, live: Live, meter: Meter, who: Who,
                         quotas: Quota, reserved: dict[str, str] | None = None
                         ) -> dict[str, Any]:
    """:func:`create`, for the daemon's other fronts too; ``reserved``: the daemon's own
    ``ember.*`` metadata (never a client's)."""
    t0 = time.monotonic()
    if body.isolation != "microvm":  # a tier this host cannot run: say so before anything
        await asyncio.to_thread(require_tier, body.isolation)
    tpl = await asyncio.to_thread(live.mgr.store.get_template, body.template)
    vcpus = body.vcpus or int(tpl.config.get("vcpus", 1))
    memory = body.memory_mib or int(tpl.config.get("memory_mib", 256))
    async with quotas.lock(who):
        quotas.check(who, sandboxes=1, vcpus=vcpus, memory_mib=memory)
        sb = await live.local.create(
            body.template, vcpus=body.vcpus, memory_mib=body.memory_mib,
            disk_mib=body.disk_mib, timeout=body.timeout, env=body.env,
            metadata={**_tagged(body.metadata, who), **(reserved or {})},
            boot_timeout=body.boot_timeout,
            on_progress=None, on_timeout=body.on_timeout, isolation=body.isolation,
            boot=body.boot,
            network=None if body.network is None else body.network.model_dump())
    live.add(sb)
    meter.latency.labels("create").observe(time.monotonic() - t0)
    return to_json(await sb.info())


def _tagged(metadata: dict[str, str], who: Principal) -> dict[str, str]:
    return {**metadata, TENANT_KEY: who.tenant}


@router.get("/sandboxes")
async def list_sandboxes(live: Live, who: Who) -> list[dict[str, Any]]:
    """The caller's sandboxes (all of them for the administrator); dead VMs are found and
    marked failed."""
    return [to_json(i) for i in await live.local.list()
            if who.sees(i.tenant)]


@router.get("/sandboxes/{sandbox_id}")
async def info(live: Live, sandbox_id: OwnedId) -> dict[str, Any]:
    return await _info(live, sandbox_id)


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
async def kill(live: Live, meter: Meter, sandbox_id: OwnedId) -> Response:
    """Destroy the sandbox: its VM, disk, sockets and registry row."""
    t0 = time.monotonic()
    await live.kill(sandbox_id)
    meter.latency.labels("kill").observe(time.monotonic() - t0)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout")
async def set_timeout(body: TimeoutRequest, live: Live,
                      sandbox_id: OwnedId) -> dict[str, Any]:
    """Its remaining lifetime, in seconds from now (null: no limit)."""
    await live.local.set_timeout(sandbox_id, body.timeout)
    return await _info(live, sandbox_id)


@router.get("/sandboxes/{sandbox_id}/network")
async def network(live: Live, sandbox_id: OwnedId) -> dict[str, Any]:
    """The sandbox's egress policy (null: no network) and its counters: bytes and packets
    each way, packets its policy refused, spoofed ones dropped."""
    rec = await asyncio.to_thread(live.mgr.get, sandbox_id)
    stats = (await asyncio.to_thread(live.mgr.network.stats)).get(sandbox_id)
    return {"policy": rec.network, "stats": None if stats is None else to_json(stats)}


@router.put("/sandboxes/{sandbox_id}/network")
async def set_network(body: NetworkRequest, live: Live,
                      sandbox_id: OwnedId) -> dict[str, Any]:
    """Replace the egress policy of a sandbox created with a network, atomically, while
    it runs. 400 for a sandbox created without one."""
    rec = await live.local.set_network(sandbox_id, body.model_dump())
    return to_json(info_of(rec))


@router.post("/sandboxes/{sandbox_id}/pause")
async def pause(live: Live, sandbox_id: OwnedId) -> dict[str, Any]:
    await live.pause(sandbox_id)
    return await _info(live, sandbox_id)


@router.post("/sandboxes/{sandbox_id}/resume")
async def resume(live: Live, sandbox_id: OwnedId) -> dict[str, Any]:
    await live.resume(sandbox_id)
    return await _info(live, sandbox_id)


@router.get("/sandboxes/{sandbox_id}/logs")
async def logs(live: Live, sandbox_id: OwnedId) -> Response:
    """The guest's console (kernel and init messages), as text."""
    return Response(await live.local.logs(sandbox_id), media_type="text/plain; charset=utf-8")


@router.get("/sandboxes/{sandbox_id}/ping")
async def ping(live: Live, meter: Meter, sandbox_id: OwnedId,
               timeout: float = Query(10.0, gt=0, le=300)) -> dict[str, float]:
    """One round trip to the guest agent (an agent that does not answer within
    ``timeout`` seconds fails the sandbox: 504)."""
    sb = await live.get(sandbox_id)
    seconds = await sb.ping(timeout)
    meter.latency.labels("ping").observe(seconds)
    return {"seconds": seconds}


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, tags=["snapshots"])
async def snapshot(body: SnapshotRequest, live: Live, meter: Meter,
                   sandbox_id: OwnedId) -> dict[str, Any]:
    """Save memory, devices and disk as a snapshot; the sandbox keeps running."""
    t0 = time.monotonic()
    sb = await live.get(sandbox_id)
    snap = await sb.snapshot(body.name)
    meter.latency.labels("snapshot").observe(time.monotonic() - t0)
    return to_json(snap)


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201, tags=["snapshots"])
async def fork(body: ForkRequest, live: Live, who: Who, quotas: Quota,
               request: Request, sandbox_id: OwnedId) -> list[dict[str, Any]]:
    """``n`` new sandboxes from this one's current state (all or none). On a cluster,
    admitted by the cluster's quota keeper and counted while they live."""
    sb = await live.get(sandbox_id)
    rec = await asyncio.to_thread(live.mgr.get, sandbox_id)
    placed = await cluster_create.decide_here(
        request, live, who, f"/v1/sandboxes/{sandbox_id}/fork",
        body.model_dump(mode="json"), cluster_create.Shape(
            rec.isolation, rec.vcpus * body.n, rec.memory_mib * body.n, body.n))
    if placed.info is not None:
        return list(placed.info)
    who = placed.who
    async with quotas.lock(who):
        quotas.check(who, sandboxes=body.n, vcpus=rec.vcpus * body.n,
                     memory_mib=rec.memory_mib * body.n)
        clones = await sb.fork(body.n)
    out: list[SandboxInfo] = []
    for c in clones:
        live.add(c)
        out.append(await c.info())
    return [to_json(i) for i in out]


@router.get("/snapshots", tags=["snapshots"])
async def list_snapshots(live: Live, who: Who) -> list[dict[str, Any]]:
    recs = await asyncio.to_thread(live.mgr.store.list_snapshots)
    return [to_json(snapshot_info(s)) for s in recs if who.owns(s.metadata)
            and not is_step_snapshot(s)]  # Dockerfile step cache entries: ember image prune


async def _own_snapshot(live: Live, who: Who, ref: str) -> None:
    if not who.admin:
        own_snapshot(who, await asyncio.to_thread(live.mgr.store.get_snapshot, ref), ref)


@router.delete("/snapshots/{ref}", status_code=204, tags=["snapshots"])
async def delete_snapshot(live: Live, who: Who, ref: str = SnapRef) -> Response:
    """Remove a snapshot (refused while sandboxes restored from it still run)."""
    await _own_snapshot(live, who, ref)
    await live.local.delete_snapshot(ref)
    return Response(status_code=204)


@router.post("/snapshots/{ref}/restore", status_code=201, tags=["snapshots"])
async def restore(body: RestoreRequest, live: Live, meter: Meter, who: Who, quotas: Quota,
                  request: Request, ref: str = SnapRef) -> dict[str, Any]:
    """A new sandbox restored from a snapshot. On a cluster, admitted by the cluster's
    quota keeper and counted while it lives."""
    t0 = time.monotonic()
    await _own_snapshot(live, who, ref)
    snap = await asyncio.to_thread(live.mgr.store.get_snapshot, ref)
    placed = await cluster_create.decide_here(
        request, live, who, f"/v1/snapshots/{ref}/restore",
        body.model_dump(mode="json", exclude_unset=True),
        cluster_create.Shape("microvm", snap.vcpus, snap.memory_mib))
    if placed.info is not None:
        return dict(placed.info)
    who = placed.who
    async with quotas.lock(who):
        quotas.check(who, sandboxes=1, vcpus=snap.vcpus, memory_mib=snap.memory_mib)
        sb = await live.local.restore(
            ref, timeout=body.timeout, env=body.env, metadata=_tagged(body.metadata, who),
            boot_timeout=body.boot_timeout, on_progress=None, on_timeout=body.on_timeout)
    live.add(sb)
    meter.latency.labels("restore").observe(time.monotonic() - t0)
    return to_json(await sb.info())


__all__ = ["router"]
