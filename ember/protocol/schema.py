"""Which fields each op carries, in each direction, and their types (see docs/protocol.md).

Requests travel host to guest, replies guest to host. A message of a known op with a
missing, mistyped or unknown field fails with :class:`ProtocolViolation`; the message says
which field and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .errors import ProtocolViolation
from .jsonmsg import Message
from .limits import (
    ERROR_KINDS,
    FILE_TYPES,
    MAX_STREAM,
    MAX_WATCH_BATCH,
    PROTOCOL_VERSION,
    WATCH_EVENT_TYPES,
)

MAX_PATH_BYTES = 4096
MAX_SIGNAL = 64
MAX_ENTROPY_BYTES = 64
MAX_PTY_SIZE = 1000
MAX_WINDOW = 16 << 20


TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

# FieldType and OpSpec are plain classes, not dataclasses: the guest agent imports this
# module at boot, and importing ``dataclasses`` costs a TCG-emulated guest tens of ms.


class FieldType:
    """A named predicate on a JSON value."""

    __slots__ = ("expected", "test")

    def __init__(self, expected: str, test: Callable[[object], bool]) -> None:
        self.expected: Final = expected
        self.test: Final = test

    def __repr__(self) -> str:
        return f"FieldType(expected={self.expected!r}, test={self.test!r})"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(low: int, high: int) -> Callable[[object], bool]:
    def test(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    return test


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def _is_timeout(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and _is_number(value) and value > 0)


def _is_argv(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and _is_str_list(value)
        and not any("\0" in s for s in value)
    )


def _is_path(value: object) -> bool:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        return False
    return len(value.encode("utf-8")) <= MAX_PATH_BYTES


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_env(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    return all(
        isinstance(v, str) and k and "=" not in k and "\0" not in k and "\0" not in v
        for k, v in value.items()
    )


def _is_hostname(value: object) -> bool:
    if not isinstance(value, str) or not 1 <= len(value) <= 63:
        return False
    if value.startswith("-") or value.endswith("-"):
        return False
    return all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in value)


def _is_entropy(value: object) -> bool:
    if not isinstance(value, str) or not 2 <= len(value) <= 2 * MAX_ENTROPY_BYTES:
        return False
    return len(value) % 2 == 0 and all(ch in "0123456789abcdef" for ch in value)


def _objects(label: str, spec: OpSpec) -> Callable[[object], bool]:
    def test(value: object) -> bool:
        if not isinstance(value, list):
            return False
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                return False
            _check_fields(f"{label} {index}", item, spec, has_op=False)
        return True

    return test


STR = FieldType("a string", lambda v: isinstance(v, str))
BOOL = FieldType("a boolean", lambda v: isinstance(v, bool))
UINT = FieldType("a non-negative integer", _int_in(0, 2**63 - 1))
INT_OR_NULL = FieldType("an integer or null", lambda v: v is None or _is_int(v))
NUMBER = FieldType("a number", _is_number)
STREAM = FieldType(f"a stream id (1 to {MAX_STREAM})", _int_in(1, MAX_STREAM))
PATH = FieldType(f"an absolute path (no NUL, at most {MAX_PATH_BYTES} bytes)", _is_path)
PATH_OR_NULL = FieldType("an absolute path or null", lambda v: v is None or _is_path(v))
MODE = FieldType("a file mode (0 to 0o7777)", _int_in(0, 0o7777))
SIGNAL = FieldType(f"a signal number (1 to {MAX_SIGNAL})", _int_in(1, MAX_SIGNAL))
ARGV = FieldType("a non-empty list of strings without NUL", _is_argv)
STR_LIST = FieldType("a list of strings", _is_str_list)
SHELL = FieldType("a string without NUL", lambda v: isinstance(v, str) and "\0" not in v)
ENV = FieldType("an object of strings (names without '=' or NUL)", _is_env)
USER = FieldType(
    "a user name, a uid or null",
    lambda v: v is None or (isinstance(v, str) and bool(v)) or _int_in(0, 2**32 - 2)(v),
)
HOSTNAME = FieldType(
    "a hostname (1 to 63 letters, digits or '-', not starting or ending with '-')", _is_hostname
)
PTY_SIZE = FieldType(f"a terminal size (1 to {MAX_PTY_SIZE})", _int_in(1, MAX_PTY_SIZE))
PTY = FieldType(
    "a terminal size: an object with 'rows' and 'cols'",
    lambda v: isinstance(v, dict) and set(v) == {"rows", "cols"}
    and all(PTY_SIZE.test(v[k]) for k in ("rows", "cols")),
)
ENTROPY = FieldType(f"1 to {MAX_ENTROPY_BYTES} bytes as hex", _is_entropy)
TIMEOUT = FieldType("a positive number of seconds or null", _is_timeout)
PORT = FieldType("a TCP port (1 to 65535)", _int_in(1, 65535))
WINDOW = FieldType(f"a byte count (1 to {MAX_WINDOW})", _int_in(1, MAX_WINDOW))
ERROR_KIND = FieldType(
    "one of " + ", ".join(sorted(ERROR_KINDS)), lambda v: isinstance(v, str) and v in ERROR_KINDS
)
FILE_TYPE = FieldType(
    "one of " + ", ".join(sorted(FILE_TYPES)), lambda v: isinstance(v, str) and v in FILE_TYPES
)
WATCH_EVENT_TYPE = FieldType(
    "one of " + ", ".join(sorted(WATCH_EVENT_TYPES)),
    lambda v: isinstance(v, str) and v in WATCH_EVENT_TYPES,
)


class OpSpec:
    """Fields of one op: required, optional, and a check across fields."""

    __slots__ = ("check", "optional", "required")

    def __init__(
        self,
        required: Mapping[str, FieldType] | None = None,
        optional: Mapping[str, FieldType] | None = None,
        check: Callable[[Message], None] | None = None,
    ) -> None:
        self.required: Final[Mapping[str, FieldType]] = {} if required is None else required
        self.optional: Final[Mapping[str, FieldType]] = {} if optional is None else optional
        self.check: Final = check

    def __repr__(self) -> str:
        return (
            f"OpSpec(required={self.required!r}, optional={self.optional!r}, check={self.check!r})"
        )


def _exec_check(msg: Message) -> None:
    if ("argv" in msg) == ("shell" in msg):
        raise ProtocolViolation("exec needs exactly one of 'argv' and 'shell'")


def _version_check(msg: Message) -> None:
    if msg["version"] != PROTOCOL_VERSION:
        raise ProtocolViolation(
            f"{msg['op']} speaks protocol version {msg['version']}, not {PROTOCOL_VERSION}"
        )


_ENTRY = OpSpec({"name": STR, "type": FILE_TYPE, "size": UINT, "mode": UINT, "mtime": NUMBER})
_PROCESS = OpSpec({"stream": STREAM, "pid": UINT, "argv": STR_LIST, "running": BOOL})
_WATCH_EVENT = OpSpec({"name": STR, "type": WATCH_EVENT_TYPE})


def _watch_events(value: object) -> bool:
    return isinstance(value, list) and len(value) <= MAX_WATCH_BATCH and _objects(
        "event", _WATCH_EVENT)(value)


REQUESTS: Mapping[str, OpSpec] = {
    # "time": the host's wall clock (seconds since the epoch): the guest has no RTC and sets
    # its clock from it.
    # "hostname", "entropy": who this guest is now and fresh bytes for its kernel RNG (a
    # guest restored from a snapshot shares its parent's; see ember/agent/identity.py).
    "hello": OpSpec(
        {"version": UINT, "nonce": UINT},
        {"time": NUMBER, "hostname": HOSTNAME, "entropy": ENTROPY},
        check=_version_check,
    ),
    "ping": OpSpec(),
    "exec": OpSpec(
        optional={
            "argv": ARGV,
            "shell": SHELL,
            "env": ENV,
            "cwd": PATH_OR_NULL,
            "user": USER,
            "stdin": BOOL,
            "timeout": TIMEOUT,
            "pty": PTY,
        },
        check=_exec_check,
    ),
    "stdin_eof": OpSpec(),
    "signal": OpSpec({"target": STREAM, "signal": SIGNAL}),
    # a new size for the terminal of an exec started with "pty" (SIGWINCH reaches it)
    "resize": OpSpec({"target": STREAM, "rows": PTY_SIZE, "cols": PTY_SIZE}),
    # a TCP connection to a port on the guest's loopback, carried on this stream: STDIN
    # frames in, STDOUT frames out within the bytes granted ("window", then "credit")
    "connect": OpSpec({"port": PORT, "window": WINDOW}),
    "credit": OpSpec({"bytes": WINDOW}),
    "ps": OpSpec(),
    "read": OpSpec({"path": PATH}),
    "write": OpSpec({"path": PATH}, {"mode": MODE, "append": BOOL}),
    "eof": OpSpec(),
    # a write given up by its client: the staged file is dropped, no reply
    "abort": OpSpec(),
    "list": OpSpec({"path": PATH}),
    "stat": OpSpec({"path": PATH}),
    "mkdir": OpSpec({"path": PATH}, {"parents": BOOL}),
    "remove": OpSpec({"path": PATH}, {"recursive": BOOL}),
    "rename": OpSpec({"src": PATH, "dst": PATH}),
    # watch a directory (and, recursive, the directories below it, those made later too)
    # until the host sends "abort" on the stream: "watching", then "fs_events" as they come
    "watch": OpSpec({"path": PATH}, {"recursive": BOOL}),
    "shutdown": OpSpec(),
}

REPLIES: Mapping[str, OpSpec] = {
    "hello_ok": OpSpec(
        {"version": UINT, "nonce": UINT, "agent": STR, "hostname": STR, "kernel": STR},
        check=_version_check,
    ),
    "pong": OpSpec(),
    "connected": OpSpec(),
    "closed": OpSpec(),
    "started": OpSpec({"pid": UINT}),
    "exit": OpSpec({"code": INT_OR_NULL, "signal": INT_OR_NULL, "timed_out": BOOL}),
    "ok": OpSpec(optional={"size": UINT}),
    "ps_result": OpSpec(
        {"processes": FieldType("a list of processes", _objects("process", _PROCESS))},
        {"more": BOOL},
    ),
    "file": OpSpec({"size": UINT, "mode": UINT}),
    "eof": OpSpec(),
    "list_result": OpSpec(
        {"entries": FieldType("a list of entries", _objects("entry", _ENTRY))}, {"more": BOOL}
    ),
    "stat_result": _ENTRY,
    # a watch is set up; its events follow (names relative to the watched directory)
    "watching": OpSpec({"watches": UINT}),
    # "overflow": events were lost here (the kernel's queue overflowed, or the watch could
    # not follow a new directory: too many directories)
    "fs_events": OpSpec(
        {"events": FieldType(f"a list of at most {MAX_WATCH_BATCH} events", _watch_events)},
        {"overflow": BOOL},
    ),
    "error": OpSpec({"kind": ERROR_KIND, "message": STR}),
}

REQUEST_OPS = frozenset(REQUESTS)
REPLY_OPS = frozenset(REPLIES)

# Requests sent on the stream of a running operation rather than on a fresh stream.
STREAM_CONTROL_OPS = frozenset({"stdin_eof", "eof", "abort", "credit"})


def check_request(stream: int, msg: Message) -> None:
    """Check a host-to-guest message received on ``stream``."""
    _check(stream, msg, REQUESTS, "request", session_ops={"hello"}, stream0_ok=set())


def check_reply(stream: int, msg: Message) -> None:
    """Check a guest-to-host message received on ``stream``."""
    _check(stream, msg, REPLIES, "reply", session_ops={"hello_ok"}, stream0_ok={"error"})


def is_final_reply(msg: Message) -> bool:
    """Whether this (checked) reply ends its request."""
    op = msg["op"]
    if op in ("started", "file", "watching", "fs_events", "connected"):
        return False
    if op in ("ps_result", "list_result"):
        return msg.get("more") is not True
    return True


def _check(
    stream: int,
    msg: Message,
    specs: Mapping[str, OpSpec],
    what: str,
    *,
    session_ops: set[str],
    stream0_ok: set[str],
) -> None:
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolViolation(f"{what} has no string 'op'")
    spec = specs.get(op)
    if spec is None:
        raise ProtocolViolation(f"unknown {what} op {op[:64]!r}")
    if op in session_ops and stream != 0:
        raise ProtocolViolation(f"{op} must be sent on stream 0, not {stream}")
    if stream == 0 and op not in session_ops and op not in stream0_ok:
        raise ProtocolViolation(f"{what} {op} on stream 0 (it needs a stream of its own)")
    _check_fields(op, msg, spec)


def _check_fields(op: str, msg: Mapping[str, object], spec: OpSpec, *, has_op: bool = True) -> None:
    for name, ftype in spec.required.items():
        if name not in msg:
            raise ProtocolViolation(f"{op}: missing field {name!r}")
        if not ftype.test(msg[name]):
            raise ProtocolViolation(f"{op}: field {name!r} must be {ftype.expected}")
    for name, value in msg.items():
        if (has_op and name == "op") or name in spec.required:
            continue
        optional = spec.optional.get(name)
        if optional is None:
            raise ProtocolViolation(f"{op}: unknown field {name[:64]!r}")
        if not optional.test(value):
            raise ProtocolViolation(f"{op}: field {name!r} must be {optional.expected}")
    if spec.check is not None:
        spec.check(dict(msg))
