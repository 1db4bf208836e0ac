"""Replies on one stream, dropped once the session they belong to has ended."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ember.protocol import ErrorKind, Kind, Message, encode_frame, encode_msg, error

from .errors import OpError


class Sender(Protocol):
    def send(self, generation: int, frame: bytes) -> bool:
        """Write a whole frame if ``generation`` is still the current session's."""
        ...


@dataclass(frozen=True)
class Reply:
    """Where an operation answers: a stream of one session."""

    sender: Sender
    generation: int
    stream: int

    def msg(self, message: Message) -> bool:
        """Send a message; False if the session is gone (the caller may stop working)."""
        return self.sender.send(self.generation, encode_msg(self.stream, message))

    def data(self, kind: Kind, payload: bytes) -> bool:
        return self.sender.send(self.generation, encode_frame(kind, self.stream, payload))

    def error(self, kind: ErrorKind, message: str) -> bool:
        return self.msg(error(kind, message))

    def fail(self, err: OpError) -> bool:
        return self.error(err.kind, err.message)
