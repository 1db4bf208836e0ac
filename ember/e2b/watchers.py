"""envd's directory watches (``filesystem.Filesystem``): the events of ember's
``files.watch`` as envd's JSON, the ``WatchDir`` server stream, and the watchers of the
polling trio (``CreateWatcher``, ``GetWatcherEvents``, ``RemoveWatcher``).

A watcher lives in the daemon: its events wait in its watch's bounded buffer
(:data:`ember.sdk.watch.MAX_PENDING_EVENTS`) until polled; one not polled for
:data:`IDLE_S`, or whose sandbox went, is dropped at the next call that looks.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ember.e2b.connect import ConnectError, end_stream, envelope
from ember.errors import EmberError
from ember.sdk.watch import MAX_PENDING_EVENTS, AsyncWatch, FsEvent

#: envd's ``EventType`` names for ember's event types.
EVENT_TYPES = {"create": "EVENT_TYPE_CREATE", "write": "EVENT_TYPE_WRITE",
               "remove": "EVENT_TYPE_REMOVE", "rename": "EVENT_TYPE_RENAME",
               "chmod": "EVENT_TYPE_CHMOD"}
#: Watchers one sandbox may have at once (each holds a guest watch).
MAX_WATCHERS = 16
#: A watcher not polled for this long is dropped.
IDLE_S = 600.0
LOST = (f"events were lost: the watch fell behind (over {MAX_PENDING_EVENTS} unread events, "
        "or the guest's inotify queue overflowed, or the tree holds more directories than "
        "a watch follows)")


def fs_event(event: FsEvent) -> dict[str, Any]:
    """envd's ``FilesystemEvent`` JSON."""
    return {"name": event.name, "type": EVENT_TYPES[event.type]}


def watch_options(msg: dict[str, Any], what: str) -> bool:
    """``recursive`` of a WatchDir or CreateWatcher request (the options ember cannot honour
    are refused)."""
    recursive = msg.get("recursive", False)
    if not isinstance(recursive, bool):
        raise ConnectError("invalid_argument", f"{what}: recursive must be a boolean")
    if msg.get("includeEntry") is True:
        raise ConnectError("unimplemented", f"{what}: includeEntry is not served by ember")
    return recursive


async def watch_stream(w: AsyncWatch, every: float,
                       deadline: float | None) -> AsyncIterator[bytes]:
    """WatchDir's answer: a start event, then a filesystem event per change, keep-alives
    while quiet; ended (the watch closed with it) when the client goes, the directory goes,
    events are lost, the sandbox goes or ``deadline`` (loop time) passes."""
    loop = asyncio.get_running_loop()
    try:
        yield envelope({"start": {}})
        while True:
            wait = every if deadline is None else min(every, deadline - loop.time())
            if wait <= 0:
                yield end_stream(ConnectError("deadline_exceeded",
                                              f"the watch of {w.path} reached its timeout"))
                return
            try:
                event = await asyncio.wait_for(anext(w), wait)
            except EmberError as err:  # before TimeoutError: some are both
                yield end_stream(ConnectError("unavailable", f"the watch of {w.path} ended: "
                                              f"{err}"))
                return
            except TimeoutError:
                if deadline is None or loop.time() < deadline:
                    yield envelope({"keepalive": {}})
                continue
            except StopAsyncIteration:
                yield end_stream()
                return
            if event.type == "overflow":
                yield end_stream(ConnectError("resource_exhausted", LOST))
                return
            yield envelope({"filesystem": fs_event(event)})
    finally:
        await w.close()


@dataclass
class Watcher:
    sandbox_id: str
    watch: AsyncWatch
    used: float = field(default_factory=time.monotonic)


class Watchers:
    """The polling trio's watchers, by id (ids are unguessable and bound to their sandbox)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Watcher] = {}

    async def sweep(self) -> None:
        """Drop the watchers idle too long, and those whose watch failed (their sandbox
        went)."""
        now = time.monotonic()
        for wid, w in list(self._by_id.items()):
            if now - w.used > IDLE_S or w.watch.error is not None:
                del self._by_id[wid]
                await w.watch.close()

    async def add(self, sandbox_id: str, watch: AsyncWatch) -> str:
        if sum(w.sandbox_id == sandbox_id for w in self._by_id.values()) >= MAX_WATCHERS:
            await watch.close()
            raise ConnectError("resource_exhausted", f"{MAX_WATCHERS} watchers are open in "
                               "this sandbox: remove one first")
        wid = secrets.token_urlsafe(12)
        self._by_id[wid] = Watcher(sandbox_id, watch)
        return wid

    def _get(self, sandbox_id: str, msg: dict[str, Any]) -> tuple[str, Watcher]:
        wid = msg.get("watcherId")
        w = self._by_id.get(wid) if isinstance(wid, str) else None
        if w is None or w.sandbox_id != sandbox_id:
            raise ConnectError("not_found", f"no watcher {str(wid)[:64]!r} in this sandbox")
        return str(wid), w

    async def events(self, sandbox_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        """The events since the last call (GetWatcherEventsResponse)."""
        wid, w = self._get(sandbox_id, msg)
        w.used = time.monotonic()
        await asyncio.sleep(0)  # let the watch's reader take what has arrived
        pending = w.watch.pending()
        if any(e.type == "overflow" for e in pending):
            raise ConnectError("resource_exhausted", f"{LOST}; the watcher goes on from here")
        if not pending and w.watch.done:
            del self._by_id[wid]
            await w.watch.close()
            if w.watch.error is not None:
                raise ConnectError("unavailable", f"the watch of {w.watch.path} ended: "
                                   f"{w.watch.error}")
            raise ConnectError("not_found", f"the watched directory {w.watch.path} is gone")
        return {"events": [fs_event(e) for e in pending]}

    async def remove(self, sandbox_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        wid, w = self._get(sandbox_id, msg)
        del self._by_id[wid]
        await w.watch.close()
        return {}


__all__ = ["EVENT_TYPES", "Watchers", "fs_event", "watch_options", "watch_stream"]
