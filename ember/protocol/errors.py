"""The one exception of the protocol layer."""

from __future__ import annotations


class ProtocolViolation(Exception):
    """Bytes or a message broke the wire protocol (see docs/protocol.md).

    ``rest`` is set by :class:`~ember.protocol.frames.FrameDecoder` when it fails: the bytes
    that followed the point of failure (starting one byte after the failed frame's first
    byte), so that a caller may scan them for a fresh hello instead of dropping them.
    """

    def __init__(self, message: str, *, rest: bytes = b"") -> None:
        super().__init__(message)
        self.rest = rest
