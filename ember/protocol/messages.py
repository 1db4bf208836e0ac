"""Builders for the messages both sides construct most often."""

from __future__ import annotations

from .jsonmsg import Message
from .limits import PROTOCOL_VERSION, ErrorKind

MAX_ERROR_MESSAGE = 4096
"""Error messages are cut to this many characters, so an error reply always fits a frame."""


def hello(nonce: int) -> Message:
    """The host's opening message (stream 0)."""
    return {"op": "hello", "version": PROTOCOL_VERSION, "nonce": nonce}


def hello_ok(nonce: int, *, agent: str, hostname: str, kernel: str) -> Message:
    """The agent's answer to a hello (stream 0)."""
    return {
        "op": "hello_ok",
        "version": PROTOCOL_VERSION,
        "nonce": nonce,
        "agent": agent,
        "hostname": hostname,
        "kernel": kernel,
    }


def error(kind: ErrorKind, message: str) -> Message:
    """A final ``error`` reply; long messages are shortened."""
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 3] + "..."
    return {"op": "error", "kind": kind.value, "message": message}
