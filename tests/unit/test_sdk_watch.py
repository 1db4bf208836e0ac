"""``files.watch``: the bounded buffer of :class:`AsyncWatch` (a consumer that stops reading
loses events, never the connection), and the watch end to end against the real agent
serving a socketpair (no VM)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ember.errors import BadRequestError, GuestError, GuestPathNotFoundError
from ember.runtime.agent_client import AgentClient
from ember.sdk import watch as W
from ember.sdk.files import AsyncFiles
from ember.sdk.watch import OVERFLOW, AsyncWatch, FsEvent, parse_fs_event

from .test_agent_client import run


def _watch(batches: list[list[FsEvent]], *, fail: bool = False) -> AsyncWatch:
    async def source() -> AsyncIterator[list[FsEvent]]:
        for b in batches:
            yield b
        if fail:
            raise GuestError("the sandbox went away")

    async def stop() -> None:
        return None

    return AsyncWatch("/w", source(), stop)


def test_events_come_in_order_and_the_end_ends_iteration() -> None:
    async def body() -> None:
        w = _watch([[FsEvent("a", "create")], [FsEvent("a", "write"), FsEvent("a", "remove")]])
        assert [e async for e in w] == [FsEvent("a", "create"), FsEvent("a", "write"),
                                        FsEvent("a", "remove")]
        assert w.done and w.error is None

    asyncio.run(body())


def test_a_consumer_that_falls_behind_sees_overflow_where_events_were_lost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W, "MAX_PENDING_EVENTS", 4)

    async def body() -> None:
        w = _watch([[FsEvent(str(i), "create") for i in range(10)], [FsEvent("late", "write")]])
        await asyncio.sleep(0.05)  # the pump has read everything; nobody took any
        # three kept (room is left for the mark), the rest lost: "late" too, the buffer
        # being still full when it came
        assert [e async for e in w] == [FsEvent("0", "create"), FsEvent("1", "create"),
                                        FsEvent("2", "create"), OVERFLOW]

    asyncio.run(body())


def test_the_buffer_is_bounded_in_bytes_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W, "MAX_PENDING_BYTES", 100)

    async def body() -> None:
        w = _watch([[FsEvent("x" * 60, "create"), FsEvent("y" * 60, "create"),
                     FsEvent("z", "write")]])
        await asyncio.sleep(0.01)
        assert [e async for e in w] == [FsEvent("x" * 60, "create"), OVERFLOW,
                                        FsEvent("z", "write")]

    asyncio.run(body())


def test_after_a_loss_the_mark_comes_before_the_next_events(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W, "MAX_PENDING_EVENTS", 3)

    async def body() -> None:
        gate = asyncio.Event()

        async def source() -> AsyncIterator[list[FsEvent]]:
            yield [FsEvent(str(i), "create") for i in range(5)]
            await gate.wait()
            yield [FsEvent("late", "write")]

        async def stop() -> None:
            return None

        w = AsyncWatch("/w", source(), stop)
        await asyncio.sleep(0.01)
        assert [await anext(w), await anext(w)] == [FsEvent("0", "create"),
                                                    FsEvent("1", "create")]
        gate.set()
        assert [e async for e in w] == [OVERFLOW, FsEvent("late", "write")]

    asyncio.run(body())


def test_a_watch_that_ends_by_itself_lets_go_of_its_stream_at_once() -> None:
    async def body() -> None:
        stopped: list[bool] = []

        async def source() -> AsyncIterator[list[FsEvent]]:
            yield [FsEvent("a", "create")]
            raise GuestError("a reply that broke the protocol")

        async def stop() -> None:
            stopped.append(True)

        w = AsyncWatch("/w", source(), stop)
        await asyncio.sleep(0.01)
        assert stopped == [True]  # before anyone reads or closes
        assert await anext(w) == FsEvent("a", "create")
        with pytest.raises(GuestError):
            await anext(w)
        await w.close()
        assert stopped == [True]

    asyncio.run(body())


def test_guest_overflow_is_passed_on_and_errors_end_iteration() -> None:
    async def body() -> None:
        w = _watch([[OVERFLOW, FsEvent("x", "chmod")]], fail=True)
        assert await anext(w) == OVERFLOW
        assert await anext(w) == FsEvent("x", "chmod")
        with pytest.raises(GuestError, match="went away"):
            await anext(w)
        assert isinstance(w.error, GuestError)

    asyncio.run(body())


def test_close_stops_a_waiting_consumer() -> None:
    async def body() -> None:
        gate = asyncio.Event()

        async def source() -> AsyncIterator[list[FsEvent]]:
            await gate.wait()
            yield []

        stopped: list[bool] = []

        async def stop() -> None:
            stopped.append(True)

        w = AsyncWatch("/w", source(), stop)
        waiter = asyncio.create_task(anext(w, None))
        await asyncio.sleep(0.01)
        await w.close()
        assert await waiter is None and stopped == [True]
        await w.close()  # twice is fine
        assert stopped == [True]

    asyncio.run(body())


def test_parse_fs_event_checks_shapes() -> None:
    assert parse_fs_event({"event": "fs", "name": "a/b", "type": "rename"}) == FsEvent(
        "a/b", "rename")
    assert parse_fs_event({"event": "fs", "name": "", "type": "overflow"}) == OVERFLOW
    for bad in ({"name": 3, "type": "create"}, {"name": "a", "type": "explode"}, {}):
        with pytest.raises(Exception, match="not a file system event"):
            parse_fs_event(bad)


# --- through the agent --------------------------------------------------------------------------
async def _next_names(w: AsyncWatch, want: set[tuple[str, str]]) -> list[FsEvent]:
    seen: list[FsEvent] = []
    async with asyncio.timeout(15):
        async for ev in w:
            seen.append(ev)
            if want <= {(e.name, e.type) for e in seen}:
                return seen
    raise AssertionError(f"the watch ended early: {seen}")


def test_files_watch_through_the_agent(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        files = AsyncFiles(lambda: c)
        with pytest.raises(GuestPathNotFoundError):
            await files.watch(str(tmp_path / "missing"))
        with pytest.raises(BadRequestError):
            await files.watch("relative/path")
        async with await files.watch(str(tmp_path), recursive=True) as w:
            await files.write(str(tmp_path / "f.txt"), b"hi")
            await files.mkdir(str(tmp_path / "d" / "e"))
            await files.write(str(tmp_path / "d" / "e" / "g"), b"")
            await files.rename(str(tmp_path / "f.txt"), str(tmp_path / "h.txt"))
            await files.remove(str(tmp_path / "h.txt"))
            await _next_names(w, {("f.txt", "create"), ("d", "create"), ("d/e/g", "create"),
                                  ("f.txt", "rename"), ("h.txt", "create"),
                                  ("h.txt", "remove")})
        # the watch is gone; the connection serves on
        assert (await c.request({"op": "ping"}))["op"] == "pong"
        gone = tmp_path / "gone"
        gone.mkdir()
        w = await files.watch(str(gone))
        os.rmdir(gone)
        assert [e async for e in w] == []  # its directory went: the iteration ends
        await w.close()

    run(body)


def test_the_blocking_face() -> None:
    from ember.sdk.portal import portal
    from ember.sdk.watch import Watch

    async def make() -> AsyncWatch:
        return _watch([[FsEvent("a", "create"), FsEvent("b", "write")]])

    with Watch(portal().call(make())) as w:
        assert w.path == "/w"
        assert list(w) == [FsEvent("a", "create"), FsEvent("b", "write")]
        assert w.done and w.error is None and w.pending() == []
