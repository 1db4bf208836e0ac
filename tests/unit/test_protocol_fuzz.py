"""Fuzzing the host side of the agent protocol: every byte from the guest is hostile.

The I/O-free core that the host runs on guest bytes (``FrameDecoder`` with the
guest-to-host kinds, ``HelloScanner``, ``check_reply`` / ``is_final_reply`` and the
host's ``reply_of``) is driven with arbitrary bytes, arbitrary splits and mutated valid
streams, and checked against small oracles written from docs/protocol.md:

- nothing but :class:`ProtocolViolation` (or :class:`ProtocolError` from ``reply_of``)
  ever escapes, and the decoder accepts exactly what the spec allows, byte for byte;
- buffering is bounded: a decoder holds at most one frame (``MAX_FRAME_SIZE``), a scanner
  at most one MSG frame (``HEADER_SIZE + MAX_MSG_PAYLOAD``), in length and in allocation;
- work is linear: every byte fed is accounted for (in a frame, buffered or discarded), a
  scanner parses each byte at most once and drops at least one byte per step. No test
  asserts wall-clock times.

``EMBER_FUZZ_EXAMPLES=N`` raises every property's example count to N (a long local run);
``EMBER_FUZZ_REPORT=path`` makes the module write how many inputs each test tried (JSON).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import os
import random
import struct
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ember.protocol.scanner as scanner_module
from ember.errors import ProtocolError
from ember.protocol import (
    ERROR_KINDS,
    FILE_TYPES,
    GUEST_TO_HOST_KINDS,
    HEADER_SIZE,
    MAGIC,
    MAX_DATA_PAYLOAD,
    MAX_FRAME_SIZE,
    MAX_JSON_DEPTH,
    MAX_MSG_PAYLOAD,
    MAX_STREAM,
    REPLY_OPS,
    REQUEST_OPS,
    WATCH_EVENT_TYPES,
    Frame,
    FrameDecoder,
    HelloScanner,
    Kind,
    ProtocolViolation,
    check_reply,
    check_request,
    encode_frame,
    encode_msg,
    hello_ok,
    is_final_reply,
    max_payload,
    parse_msg,
)
from ember.protocol.schema import REPLIES
from ember.runtime.agent_client import reply_of

# --- budget and the input count -------------------------------------------------------------
_EXAMPLES_ENV = os.environ.get("EMBER_FUZZ_EXAMPLES", "").strip()
_EXAMPLES = int(_EXAMPLES_ENV) if _EXAMPLES_ENV else 0


def fuzz(default: int, *, per: int = 1) -> settings:
    """Settings of one property: ``default`` examples, or EMBER_FUZZ_EXAMPLES / ``per``."""
    count = max(default, _EXAMPLES // per) if _EXAMPLES else default
    return settings(
        max_examples=count,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


_TRIED: Counter[str] = Counter()


def tried(name: str) -> None:
    """Count one input of a property (reported through EMBER_FUZZ_REPORT)."""
    _TRIED[name] += 1


@pytest.fixture(scope="module", autouse=True)
def _fuzz_report() -> Iterator[None]:
    yield
    target = os.environ.get("EMBER_FUZZ_REPORT")
    if not target or not _TRIED:
        return
    path = Path(target)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    tests: dict[str, int] = dict(old.get("tests", {})) if isinstance(old, dict) else {}
    tests.update({f"{__name__}::{name}": count for name, count in _TRIED.items()})
    report = {
        "tests": dict(sorted(tests.items())),
        "total": sum(tests.values()),
        "examples_setting": _EXAMPLES or None,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")


# --- oracles written from docs/protocol.md ------------------------------------------------
G2H = GUEST_TO_HOST_KINDS
G2H_VALUES = frozenset(int(k) for k in G2H)
SCAN_BOUND = HEADER_SIZE + MAX_MSG_PAYLOAD
NONCE = 0x1234_5678_9ABC  # 14 decimal digits; stale nonces below have at most 6
OURS = encode_msg(0, hello_ok(NONCE, agent="0.1.0", hostname="ember", kernel="6.1.0"))
PREFIX = MAGIC + bytes([1, Kind.MSG]) + bytes(4)  # a MSG header on stream 0, minus the length


def alloc_bound(limit: int) -> int:
    """What a bytearray holding at most ``limit`` bytes may allocate (CPython over-allocates
    by 1/8 when growing)."""
    return 2 * limit + 4096


def header_prefix_ok(head: bytes) -> bool:
    """Whether these first bytes of a guest-to-host frame header are valid so far."""
    if head[:2] != MAGIC[: len(head[:2])]:
        return False
    if len(head) > 2 and head[2] != 1:
        return False
    if len(head) > 3 and head[3] not in G2H_VALUES:
        return False
    if len(head) < HEADER_SIZE:
        return True
    stream, length = struct.unpack(">II", head[4:HEADER_SIZE])
    if stream == 0 and head[3] != Kind.MSG:
        return False
    return int(length) <= (MAX_MSG_PAYLOAD if head[3] == Kind.MSG else MAX_DATA_PAYLOAD)


class Expected:
    """What a correct decoder does with ``blob`` (guest-to-host direction)."""

    def __init__(self, blob: bytes) -> None:
        self.frames: list[tuple[int, Frame]] = []  # (end offset, frame)
        self.fail_at: int | None = None  # first byte offset that reveals the violation
        self.fail_start = 0  # offset of the frame that fails
        self.header_failure = False
        pos = 0
        while pos < len(blob):
            head = blob[pos : pos + HEADER_SIZE]
            if not header_prefix_ok(head):
                bad = next(i for i in range(1, len(head) + 1) if not header_prefix_ok(head[:i]))
                self.fail_at, self.fail_start, self.header_failure = pos + bad - 1, pos, True
                return
            if len(head) < HEADER_SIZE:
                return
            length = struct.unpack(">I", head[8:])[0]
            end = pos + HEADER_SIZE + length
            if end > len(blob):
                return
            frame = Frame(Kind(head[3]), struct.unpack(">I", head[4:8])[0], blob[pos + 12 : end])
            if frame.kind is Kind.MSG:
                try:
                    parse_msg(frame.payload)
                except ProtocolViolation:
                    self.fail_at, self.fail_start = end - 1, pos
                    return
            self.frames.append((end, frame))
            pos = end

    def frames_within(self, fed: int) -> list[Frame]:
        return [frame for end, frame in self.frames if end <= fed]


def json_depth(value: object) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def json_strings(value: object) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_accepted_msg(frame: Frame) -> dict[str, object]:
    """A MSG frame the decoder returned: a well-formed message, and what the host does next."""
    msg = frame.msg()
    assert isinstance(msg.get("op"), str)
    assert json_depth(msg) <= MAX_JSON_DEPTH
    for text in json_strings(msg):
        text.encode("utf-8")  # no lone surrogate
    # finite numbers only, and the message survives a strict re-encoding unchanged
    assert json.loads(json.dumps(msg, allow_nan=False)) == msg
    check_host_reply(frame.stream, frame)
    return msg


def check_host_reply(stream: int, frame: Frame) -> None:
    """``reply_of`` (what the host applies to every reply) fails only with ProtocolError."""
    try:
        reply = reply_of(stream, frame)
    except ProtocolError as err:
        assert isinstance(err.__cause__, ProtocolViolation) or frame.kind is not Kind.MSG
        return
    assert reply["op"] in REPLY_OPS
    check_reply(stream, reply)
    assert isinstance(is_final_reply(reply), bool)


def run_decoder(blob: bytes, cuts: Sequence[int]) -> list[Frame]:
    """Feed ``blob`` split at ``cuts``; check every step against :class:`Expected`."""
    expected = Expected(blob)
    ends = [end for end, _ in expected.frames]
    decoder = FrameDecoder(G2H)
    frames: list[Frame] = []
    bounds = [0, *sorted({min(max(c, 0), len(blob)) for c in cuts}), len(blob)]
    for start, end in itertools.pairwise(bounds):
        try:
            out = decoder.feed(blob[start:end])
        except ProtocolViolation as err:
            assert expected.fail_at is not None, "decoder rejected a valid stream"
            assert start <= expected.fail_at < end, (start, end, expected.fail_at)
            assert len(frames) == bisect.bisect_right(ends, start)
            if expected.header_failure:
                assert err.rest == blob[expected.fail_start + 1 : end]
            else:  # a complete MSG frame that is not a valid message
                assert err.rest == blob[expected.fail_at + 1 : end]
            assert decoder.buffered == 0
            with pytest.raises(ProtocolViolation, match="failed earlier"):
                decoder.feed(OURS)
            return frames
        assert expected.fail_at is None or expected.fail_at >= end, "violation missed"
        done_before = len(frames)
        frames += out
        assert len(frames) == bisect.bisect_right(ends, end)
        assert out == [frame for _, frame in expected.frames[done_before : len(frames)]]
        for frame in out:
            assert frame.kind in G2H
            assert 0 <= frame.stream <= MAX_STREAM
            assert frame.stream != 0 or frame.kind is Kind.MSG
            assert len(frame.payload) <= max_payload(frame.kind)
            if frame.kind is Kind.MSG:
                check_accepted_msg(frame)
        # bounded, exactly accounted buffering: what is not in a frame is the frame in progress
        done = ends[len(frames) - 1] if frames else 0
        assert decoder.buffered == end - done
        assert decoder.buffered <= MAX_FRAME_SIZE
        head = blob[done : min(end, done + HEADER_SIZE)]
        assert header_prefix_ok(head)
        if len(head) == HEADER_SIZE:
            assert end - done < HEADER_SIZE + struct.unpack(">I", head[8:])[0]
        assert sys.getsizeof(decoder._buf) <= alloc_bound(MAX_FRAME_SIZE)
    assert expected.fail_at is None
    return frames


# --- strategies -----------------------------------------------------------------------------
uints = st.integers(0, 2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
short_text = st.text(max_size=12)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    finite,
    st.text(max_size=16),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(short_text, inner, max_size=4),
    max_leaves=10,
)
ENTRY = {
    "name": short_text,
    "type": st.sampled_from(sorted(FILE_TYPES)),
    "size": uints,
    "mode": uints,
    "mtime": uints | finite,
}
PROCESS = {
    "stream": st.integers(1, MAX_STREAM),
    "pid": uints,
    "argv": st.lists(short_text, max_size=3),
    "running": st.booleans(),
}
int_or_null = st.none() | st.integers(-(2**70), 2**70)
REPLY_FIELDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "hello_ok": (
        {
            "version": st.just(1),
            "nonce": uints,
            "agent": short_text,
            "hostname": short_text,
            "kernel": short_text,
        },
        {},
    ),
    "pong": ({}, {}),
    "connected": ({}, {}),
    "closed": ({}, {}),
    "started": ({"pid": uints}, {}),
    "exit": ({"code": int_or_null, "signal": int_or_null, "timed_out": st.booleans()}, {}),
    "ok": ({}, {"size": uints}),
    "ps_result": (
        {"processes": st.lists(st.fixed_dictionaries(PROCESS), max_size=3)},
        {"more": st.booleans()},
    ),
    "file": ({"size": uints, "mode": uints}, {}),
    "eof": ({}, {}),
    "list_result": (
        {"entries": st.lists(st.fixed_dictionaries(ENTRY), max_size=3)},
        {"more": st.booleans()},
    ),
    "stat_result": (ENTRY, {}),
    "watching": ({"watches": uints}, {}),
    "fs_events": (
        {"events": st.lists(st.fixed_dictionaries(
            {"name": short_text, "type": st.sampled_from(sorted(WATCH_EVENT_TYPES))}),
            max_size=3)},
        {"overflow": st.booleans()},
    ),
    "error": ({"kind": st.sampled_from(sorted(ERROR_KINDS)), "message": st.text(max_size=40)}, {}),
}
assert set(REPLY_FIELDS) == set(REPLY_OPS)
ALL_FIELD_NAMES = sorted(
    {name for spec in REPLIES.values() for name in (*spec.required, *spec.optional)}
    | {"path", "argv", "shell", "target", "signal", "nonce", "time"}
)


@st.composite
def valid_replies(draw: st.DrawFn) -> tuple[int, dict[str, object]]:
    """A reply the host must accept, on a stream it may come on."""
    op = draw(st.sampled_from(sorted(REPLY_FIELDS)))
    required, optional = REPLY_FIELDS[op]
    msg = {"op": op, **draw(st.fixed_dictionaries(required, optional=optional))}
    if op == "hello_ok":
        stream = 0
    elif op == "error":
        stream = draw(st.sampled_from([0, 1, MAX_STREAM]) | st.integers(0, MAX_STREAM))
    else:
        stream = draw(st.sampled_from([1, MAX_STREAM]) | st.integers(1, MAX_STREAM))
    return stream, msg


@st.composite
def data_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([Kind.STDOUT, Kind.STDERR, Kind.FILEDATA]))
    stream = draw(st.sampled_from([1, 2, MAX_STREAM]) | st.integers(1, MAX_STREAM))
    if draw(st.integers(0, 9)) == 0:  # now and then a big or exactly maximal one
        size = draw(st.sampled_from([MAX_MSG_PAYLOAD + 1, MAX_DATA_PAYLOAD - 1, MAX_DATA_PAYLOAD]))
        payload = bytes([draw(st.integers(0, 255))]) * size
    else:
        payload = draw(st.binary(max_size=96))
    return encode_frame(kind, stream, payload)


@st.composite
def msg_frames(draw: st.DrawFn) -> bytes:
    stream, msg = draw(valid_replies())
    return encode_msg(stream, msg)


valid_frame = st.one_of(msg_frames(), data_frames())


def frame_offsets(frames: Sequence[bytes]) -> list[int]:
    return list(itertools.accumulate((len(f) for f in frames[:-1]), initial=0))


HOSTILE_LENGTHS = [
    0,
    1,
    MAX_MSG_PAYLOAD - 1,
    MAX_MSG_PAYLOAD,
    MAX_MSG_PAYLOAD + 1,
    MAX_DATA_PAYLOAD,
    MAX_DATA_PAYLOAD + 1,
    2**31,
    2**32 - 1,
]


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """A valid guest-to-host stream, then 1-4 hostile edits (bytes or header fields)."""
    frames = draw(st.lists(valid_frame, min_size=1, max_size=6))
    blob = bytearray(b"".join(frames))
    offsets = frame_offsets(frames)
    for _ in range(draw(st.integers(1, 4))):
        if not blob:
            break
        edit = draw(
            st.sampled_from(
                ["flip", "byte", "truncate", "delete", "insert", "duplicate", "header", "header"]
            )
        )
        at = draw(st.integers(0, len(blob) - 1))
        if edit == "flip":
            blob[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "byte":
            blob[at] = draw(st.integers(0, 255))
        elif edit == "truncate":
            del blob[at:]
        elif edit == "delete":
            del blob[at : at + draw(st.integers(1, 16))]
        elif edit == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "duplicate":
            blob[at:at] = blob[at : at + draw(st.integers(1, 64))]
        else:  # rewrite one field of one frame header
            base = draw(st.sampled_from(offsets))
            if base + HEADER_SIZE > len(blob):
                continue
            field = draw(st.sampled_from(["magic", "version", "kind", "stream", "length"]))
            if field == "magic":
                blob[base : base + 2] = draw(st.sampled_from([b"ME", b"EN", b"\0M", b"E\0"]))
            elif field == "version":
                blob[base + 2] = draw(st.sampled_from([0, 2, 255]))
            elif field == "kind":
                blob[base + 3] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 255]))
            elif field == "stream":
                stream = draw(st.sampled_from([0, 1, MAX_STREAM]))
                blob[base + 4 : base + 8] = struct.pack(">I", stream)
            else:
                length = draw(st.sampled_from(HOSTILE_LENGTHS) | st.integers(0, 2**32 - 1))
                blob[base + 8 : base + 12] = struct.pack(">I", length)
    return bytes(blob)


@st.composite
def hostile_headers(draw: st.DrawFn) -> bytes:
    """A frame whose every header field may be hostile, then a payload that may be short."""
    magic = draw(
        st.sampled_from([MAGIC, MAGIC, MAGIC, b"ME", b"E\0"]) | st.binary(min_size=2, max_size=2)
    )
    version = draw(st.sampled_from([1, 1, 1, 0, 2, 255]))
    kind = draw(st.integers(0, 7) | st.just(255))
    stream = draw(st.sampled_from([0, 1, MAX_STREAM]) | st.integers(0, 2**32 - 1))
    payload = draw(st.binary(max_size=64) | msg_frames().map(lambda f: f[HEADER_SIZE:]))
    length = draw(
        st.sampled_from([len(payload), *HOSTILE_LENGTHS]) | st.integers(0, len(payload) + 8)
    )
    return struct.pack(">2sBBII", magic, version, kind, stream, length) + payload


def cuts_for(data: st.DataObject, size: int) -> list[int]:
    return data.draw(st.lists(st.integers(0, size), max_size=8), label="cuts")


# --- FrameDecoder ---------------------------------------------------------------------------
@fuzz(400)
@given(
    st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=512).map(lambda b: b"EM" + b),
        st.binary(max_size=512).map(lambda b: b"EM\x01" + b),
        st.tuples(st.sampled_from([1, 2, 3, 5]), st.binary(max_size=512)).map(
            lambda t: b"EM\x01" + bytes([t[0]]) + t[1]
        ),
        st.lists(valid_frame, max_size=3).map(b"".join).flatmap(
            lambda good: st.binary(max_size=512).map(lambda junk: good + junk)
        ),
    ),
    st.data(),
)
def test_decoder_arbitrary_bytes(blob: bytes, data: st.DataObject) -> None:
    tried("test_decoder_arbitrary_bytes")
    run_decoder(blob, cuts_for(data, len(blob)))


@fuzz(200)
@given(st.lists(valid_frame, max_size=8), st.data())
def test_decoder_valid_streams_round_trip(frames: list[bytes], data: st.DataObject) -> None:
    """The control: generated valid streams decode to exactly their frames under any split."""
    tried("test_decoder_valid_streams_round_trip")
    blob = b"".join(frames)
    decoded = run_decoder(blob, cuts_for(data, len(blob)))
    assert [f.encode() for f in decoded] == frames


@fuzz(500)
@given(mutated_streams(), st.data())
def test_decoder_mutated_streams(blob: bytes, data: st.DataObject) -> None:
    tried("test_decoder_mutated_streams")
    run_decoder(blob, cuts_for(data, len(blob)))


@fuzz(300)
@given(st.lists(hostile_headers(), min_size=1, max_size=4), st.data())
def test_decoder_hostile_headers(frames: list[bytes], data: st.DataObject) -> None:
    """Bad headers are rejected from the header alone: no payload is ever buffered for them."""
    tried("test_decoder_hostile_headers")
    blob = b"".join(frames)
    run_decoder(blob, cuts_for(data, len(blob)))
    head = frames[0][:HEADER_SIZE]
    length = struct.unpack(">I", head[8:])[0]
    decoder = FrameDecoder(G2H)
    if not header_prefix_ok(head) or (head[3] == Kind.MSG and length == 0):
        with pytest.raises(ProtocolViolation):  # an empty MSG payload is not JSON
            decoder.feed(head)
        assert decoder.buffered == 0
    else:
        decoder.feed(head)
        assert decoder.buffered == (HEADER_SIZE if length else 0)


# --- MSG payloads: hostile JSON -------------------------------------------------------------
def _json_edit(text: str, edit: str, draw: st.DrawFn) -> tuple[bytes, bool | None]:
    """Apply one hostile edit to the JSON text of a message; say whether the decoder must
    reject it (True), accept it (False), or may do either (None)."""
    body = text[1:]  # the text after the opening brace: '"op":...}'

    def field(name: str, raw: str) -> bytes:  # a field placed before the message's own
        return ("{" + f'"{name}":{raw},' + body).encode()

    if edit == "none":
        return text.encode(), False
    if edit == "duplicate key":
        key = draw(st.sampled_from(["op", "n"]))
        return field(key, f'1,"{key}":2'), True
    if edit == "constant":
        return field("n", draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))), True
    if edit == "float overflow":
        num = draw(st.sampled_from(["1e999", "-1E400", "1" + "0" * 400 + ".0", "9" * 310 + "e0"]))
        return field("n", num), True
    if edit == "huge int":
        return field("n", "7" * draw(st.integers(4301, 6000))), True
    if edit == "deep list":
        depth = draw(st.integers(MAX_JSON_DEPTH, 20_000))
        return field("n", "[" * depth + "]" * depth), True
    if edit == "deep object":
        depth = draw(st.integers(MAX_JSON_DEPTH, 6_000))
        return field("n", '{"a":' * depth + "1" + "}" * depth), True
    if edit == "nesting within limit":
        depth = draw(st.integers(1, MAX_JSON_DEPTH - 1))
        return field("n", "[" * depth + "]" * depth), False
    if edit == "lone surrogate":
        esc = draw(st.sampled_from(["\\ud800", "\\udfff", "\\udc00\\ud800", "x\\ud83d"]))
        if draw(st.booleans()):
            return field(esc, "1"), True  # in a key
        return field("n", f'"{esc}"'), True
    if edit == "surrogate pair":
        return field("n", '"\\ud83d\\ude00"'), False
    if edit == "bad utf-8":
        junk = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe6\x97", b"\x80"]))
        return b'{"n":"' + junk + b'",' + body.encode(), True
    if edit == "bom":
        return b"\xef\xbb\xbf" + text.encode(), True
    if edit == "control char":
        return field("n", '"a' + chr(draw(st.integers(0, 31))) + 'b"'), True
    if edit == "bad escape":
        return field("n", '"\\x41"'), True
    if edit == "trailing":
        return (text + draw(st.sampled_from([" x", "{}", ",", "]", "\0"]))).encode(), True
    if edit == "whitespace":
        return (" \n\t" + text + " \r\n").encode(), False
    if edit == "not an object":
        return draw(st.sampled_from([b"[]", b"1", b'"op"', b"null", b"true", b"", b" "])), True
    if edit == "no op":
        return b'{"opx":"pong"}', True
    if edit == "op not a string":
        op = draw(st.sampled_from(["1", "null", "[]", "{}", "true"]))
        return ('{"op":' + op + "}").encode(), True
    if edit == "truncated":
        return text[: draw(st.integers(0, len(text) - 1))].encode(), True
    if edit == "oversized":  # one to four bytes over the bound
        pad = MAX_MSG_PAYLOAD + draw(st.integers(1, 4)) - len(text.encode()) - 7
        return field("n", '"' + "a" * pad + '"'), True
    if edit == "exactly 64 KiB":
        pad = MAX_MSG_PAYLOAD - len(text.encode()) - 7
        return field("n", '"' + "a" * pad + '"'), False
    if edit == "many keys":
        keys = "".join(f'"k{i}":{i},' for i in range(draw(st.integers(1, 4000))))
        return ("{" + keys + body).encode(), False
    if edit == "bit flip":
        raw = bytearray(text.encode())
        raw[draw(st.integers(0, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw), None
    if edit == "splice":
        encoded = text.encode()
        at = draw(st.integers(0, len(encoded)))
        return encoded[:at] + draw(st.binary(min_size=1, max_size=8)) + encoded[at:], None
    raise AssertionError(edit)


JSON_EDITS = [
    "none", "duplicate key", "constant", "float overflow", "huge int", "deep list",
    "deep object", "nesting within limit", "lone surrogate", "surrogate pair", "bad utf-8",
    "bom", "control char", "bad escape", "trailing", "whitespace", "not an object", "no op",
    "op not a string", "truncated", "oversized", "exactly 64 KiB", "many keys", "bit flip",
    "splice",
]  # fmt: skip


@st.composite
def hostile_payloads(draw: st.DrawFn) -> tuple[int, bytes, bool | None, str]:
    stream, msg = draw(valid_replies())
    edit = draw(st.sampled_from(JSON_EDITS))
    text = json.dumps(msg, ensure_ascii=draw(st.booleans()), separators=(",", ":"))
    payload, must_fail = _json_edit(text, edit, draw)
    if len(payload) > MAX_MSG_PAYLOAD:
        must_fail = True
    return stream, payload, must_fail, edit


@fuzz(600)
@given(hostile_payloads(), st.data())
def test_hostile_msg_payloads(
    case: tuple[int, bytes, bool | None, str], data: st.DataObject
) -> None:
    """NaN/Infinity, duplicate keys, deep nesting, huge numbers, non-UTF-8, surrogates,
    oversize...: rejected exactly as the spec says, and never with another exception."""
    tried("test_hostile_msg_payloads")
    stream, payload, must_fail, edit = case
    blob = struct.pack(">2sBBII", MAGIC, 1, Kind.MSG, stream, len(payload)) + payload
    frames = run_decoder(blob, cuts_for(data, len(blob)))
    if must_fail is True:
        assert not frames, edit
    elif must_fail is False:
        assert len(frames) == 1, edit
        assert frames[0].msg() == json.loads(payload.decode())


@fuzz(200)
@given(st.lists(st.tuples(valid_replies(), st.booleans()), min_size=1, max_size=5), st.data())
def test_valid_replies_pass_the_host(
    replies: list[tuple[tuple[int, dict[str, object]], bool]], data: st.DataObject
) -> None:
    """The generator's valid replies pass decoding and the host's reply check (so that the
    hostile variants above start from the accepted language)."""
    tried("test_valid_replies_pass_the_host")
    blob = b"".join(
        encode_frame(Kind.MSG, s, json.dumps(m, ensure_ascii=a).encode()) for (s, m), a in replies
    )
    frames = run_decoder(blob, cuts_for(data, len(blob)))
    assert [(f.stream, f.msg()) for f in frames] == [r for r, _ in replies]
    for frame in frames:
        assert reply_of(frame.stream, frame) == frame.msg()


# --- reply schema ---------------------------------------------------------------------------
def check_schema_outcome(stream: int, msg: dict[str, object]) -> None:
    """check_reply raises only ProtocolViolation; what it accepts follows the spec."""
    try:
        check_reply(stream, msg)
    except ProtocolViolation:
        pass
    else:
        op = msg["op"]
        assert isinstance(op, str) and op in REPLY_OPS
        spec = REPLIES[op]
        assert set(spec.required) <= set(msg)
        assert set(msg) - {"op"} <= set(spec.required) | set(spec.optional)
        assert (stream == 0) == (op == "hello_ok") or op == "error"
        final = is_final_reply(msg)
        assert isinstance(final, bool)
        more = op in ("ps_result", "list_result") and msg.get("more") is True
        assert final == (op not in ("started", "file", "watching", "fs_events", "connected")
                         and not more)
    # the guest-side check is held to the same standard on the same values
    with contextlib.suppress(ProtocolViolation):
        check_request(stream, msg)


op_values = st.one_of(
    st.sampled_from(sorted(REPLY_OPS | REQUEST_OPS)),
    st.text(max_size=70),
    json_scalars,
)
streams = st.sampled_from([0, 1, 2, MAX_STREAM]) | st.integers(0, MAX_STREAM)


@fuzz(300)
@given(
    streams,
    op_values,
    st.dictionaries(st.sampled_from(ALL_FIELD_NAMES) | short_text, json_values, max_size=8),
    st.booleans(),
)
def test_reply_schema_arbitrary_values(
    stream: int, op: object, fields: dict[str, object], with_op: bool
) -> None:
    tried("test_reply_schema_arbitrary_values")
    msg = {**fields, "op": op} if with_op else dict(fields)
    check_schema_outcome(stream, msg)


@st.composite
def near_valid_replies(draw: st.DrawFn) -> tuple[int, dict[str, object]]:
    """A valid reply with a few fields dropped, retyped or added, or moved to another stream."""
    stream, msg = draw(valid_replies())
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["retype", "drop", "add", "stream", "nested"]))
        names = sorted(k for k in msg if k != "op")
        if edit == "retype" and names:
            msg[draw(st.sampled_from(names))] = draw(json_values)
        elif edit == "drop" and names:
            del msg[draw(st.sampled_from(names))]
        elif edit == "add":
            msg[draw(st.sampled_from(ALL_FIELD_NAMES) | short_text)] = draw(json_values)
        elif edit == "stream":
            stream = draw(streams)
        elif edit == "nested":  # retype one field of one entry / process
            for key in ("entries", "processes"):
                items = msg.get(key)
                if isinstance(items, list) and items and isinstance(items[0], dict):
                    item = dict(items[0])
                    item[draw(st.sampled_from([*sorted(item), "op", "x"]))] = draw(json_values)
                    msg[key] = [item, *items[1:]]
    return stream, msg


@fuzz(400)
@given(near_valid_replies())
def test_reply_schema_near_valid(case: tuple[int, dict[str, object]]) -> None:
    tried("test_reply_schema_near_valid")
    check_schema_outcome(*case)


@fuzz(300)
@given(near_valid_replies(), st.booleans())
def test_reply_of_over_the_wire(case: tuple[int, dict[str, object]], ascii_only: bool) -> None:
    """The whole host path for one reply: bytes, decoder, then ``reply_of``."""
    tried("test_reply_of_over_the_wire")
    stream, msg = case
    payload = json.dumps(msg, ensure_ascii=ascii_only).encode()
    if len(payload) > MAX_MSG_PAYLOAD:
        return
    for frame in run_decoder(encode_frame(Kind.MSG, stream, payload), []):
        check_host_reply(stream, frame)


# --- HelloScanner ---------------------------------------------------------------------------
class MeteredScanner(HelloScanner):
    """The real scanner, counting its steps: every ``_scan`` pass and every drop."""

    def __init__(self, nonce: int) -> None:
        super().__init__(nonce, kinds=G2H)
        self.scans = 0
        self.drops = 0

    def _scan(self) -> Any:
        self.scans += 1
        return super()._scan()

    def _drop(self, count: int) -> None:
        if count:
            self.drops += 1
        super()._drop(count)


class ParseMeter:
    """Count the payload bytes the scanner hands to ``parse_msg`` (its costly step)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._patch = pytest.MonkeyPatch()

    def _parse(self, payload: bytes) -> dict[str, object]:
        self.bytes += len(payload)
        return parse_msg(payload)

    def __enter__(self) -> ParseMeter:
        self._patch.setattr(scanner_module, "parse_msg", self._parse)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._patch.undo()


class ExpectedScan:
    """What a correct HelloScanner does with ``blob``: the first MSG frame on stream 0 that
    parses and carries our nonce is the match (or a violation if its body is malformed)."""

    def __init__(self, blob: bytes, nonce: int) -> None:
        self.start: int | None = None
        self.end = 0
        self.violation = False
        at = blob.find(PREFIX)
        while at >= 0:
            if at + HEADER_SIZE <= len(blob):
                length = struct.unpack(">I", blob[at + 8 : at + 12])[0]
                end = at + HEADER_SIZE + length
                # valid JSON holds no NUL byte: no need to parse those (and it keeps the
                # oracle linear on overlapping candidates)
                has_nul = blob.find(0, at + HEADER_SIZE, end) >= 0
                if length <= MAX_MSG_PAYLOAD and end <= len(blob) and not has_nul:
                    try:
                        msg = parse_msg(blob[at + HEADER_SIZE : end])
                    except ProtocolViolation:
                        msg = {}
                    value = msg.get("nonce")
                    ours = value == nonce and not isinstance(value, bool)
                    if msg.get("op") == "hello_ok" and ours:
                        self.start, self.end = at, end
                        try:
                            check_reply(0, msg)
                        except ProtocolViolation:
                            self.violation = True
                        return
            at = blob.find(PREFIX, at + 1)


def run_scanner(blob: bytes, chunks: Sequence[bytes] | None = None) -> tuple[MeteredScanner, Any]:
    """Feed ``blob`` (as ``chunks`` if given); check bounds, accounting and linear work, then
    the frames that follow a match."""
    expected = ExpectedScan(blob, NONCE)
    after = Expected(blob[expected.end :]) if expected.start is not None else None
    scanner = MeteredScanner(NONCE)
    fed = feeds = 0
    with ParseMeter() as meter:
        for chunk in chunks if chunks is not None else [blob]:
            fed += len(chunk)
            feeds += 1
            try:
                found = scanner.feed(chunk)
            except ProtocolViolation:
                assert expected.start is not None and after is not None
                assert expected.end <= fed
                if not expected.violation:  # a good match, then bad frames in the same chunk
                    assert after.fail_at is not None and expected.end + after.fail_at < fed
                return scanner, None
            assert scanner.buffered <= SCAN_BOUND
            assert sys.getsizeof(scanner._buf) <= alloc_bound(SCAN_BOUND)
            # linear work: each byte is parsed at most once; each step drops a byte or ends
            assert meter.bytes <= fed
            assert scanner.drops <= fed
            assert scanner.scans <= scanner.drops + 2 * feeds
            if found is None:
                assert expected.start is None or expected.end > fed
                assert scanner.discarded + scanner.buffered == fed
                continue
            assert expected.start is not None and after is not None and not expected.violation
            assert expected.end <= fed
            assert found.discarded == expected.start
            assert found.message == parse_msg(blob[expected.start + HEADER_SIZE : expected.end])
            assert found.message["nonce"] == NONCE
            # the frames after it reach the decoder unchanged
            frames = list(found.frames)
            try:
                frames += found.decoder.feed(blob[fed:])
            except ProtocolViolation:
                assert after.fail_at is not None
                return scanner, found
            assert after.fail_at is None
            assert frames == [frame for _, frame in after.frames]
            return scanner, found
    assert expected.start is None
    return scanner, None


def split(blob: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted({min(max(c, 0), len(blob)) for c in cuts}), len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(bounds)]


def stale_hello_ok(nonce: int) -> bytes:
    return encode_msg(0, hello_ok(nonce, agent="old", hostname="h", kernel="k"))


@st.composite
def stale_bytes(draw: st.DrawFn) -> bytes:
    """What a hostile or stale guest may send before its hello_ok (never our nonce)."""
    parts = draw(
        st.lists(
            st.one_of(
                st.binary(max_size=64),
                valid_frame,
                valid_frame.map(lambda f: f[: len(f) // 2]),  # cut short
                st.integers(0, 10**6).map(stale_hello_ok),
                st.integers(0, 10**6).map(lambda n: stale_hello_ok(n)[:-1]),
                st.builds(  # a stream-0 MSG header with a hostile length, then anything
                    lambda length, tail: PREFIX + struct.pack(">I", length) + tail,
                    st.sampled_from(HOSTILE_LENGTHS) | st.integers(0, 300),
                    st.binary(max_size=32) | st.text(max_size=32).map(str.encode),
                ),
                st.just(PREFIX[: len(PREFIX) - 1]),
                st.just(OURS[:HEADER_SIZE]),  # our header, cut before the body
            ),
            max_size=6,
        )
    )
    return b"".join(parts)


@fuzz(400)
@given(st.lists(st.binary(max_size=512), max_size=8))
def test_scanner_arbitrary_bytes(chunks: list[bytes]) -> None:
    tried("test_scanner_arbitrary_bytes")
    run_scanner(b"".join(chunks), chunks)


@fuzz(300)
@given(stale_bytes(), st.lists(valid_frame, max_size=3), st.data())
def test_scanner_finds_hello_ok_after_hostile_bytes(
    stale: bytes, following: list[bytes], data: st.DataObject
) -> None:
    """Whatever comes first, our hello_ok is found right where it starts, and the frames
    after it are handed to the decoder unchanged, under any split."""
    tried("test_scanner_finds_hello_ok_after_hostile_bytes")
    blob = stale + OURS + b"".join(following)
    _, found = run_scanner(blob, split(blob, cuts_for(data, len(blob))))
    assert found is not None
    assert found.discarded == len(stale)


@st.composite
def hello_ok_variants(draw: st.DrawFn) -> bytes:
    """hello_ok frames carrying our nonce, mutated in their fields or bytes."""
    msg: dict[str, object] = dict(hello_ok(NONCE, agent="a", hostname="h", kernel="k"))
    edit = draw(st.sampled_from(["field", "drop", "add", "version", "nonce type", "bytes"]))
    if edit == "field":
        msg[draw(st.sampled_from(sorted(k for k in msg if k not in ("op", "nonce"))))] = draw(
            json_values
        )
    elif edit == "drop":
        del msg[draw(st.sampled_from(sorted(k for k in msg if k not in ("op", "nonce"))))]
    elif edit == "add":
        msg[draw(short_text.filter(lambda k: k not in msg))] = draw(json_values)
    elif edit == "version":
        msg["version"] = draw(st.sampled_from([0, 2, 255, 2**64, -1, True, 1.0, "1"]))
    elif edit == "nonce type":
        msg["nonce"] = draw(st.sampled_from([float(NONCE), str(NONCE), [NONCE], True]))
    frame = bytearray(encode_frame(Kind.MSG, 0, json.dumps(msg).encode()))
    if edit == "bytes":
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(frame) - 1))
            frame[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(frame)


@fuzz(300)
@given(stale_bytes(), hello_ok_variants(), st.data())
def test_scanner_mutated_hello_ok(stale: bytes, variant: bytes, data: st.DataObject) -> None:
    """A hello_ok with our nonce but a bad body is a violation; one that is not ours any more
    is skipped: found later (our real hello_ok follows) or a violation, nothing else."""
    tried("test_scanner_mutated_hello_ok")
    blob = stale + variant + OURS
    run_scanner(blob, split(blob, cuts_for(data, len(blob))))


# --- 4 MiB inputs in 1-byte..64 KiB chunks ----------------------------------------------------
BIG = 4 << 20


def log_uniform_chunks(blob: bytes, rng: random.Random) -> list[bytes]:
    """Chunks of 1 byte to 64 KiB, sizes spread evenly over their orders of magnitude."""
    chunks, pos = [], 0
    while pos < len(blob):
        size = int(2 ** rng.uniform(0, 16))
        chunks.append(blob[pos : pos + size])
        pos += size
    return chunks


def hostile_garbage(rng: random.Random, size: int) -> bytes:
    """About ``size`` bytes of the scanner's worst cases (never a hello_ok with our nonce)."""
    nul_free = bytes(range(1, 256))
    out = bytearray()
    while len(out) < size:
        case = rng.randrange(8)
        if case == 0:  # random bytes
            out += rng.randbytes(rng.randrange(1, 4096))
        elif case == 1:  # a candidate announcing 64 KiB, NUL-free but not JSON
            run = b"a" * rng.randrange(MAX_MSG_PAYLOAD + 1)
            out += PREFIX + struct.pack(">I", MAX_MSG_PAYLOAD) + run
        elif case == 2:  # a complete 64 KiB candidate that parses (costly) but is not ours
            pad = MAX_MSG_PAYLOAD - 64
            out += encode_msg(0, {"op": "hello_ok", "nonce": 7, "p": "x" * pad})
        elif case == 3:  # a candidate whose NUL is at its very end
            body = bytes(rng.choice(nul_free) for _ in range(64)) * 1023 + b"\0"
            out += PREFIX + struct.pack(">I", len(body)) + body
        elif case == 4:  # overlapping candidates: each one's payload holds the next header
            out += (PREFIX + struct.pack(">I", MAX_MSG_PAYLOAD)) * rng.randrange(1, 2000)
        elif case == 5:  # stale hello_oks
            count = rng.randrange(1, 50)
            out += b"".join(stale_hello_ok(rng.randrange(10**6)) for _ in range(count))
        elif case == 6:  # frames of other streams, whose data holds candidate headers
            data = (PREFIX + struct.pack(">I", 40) + b"{" * 40) * rng.randrange(1, 4000)
            out += encode_frame(Kind.STDOUT, 3, data[:MAX_DATA_PAYLOAD])
        else:  # valid JSON candidates, cut short by the next candidate
            out += PREFIX + struct.pack(">I", 5000) + b'{"op":"hello_ok","nonce":' + b"1" * 200
    return bytes(out)


@fuzz(2, per=2000)
@given(st.integers(0, 2**32))
def test_scanner_4mib_of_hostile_bytes_before_hello(seed: int) -> None:
    """Endless garbage before the hello: memory stays at one MSG frame, work stays linear,
    and our hello_ok is still found right after it."""
    tried("test_scanner_4mib_of_hostile_bytes_before_hello")
    rng = random.Random(seed)
    garbage = hostile_garbage(rng, BIG)
    blob = garbage + OURS
    chunks = log_uniform_chunks(blob, rng)
    scanner, found = run_scanner(blob, chunks)
    assert found is not None and found.discarded == len(garbage)
    assert scanner.drops <= len(blob)


@fuzz(2, per=2000)
@given(st.integers(0, 2**32))
def test_decoder_4mib_streams(seed: int) -> None:
    """4 MiB of valid frames (tiny to maximal) in 1-byte..64 KiB chunks: every frame comes out
    intact and at most one frame is ever buffered; 4 MiB of garbage fails at once and then
    costs nothing."""
    tried("test_decoder_4mib_streams")
    rng = random.Random(seed)
    frames, size = [], 0
    while size < BIG:
        case = rng.randrange(5)
        stream = rng.randrange(1, 9)
        if case == 0:
            batch = [encode_frame(Kind.STDOUT, stream, rng.randbytes(MAX_DATA_PAYLOAD))]
        elif case == 1:
            batch = [encode_msg(0, {"op": "error", "kind": "io", "message": "m" * 60000})]
        elif case == 2:
            batch = [encode_frame(Kind.FILEDATA, MAX_STREAM, b"")] * 500
        elif case == 3:
            batch = [encode_frame(Kind.STDERR, 1, rng.randbytes(rng.randrange(1, 64)))] * 500
        else:
            batch = [encode_msg(stream, {"op": "ok", "size": i}) for i in range(500)]
        frames += batch
        size += sum(len(frame) for frame in batch)
    blob = b"".join(frames)
    chunks = log_uniform_chunks(blob, rng)
    cuts = list(itertools.accumulate(len(c) for c in chunks))
    decoded = run_decoder(blob, cuts[:-1])
    assert len(decoded) == len(frames)

    garbage = b"X" + rng.randbytes(BIG)
    decoder = FrameDecoder(G2H)
    failures = 0
    for chunk in log_uniform_chunks(garbage, rng):
        try:
            decoder.feed(chunk)
        except ProtocolViolation as err:
            failures += 1
            assert len(err.rest) < len(chunk) + HEADER_SIZE
        assert decoder.buffered <= HEADER_SIZE
    assert failures > 0
