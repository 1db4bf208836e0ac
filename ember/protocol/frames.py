"""Frames: encoding, and an incremental decoder with bounded buffering. No I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import ProtocolViolation
from .jsonmsg import Message, dump_msg, parse_msg
from .limits import (
    ALL_KINDS,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_STREAM,
    PROTOCOL_VERSION,
    Kind,
    max_payload,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final


class Frame:
    """One frame. ``payload`` is a JSON object for MSG, raw bytes for the other kinds.

    An immutable value (``Final`` fields, compared and hashed by value). Written by hand, not
    as a dataclass: the guest agent imports this at boot, and importing ``dataclasses``
    (which pulls in ``inspect``) costs a TCG-emulated guest tens of milliseconds.
    """

    __slots__ = ("_parsed", "kind", "payload", "stream")

    def __init__(self, kind: Kind, stream: int, payload: bytes) -> None:
        self.kind: Final = kind
        self.stream: Final = stream
        self.payload: Final = payload
        self._parsed: Message | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.kind, self.stream, self.payload) == (other.kind, other.stream, other.payload)

    def __hash__(self) -> int:
        return hash((self.kind, self.stream, self.payload))

    def __repr__(self) -> str:
        return f"Frame(kind={self.kind!r}, stream={self.stream!r}, payload={self.payload!r})"

    def msg(self) -> Message:
        """The MSG payload as a checked JSON object (a fresh copy on every call)."""
        if self._parsed is None:
            if self.kind is not Kind.MSG:
                raise ProtocolViolation(
                    f"{self.kind.name} frame on stream {self.stream} is not a MSG"
                )
            self._parsed = parse_msg(self.payload)
        return dict(self._parsed)

    def encode(self) -> bytes:
        """The frame's bytes on the wire."""
        return encode_frame(self.kind, self.stream, self.payload)


def encode_frame(kind: int, stream: int, payload: bytes) -> bytes:
    """Encode one frame; raise :class:`ProtocolViolation` if it would break a bound.

    ``kind`` is a :class:`Kind` (a plain int is accepted and checked).
    """
    checked = _check_kind(int(kind), ALL_KINDS)
    _check_stream(checked, stream)
    limit = max_payload(checked)
    if len(payload) > limit:
        raise ProtocolViolation(f"{checked.name} payload of {len(payload)} bytes exceeds {limit}")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, checked, stream, len(payload)) + payload


def encode_msg(stream: int, obj: Mapping[str, object]) -> bytes:
    """Encode a message (a JSON object with a string ``op``) as a MSG frame."""
    return encode_frame(Kind.MSG, stream, dump_msg(obj))


class FrameDecoder:
    """Bytes in, frames out. Holds at most one frame (header plus payload) of leftover bytes.

    Each MSG frame is parsed as it completes, so every MSG frame returned has a valid
    ``msg()``. After a :class:`ProtocolViolation` the decoder stays failed.
    """

    def __init__(self, kinds: Iterable[Kind] = ALL_KINDS) -> None:
        self._kinds = frozenset(kinds)
        self._buf = bytearray()
        self._header: tuple[Kind, int, int] | None = None  # kind, stream, length
        self._failure: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress (at most ``MAX_FRAME_SIZE``)."""
        return len(self._buf) + (HEADER_SIZE if self._header is not None else 0)

    def feed(self, data: bytes) -> list[Frame]:
        """Decode ``data``; return the frames it completes, in order."""
        if self._failure is not None:
            raise ProtocolViolation(f"decoder failed earlier: {self._failure}")
        frames: list[Frame] = []
        view = memoryview(data)
        pos = 0
        while True:
            if self._header is None:
                take = min(HEADER_SIZE - len(self._buf), len(view) - pos)
                self._buf += view[pos : pos + take]
                pos += take
                try:
                    self._check_header()
                except ProtocolViolation as err:
                    raise self._fail(err, bytes(self._buf[1:]) + bytes(view[pos:])) from None
            else:
                take = min(self._header[2] - len(self._buf), len(view) - pos)
                self._buf += view[pos : pos + take]
                pos += take
            if self._header is not None and len(self._buf) == self._header[2]:
                frame = Frame(self._header[0], self._header[1], bytes(self._buf))
                self._header = None
                self._buf.clear()
                if frame.kind is Kind.MSG:
                    try:
                        frame.msg()
                    except ProtocolViolation as err:
                        raise self._fail(err, bytes(view[pos:])) from None
                frames.append(frame)
            elif pos >= len(view):
                return frames

    def _check_header(self) -> None:
        """Check the header bytes received so far; parse the header once complete."""
        buf = self._buf
        if buf[: len(MAGIC)] != MAGIC[: len(buf)]:
            raise ProtocolViolation(f"bad magic {bytes(buf[:2])!r}")
        if len(buf) > 2 and buf[2] != PROTOCOL_VERSION:
            raise ProtocolViolation(f"unknown protocol version {buf[2]}")
        if len(buf) > 3:
            _check_kind(buf[3], self._kinds)
        if len(buf) < HEADER_SIZE:
            return
        _, _, kind_byte, stream, length = HEADER.unpack(buf)
        kind = Kind(kind_byte)
        _check_stream(kind, stream)
        if length > max_payload(kind):
            raise ProtocolViolation(
                f"{kind.name} frame on stream {stream} announces {length} bytes, "
                f"more than {max_payload(kind)}"
            )
        self._header = (kind, stream, length)
        buf.clear()

    def _fail(self, err: ProtocolViolation, rest: bytes) -> ProtocolViolation:
        self._failure = str(err)
        self._buf.clear()
        self._header = None
        return ProtocolViolation(str(err), rest=rest)


def _check_kind(value: int, allowed: frozenset[Kind]) -> Kind:
    if value not in allowed:
        names = "/".join(sorted(k.name for k in allowed))
        raise ProtocolViolation(f"frame kind {value} is not one of {names}")
    return Kind(value)


def _check_stream(kind: Kind, stream: int) -> None:
    if not 0 <= stream <= MAX_STREAM:
        raise ProtocolViolation(f"stream id {stream} is out of range")
    if stream == 0 and kind is not Kind.MSG:
        raise ProtocolViolation(f"{kind.name} frame on stream 0 (only MSG frames may use it)")
