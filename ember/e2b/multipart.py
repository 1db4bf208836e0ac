"""A streaming ``multipart/form-data`` reader for envd's ``POST /files``: bytes in, events
out, no I/O, bounded memory (part heads bounded, part bodies passed on as they arrive).

Events: ``("part", filename)`` when a part's head is read, ``("data", bytes)`` for its
body, ``("end", b"")`` when it ends. A malformed body raises BadRequestError.
"""

from __future__ import annotations

import re
from typing import Literal

from ember.errors import BadRequestError

MAX_HEAD = 16 * 1024
MAX_PARTS = 1000
Event = tuple[Literal["part", "data", "end"], str | bytes]
_FILENAME = re.compile(rb'filename="((?:[^"\\]|\\.)*)"', re.IGNORECASE)
_BOUNDARY = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)


def boundary_of(content_type: str) -> bytes:
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise BadRequestError("multipart/form-data without a boundary")
    return m.group(1).encode()


class MultipartReader:
    def __init__(self, boundary: bytes) -> None:
        self._delim = b"\r\n--" + boundary
        self._buf = bytearray(b"\r\n")  # the first delimiter has no CRLF before it
        self._state: Literal["preamble", "after", "head", "body", "done"] = "preamble"
        self._parts = 0

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        out: list[Event] = []
        while True:
            if self._state == "preamble":
                i = self._buf.find(self._delim)
                if i < 0:
                    if len(self._buf) > MAX_HEAD:
                        raise BadRequestError("multipart body without its boundary")
                    return out
                del self._buf[:i + len(self._delim)]
                self._state = "after"
            elif self._state == "after":
                if len(self._buf) < 2:
                    return out
                mark = bytes(self._buf[:2])
                del self._buf[:2]
                if mark == b"--":
                    self._state = "done"
                    self._buf.clear()
                    return out
                if mark != b"\r\n":
                    raise BadRequestError("malformed multipart delimiter")
                self._state = "head"
            elif self._state == "head":
                i = self._buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(self._buf) > MAX_HEAD:
                        raise BadRequestError(f"a multipart part head over {MAX_HEAD} bytes")
                    return out
                head = bytes(self._buf[:i])
                del self._buf[:i + 4]
                self._parts += 1
                if self._parts > MAX_PARTS:
                    raise BadRequestError(f"more than {MAX_PARTS} files in one upload")
                m = _FILENAME.search(head)
                name = m.group(1).replace(b'\\"', b'"').decode("utf-8", "replace") if m else ""
                out.append(("part", name))
                self._state = "body"
            elif self._state == "body":
                i = self._buf.find(self._delim)
                if i < 0:
                    keep = len(self._delim) - 1  # a delimiter may straddle two reads
                    if len(self._buf) > keep:
                        out.append(("data", bytes(self._buf[:-keep])))
                        del self._buf[:-keep]
                    return out
                if i:
                    out.append(("data", bytes(self._buf[:i])))
                out.append(("end", b""))
                del self._buf[:i + len(self._delim)]
                self._state = "after"
            else:
                self._buf.clear()
                return out

    def close(self) -> None:
        if self._state != "done":
            raise BadRequestError("the multipart body ended before its closing boundary")
