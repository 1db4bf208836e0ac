"""``sandbox.files.watch(path)``: a directory's changes as they happen (inotify in the guest).

A watch is read by a task of its own into a bounded buffer, so that a consumer that stops
reading never stalls the sandbox's agent connection (which every other operation shares):
past :data:`MAX_PENDING_EVENTS` unread events, the newest are dropped and the consumer
finds an ``overflow`` event where they were.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import httpx

from ember.errors import EmberError, GuestError, ProtocolError
from ember.runtime.agent_client import AgentClient, error_from_reply, reply_of
from ember.sdk import wire
from ember.sdk.portal import portal

#: Events held for a consumer that is not reading; beyond, events are lost (``overflow``).
MAX_PENDING_EVENTS = 10_000
#: ... and the most their names may hold (a guest chooses them: up to 64 KiB each).
MAX_PENDING_BYTES = 8 << 20
#: How long the guest has to set a watch up (a recursive one walks its tree first).
START_TIMEOUT_S = 120.0

FsEventType = Literal["create", "write", "remove", "rename", "chmod", "overflow"]
_TYPES = frozenset({"create", "write", "remove", "rename", "chmod"})


@dataclass(frozen=True)
class FsEvent:
    """One change below a watched directory: ``name`` is relative to it (``"a/b.txt"``).

    ``type`` is ``create`` (also the new name of a rename), ``write``, ``remove``,
    ``rename`` (the old name), ``chmod``, or ``overflow``: events were lost here (the
    guest's queue overflowed, the watch reached its bound of directories, or the consumer
    fell :data:`MAX_PENDING_EVENTS` behind); ``name`` is then empty.
    """

    name: str
    type: FsEventType


OVERFLOW = FsEvent("", "overflow")
Batch = list[FsEvent]


class AsyncWatch:
    """A running watch: ``async for event in watch``; :meth:`close` ends it (so does
    leaving ``async with``). Iteration ends when the watched directory goes away, and
    raises if the sandbox goes."""

    def __init__(self, path: str, source: AsyncIterator[Batch],
                 stop: Callable[[], Awaitable[None]]) -> None:
        self.path = path
        self._source = source
        self._stop = stop
        self._queue: collections.deque[FsEvent] = collections.deque()
        self._bytes = 0  # of the names queued
        self._lost = False
        self._done = False
        self._closed = False
        self._stopped = False
        self._error: EmberError | None = None
        self._wake = asyncio.Event()
        self._pump = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for batch in self._source:
                for event in batch:
                    self._push(event)
                self._wake.set()
        except EmberError as err:
            self._error = err
        finally:
            self._done = True
            self._wake.set()
        # ended by itself (the directory went, or an error): let go of its stream at once,
        # so that nothing more the guest sends for it can wait on this reader
        await self._stop_once()

    async def _stop_once(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self._stop()

    def _push(self, event: FsEvent) -> None:
        if event.type == "overflow":
            self._lost = True
            return
        if (len(self._queue) >= MAX_PENDING_EVENTS - 1  # room for the overflow mark
                or self._bytes + len(event.name) > MAX_PENDING_BYTES):
            self._lost = True
            return
        if self._lost:
            self._queue.append(OVERFLOW)
            self._lost = False
        self._queue.append(event)
        self._bytes += len(event.name)

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> FsEvent:
        while True:
            if self._queue:
                event = self._queue.popleft()
                self._bytes -= len(event.name)
                return event
            if self._lost:
                self._lost = False
                return OVERFLOW
            if self._done or self._closed:
                if self._error is not None and not self._closed:
                    raise self._error
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    def pending(self) -> list[FsEvent]:
        """The events received and not yet taken (taken now), without waiting."""
        out = list(self._queue)
        self._queue.clear()
        self._bytes = 0
        if self._lost:
            self._lost = False
            out.append(OVERFLOW)
        return out

    @property
    def done(self) -> bool:
        """The watch ended (closed, its directory gone, or its sandbox)."""
        return self._done or self._closed

    @property
    def error(self) -> EmberError | None:
        """What ended the watch, if it was not a close or its directory going away."""
        return self._error

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._pump.cancel()
        with contextlib.suppress(BaseException):
            await self._pump
        await self._stop_once()

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


class Watch:
    """The blocking face of :class:`AsyncWatch`: ``for event in watch``, :meth:`close`,
    ``with``."""

    def __init__(self, inner: AsyncWatch) -> None:
        self._inner = inner
        self.path = inner.path

    def __iter__(self) -> Iterator[FsEvent]:
        return portal().iterate(self._inner)

    def pending(self) -> list[FsEvent]:
        """The events received and not yet taken (taken now), without waiting."""
        return portal().call(self._pending())

    async def _pending(self) -> list[FsEvent]:
        return self._inner.pending()

    @property
    def done(self) -> bool:
        return self._inner.done

    @property
    def error(self) -> EmberError | None:
        return self._inner.error

    def close(self) -> None:
        portal().call(self._inner.close())

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --- the guest agent's watch ------------------------------------------------------------------
async def watch_agent(client: AgentClient, path: str, recursive: bool) -> AsyncWatch:
    """A watch over the agent connection ``client``; errors (a missing directory) are
    raised here."""
    sid = client.open_stream()
    what = f"watch path {path!r}"
    try:
        await client.send_msg(sid, {"op": "watch", "path": path, "recursive": recursive})
        first = reply_of(sid, await client.next_frame(sid, START_TIMEOUT_S))
        if first["op"] == "error":
            raise error_from_reply(first, what)
        if first["op"] != "watching":
            raise ProtocolError(f"expected 'watching' from the agent, got {first['op']!r}")
    except BaseException:
        client.close_stream(sid)
        raise

    async def source() -> AsyncIterator[Batch]:
        while True:
            msg = reply_of(sid, await client.next_frame(sid, None))
            if msg["op"] == "fs_events":
                batch = [FsEvent(str(e["name"]), e["type"]) for e in msg["events"]]
                yield ([OVERFLOW] if msg.get("overflow") else []) + batch
            elif msg["op"] == "eof":
                return
            elif msg["op"] == "error":
                raise error_from_reply(msg, what)
            else:
                raise ProtocolError(f"unexpected {msg['op']!r} in a watch")

    async def stop() -> None:
        with contextlib.suppress(EmberError):
            await client.send_msg(sid, {"op": "abort"})
        client.close_stream(sid)

    return AsyncWatch(path, source(), stop)


# --- the daemon's watch (NDJSON) ---------------------------------------------------------------
def event_json(event: FsEvent) -> dict[str, Any]:
    return {"event": "fs", "name": event.name, "type": event.type}


def parse_fs_event(ev: dict[str, Any]) -> FsEvent:
    name, kind = ev.get("name"), ev.get("type")
    if not isinstance(name, str) or (kind not in _TYPES and kind != "overflow"):
        raise ProtocolError(f"not a file system event: {str(ev)[:100]}")
    return OVERFLOW if kind == "overflow" else FsEvent(name, kind)


async def watch_response(path: str, response: httpx.Response) -> AsyncWatch:
    """A watch read from the daemon's NDJSON answer (its ``watching`` event first)."""
    lines = response.aiter_lines()

    async def events() -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in lines:
                if line:
                    ev = wire.parse_event(line.encode())
                    if ev["event"] == "error":
                        raise wire.error_for_event(ev)
                    yield ev
        except httpx.HTTPError as err:
            raise GuestError(f"the daemon's watch of {path} broke off: {err}") from None

    stream = events()
    try:
        first = await anext(stream, None)
        if first is None or first["event"] != "watching":
            raise ProtocolError(f"the daemon's watch began with {json.dumps(first)[:100]}")
    except BaseException:
        await response.aclose()
        raise

    async def source() -> AsyncIterator[Batch]:
        async for ev in stream:
            if ev["event"] == "fs":
                yield [parse_fs_event(ev)]
            elif ev["event"] == "end":
                return
        raise GuestError(f"the daemon ended the watch of {path} without saying why")

    async def stop() -> None:
        await response.aclose()

    return AsyncWatch(path, source(), stop)


__all__ = ["MAX_PENDING_EVENTS", "AsyncWatch", "FsEvent", "Watch", "event_json",
           "parse_fs_event", "watch_agent", "watch_response"]
