"""Frame encoding and the incremental decoder, including hostile bytes."""

from __future__ import annotations

import itertools
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.protocol import (
    HEADER_SIZE,
    HOST_TO_GUEST_KINDS,
    MAX_DATA_PAYLOAD,
    MAX_FRAME_SIZE,
    MAX_JSON_DEPTH,
    MAX_MSG_PAYLOAD,
    Frame,
    FrameDecoder,
    Kind,
    ProtocolViolation,
    encode_frame,
    encode_msg,
    parse_msg,
)


def header(kind: int, stream: int, length: int, magic: bytes = b"EM", version: int = 1) -> bytes:
    return struct.pack(">2sBBII", magic, version, kind, stream, length)


def raw_msg(stream: int, payload: bytes) -> bytes:
    return header(Kind.MSG, stream, len(payload)) + payload


def decode_all(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    assert decoder.buffered == 0
    return frames


# --- encoding ------------------------------------------------------------------------------
def test_encode_msg_layout() -> None:
    frame = encode_msg(7, {"op": "ping"})
    assert frame[:4] == b"EM\x01\x01"
    assert struct.unpack(">II", frame[4:12]) == (7, len(frame) - HEADER_SIZE)
    assert json.loads(frame[12:]) == {"op": "ping"}


@pytest.mark.parametrize("kind", list(Kind))
def test_round_trip_every_kind(kind: Kind) -> None:
    payload = b'{"op":"x"}' if kind is Kind.MSG else bytes(range(256))
    assert decode_all(encode_frame(kind, 3, payload)) == [Frame(kind, 3, payload)]


def test_empty_data_frame() -> None:
    assert decode_all(encode_frame(Kind.STDOUT, 1, b"")) == [Frame(Kind.STDOUT, 1, b"")]


def test_frame_is_a_value() -> None:
    frame = Frame(Kind.STDOUT, 1, b"x")
    assert frame == Frame(kind=Kind.STDOUT, stream=1, payload=b"x")
    assert hash(frame) == hash(Frame(Kind.STDOUT, 1, b"x"))
    assert frame != Frame(Kind.STDERR, 1, b"x") and frame != (Kind.STDOUT, 1, b"x")
    assert repr(frame) == "Frame(kind=<Kind.STDOUT: 2>, stream=1, payload=b'x')"


def test_valid_non_ascii_text_is_accepted() -> None:
    text = "é, 日本, 🎉 and \uffff"
    assert Frame(Kind.MSG, 1, encode_msg(1, {"op": text})[HEADER_SIZE:]).msg() == {"op": text}


def test_largest_frames_pass() -> None:
    data = encode_frame(Kind.FILEDATA, 1, b"x" * MAX_DATA_PAYLOAD)
    assert len(data) == MAX_FRAME_SIZE
    big = {"op": "x", "pad": "a" * (MAX_MSG_PAYLOAD - 20)}
    frames = decode_all(data + encode_msg(2, big))
    assert frames[0].payload == b"x" * MAX_DATA_PAYLOAD
    assert frames[1].msg() == big


def test_encode_rejects_oversize_payloads() -> None:
    with pytest.raises(ProtocolViolation, match="exceeds"):
        encode_frame(Kind.STDIN, 1, b"x" * (MAX_DATA_PAYLOAD + 1))
    with pytest.raises(ProtocolViolation, match="needs"):
        encode_msg(1, {"op": "x", "pad": "a" * MAX_MSG_PAYLOAD})


@pytest.mark.parametrize(
    ("kind", "stream", "match"),
    [(9, 1, "kind"), (Kind.STDOUT, 0, "stream 0"), (Kind.MSG, -1, "range"), (1, 2**32, "range")],
)
def test_encode_rejects_bad_headers(kind: int, stream: int, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        encode_frame(kind, stream, b"{}")


@pytest.mark.parametrize(
    "obj",
    [
        {"no": "op"},
        {"op": 3},
        {"op": "x", "n": float("nan")},
        {"op": "\ud800"},
        {"op": "x", "s": {1}},
    ],
)
def test_encode_msg_rejects_unencodable(obj: dict[str, object]) -> None:
    with pytest.raises(ProtocolViolation):
        encode_msg(1, obj)


def test_msg_of_data_frame_is_a_violation() -> None:
    with pytest.raises(ProtocolViolation, match="not a MSG"):
        Frame(Kind.STDOUT, 1, b"{}").msg()


def test_msg_returns_a_copy() -> None:
    frame = decode_all(encode_msg(1, {"op": "x"}))[0]
    frame.msg()["op"] = "changed"
    assert frame.msg() == {"op": "x"}


# --- decoding: boundaries -------------------------------------------------------------------
STREAM = (
    encode_msg(1, {"op": "exec", "argv": ["echo", "hé"]})
    + encode_frame(Kind.STDIN, 1, b"\x00\xffdata")
    + encode_frame(Kind.FILEDATA, 2, b"")
    + encode_msg(2, {"op": "eof"})
)


def test_split_at_every_byte_boundary() -> None:
    expected = decode_all(STREAM)
    assert len(expected) == 4
    for cut in range(len(STREAM) + 1):
        decoder = FrameDecoder()
        frames = decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:])
        assert frames == expected, cut


def test_byte_at_a_time() -> None:
    decoder = FrameDecoder()
    frames = [f for i in range(len(STREAM)) for f in decoder.feed(STREAM[i : i + 1])]
    assert frames == decode_all(STREAM)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_chunking_gives_the_same_frames(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    decoder = FrameDecoder()
    frames = []
    for start, end in itertools.pairwise(bounds):
        frames += decoder.feed(STREAM[start:end])
    assert frames == decode_all(STREAM)


# --- decoding: violations -------------------------------------------------------------------
BAD_FRAMES = {
    "magic": header(1, 1, 2, magic=b"XM") + b"{}",
    "version": header(1, 1, 2, version=2) + b"{}",
    "kind 0": header(0, 1, 0),
    "kind 6": header(6, 1, 0),
    "data on stream 0": header(Kind.STDOUT, 0, 0),
    "oversize msg": header(Kind.MSG, 1, MAX_MSG_PAYLOAD + 1),
    "oversize data": header(Kind.FILEDATA, 1, MAX_DATA_PAYLOAD + 1),
    "huge length": header(Kind.STDIN, 1, 2**32 - 1),
    "bad utf-8": raw_msg(1, b'{"op":"\xff"}'),
    "overlong utf-8": raw_msg(1, b'{"op":"\xc0\xaf"}'),
    "encoded surrogate": raw_msg(1, b'{"op":"\xed\xa0\x80"}'),
    "escaped lone surrogate": raw_msg(1, b'{"op":"\\ud800"}'),
    "lone surrogate after non-ascii": raw_msg(1, b'{"op":"x","s":["\xc3\xa9\\udfff"]}'),
    "lone surrogate in a key": raw_msg(1, b'{"op":"x","o":{"\\udc80":1}}'),
    "not json": raw_msg(1, b"{op}"),
    "empty": raw_msg(1, b""),
    "trailing data": raw_msg(1, b'{"op":"x"} {}'),
    "array": raw_msg(1, b'["op"]'),
    "string": raw_msg(1, b'"op"'),
    "null": raw_msg(1, b"null"),
    "no op": raw_msg(1, b'{"opx":"x"}'),
    "op not a string": raw_msg(1, b'{"op":1}'),
    "duplicate key": raw_msg(1, b'{"op":"x","op":"y"}'),
    "NaN": raw_msg(1, b'{"op":"x","n":NaN}'),
    "Infinity": raw_msg(1, b'{"op":"x","n":-Infinity}'),
    "float overflow": raw_msg(1, b'{"op":"x","n":1e999}'),
    "huge int": raw_msg(1, b'{"op":"x","n":' + b"9" * 5000 + b"}"),
    "deep nesting": raw_msg(1, b'{"op":"x","n":' + b"[" * 5000 + b"]" * 5000 + b"}"),
    "nesting over limit": raw_msg(
        1, b'{"op":"x","n":' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    ),
    "control char": raw_msg(1, b'{"op":"a\x01"}'),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_violations(name: str) -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolViolation):
        decoder.feed(BAD_FRAMES[name])
    with pytest.raises(ProtocolViolation, match="failed earlier"):
        decoder.feed(encode_msg(1, {"op": "ping"}))


def test_nesting_at_the_limit_passes() -> None:
    depth = MAX_JSON_DEPTH - 1
    payload = b'{"op":"x","n":' + b"[" * depth + b"]" * depth + b"}"
    assert decode_all(raw_msg(1, payload))[0].msg()["op"] == "x"


def test_bad_magic_fails_at_the_first_byte() -> None:
    with pytest.raises(ProtocolViolation, match="magic"):
        FrameDecoder().feed(b"X")


def test_rest_starts_after_the_failed_frames_first_byte() -> None:
    good = encode_msg(0, {"op": "hello", "version": 1, "nonce": 1})
    with pytest.raises(ProtocolViolation) as caught:
        FrameDecoder().feed(b"E" + good)  # "EE" is the bad magic
    assert caught.value.rest == good
    bad_json = raw_msg(1, b"{nope}")
    with pytest.raises(ProtocolViolation) as caught:
        FrameDecoder().feed(bad_json + good)
    assert caught.value.rest == good


def test_kind_filter() -> None:
    decoder = FrameDecoder(HOST_TO_GUEST_KINDS)
    with pytest.raises(ProtocolViolation, match="kind 2"):
        decoder.feed(encode_frame(Kind.STDOUT, 1, b"x"))


def test_parse_msg_direct() -> None:
    assert parse_msg(b' {"op": "x", "a": [1, 2.5, true, null]} ')["a"] == [1, 2.5, True, None]
    with pytest.raises(ProtocolViolation):
        parse_msg(b"{" * (MAX_MSG_PAYLOAD + 1))


# --- decoding: hostile bytes (hypothesis) ---------------------------------------------------
def _feed_checked(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
        except ProtocolViolation:
            return
        assert decoder.buffered <= MAX_FRAME_SIZE
        for frame in frames:
            if frame.kind is Kind.MSG:
                assert isinstance(frame.msg()["op"], str)
            assert len(frame.payload) <= MAX_DATA_PAYLOAD


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_random_bytes(chunks: list[bytes]) -> None:
    _feed_checked(chunks)


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """Mostly well-formed headers with hostile lengths and payloads."""
    kind = draw(st.integers(min_value=0, max_value=7))
    stream = draw(st.sampled_from([0, 1, 2**32 - 1]))
    payload = draw(
        st.one_of(
            st.binary(max_size=64),
            st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3)
                ),
                max_leaves=8,
            ).map(lambda v: json.dumps(v).encode()),
            st.builds(
                lambda op, extra: json.dumps({"op": op, **extra}).encode(),
                st.text(max_size=8),
                st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
            ),
        )
    )
    length = draw(
        st.one_of(
            st.just(len(payload)),
            st.integers(min_value=0, max_value=len(payload) + 3),
            st.sampled_from(
                [MAX_MSG_PAYLOAD, MAX_MSG_PAYLOAD + 1, MAX_DATA_PAYLOAD + 1, 2**32 - 1]
            ),
        )
    )
    return header(kind, stream, length) + payload


@settings(max_examples=300)
@given(st.lists(plausible_frames(), max_size=8), st.data())
def test_plausible_hostile_frames(frames: list[bytes], data: st.DataObject) -> None:
    blob = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=6)))
    bounds = [0, *cuts, len(blob)]
    _feed_checked([blob[a:b] for a, b in itertools.pairwise(bounds)])


@given(st.binary(min_size=1, max_size=200))
def test_truncated_valid_stream_never_yields_garbage(tail: bytes) -> None:
    decoder = FrameDecoder()
    cut = len(tail) % len(STREAM)
    frames = decoder.feed(STREAM[:cut])
    assert frames == decode_all(STREAM)[: len(frames)]
    assert decoder.buffered <= MAX_FRAME_SIZE
