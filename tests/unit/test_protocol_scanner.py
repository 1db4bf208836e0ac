"""Resynchronisation: HelloScanner and MessageScanner over stale and hostile bytes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.protocol import (
    HEADER_SIZE,
    MAX_MSG_PAYLOAD,
    HelloScanner,
    Kind,
    MessageScanner,
    ProtocolViolation,
    encode_frame,
    encode_msg,
    hello_ok,
)

NONCE = 0x1234_5678_9ABC
OURS = encode_msg(0, hello_ok(NONCE, agent="0.1.0", hostname="ember", kernel="6.1.0"))
FOLLOWING = encode_msg(5, {"op": "pong"}) + encode_frame(Kind.STDOUT, 6, b"out")
SCAN_BOUND = HEADER_SIZE + MAX_MSG_PAYLOAD


def scan(data: bytes, nonce: int = NONCE, step: int | None = None) -> object:
    scanner = HelloScanner(nonce)
    step = step or max(1, len(data))
    for start in range(0, max(1, len(data)), step):
        found = scanner.feed(data[start : start + step])
        assert scanner.buffered <= SCAN_BOUND
        if found is not None:
            rest = data[start + step :]
            return found, found.frames + found.decoder.feed(rest)
    return None


def test_finds_hello_ok_with_frames_after_it() -> None:
    found, frames = scan(OURS + FOLLOWING)  # type: ignore[misc]
    assert found.message["nonce"] == NONCE
    assert found.discarded == 0
    assert [(f.kind, f.stream) for f in frames] == [(Kind.MSG, 5), (Kind.STDOUT, 6)]


STALE = [
    b"random garbage \x00\xff",
    encode_frame(Kind.STDOUT, 3, b"old output")[:-4],  # a frame cut short
    encode_msg(0, hello_ok(NONCE + 1, agent="a", hostname="h", kernel="k")),  # old nonce
    encode_msg(7, {"op": "exit", "code": 0, "signal": None, "timed_out": False}),
    encode_msg(0, {"op": "error", "kind": "io", "message": "old"}),
    OURS[:HEADER_SIZE] + b"{",  # a header of our own hello_ok, then cut
    b"EM\x01\x01\x00\x00\x00\x00\xff\xff\xff\xff",  # a stream-0 MSG header with a huge length
    b'EM\x01\x01\x00\x00\x00\x00\x00\x00\x00\x30{"op":"hello_ok"',  # swallows what follows
]


@pytest.mark.parametrize("stale", STALE)
def test_skips_stale_bytes(stale: bytes) -> None:
    found, frames = scan(stale + OURS + FOLLOWING)  # type: ignore[misc]
    assert found.message["nonce"] == NONCE
    assert found.discarded == len(stale)
    assert len(frames) == 2


def test_split_at_every_byte_boundary() -> None:
    data = b"".join(STALE) + OURS + FOLLOWING
    for cut in range(len(data) + 1):
        scanner = HelloScanner(NONCE)
        found = scanner.feed(data[:cut])
        if found is None:
            found = scanner.feed(data[cut:])
            assert found is not None, cut
            frames = found.frames
        else:
            frames = found.frames + found.decoder.feed(data[cut:])
        assert found.message["nonce"] == NONCE
        assert len(frames) == 2, cut


def test_byte_at_a_time() -> None:
    found, frames = scan(b"".join(STALE) + OURS + FOLLOWING, step=1)  # type: ignore[misc]
    assert found.message["nonce"] == NONCE and len(frames) == 2


def test_malformed_hello_ok_with_our_nonce_is_a_violation() -> None:
    bad = encode_msg(0, {"op": "hello_ok", "version": 1, "nonce": NONCE})
    with pytest.raises(ProtocolViolation, match="missing field"):
        HelloScanner(NONCE).feed(bad)


def test_other_protocol_version_is_a_violation() -> None:
    msg = hello_ok(NONCE, agent="a", hostname="h", kernel="k") | {"version": 2}
    with pytest.raises(ProtocolViolation, match="version 2"):
        HelloScanner(NONCE).feed(encode_msg(0, msg))


def test_boolean_nonce_does_not_match() -> None:
    msg = hello_ok(1, agent="a", hostname="h", kernel="k") | {"nonce": True}
    assert HelloScanner(1).feed(encode_msg(0, msg)) is None


def test_garbage_after_match_raises_from_the_decoder() -> None:
    with pytest.raises(ProtocolViolation):
        HelloScanner(NONCE).feed(OURS + b"garbage")


def test_scanner_is_single_use() -> None:
    scanner = HelloScanner(NONCE)
    assert scanner.feed(OURS) is not None
    with pytest.raises(RuntimeError):
        scanner.feed(b"")


def test_message_scanner_for_the_agent() -> None:
    scanner = MessageScanner(lambda m: m["op"] == "hello")
    hello = encode_msg(0, {"op": "hello", "version": 1, "nonce": 9})
    found = scanner.feed(b"\x00junk" + encode_msg(0, {"op": "ping"}) + hello)
    assert found is not None and found.message["nonce"] == 9


def test_buffer_stays_bounded_on_endless_garbage() -> None:
    scanner = HelloScanner(NONCE)
    candidate = b"EM\x01\x01\x00\x00\x00\x00" + (MAX_MSG_PAYLOAD).to_bytes(4, "big")
    blob = (candidate + b"{" + b"a" * 5000) * 40 + bytes(range(256)) * 400
    for start in range(0, len(blob), 4096):
        assert scanner.feed(blob[start : start + 4096]) is None
        assert scanner.buffered <= SCAN_BOUND
    assert scanner.feed(OURS) is not None


def test_overlapping_candidates_are_cheap() -> None:
    """Each candidate announces 64 KiB; each lies inside the previous one's payload."""
    candidate = b"EM\x01\x01\x00\x00\x00\x00" + (MAX_MSG_PAYLOAD).to_bytes(4, "big")
    blob = candidate * 100_000  # 1.2 MB: quadratic work would take minutes
    scanner = HelloScanner(NONCE)
    assert scanner.feed(blob) is None
    found = scanner.feed(OURS)
    assert found is not None


@settings(max_examples=300)
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0, max_value=1000), max_size=5))
def test_any_garbage_then_hello_ok(garbage: bytes, cuts: list[int]) -> None:
    data = garbage + OURS + FOLLOWING
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    scanner = HelloScanner(NONCE)
    frames = []
    found = None
    for start, end in itertools.pairwise(bounds):
        chunk = data[start:end]
        if found is None:
            found = scanner.feed(chunk)
            assert scanner.buffered <= SCAN_BOUND
            if found is not None:
                frames += found.frames
        else:
            frames += found.decoder.feed(chunk)
    assert found is not None
    assert found.message["nonce"] == NONCE
    assert len(frames) == 2


@given(st.lists(st.binary(max_size=300), max_size=10))
def test_hostile_bytes_never_raise_anything_else(chunks: list[bytes]) -> None:
    scanner = HelloScanner(NONCE)
    for chunk in chunks:
        try:
            found = scanner.feed(chunk)
        except ProtocolViolation:
            return
        assert scanner.buffered <= SCAN_BOUND
        if found is not None:
            return
