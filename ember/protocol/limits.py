"""Constants of the wire format: frame header, kinds, and every length bound."""

from __future__ import annotations

import enum
import struct

PROTOCOL_VERSION = 1
"""Version byte of every frame, and the ``version`` of hello / hello_ok."""

MAGIC = b"EM"

HEADER = struct.Struct(">2sBBII")
"""magic, version, kind, stream, payload length."""

HEADER_SIZE = HEADER.size

MAX_MSG_PAYLOAD = 64 * 1024
"""Largest payload of a MSG frame (one JSON object)."""

MAX_DATA_PAYLOAD = 256 * 1024
"""Largest payload of a STDOUT, STDERR, STDIN or FILEDATA frame."""

MAX_FRAME_SIZE = HEADER_SIZE + MAX_DATA_PAYLOAD
"""Largest frame on the wire; no decoder holds more than this."""

MAX_STREAM = 2**32 - 1

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a MSG payload."""


class Kind(enum.IntEnum):
    """Frame kinds."""

    MSG = 1
    STDOUT = 2
    STDERR = 3
    STDIN = 4
    FILEDATA = 5


ALL_KINDS = frozenset(Kind)
HOST_TO_GUEST_KINDS = frozenset({Kind.MSG, Kind.STDIN, Kind.FILEDATA})
GUEST_TO_HOST_KINDS = frozenset({Kind.MSG, Kind.STDOUT, Kind.STDERR, Kind.FILEDATA})


def max_payload(kind: Kind) -> int:
    """The payload bound of a frame kind."""
    return MAX_MSG_PAYLOAD if kind is Kind.MSG else MAX_DATA_PAYLOAD


class ErrorKind(enum.StrEnum):
    """The ``kind`` of an ``error`` reply."""

    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    PERMISSION = "permission"
    EXISTS = "exists"
    NOT_A_DIRECTORY = "not_a_directory"
    IS_A_DIRECTORY = "is_a_directory"
    NOT_EMPTY = "not_empty"
    IO = "io"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


ERROR_KINDS = frozenset(k.value for k in ErrorKind)
FILE_TYPES = frozenset({"file", "dir", "symlink", "other"})
WATCH_EVENT_TYPES = frozenset({"create", "write", "remove", "rename", "chmod"})
"""What a watch reports of an entry (E2B's, after Go's fsnotify)."""
CONNECT_FRAME_CHARGE = 32 * 1024
"""What each STDOUT frame of a carried connection (``connect``) costs of the bytes the host
granted, however small: so a granted window bounds the frames in flight too, not only the
bytes (a server writing a byte at a time cannot fill the host's queue with frames)."""
MAX_WATCH_BATCH = 512
"""The most events in one ``fs_events`` message."""
