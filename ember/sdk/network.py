"""``sandbox.network``: the sandbox's network in one place (its policy, counters and
exposed ports), as :attr:`sandbox.files` holds its files. Each call is the sandbox's own
method of the same purpose (``set_network``, ``network_stats``, ``expose``, ...)."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ember.net.policy import NetworkPolicy
from ember.net.stats import NetworkStats
from ember.sdk.results import ExposedPort, SandboxInfo

if TYPE_CHECKING:
    from ember.sdk.async_sandbox import AsyncSandbox


class AsyncNetwork:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def update(self, policy: NetworkPolicy | Mapping[str, Any]) -> SandboxInfo:
        """Replace the egress policy, atomically, while the sandbox runs."""
        return await self._sandbox.set_network(policy)

    async def policy(self) -> NetworkPolicy | None:
        """The policy in force (None: the sandbox has no network)."""
        return (await self._sandbox.info()).network

    async def stats(self) -> NetworkStats | None:
        return await self._sandbox.network_stats()

    async def expose(self, port: int, *, pause_after_idle: float | None = None) -> ExposedPort:
        return await self._sandbox.expose(port, pause_after_idle=pause_after_idle)

    async def unexpose(self, port: int) -> None:
        await self._sandbox.unexpose(port)

    async def ports(self) -> builtins.list[ExposedPort]:
        return await self._sandbox.ports()
