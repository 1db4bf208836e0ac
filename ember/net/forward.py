"""Exposed ports: a TCP listener on the host (the daemon's) for each exposed guest port,
whose connections are carried to the guest from inside the sandbox's own network
namespace when it has a NIC, and by its agent (a connection to the guest's loopback,
``ember.runtime.guest_port``) when it has none. Nothing else reaches a guest: the host
table lets nothing new into a sandbox link, so an unexposed port is unreachable, and
exposing one needs no network at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ember.errors import BadRequestError, EmberError, NetworkError, SandboxNotFoundError
from ember.net.addressing import GUEST_IP, netns_name
from ember.net.nsutil import in_netns, netns_path

log = logging.getLogger("ember.net")
#: Ports one sandbox may expose at once, and connections one exposed port carries at once.
MAX_PORTS = 64
MAX_CONNECTIONS = 256
CONNECT_TIMEOUT_S = 10.0
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Exposed:
    sandbox_id: str
    port: int  # in the guest
    host: str
    host_port: int


class _Listener:
    def __init__(self, exposed: Exposed, server: asyncio.Server) -> None:
        self.exposed = exposed
        self.server = server
        self.active = 0


Wake = Callable[[str], Awaitable[None]]


class Carried(Protocol):
    """A connection to a guest port that the sandbox's agent carries."""

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self) -> None: ...

    async def aclose(self) -> None: ...


#: Opens a carried connection to (sandbox id, guest port), for sandboxes without a NIC.
Carrier = Callable[[str, int], Awaitable[Carried]]
#: How often idle sandboxes are looked for.
IDLE_CHECK_S = 0.5


class PortForwarder:
    """The exposed ports of one daemon, listening on ``bind`` (an address of this host).

    Scale to zero: a sandbox given an idle period (:meth:`set_idle_pause`) is paused (with
    ``pause``) once no connection to any of its exposed ports has been open, and no byte has
    passed, for that long; the next connection resumes it (``resume``) before it is carried
    on, so its client only sees a slower first byte.
    """

    def __init__(self, bind: str = "127.0.0.1", *, pause: Wake | None = None,
                 resume: Wake | None = None, carrier: Carrier | None = None) -> None:
        self.bind = bind
        self._carrier = carrier
        self._open: dict[tuple[str, int], _Listener] = {}
        self._pause, self._resume = pause, resume
        self._idle: dict[str, float] = {}  # sandbox -> seconds of idleness that pause it
        self._last: dict[str, float] = {}  # sandbox -> monotonic time of its last traffic
        self._paused: set[str] = set()  # paused by us (for idleness)
        self._locks: dict[str, asyncio.Lock] = {}
        self._watch: asyncio.Task[None] | None = None

    def set_idle_pause(self, sandbox_id: str, seconds: float | None) -> None:
        """Pause the sandbox after ``seconds`` without traffic on its exposed ports (None:
        never)."""
        if seconds is None:
            self._idle.pop(sandbox_id, None)
            return
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (
                1 <= seconds <= 7 * 86400):
            raise BadRequestError(f"idle pause must be 1 s .. 7 days, not {seconds!r}")
        if self._pause is None or self._resume is None:
            raise BadRequestError("this forwarder cannot pause sandboxes")
        self._idle[sandbox_id] = float(seconds)
        self._last[sandbox_id] = time.monotonic()
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_idle())

    def idle_pause(self, sandbox_id: str) -> float | None:
        return self._idle.get(sandbox_id)

    def adopt_paused(self, sandbox_id: str) -> None:
        """The sandbox, given an idle period, is found paused (by a daemon restarted while
        it idled): as if this forwarder had paused it, its next connection resumes it."""
        if sandbox_id in self._idle:
            self._paused.add(sandbox_id)

    def _active(self, sandbox_id: str) -> int:
        return sum(lst.active for (sid, _), lst in self._open.items() if sid == sandbox_id)

    async def _watch_idle(self) -> None:
        while self._idle:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.monotonic()
            for sid, limit in list(self._idle.items()):
                if not self.exposed(sid):  # no port left to wake it: never pause it
                    self._idle.pop(sid, None)
                    continue
                if sid in self._paused or self._active(sid) or \
                        now - self._last.get(sid, now) < limit:
                    continue
                async with self._lock(sid):
                    if sid in self._paused or self._active(sid):
                        continue
                    try:
                        assert self._pause is not None
                        await self._pause(sid)
                        self._paused.add(sid)
                        log.info("sandbox %s: paused after %.0f s without traffic on its "
                                 "exposed ports", sid, limit)
                    except Exception as err:  # gone, or paused by its owner: stop watching
                        log.info("sandbox %s: not paused for idleness: %s", sid, err)
                        self._idle.pop(sid, None)

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    async def _wake(self, sandbox_id: str) -> None:
        """Resume the sandbox if idleness paused it (its first connection waits for it)."""
        self._last[sandbox_id] = time.monotonic()
        if sandbox_id not in self._paused:
            return
        async with self._lock(sandbox_id):
            if sandbox_id in self._paused:
                assert self._resume is not None
                t0 = time.monotonic()
                try:
                    await self._resume(sandbox_id)
                    log.info("sandbox %s: resumed by a connection in %.0f ms", sandbox_id,
                             (time.monotonic() - t0) * 1000)
                except Exception as err:  # resumed (or destroyed) by its owner meanwhile
                    log.info("sandbox %s: not resumed for a connection: %s", sandbox_id, err)
                self._paused.discard(sandbox_id)
        self._last[sandbox_id] = time.monotonic()

    def find(self, sandbox_id: str, port: int) -> Exposed | None:
        listener = self._open.get((sandbox_id, port))
        return None if listener is None else listener.exposed

    def exposed(self, sandbox_id: str) -> list[Exposed]:
        return sorted((lst.exposed for (sid, _), lst in self._open.items()
                       if sid == sandbox_id), key=lambda e: e.port)

    async def expose(self, sandbox_id: str, port: int, host_port: int = 0) -> Exposed:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise BadRequestError(f"port must be 1..65535, not {port!r}")
        if (sandbox_id, port) in self._open:
            e = self._open[(sandbox_id, port)].exposed
            raise BadRequestError(f"port {port} of sandbox {sandbox_id} is exposed already, "
                                  f"at {e.host}:{e.host_port}")
        if len(self.exposed(sandbox_id)) >= MAX_PORTS:
            raise BadRequestError(f"sandbox {sandbox_id} exposes {MAX_PORTS} ports already")
        ns = netns_path(netns_name(sandbox_id))
        by_agent = not ns.exists()
        if by_agent and self._carrier is None:
            raise BadRequestError(
                f"sandbox {sandbox_id} has no network: exposed ports reach a guest through "
                "its NIC; create it with network={'internet': False} to serve ports without "
                "reaching anything")
        holder: list[_Listener] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if by_agent:
                await self._carry_by_agent(holder[0], reader, writer)
            else:
                await self._carry(holder[0], ns, reader, writer)

        try:
            server = await asyncio.start_server(handle, host=self.bind, port=host_port,
                                                reuse_address=True)
        except OSError as err:
            raise NetworkError(f"cannot listen on {self.bind}:{host_port} for port {port} of "
                               f"sandbox {sandbox_id}: {err.strerror}") from None
        bound = server.sockets[0].getsockname()
        exposed = Exposed(sandbox_id, port, str(bound[0]), int(bound[1]))
        listener = _Listener(exposed, server)
        holder.append(listener)
        self._open[(sandbox_id, port)] = listener
        log.info("sandbox %s: port %d exposed at %s:%d", sandbox_id, port, exposed.host,
                 exposed.host_port)
        return exposed

    async def close(self, sandbox_id: str, port: int | None = None) -> list[Exposed]:
        """Stop exposing ``port`` (every port of the sandbox if None); what was closed."""
        keys = [k for k in self._open if k[0] == sandbox_id and (port is None or k[1] == port)]
        if port is None:
            for table in (self._idle, self._last, self._locks):
                table.pop(sandbox_id, None)
            self._paused.discard(sandbox_id)
        if port is not None and not keys:
            raise BadRequestError(f"port {port} of sandbox {sandbox_id} is not exposed")
        closed = []
        for key in keys:
            listener = self._open.pop(key)
            listener.server.close()
            closed.append(listener.exposed)
        return closed

    async def close_all(self) -> None:
        for sid in {k[0] for k in self._open}:
            await self.close(sid)
        if self._watch is not None:
            self._watch.cancel()

    async def _carry(self, listener: _Listener, ns: Path, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        exposed = listener.exposed
        if listener.active >= MAX_CONNECTIONS or not ns.exists():
            writer.close()
            if not ns.exists():  # the sandbox is gone: so is its port
                with contextlib.suppress(BadRequestError):
                    await self.close(exposed.sandbox_id, exposed.port)
            return
        listener.active += 1
        sid = exposed.sandbox_id
        try:
            await self._wake(sid)
            sock = await asyncio.to_thread(in_netns, ns, lambda: socket.socket(
                socket.AF_INET, socket.SOCK_STREAM))
            sock.setblocking(False)
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
                    sock, (GUEST_IP, exposed.port)), CONNECT_TIMEOUT_S)  # every tier's guest
            except (OSError, TimeoutError):
                sock.close()
                return  # nothing listens there: the client sees its connection closed
            g_reader, g_writer = await asyncio.open_connection(sock=sock)

            def seen() -> None:
                self._last[sid] = time.monotonic()

            await asyncio.gather(_pipe(reader, g_writer, seen), _pipe(g_reader, writer, seen))
        except Exception as err:  # one connection's trouble never stops the listener
            log.debug("sandbox %s port %d: connection ended: %s", exposed.sandbox_id,
                      exposed.port, err)
        finally:
            listener.active -= 1
            self._last[sid] = time.monotonic()
            writer.close()


    async def _carry_by_agent(self, listener: _Listener, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        """A connection to a sandbox without a NIC: its agent carries it to the guest's
        loopback (so the guest's server must listen there, or on every address)."""
        exposed = listener.exposed
        sid = exposed.sandbox_id
        if listener.active >= MAX_CONNECTIONS:
            writer.close()
            return
        listener.active += 1
        try:
            await self._wake(sid)
            assert self._carrier is not None
            try:
                conn = await asyncio.wait_for(self._carrier(sid, exposed.port),
                                              CONNECT_TIMEOUT_S)
            except SandboxNotFoundError:  # the sandbox is gone: so is its port
                with contextlib.suppress(BadRequestError):
                    await self.close(sid, exposed.port)
                return
            except (EmberError, TimeoutError):
                return  # nothing listens there: the client sees its connection closed

            def seen() -> None:
                self._last[sid] = time.monotonic()

            try:
                await asyncio.gather(_to_guest(reader, conn, seen),
                                     _from_guest(conn, writer, seen))
            finally:
                await conn.aclose()
        except Exception as err:  # one connection's trouble never stops the listener
            log.debug("sandbox %s port %d: connection ended: %s", sid, exposed.port, err)
        finally:
            listener.active -= 1
            self._last[sid] = time.monotonic()
            writer.close()


async def _to_guest(src: asyncio.StreamReader, conn: Carried,
                    seen: Callable[[], None]) -> None:
    try:
        while data := await src.read(CHUNK):
            seen()
            await conn.write(data)
        await conn.write_eof()
    except (ConnectionError, OSError, EmberError):
        await conn.aclose()  # the other direction ends too


async def _from_guest(conn: Carried, dst: asyncio.StreamWriter,
                      seen: Callable[[], None]) -> None:
    try:
        while data := await conn.read():
            seen()
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError, EmberError):
        pass
    finally:
        if not dst.can_write_eof():
            dst.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                seen: Callable[[], None]) -> None:
    try:
        while data := await src.read(CHUNK):
            seen()
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        if not dst.can_write_eof():
            dst.close()
