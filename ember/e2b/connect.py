"""The Connect protocol's framing, as envd's clients speak it (JSON codec, HTTP/1.1): no
I/O here, bytes in and messages out, every length bounded.

* A **unary** call is a plain POST: ``Content-Type: application/json``, the request
  message is the body, the answer is the response message (200) or an error: the HTTP
  status of its code and a body ``{"code": "not_found", "message": "..."}``.
* A **streaming** call (``application/connect+json``) frames each message in an envelope:
  one flags byte and a 4-byte big-endian length, then that many bytes of JSON. A server
  stream answers 200 whatever happens and ends with an *end-stream* envelope (flag
  ``0x02``) whose JSON is ``{}`` or ``{"error": {"code", "message"}}``.

:class:`EnvelopeReader` takes the body as it arrives and hands back whole messages; a
compressed envelope, an unknown flag, a length over its bound or a body that stops
mid-envelope raises :class:`ConnectError` (``invalid_argument`` or
``resource_exhausted``), so that a malformed request gets an answer, never a hang.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
HEADER = struct.Struct(">BI")
#: The largest message accepted in a request (envd's RPC messages are small: file
#: contents go through ``/files``; stdin chunks are bounded by the SDK at a few KiB).
MAX_MESSAGE = 4 << 20
STREAM_CONTENT_TYPE = "application/connect+json"
UNARY_CONTENT_TYPE = "application/json"

#: Connect error codes and the HTTP status a unary call answers with each
#: (connectrpc.com/docs/protocol, "Error codes").
HTTP_STATUS: dict[str, int] = {
    "canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504,
    "not_found": 404, "already_exists": 409, "permission_denied": 403,
    "resource_exhausted": 429, "failed_precondition": 400, "aborted": 409,
    "out_of_range": 400, "unimplemented": 501, "internal": 500, "unavailable": 503,
    "data_loss": 500, "unauthenticated": 401,
}


class ConnectError(Exception):
    """An error as a Connect client receives it: a code of :data:`HTTP_STATUS` and a
    message."""

    def __init__(self, code: str, message: str) -> None:
        if code not in HTTP_STATUS:
            raise ValueError(f"not a Connect error code: {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def envelope(message: dict[str, Any] | bytes, *, flags: int = 0) -> bytes:
    """One envelope holding ``message`` (a dict is encoded as compact JSON)."""
    data = message if isinstance(message, bytes) else json.dumps(
        message, separators=(",", ":")).encode()
    return HEADER.pack(flags, len(data)) + data


def end_stream(error: ConnectError | None = None) -> bytes:
    """The end-stream envelope that closes every server stream."""
    return envelope({} if error is None else {"error": error.to_json()},
                    flags=FLAG_END_STREAM)


def unary_error_body(error: ConnectError) -> bytes:
    return json.dumps(error.to_json(), separators=(",", ":")).encode()


def decode_message(data: bytes, what: str) -> dict[str, Any]:
    """A request message's JSON (an object), or ``invalid_argument``."""
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ConnectError("invalid_argument", f"{what}: the message is not JSON") from None
    if not isinstance(msg, dict):
        raise ConnectError("invalid_argument", f"{what}: the message is not a JSON object")
    return msg


@dataclass
class EnvelopeReader:
    """Whole envelopes out of a request body fed in pieces of any size."""

    max_message: int = MAX_MESSAGE

    def __post_init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The messages completed by ``data`` (each envelope's payload)."""
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= HEADER.size:
            flags, length = HEADER.unpack_from(self._buf)
            if flags & FLAG_COMPRESSED:
                raise ConnectError("unimplemented", "compressed messages are not accepted")
            if flags:
                raise ConnectError("invalid_argument",
                                   f"unexpected envelope flags 0x{flags:02x} in a request")
            if length > self.max_message:
                raise ConnectError("resource_exhausted",
                                   f"a message of {length} bytes is over the limit of "
                                   f"{self.max_message}")
            if len(self._buf) < HEADER.size + length:
                break
            out.append(bytes(self._buf[HEADER.size:HEADER.size + length]))
            del self._buf[:HEADER.size + length]
        return out

    def close(self) -> None:
        """The body ended: anything left over is a truncated envelope."""
        if self._buf:
            raise ConnectError("invalid_argument",
                               f"the request body ends inside an envelope ({len(self._buf)} "
                               "bytes left over)")


def single_message(body: bytes, what: str, *, max_message: int = MAX_MESSAGE) -> dict[str, Any]:
    """The one request message of a server-streaming call, from its whole body."""
    reader = EnvelopeReader(max_message)
    messages = reader.feed(body)
    reader.close()
    if len(messages) != 1:
        raise ConnectError("invalid_argument",
                           f"{what}: expected one request message, got {len(messages)}")
    return decode_message(messages[0], what)


def timeout_of(header: str | None) -> float | None:
    """Seconds from a ``Connect-Timeout-Ms`` header (None: no deadline)."""
    if header is None:
        return None
    if not header.isdigit() or len(header) > 10:
        raise ConnectError("invalid_argument", f"Connect-Timeout-Ms must be 1-10 digits, "
                           f"not {header[:20]!r}")
    return int(header) / 1000


__all__ = [
    "STREAM_CONTENT_TYPE", "UNARY_CONTENT_TYPE", "ConnectError", "EnvelopeReader",
    "decode_message", "end_stream", "envelope", "single_message", "timeout_of",
    "unary_error_body",
]
