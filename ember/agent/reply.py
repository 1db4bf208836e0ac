"""Replies on one stream, dropped once the session they belong to has ended."""

from __future__ import annotations

from ember.protocol import ErrorKind, Kind, Message, encode_frame, encode_msg, error

from .errors import OpError

# No runtime import of ``typing`` (nor ``dataclasses``): each costs a TCG-emulated guest
# tens of milliseconds at boot. Sender exists for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final, Protocol

    class Sender(Protocol):
        def send(self, generation: int, frame: bytes) -> bool:
            """Write a whole frame if ``generation`` is still the current session's."""
            ...


class Reply:
    """Where an operation answers: a stream of one session."""

    __slots__ = ("generation", "sender", "stream")

    def __init__(self, sender: Sender, generation: int, stream: int) -> None:
        self.sender: Final = sender
        self.generation: Final = generation
        self.stream: Final = stream

    def __repr__(self) -> str:
        return (
            f"Reply(sender={self.sender!r}, generation={self.generation!r}, stream={self.stream!r})"
        )

    def msg(self, message: Message) -> bool:
        """Send a message; False if the session is gone (the caller may stop working)."""
        return self.sender.send(self.generation, encode_msg(self.stream, message))

    def data(self, kind: Kind, payload: bytes) -> bool:
        return self.sender.send(self.generation, encode_frame(kind, self.stream, payload))

    def error(self, kind: ErrorKind, message: str) -> bool:
        return self.msg(error(kind, message))

    def fail(self, err: OpError) -> bool:
        return self.error(err.kind, err.message)
