"""Resynchronisation: skip stale bytes until one particular MSG frame on stream 0.

A virtio-serial port outlives its connections: bytes (even half frames) written for an
earlier connection may arrive first. The host therefore scans for the ``hello_ok`` that
carries its own nonce (:class:`HelloScanner`); the agent scans for a ``hello`` after it
has dropped a session. Both then hand over to a normal :class:`FrameDecoder`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .errors import ProtocolViolation
from .frames import Frame, FrameDecoder
from .jsonmsg import Message, parse_msg
from .limits import ALL_KINDS, HEADER, HEADER_SIZE, MAGIC, MAX_MSG_PAYLOAD, PROTOCOL_VERSION, Kind
from .schema import check_reply

# Header of a MSG frame on stream 0, everything but the length.
_PREFIX = MAGIC + bytes([PROTOCOL_VERSION, Kind.MSG]) + bytes(4)
_CAPACITY = HEADER_SIZE + MAX_MSG_PAYLOAD


TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final


class Handshake:
    """What a scanner found: the matching message, and the decoder that continues after it.

    An immutable record, written by hand: the guest agent avoids importing ``dataclasses``.
    """

    __slots__ = ("decoder", "discarded", "frames", "message")

    def __init__(
        self,
        message: Message,
        decoder: FrameDecoder,
        frames: list[Frame] | None = None,
        discarded: int = 0,
    ) -> None:
        self.message: Final = message
        self.decoder: Final = decoder
        self.frames: Final[list[Frame]] = [] if frames is None else frames
        """Frames that followed the matching one in the bytes fed so far."""
        self.discarded: Final = discarded
        """Bytes skipped before the matching frame."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Handshake):
            return NotImplemented
        return (self.message, self.decoder, self.frames, self.discarded) == (
            other.message,
            other.decoder,
            other.frames,
            other.discarded,
        )

    def __repr__(self) -> str:
        return (
            f"Handshake(message={self.message!r}, decoder={self.decoder!r}, "
            f"frames={self.frames!r}, discarded={self.discarded!r})"
        )


class MessageScanner:
    """Discard bytes until a MSG frame on stream 0 whose message satisfies ``match``.

    Buffers at most one MSG frame (header plus 64 KiB). Work is linear in the bytes fed:
    a candidate's payload may not contain a NUL byte (valid JSON never does, and every
    frame header does), so candidates never overlap.
    """

    def __init__(
        self, match: Callable[[Message], bool], *, kinds: Iterable[Kind] = ALL_KINDS
    ) -> None:
        self._match = match
        self._kinds = frozenset(kinds)
        self._buf = bytearray()
        self._clean = HEADER_SIZE  # payload bytes before this offset hold no NUL
        self._discarded = 0
        self._done = False

    @property
    def buffered(self) -> int:
        """Bytes held (at most one MSG frame)."""
        return len(self._buf)

    @property
    def discarded(self) -> int:
        """Bytes skipped so far."""
        return self._discarded

    def feed(self, data: bytes) -> Handshake | None:
        """Scan ``data``; return the handshake once the matching frame is complete.

        Frames after the matching one are decoded by the handshake's decoder, which raises
        :class:`ProtocolViolation` if they are invalid. A scanner is used only once.
        """
        if self._done:
            raise RuntimeError("scanner already matched; feed its handshake's decoder")
        view = memoryview(data)
        pos = 0
        while True:
            found = self._scan()
            if found is not None:
                message, end = found
                self._done = True
                rest = bytes(self._buf[end:]) + bytes(view[pos:])
                self._buf.clear()
                decoder = FrameDecoder(self._kinds)
                frames = decoder.feed(rest)
                return Handshake(message, decoder, frames, self._discarded)
            if pos >= len(view):
                return None
            take = min(len(view) - pos, _CAPACITY - len(self._buf))
            self._buf += view[pos : pos + take]
            pos += take

    def _scan(self) -> tuple[Message, int] | None:
        buf = self._buf
        while True:
            start = buf.find(_PREFIX)
            if start < 0:
                self._drop(max(0, len(buf) - (len(_PREFIX) - 1)))
                return None
            self._drop(start)
            if len(buf) < HEADER_SIZE:
                return None
            length = HEADER.unpack_from(buf)[4]
            end = HEADER_SIZE + length
            if length > MAX_MSG_PAYLOAD or buf.find(0, self._clean, end) >= 0:
                self._drop(1)
                continue
            if len(buf) < end:
                self._clean = len(buf)
                return None
            try:
                message = parse_msg(bytes(buf[HEADER_SIZE:end]))
            except ProtocolViolation:
                self._drop(1)
                continue
            if self._match(message):
                return message, end
            self._drop(1)

    def _drop(self, count: int) -> None:
        if count:
            del self._buf[:count]
            self._discarded += count
            self._clean = HEADER_SIZE


class HelloScanner(MessageScanner):
    """The host's scanner: waits for the ``hello_ok`` that carries ``nonce``.

    A ``hello_ok`` with the right nonce but a malformed body raises
    :class:`ProtocolViolation` (it cannot be stale: the nonce is fresh).
    """

    def __init__(self, nonce: int, *, kinds: Iterable[Kind] = ALL_KINDS) -> None:
        super().__init__(self._is_our_hello_ok, kinds=kinds)
        self.nonce = nonce

    def _is_our_hello_ok(self, message: Message) -> bool:
        if message.get("op") != "hello_ok" or message.get("nonce") != self.nonce:
            return False
        if isinstance(message.get("nonce"), bool):
            return False
        check_reply(0, message)
        return True
