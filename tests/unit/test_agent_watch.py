"""The agent's ``watch`` (inotify): the pure parser of ``struct inotify_event`` and the mask
mapping, fed hostile bytes; then real watches against an agent serving a socketpair."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.agent import ops_watch
from ember.agent.ops_watch import (
    EVENT,
    IN_ATTRIB,
    IN_CREATE,
    IN_DELETE,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    event_type,
    parse_events,
)
from ember.protocol import check_reply

from .test_agent_harness import AgentHarness


def raw_event(wd: int, mask: int, name: bytes = b"", cookie: int = 0, pad: int = 0) -> bytes:
    padded = name + b"\0" * pad if name or pad else b""
    return EVENT.pack(wd, mask, cookie, len(padded)) + padded


# --- the pure parts ---------------------------------------------------------------------------
def test_parse_events_reads_names_without_their_padding() -> None:
    buf = (raw_event(1, IN_CREATE, b"a.txt", pad=11) + raw_event(2, IN_DELETE)
           + raw_event(-1, 0x4000) + raw_event(3, IN_MOVED_TO, b"b", cookie=7, pad=3))
    assert parse_events(buf) == [(1, IN_CREATE, 0, b"a.txt"), (2, IN_DELETE, 0, b""),
                                 (-1, 0x4000, 0, b""), (3, IN_MOVED_TO, 7, b"b")]
    assert parse_events(b"") == []


def test_parse_events_refuses_truncated_input() -> None:
    whole = raw_event(1, IN_CREATE, b"name", pad=4)
    for cut in range(1, len(whole)):
        with pytest.raises(ValueError):
            parse_events(whole[:cut])
    with pytest.raises(ValueError, match="runs past"):
        parse_events(EVENT.pack(1, IN_CREATE, 0, 2**32 - 1) + b"x" * 32)


@given(st.binary(max_size=512))
def test_parse_events_on_any_bytes_returns_bounded_events_or_value_error(data: bytes) -> None:
    try:
        events = parse_events(data)
    except ValueError:
        return
    assert len(events) <= len(data) // EVENT.size
    assert sum(len(name) for *_, name in events) <= len(data)


@given(st.lists(st.tuples(st.integers(-1, 2**31 - 1), st.integers(0, 2**32 - 1),
                          st.binary(max_size=64).map(lambda b: b.replace(b"\0", b"")),
                          st.integers(0, 16)), max_size=20))
def test_parse_events_round_trips(events: list[tuple[int, int, bytes, int]]) -> None:
    buf = b"".join(raw_event(wd, mask, name, pad=pad) for wd, mask, name, pad in events)
    assert parse_events(buf) == [(wd, mask, 0, name) for wd, mask, name, _ in events]


def test_event_types_follow_fsnotify() -> None:
    assert event_type(IN_CREATE) == event_type(IN_MOVED_TO) == "create"
    assert event_type(IN_CREATE | IN_ISDIR) == "create"
    assert event_type(IN_DELETE) == "remove"
    assert event_type(IN_MOVED_FROM) == "rename"
    assert event_type(IN_MODIFY) == "write"
    assert event_type(IN_ATTRIB) == "chmod"
    assert event_type(0x8000) is None  # IN_IGNORED


def test_event_struct_is_the_kernels() -> None:
    assert EVENT.size == 16 == struct.calcsize("iIII")


# --- against the agent ------------------------------------------------------------------------
def start(agent: AgentHarness, path: Path | str, **fields: Any) -> int:
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "watch", "path": str(path), **fields})
    first = agent.next_msg(stream)
    assert first["op"] == "watching", first
    return stream


def events_until(agent: AgentHarness, stream: int, want: list[tuple[str, str]],
                 timeout: float = 10.0) -> list[tuple[str, str]]:
    """Events of the watch until every one of ``want`` was seen (in that order)."""
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while True:
        left = [w for w in want if w not in seen]
        if not left and _in_order(seen, want):
            return seen
        msg = agent.next_msg(stream, max(0.1, deadline - time.monotonic()))
        check_reply(stream, msg)
        assert msg["op"] == "fs_events", msg
        seen += [(e["name"], e["type"]) for e in msg["events"]]


def _in_order(seen: list[tuple[str, str]], want: list[tuple[str, str]]) -> bool:
    it = iter(seen)
    return all(w in it for w in want)


def test_watch_reports_create_write_chmod_rename_remove(agent: AgentHarness,
                                                        tmp_path: Path) -> None:
    stream = start(agent, tmp_path)
    (tmp_path / "a.txt").write_text("hello")
    os.chmod(tmp_path / "a.txt", 0o600)
    os.rename(tmp_path / "a.txt", tmp_path / "b.txt")
    (tmp_path / "b.txt").unlink()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep").write_text("not reported: not recursive")
    seen = events_until(agent, stream, [
        ("a.txt", "create"), ("a.txt", "write"), ("a.txt", "chmod"), ("a.txt", "rename"),
        ("b.txt", "create"), ("b.txt", "remove"), ("sub", "create")])
    agent.send_msg(stream, {"op": "abort"})
    assert all(not name.startswith("sub/") for name, _ in seen)
    assert agent.request({"op": "ping"}) == {"op": "pong"}  # still serving


def test_recursive_watch_follows_new_and_moved_directories(agent: AgentHarness,
                                                           tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    stream = start(agent, tmp_path, recursive=True)
    (tmp_path / "old" / "f").write_text("x")
    events_until(agent, stream, [("old/f", "create"), ("old/f", "write")])
    (tmp_path / "new" / "inner").mkdir(parents=True)
    (tmp_path / "new" / "inner" / "g").write_text("y")
    events_until(agent, stream, [("new", "create"), ("new/inner/g", "create")])
    os.rename(tmp_path / "new", tmp_path / "moved")
    events_until(agent, stream, [("new", "rename"), ("moved", "create")])
    (tmp_path / "moved" / "inner" / "h").write_text("z")
    seen = events_until(agent, stream, [("moved/inner/h", "create")])
    assert not any(name.startswith("new/inner/h") for name, _ in seen)
    agent.send_msg(stream, {"op": "abort"})


def test_watching_a_missing_path_or_a_file_fails(agent: AgentHarness, tmp_path: Path) -> None:
    missing = agent.request({"op": "watch", "path": str(tmp_path / "nope")})
    assert missing["op"] == "error" and missing["kind"] == "not_found"
    (tmp_path / "f").write_text("")
    afile = agent.request({"op": "watch", "path": str(tmp_path / "f")})
    assert afile["op"] == "error" and afile["kind"] == "not_a_directory"


def test_the_watch_ends_when_its_directory_goes(agent: AgentHarness, tmp_path: Path) -> None:
    target = tmp_path / "w"
    target.mkdir()
    stream = start(agent, target)
    target.rmdir()
    final = agent.collect(stream)[-1].msg()
    assert final == {"op": "eof"}


def test_watches_are_bounded(agent: AgentHarness, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    slots = threading.BoundedSemaphore(2)
    monkeypatch.setattr(ops_watch, "_slots", slots)
    streams = [start(agent, tmp_path) for _ in range(2)]
    refused = agent.request({"op": "watch", "path": str(tmp_path)})
    assert refused["op"] == "error" and "too many directory watches" in refused["message"]
    agent.send_msg(streams[0], {"op": "abort"})
    deadline = time.monotonic() + 10
    while True:  # the slot comes back once the watch's thread has ended
        stream = agent.new_stream()
        agent.send_msg(stream, {"op": "watch", "path": str(tmp_path)})
        msg = agent.next_msg(stream)
        if msg["op"] == "watching":
            break
        assert time.monotonic() < deadline, msg
        time.sleep(0.05)
    # End the two watches still open and wait until their slots are back: they were taken
    # from this test's semaphore, which the module must have again when they give them back.
    for open_one in (streams[1], stream):
        agent.send_msg(open_one, {"op": "abort"})
    for _ in range(2):
        assert slots.acquire(timeout=10), "the watches did not give their slots back"


def test_a_huge_tree_is_watched_up_to_the_bound_and_says_overflow(
        agent: AgentHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_watch, "MAX_DIRS", 5)
    for i in range(12):
        (tmp_path / f"d{i}").mkdir()
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "watch", "path": str(tmp_path), "recursive": True})
    first = agent.next_msg(stream)
    assert first == {"op": "watching", "watches": 5}
    (tmp_path / "late").write_text("")
    msg = agent.next_msg(stream)
    assert msg["overflow"] is True  # the walk stopped at the bound, and says so
    events_until(agent, stream, [("late", "create")])
    agent.send_msg(stream, {"op": "abort"})


def test_a_wide_directory_is_scanned_up_to_the_bound(
        agent: AgentHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_watch, "MAX_SCAN", 10)
    stream = start(agent, tmp_path, recursive=True)
    wide = tmp_path / "wide-tmp"
    wide.mkdir()
    for i in range(30):
        (wide / f"f{i}").write_text("")
    os.rename(wide, tmp_path / "wide")  # moved in whole: its entries are walked
    overflow = False
    created: set[str] = set()
    deadline = time.monotonic() + 10
    while not (overflow and "wide" in created) and time.monotonic() < deadline:
        msg = agent.next_msg(stream)
        overflow = overflow or msg.get("overflow") is True
        created |= {e["name"] for e in msg["events"] if e["type"] == "create"}
    assert overflow and "wide" in created
    assert len([n for n in created if n.startswith("wide/")]) <= 10
    agent.send_msg(stream, {"op": "abort"})


def test_a_new_session_stops_the_watches_of_the_last(tmp_path: Path) -> None:
    harness = AgentHarness()
    try:
        harness.handshake(1)
        start(harness, tmp_path)
        harness.handshake(2)  # a new hello: the old session's streams are gone
        (tmp_path / "x").write_text("")
        assert harness.request({"op": "ping"}) == {"op": "pong"}
        time.sleep(0.3)
        assert not any(harness.queues[s] for s in list(harness.queues) if s != 0)
    finally:
        harness.close()
