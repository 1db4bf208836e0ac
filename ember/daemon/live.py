"""What the daemon holds open: one agent connection per sandbox, shared by every request
on it, and the background processes its clients started.

A connection is opened on first use (after a restart of the daemon too: sandboxes outlive
it, and the first request re-attaches with a resync) and dropped when its sandbox ends.
Everything else about a sandbox lives in the registry, not here, so that a daemon killed
with SIGKILL loses nothing a new one cannot find again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence

from ember.daemon.activity import Activity
from ember.errors import (
    BadRequestError,
    EmberError,
    GuestError,
    NetworkError,
    NotFoundError,
    SandboxNotFoundError,
)
from ember.net.forward import Exposed, PortForwarder
from ember.paths import Paths
from ember.runtime.guest_port import GuestConnection
from ember.runtime.manager import SandboxManager
from ember.runtime.states import LIVE_STATES
from ember.sdk.async_sandbox import AsyncSandbox, manager
from ember.sdk.local import Local
from ember.sdk.process import AsyncProcess
from ember.store.records import ExposedPortRecord, SandboxRecord

log = logging.getLogger("ember.daemon")

#: How long a request waits for another owner of a sandbox's connection (a local SDK
#: process that connected directly) before it is told the sandbox is busy.
ATTACH_WAIT_S = 5.0
#: Background processes a sandbox may have in the daemon's table at once.
MAX_PROCESSES = 1024


class LiveSandboxes:
    """The daemon's open sandboxes, by id."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        #: Requests and template jobs in progress (see :mod:`ember.daemon.activity`).
        self.activity = Activity()
        self.local = Local(paths)  # the home's operations, in the daemon's process
        self._open: dict[str, AsyncSandbox] = {}
        self._attaching: dict[str, asyncio.Lock] = {}
        self._procs: dict[str, dict[int, AsyncProcess]] = {}
        #: Exposed ports, listening on EMBER_PORTS_BIND (default 127.0.0.1); a sandbox
        #: idle on them past its limit is paused, and woken by the next connection.
        self.ports = PortForwarder(os.environ.get("EMBER_PORTS_BIND") or "127.0.0.1",
                                   pause=self.pause, resume=self.resume,
                                   carrier=self._connect_port)

    @property
    def mgr(self) -> SandboxManager:
        return manager(self.paths)

    def add(self, sb: AsyncSandbox) -> AsyncSandbox:
        self._open[sb.id] = sb
        return sb

    def ids(self) -> Sequence[str]:
        return list(self._open)

    def peek(self, sandbox_id: str) -> AsyncSandbox | None:
        """The open sandbox, if the daemon holds one for ``sandbox_id`` (no attach)."""
        return self._open.get(sandbox_id)

    async def get(self, sandbox_id: str) -> AsyncSandbox:
        """The sandbox's shared connection, opened (re-attached) on first use."""
        sb = self._open.get(sandbox_id)
        if sb is not None and _usable(sb):
            return sb
        lock = self._attaching.setdefault(sandbox_id, asyncio.Lock())
        async with lock:
            sb = self._open.get(sandbox_id)
            if sb is not None and _usable(sb):
                return sb
            if sb is not None:  # broken: its sandbox failed or ended; say why, from scratch
                await self.forget(sandbox_id)
            rec = await asyncio.to_thread(self.mgr.get, sandbox_id)  # reconciled
            if rec.state == "failed":  # as an in-process handle says it, for every client
                raise GuestError(f"sandbox {sandbox_id} failed: {rec.error}")
            sb = await self.local.connect(sandbox_id, wait=ATTACH_WAIT_S)
            log.info("attached to sandbox %s", sandbox_id)
            self._open[sandbox_id] = sb
            return sb

    def _drop(self, sandbox_id: str) -> AsyncSandbox | None:
        """Forget what the daemon holds of a sandbox; its open connection, if any."""
        self._procs.pop(sandbox_id, None)
        lock = self._attaching.get(sandbox_id)
        if lock is not None and not lock.locked():  # one per sandbox attached, not forever
            del self._attaching[sandbox_id]
        return self._open.pop(sandbox_id, None)

    async def forget(self, sandbox_id: str) -> None:
        """Close the daemon's connection to a sandbox (which keeps running)."""
        sb = self._drop(sandbox_id)
        if sb is not None:
            with contextlib.suppress(Exception):
                await sb.close()

    async def pause(self, sandbox_id: str) -> None:
        """Stop the sandbox's vCPUs (through the daemon's open connection if it has one,
        which then says "paused" instead of waiting for the agent)."""
        sb = self.peek(sandbox_id)
        if sb is not None:
            await sb.pause()
        else:
            await self.local.pause(sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        sb = self.peek(sandbox_id)
        if sb is not None:
            await sb.resume()
        else:
            await self.local.resume(sandbox_id)

    # --- exposed ports (kept in the registry: a restarted daemon exposes them again) -----
    async def _connect_port(self, sandbox_id: str, port: int) -> GuestConnection:
        """A connection to a guest port carried by the sandbox's agent (no NIC needed)."""
        sb = await self.get(sandbox_id)
        return await sb._connect_port(port)

    async def expose(self, sandbox_id: str, port: int, *,
                     pause_after_idle: float | None = None) -> Exposed:
        await asyncio.to_thread(self.mgr.get, sandbox_id)  # 404 for an unknown one
        exposed = await self.ports.expose(sandbox_id, port)
        try:
            if pause_after_idle is not None:
                self.ports.set_idle_pause(sandbox_id, pause_after_idle)
            store = self.mgr.store
            await asyncio.to_thread(store.put_exposed_port, ExposedPortRecord(
                sandbox_id, port, exposed.host_port, self.ports.idle_pause(sandbox_id)))
            if pause_after_idle is not None:
                await asyncio.to_thread(store.set_idle_pause, sandbox_id, pause_after_idle)
        except BaseException:
            await self.ports.close(sandbox_id, port)
            raise
        return exposed

    async def unexpose(self, sandbox_id: str, port: int) -> None:
        await self.ports.close(sandbox_id, port)
        await asyncio.to_thread(self.mgr.store.delete_exposed_ports, sandbox_id, port)

    async def restore_ports(self) -> None:
        """Expose again what a previous daemon exposed, for sandboxes still alive (at the
        same host port if it is free, else at a new one); forget the rest."""
        store = self.mgr.store
        rows = await asyncio.to_thread(store.list_exposed_ports)
        for sid in sorted({r.sandbox_id for r in rows}):
            mine = [r for r in rows if r.sandbox_id == sid]
            try:
                rec: SandboxRecord | None = await asyncio.to_thread(self.mgr.get, sid)
            except SandboxNotFoundError:
                rec = None
            if rec is None or rec.state not in LIVE_STATES or rec.network is None:
                log.info("sandbox %s is gone: its exposed ports are forgotten", sid)
                await asyncio.to_thread(store.delete_exposed_ports, sid)
                continue
            for row in mine:
                await self._reexpose(rec, row)
            idle = mine[0].pause_after_idle_s
            if idle is not None and self.ports.exposed(sid):
                self.ports.set_idle_pause(sid, idle)
                if rec.state == "paused":
                    self.ports.adopt_paused(sid)

    async def _reexpose(self, rec: SandboxRecord, row: ExposedPortRecord) -> None:
        store = self.mgr.store
        try:
            try:
                got = await self.ports.expose(rec.id, row.port, row.host_port)
            except NetworkError as err:  # its host port is taken now: another one
                log.warning("sandbox %s port %d: %s; exposing it at another host port",
                            rec.id, row.port, err)
                got = await self.ports.expose(rec.id, row.port)
        except EmberError as err:
            log.warning("sandbox %s port %d is not exposed again: %s", rec.id, row.port, err)
            await asyncio.to_thread(store.delete_exposed_ports, rec.id, row.port)
            return
        if got.host_port != row.host_port:
            await asyncio.to_thread(store.put_exposed_port, ExposedPortRecord(
                rec.id, row.port, got.host_port, row.pause_after_idle_s))
        log.info("sandbox %s: port %d exposed again at %s:%d", rec.id, row.port, got.host,
                 got.host_port)

    async def kill(self, sandbox_id: str) -> None:
        """Destroy a sandbox, whether the daemon holds it open or not."""
        await self.ports.close(sandbox_id)
        await asyncio.to_thread(self.mgr.store.delete_exposed_ports, sandbox_id)
        sb = self._drop(sandbox_id)
        if sb is not None:
            await sb.kill()
            return
        await asyncio.to_thread(self.mgr.get, sandbox_id)  # SandboxNotFoundError, as a 404
        await asyncio.to_thread(self.mgr.destroy, sandbox_id)

    # --- background processes ------------------------------------------------------------
    def keep_process(self, sandbox_id: str, proc: AsyncProcess) -> None:
        table = self._procs.setdefault(sandbox_id, {})
        if len(table) >= MAX_PROCESSES:
            self._collect(table)
        if len(table) >= MAX_PROCESSES:
            raise BadRequestError(
                f"sandbox {sandbox_id} has {MAX_PROCESSES} background processes started "
                "through the daemon whose output nobody read; wait for some first")
        table[proc.pid] = proc

    def process(self, sandbox_id: str, pid: int) -> AsyncProcess:
        proc = self._procs.get(sandbox_id, {}).get(pid)
        if proc is None:
            raise NotFoundError(f"sandbox {sandbox_id} has no process {pid} started through "
                                "this daemon (or its output was already read to the end)")
        return proc

    def drop_process(self, sandbox_id: str, pid: int) -> None:
        self._procs.get(sandbox_id, {}).pop(pid, None)

    @staticmethod
    def _collect(table: dict[int, AsyncProcess]) -> None:
        for pid in [p for p, proc in table.items() if proc.result is not None]:
            del table[pid]

    async def close(self) -> None:
        """Disconnect from every sandbox (they keep running): the daemon is stopping."""
        await self.ports.close_all()
        for sid in list(self._open):
            await self.forget(sid)


def _usable(sb: AsyncSandbox) -> bool:
    """Still connected (a paused sandbox is: its operations say it is paused)."""
    client = sb._client
    return not sb._killed and client is not None and not client.broken


__all__ = ["LiveSandboxes"]
