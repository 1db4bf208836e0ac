"""Per-op schema checks, typed getters and builders."""

from __future__ import annotations

from typing import Any

import pytest

import ember.protocol as P
from ember.protocol import ProtocolViolation, check_reply, check_request, is_final_reply

VALID_REQUESTS: list[tuple[int, dict[str, Any]]] = [
    (0, {"op": "hello", "version": 1, "nonce": 0}),
    (0, {"op": "hello", "version": 1, "nonce": 0, "time": 1.5, "hostname": "sb-1a2b",
         "entropy": "00ff" * 32}),
    (1, {"op": "ping"}),
    (1, {"op": "exec", "argv": ["ls", "-l"]}),
    (
        1,
        {
            "op": "exec",
            "shell": "echo $HOME",
            "env": {"A": "1"},
            "cwd": "/tmp",
            "user": "nobody",
            "stdin": True,
            "timeout": 1.5,
        },
    ),
    (1, {"op": "exec", "argv": ["x"], "user": 1000, "cwd": None, "timeout": None}),
    (1, {"op": "stdin_eof"}),
    (1, {"op": "signal", "target": 4, "signal": 15}),
    (1, {"op": "ps"}),
    (1, {"op": "read", "path": "/etc/passwd"}),
    (1, {"op": "write", "path": "/tmp/x", "mode": 0o600, "append": True}),
    (1, {"op": "write", "path": "/tmp/x"}),
    (1, {"op": "eof"}),
    (1, {"op": "list", "path": "/"}),
    (1, {"op": "stat", "path": "/"}),
    (1, {"op": "mkdir", "path": "/a/b", "parents": True}),
    (1, {"op": "remove", "path": "/a", "recursive": False}),
    (1, {"op": "rename", "src": "/a", "dst": "/b"}),
    (2**32 - 1, {"op": "shutdown"}),
]

ENTRY = {"name": "x", "type": "file", "size": 3, "mode": 0o644, "mtime": 1.5}
VALID_REPLIES: list[tuple[int, dict[str, Any]]] = [
    (0, {"op": "hello_ok", "version": 1, "nonce": 5, "agent": "a", "hostname": "h", "kernel": "k"}),
    (0, {"op": "error", "kind": "bad_request", "message": "protocol violation"}),
    (1, {"op": "pong"}),
    (1, {"op": "started", "pid": 12}),
    (1, {"op": "exit", "code": 0, "signal": None, "timed_out": False}),
    (1, {"op": "exit", "code": None, "signal": 9, "timed_out": True}),
    (1, {"op": "ok"}),
    (1, {"op": "ok", "size": 10}),
    (1, {"op": "ps_result", "processes": [{"stream": 1, "pid": 2, "argv": [], "running": True}]}),
    (1, {"op": "file", "size": 1, "mode": 0o644}),
    (1, {"op": "eof"}),
    (1, {"op": "list_result", "entries": [ENTRY], "more": True}),
    (1, {"op": "stat_result", **ENTRY, "mtime": 7}),
    (1, {"op": "error", "kind": "not_empty", "message": "m"}),
]


@pytest.mark.parametrize(("stream", "msg"), VALID_REQUESTS)
def test_valid_requests(stream: int, msg: dict[str, Any]) -> None:
    check_request(stream, msg)


@pytest.mark.parametrize(("stream", "msg"), VALID_REPLIES)
def test_valid_replies(stream: int, msg: dict[str, Any]) -> None:
    check_reply(stream, msg)


BAD_REQUESTS: list[tuple[int, dict[str, Any], str]] = [
    (1, {"op": "nope"}, "unknown request op"),
    (1, {"op": 1}, "no string 'op'"),
    (1, {"op": "hello", "version": 1, "nonce": 1}, "stream 0"),
    (0, {"op": "ping"}, "stream 0"),
    (0, {"op": "hello", "version": 2, "nonce": 1}, "version 2"),
    (0, {"op": "hello", "version": 1, "nonce": -1}, "'nonce'"),
    (0, {"op": "hello", "version": 1, "nonce": True}, "'nonce'"),
    (0, {"op": "hello", "version": 1}, "missing field 'nonce'"),
    (0, {"op": "hello", "version": 1, "nonce": 1, "hostname": "-bad"}, "'hostname'"),
    (0, {"op": "hello", "version": 1, "nonce": 1, "hostname": "a" * 64}, "'hostname'"),
    (0, {"op": "hello", "version": 1, "nonce": 1, "hostname": "a.b"}, "'hostname'"),
    (0, {"op": "hello", "version": 1, "nonce": 1, "entropy": "abc"}, "'entropy'"),
    (0, {"op": "hello", "version": 1, "nonce": 1, "entropy": "zz"}, "'entropy'"),
    (0, {"op": "hello", "version": 1, "nonce": 1, "entropy": "00" * 65}, "'entropy'"),
    (1, {"op": "ping", "extra": 1}, "unknown field 'extra'"),
    (1, {"op": "exec"}, "exactly one"),
    (1, {"op": "exec", "argv": ["a"], "shell": "a"}, "exactly one"),
    (1, {"op": "exec", "argv": []}, "'argv'"),
    (1, {"op": "exec", "argv": "ls"}, "'argv'"),
    (1, {"op": "exec", "argv": ["a\0b"]}, "'argv'"),
    (1, {"op": "exec", "shell": 3}, "'shell'"),
    (1, {"op": "exec", "shell": "x", "env": {"A": 1}}, "'env'"),
    (1, {"op": "exec", "shell": "x", "env": {"A=B": "1"}}, "'env'"),
    (1, {"op": "exec", "shell": "x", "env": {"": "1"}}, "'env'"),
    (1, {"op": "exec", "shell": "x", "cwd": "relative"}, "'cwd'"),
    (1, {"op": "exec", "shell": "x", "user": ""}, "'user'"),
    (1, {"op": "exec", "shell": "x", "user": -1}, "'user'"),
    (1, {"op": "exec", "shell": "x", "user": True}, "'user'"),
    (1, {"op": "exec", "shell": "x", "stdin": 1}, "'stdin'"),
    (1, {"op": "exec", "shell": "x", "timeout": 0}, "'timeout'"),
    (1, {"op": "exec", "shell": "x", "timeout": True}, "'timeout'"),
    (1, {"op": "exec", "shell": "x", "timeout": "5"}, "'timeout'"),
    (1, {"op": "signal", "target": 0, "signal": 9}, "'target'"),
    (1, {"op": "signal", "target": 1, "signal": 65}, "'signal'"),
    (1, {"op": "read", "path": "/a\0"}, "'path'"),
    (1, {"op": "read", "path": "/" + "a" * 4096}, "'path'"),
    (1, {"op": "write", "path": "/a", "mode": 0o10000}, "'mode'"),
    (1, {"op": "write", "path": "/a", "append": "yes"}, "'append'"),
    (1, {"op": "rename", "src": "/a"}, "missing field 'dst'"),
]


@pytest.mark.parametrize(("stream", "msg", "match"), BAD_REQUESTS)
def test_bad_requests(stream: int, msg: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        check_request(stream, msg)


BAD_REPLIES: list[tuple[int, dict[str, Any], str]] = [
    (0, {"op": "pong"}, "stream 0"),
    (
        1,
        {"op": "hello_ok", "version": 1, "nonce": 1, "agent": "", "hostname": "", "kernel": ""},
        "stream 0",
    ),
    (1, {"op": "started", "pid": "12"}, "'pid'"),
    (1, {"op": "exit", "code": 0, "signal": None}, "'timed_out'"),
    (1, {"op": "exit", "code": 1.5, "signal": None, "timed_out": False}, "'code'"),
    (1, {"op": "error", "kind": "oops", "message": "m"}, "'kind'"),
    (1, {"op": "ps_result", "processes": [{"stream": 1}]}, "missing field 'pid'"),
    (1, {"op": "ps_result", "processes": [1]}, "'processes'"),
    (1, {"op": "list_result", "entries": [{**ENTRY, "type": "fifo"}]}, "'type'"),
    (1, {"op": "list_result", "entries": [{**ENTRY, "op": "x"}]}, "unknown field 'op'"),
    (1, {"op": "stat_result", **ENTRY, "size": -1}, "'size'"),
    (1, {"op": "ok", "size": True}, "'size'"),
]


@pytest.mark.parametrize(("stream", "msg", "match"), BAD_REPLIES)
def test_bad_replies(stream: int, msg: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        check_reply(stream, msg)


def test_final_replies() -> None:
    assert not is_final_reply({"op": "started", "pid": 1})
    assert not is_final_reply({"op": "file", "size": 1, "mode": 0})
    assert not is_final_reply({"op": "list_result", "entries": [], "more": True})
    assert is_final_reply({"op": "list_result", "entries": [], "more": False})
    assert is_final_reply({"op": "ps_result", "processes": []})
    for op in ("exit", "ok", "eof", "pong", "stat_result", "error"):
        assert is_final_reply({"op": op})


def test_getters() -> None:
    msg: P.Message = {"op": "x", "s": "v", "i": 3, "b": True, "f": 1.5, "l": ["a"], "m": {"k": "v"}}
    assert P.get_str(msg, "s") == "v"
    assert P.get_opt_str(msg, "missing") is None
    assert P.get_int(msg, "i") == 3
    assert P.get_opt_int(msg, "missing") is None
    assert P.get_bool(msg, "b") is True and P.get_bool(msg, "missing") is False
    assert P.get_opt_number(msg, "f") == 1.5 and P.get_opt_number(msg, "i") == 3.0
    assert P.get_str_list(msg, "l") == ["a"]
    assert P.get_str_map(msg, "m") == {"k": "v"} and P.get_str_map(msg, "missing") == {}
    for getter, name in [
        (P.get_str, "i"),
        (P.get_int, "b"),
        (P.get_bool, "i"),
        (P.get_opt_number, "b"),
        (P.get_str_list, "m"),
        (P.get_str_map, "l"),
    ]:
        with pytest.raises(ProtocolViolation, match=repr(name)):
            getter(msg, name)  # type: ignore[operator]


def test_builders() -> None:
    assert P.hello(3) == {"op": "hello", "version": 1, "nonce": 3}
    check_request(0, P.hello(3))
    check_reply(0, P.hello_ok(3, agent="a", hostname="h", kernel="k"))
    long = P.error(P.ErrorKind.IO, "x" * 10_000)
    assert len(str(long["message"])) == P.MAX_ERROR_MESSAGE
    check_reply(1, long)
    assert {k.value for k in P.ErrorKind} == P.ERROR_KINDS
