"""Warm pools from the SDK: what ``AsyncSandbox.set_pool`` / ``list_pools`` /
``remove_pool`` do, in this process (``EMBER_LOCAL=1``) or through a daemon."""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING
from urllib.parse import quote

from ember.errors import NotFoundError
from ember.runtime import pools
from ember.sdk.results import PoolInfo

if TYPE_CHECKING:
    from ember.runtime.manager import SandboxManager
    from ember.sdk.remote import Transport


def _info(status: pools.PoolStatus) -> PoolInfo:
    p = status.pool
    return PoolInfo(key=p.key, template=p.template, vcpus=p.vcpus, memory_mib=p.memory_mib,
                    disk_mib=p.disk_mib, size=p.size, created_at=p.created_at,
                    ready=status.ready, starting=status.starting,
                    idle_pss_bytes=status.idle_pss_bytes)


async def list_here(mgr: SandboxManager) -> list[PoolInfo]:
    return [_info(s) for s in await asyncio.to_thread(pools.status, mgr)]


async def set_here(mgr: SandboxManager, template: str, size: int, vcpus: int | None,
                   memory_mib: int | None, disk_mib: int | None) -> PoolInfo:
    rec = await asyncio.to_thread(functools.partial(
        pools.set_pool, mgr, template, size, vcpus=vcpus, memory_mib=memory_mib,
        disk_mib=disk_mib))
    now = {i.key: i for i in await list_here(mgr)}
    return now.get(rec.key) or PoolInfo(
        key=rec.key, template=rec.template, vcpus=rec.vcpus, memory_mib=rec.memory_mib,
        disk_mib=rec.disk_mib, size=rec.size, created_at=rec.created_at)


async def remove_here(mgr: SandboxManager, key: str) -> None:
    if not any(p.key == key for p in await asyncio.to_thread(mgr.store.list_pools)):
        raise NotFoundError(f"no pool {key!r}")
    await asyncio.to_thread(pools.remove_pool, mgr, key)


async def list_remote(t: Transport) -> list[PoolInfo]:
    from ember.sdk.wire import pool_info

    return [pool_info(i) for i in await t.call("GET", "/pools")]


async def set_remote(t: Transport, template: str, size: int, vcpus: int | None,
                     memory_mib: int | None, disk_mib: int | None) -> PoolInfo:
    from ember.sdk.wire import pool_info

    body = {"template": template, "size": size, "vcpus": vcpus, "memory_mib": memory_mib,
            "disk_mib": disk_mib}
    return pool_info(await t.call("PUT", "/pools", json=body))


async def remove_remote(t: Transport, key: str) -> None:
    await t.call("DELETE", "/pools/" + quote(key, safe="/"))
