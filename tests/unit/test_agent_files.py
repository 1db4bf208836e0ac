"""File operations against an agent serving a socketpair (no VM)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from ember.agent.errors import ERRNO_KINDS
from ember.protocol import MAX_DATA_PAYLOAD, Kind

from .test_agent_harness import AgentHarness


def write(agent: AgentHarness, path: Path | str, data: bytes, **fields: Any) -> dict[str, Any]:
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "write", "path": str(path), **fields})
    agent.send_data(Kind.FILEDATA, stream, data)
    agent.send_msg(stream, {"op": "eof"})
    return agent.collect(stream)[-1].msg()


def read(agent: AgentHarness, path: Path | str) -> tuple[dict[str, Any], bytes, list[int]]:
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "read", "path": str(path)})
    frames = agent.collect(stream)
    data = [f.payload for f in frames if f.kind is Kind.FILEDATA]
    return frames[0].msg(), b"".join(data), [len(d) for d in data]


def test_write_then_read_3_mib(agent: AgentHarness, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    target = tmp_path / "big.bin"
    assert write(agent, target, data) == {"op": "ok", "size": len(data)}
    assert target.read_bytes() == data
    header, back, sizes = read(agent, target)
    assert header == {"op": "file", "size": len(data), "mode": 0o644}
    assert back == data
    assert max(sizes) <= MAX_DATA_PAYLOAD and len(sizes) >= 12


def test_write_mode_append_and_truncate(agent: AgentHarness, tmp_path: Path) -> None:
    target = tmp_path / "f"
    assert write(agent, target, b"one", mode=0o600)["size"] == 3
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    write(agent, target, b"two", append=True)
    assert target.read_bytes() == b"onetwo"
    write(agent, target, b"3")
    assert target.read_bytes() == b"3"
    write(agent, target, b"", mode=0o755)
    assert target.read_bytes() == b"" and stat.S_IMODE(target.stat().st_mode) == 0o755


def test_write_errors_discard_the_data(agent: AgentHarness, tmp_path: Path) -> None:
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "write", "path": str(tmp_path / "no" / "dir")})
    agent.send_data(Kind.FILEDATA, stream, b"x" * 1000)
    agent.send_msg(stream, {"op": "eof"})
    reply = agent.next_msg(stream)
    assert reply["op"] == "error" and reply["kind"] == "not_found"
    assert agent.request({"op": "ping"}) == {"op": "pong"}  # the eof produced no reply
    assert not agent.queues[stream]
    assert write(agent, tmp_path, b"x")["kind"] == "is_a_directory"


def test_filedata_for_unknown_stream(agent: AgentHarness) -> None:
    agent.send_data(Kind.FILEDATA, 77, b"stray")
    agent.send_data(Kind.FILEDATA, 77, b"more")
    reply = agent.next_msg(77)
    assert reply["op"] == "error" and reply["kind"] == "bad_request"
    agent.send_msg(77, {"op": "eof"})
    assert agent.request({"op": "ping"}) == {"op": "pong"}
    assert not agent.queues[77]  # one error only, and the eof was absorbed


def test_eof_without_write(agent: AgentHarness) -> None:
    agent.send_msg(5, {"op": "eof"})
    assert agent.next_msg(5)["kind"] == "bad_request"


def test_read_errors(agent: AgentHarness, tmp_path: Path) -> None:
    assert read(agent, tmp_path / "absent")[0]["kind"] == "not_found"
    assert read(agent, tmp_path)[0]["kind"] == "is_a_directory"
    assert read(agent, "/dev/null")[0]["kind"] == "bad_request"
    (tmp_path / "f").write_text("x")
    assert read(agent, tmp_path / "f" / "x")[0]["kind"] == "not_a_directory"


def test_read_empty_file(agent: AgentHarness, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    header, data, sizes = read(agent, tmp_path / "empty")
    assert header["size"] == 0 and data == b"" and sizes == []


def test_stat(agent: AgentHarness, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"12345")
    reply = agent.request({"op": "stat", "path": str(tmp_path / "f")})
    assert reply["op"] == "stat_result"
    assert (reply["name"], reply["type"], reply["size"]) == ("f", "file", 5)
    assert reply["mtime"] == pytest.approx((tmp_path / "f").stat().st_mtime)
    os.symlink("f", tmp_path / "link")
    assert agent.request({"op": "stat", "path": str(tmp_path / "link")})["type"] == "file"
    assert agent.request({"op": "stat", "path": "/"})["name"] == "/"
    assert agent.request({"op": "stat", "path": str(tmp_path) + "/"})["type"] == "dir"
    assert agent.request({"op": "stat", "path": str(tmp_path / "x")})["kind"] == "not_found"


def test_list(agent: AgentHarness, tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"abc")
    (tmp_path / "a").mkdir()
    os.symlink("b.txt", tmp_path / "c")
    os.mkfifo(tmp_path / "d")
    (tmp_path / os.fsdecode(b"bad\xffname")).write_bytes(b"")
    reply = agent.request({"op": "list", "path": str(tmp_path)})
    assert reply["op"] == "list_result" and reply["more"] is False
    types = {e["name"]: e["type"] for e in reply["entries"]}
    assert types == {
        "a": "dir",
        "b.txt": "file",
        "c": "symlink",
        "d": "other",
        "bad\ufffdname": "file",
    }
    assert (
        agent.request({"op": "list", "path": str(tmp_path / "b.txt")})["kind"] == "not_a_directory"
    )
    assert agent.request({"op": "list", "path": str(tmp_path / "x")})["kind"] == "not_found"


def test_list_large_directory_is_split(agent: AgentHarness, tmp_path: Path) -> None:
    names = {f"{i:05d}-" + "n" * 200 for i in range(1500)}
    for name in names:
        (tmp_path / name).write_bytes(b"")
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "list", "path": str(tmp_path)})
    replies = [f.msg() for f in agent.collect(stream)]
    assert len(replies) > 1
    assert [r["more"] for r in replies] == [True] * (len(replies) - 1) + [False]
    assert {e["name"] for r in replies for e in r["entries"]} == names


def test_mkdir(agent: AgentHarness, tmp_path: Path) -> None:
    assert agent.request({"op": "mkdir", "path": str(tmp_path / "d")}) == {"op": "ok"}
    assert (tmp_path / "d").is_dir()
    assert agent.request({"op": "mkdir", "path": str(tmp_path / "d")})["kind"] == "exists"
    assert agent.request({"op": "mkdir", "path": str(tmp_path / "x/y")})["kind"] == "not_found"
    deep = str(tmp_path / "x/y/z")
    assert agent.request({"op": "mkdir", "path": deep, "parents": True}) == {"op": "ok"}
    assert agent.request({"op": "mkdir", "path": deep, "parents": True}) == {"op": "ok"}


def test_remove(agent: AgentHarness, tmp_path: Path) -> None:
    (tmp_path / "d/e").mkdir(parents=True)
    (tmp_path / "d/e/f").write_bytes(b"")
    (tmp_path / "file").write_bytes(b"")
    os.symlink(tmp_path / "d", tmp_path / "link")
    assert agent.request({"op": "remove", "path": str(tmp_path / "file")}) == {"op": "ok"}
    assert agent.request({"op": "remove", "path": str(tmp_path / "link")}) == {"op": "ok"}
    assert (tmp_path / "d/e/f").exists()  # removing a symlink leaves its target
    assert agent.request({"op": "remove", "path": str(tmp_path / "d")})["kind"] == "not_empty"
    reply = agent.request({"op": "remove", "path": str(tmp_path / "d"), "recursive": True})
    assert reply == {"op": "ok"} and not (tmp_path / "d").exists()
    assert agent.request({"op": "remove", "path": str(tmp_path / "d")})["kind"] == "not_found"
    assert agent.request({"op": "remove", "path": "/", "recursive": True})["kind"] == "bad_request"


def test_rename(agent: AgentHarness, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/inner").write_bytes(b"")
    assert agent.request(
        {"op": "rename", "src": str(tmp_path / "a"), "dst": str(tmp_path / "b")}
    ) == {"op": "ok"}
    assert (tmp_path / "b").read_bytes() == b"x"
    reply = agent.request({"op": "rename", "src": str(tmp_path / "a"), "dst": str(tmp_path / "c")})
    assert reply["kind"] == "not_found"
    reply = agent.request(
        {"op": "rename", "src": str(tmp_path / "b"), "dst": str(tmp_path / "dir")}
    )
    assert reply["kind"] == "is_a_directory"
    reply = agent.request(
        {"op": "rename", "src": str(tmp_path / "dir"), "dst": str(tmp_path / "b")}
    )
    assert reply["kind"] == "not_a_directory"


def test_errno_kinds_are_protocol_kinds() -> None:
    from ember.protocol import ERROR_KINDS

    assert set(ERRNO_KINDS.values()) <= ERROR_KINDS


def test_a_write_given_up_leaves_the_old_file(agent: AgentHarness, tmp_path: Path) -> None:
    """``abort`` (the client's data stopped) and a lost session alike: the target is as it
    was and no staged copy remains; the agent keeps serving."""
    target = tmp_path / "keep.txt"
    target.write_bytes(b"old content")
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "write", "path": str(target), "mode": 0o644})
    agent.send_data(Kind.FILEDATA, stream, b"half of the new")
    assert agent.request({"op": "ping"}) == {"op": "pong"}  # the data arrived
    assert target.read_bytes() == b"old content"  # not written in place
    agent.send_msg(stream, {"op": "abort"})
    assert agent.request({"op": "ping"}) == {"op": "pong"}
    assert not agent.queues[stream]  # abort has no reply
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    # the same when the whole session goes away mid-write
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "write", "path": str(tmp_path / "new.txt")})
    agent.send_data(Kind.FILEDATA, stream, b"partial")
    assert agent.request({"op": "ping"}) == {"op": "pong"}
    agent.close()
    deadline = time.monotonic() + 5
    while len(list(tmp_path.iterdir())) > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_writes_through_symlinks_and_to_devices(agent: AgentHarness, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"a")
    real.chmod(0o640)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert write(agent, link, b"through")["size"] == 7
    assert link.is_symlink() and real.read_bytes() == b"through"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640  # no mode asked: it keeps its own
    assert write(agent, "/dev/null", b"gone")["size"] == 4  # not a regular file: in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
