"""envd's watches without a VM: what WatchDir and the watcher trio answer, read back with the
``e2b`` SDK's own generated messages (so the JSON names and enum strings are the SDK's)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from ember.e2b.connect import HEADER, ConnectError
from ember.e2b.watchers import MAX_WATCHERS, Watchers, fs_event, watch_options, watch_stream
from ember.errors import EmberTimeoutError, GuestError
from ember.sdk.watch import OVERFLOW, AsyncWatch, FsEvent

pb = pytest.importorskip("e2b.envd.filesystem.filesystem_pb")


def fake_watch(batches: list[list[FsEvent]], *, hold: asyncio.Event | None = None,
               fail: bool | str = False) -> tuple[AsyncWatch, list[bool]]:
    closed: list[bool] = []

    async def source() -> AsyncIterator[list[FsEvent]]:
        for b in batches:
            yield b
        if hold is not None:
            await hold.wait()
        if fail == "timeout":  # an EmberTimeoutError is a TimeoutError too
            raise EmberTimeoutError("the guest agent stopped answering")
        if fail:
            raise GuestError("the sandbox went away")

    async def stop() -> None:
        closed.append(True)

    return AsyncWatch("/w", source(), stop), closed


def envelopes(data: bytes) -> list[tuple[int, dict[str, object]]]:
    out = []
    while data:
        flags, length = HEADER.unpack_from(data)
        out.append((flags, json.loads(data[HEADER.size:HEADER.size + length])))
        data = data[HEADER.size + length:]
    return out


async def collect(stream: AsyncIterator[bytes]) -> list[tuple[int, dict[str, object]]]:
    return envelopes(b"".join([c async for c in stream]))


def test_events_are_the_sdks_filesystem_events() -> None:
    for kind, name in (("create", "CREATE"), ("write", "WRITE"), ("remove", "REMOVE"),
                       ("rename", "RENAME"), ("chmod", "CHMOD")):
        ev = pb.FilesystemEvent.from_json(json.dumps(fs_event(FsEvent("d/f", kind))))  # type: ignore[arg-type]
        assert ev.name == "d/f" and ev.type == getattr(pb.EventType, name)


def test_options() -> None:
    assert watch_options({"path": "/a"}, "W") is False
    assert watch_options({"recursive": True}, "W") is True
    with pytest.raises(ConnectError) as err:
        watch_options({"recursive": "yes"}, "W")
    assert err.value.code == "invalid_argument"
    with pytest.raises(ConnectError) as err:
        watch_options({"includeEntry": True}, "W")
    assert err.value.code == "unimplemented"


def test_watch_dir_stream_start_events_keepalive_end() -> None:
    async def body() -> None:
        hold = asyncio.Event()
        w, closed = fake_watch([[FsEvent("a", "create")]], hold=hold)
        asyncio.get_running_loop().call_later(0.3, hold.set)
        got = await collect(watch_stream(w, 0.1, None))
        parsed = [pb.WatchDirResponse.from_json(json.dumps(m)) for f, m in got if f == 0]
        assert parsed[0].event.field == "start"
        assert parsed[1].event.field == "filesystem" and parsed[1].event.value.name == "a"
        assert {p.event.field for p in parsed[2:]} == {"keepalive"}
        assert got[-1] == (2, {})  # the directory went: a clean end
        assert closed == [True]

    asyncio.run(body())


@pytest.mark.parametrize(("batches", "fail", "code"), [
    ([[OVERFLOW]], False, "resource_exhausted"),
    ([], True, "unavailable"),
    ([], "timeout", "unavailable"),
])
def test_watch_dir_stream_ends_with_an_error(batches: list[list[FsEvent]], fail: bool | str,
                                             code: str) -> None:
    async def body() -> None:
        w, closed = fake_watch(batches, fail=fail)
        got = await collect(watch_stream(w, 5, None))
        flags, last = got[-1]
        assert flags == 2 and last["error"]["code"] == code  # type: ignore[index]
        assert closed == [True]

    asyncio.run(body())


def test_watch_dir_stream_has_a_deadline() -> None:
    async def body() -> None:
        w, _ = fake_watch([], hold=asyncio.Event())
        loop = asyncio.get_running_loop()
        got = await collect(watch_stream(w, 5, loop.time() + 0.2))
        assert got[-1][1]["error"]["code"] == "deadline_exceeded"  # type: ignore[index]

    asyncio.run(body())


def test_watchers_poll_remove_and_stay_in_their_sandbox() -> None:
    async def body() -> None:
        ws = Watchers()
        hold = asyncio.Event()
        w, closed = fake_watch([[FsEvent("a", "create"), FsEvent("a", "write")]], hold=hold)
        wid = await ws.add("sb1", w)
        answer = await ws.events("sb1", {"watcherId": wid})
        parsed = pb.GetWatcherEventsResponse.from_json(json.dumps(answer))
        assert [(e.name, e.type) for e in parsed.events] == [
            ("a", pb.EventType.CREATE), ("a", pb.EventType.WRITE)]
        assert await ws.events("sb1", {"watcherId": wid}) == {"events": []}
        with pytest.raises(ConnectError) as err:
            await ws.events("sb2", {"watcherId": wid})  # another sandbox's token
        assert err.value.code == "not_found"
        assert await ws.remove("sb1", {"watcherId": wid}) == {}
        assert closed == [True]
        with pytest.raises(ConnectError):
            await ws.events("sb1", {"watcherId": wid})

    asyncio.run(body())


def test_watchers_are_bounded_and_report_losses_and_ends() -> None:
    async def body() -> None:
        ws = Watchers()
        ids = [await ws.add("sb", fake_watch([], hold=asyncio.Event())[0])
               for _ in range(MAX_WATCHERS)]
        extra, closed = fake_watch([])
        with pytest.raises(ConnectError) as err:
            await ws.add("sb", extra)
        assert err.value.code == "resource_exhausted" and closed == [True]
        await ws.add("other", fake_watch([], hold=asyncio.Event())[0])  # per sandbox
        for wid in ids:
            await ws.remove("sb", {"watcherId": wid})

        lossy = await ws.add("sb", fake_watch([[FsEvent("a", "create"), OVERFLOW]],
                                              hold=asyncio.Event())[0])
        with pytest.raises(ConnectError) as err:
            await ws.events("sb", {"watcherId": lossy})
        assert err.value.code == "resource_exhausted"
        assert await ws.events("sb", {"watcherId": lossy}) == {"events": []}  # goes on

        gone = await ws.add("sb", fake_watch([[FsEvent("x", "remove")]])[0])
        await asyncio.sleep(0.01)
        assert len((await ws.events("sb", {"watcherId": gone}))["events"]) == 1
        with pytest.raises(ConnectError) as err:
            await ws.events("sb", {"watcherId": gone})
        assert err.value.code == "not_found" and "is gone" in err.value.message

        dead, dead_closed = fake_watch([], fail=True)
        dead_id = await ws.add("sb", dead)
        await asyncio.sleep(0.01)
        await ws.sweep()  # its sandbox went: dropped
        assert dead_closed == [True]
        with pytest.raises(ConnectError):
            await ws.events("sb", {"watcherId": dead_id})

    asyncio.run(body())
