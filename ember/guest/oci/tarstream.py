"""Read a layer tar as a stream of members, hashing it and insisting on a proper end.

Python's :mod:`tarfile` stops quietly at a bad header or a missing end-of-archive marker.
A layer that does either is corrupt or truncated, so :class:`LayerTar` watches the bytes
tarfile reads and, once tarfile stops, checks that it stopped at a zero block. It also
hashes every byte, which gives the layer's diff id (the digest of the uncompressed tar).
"""

from __future__ import annotations

import hashlib
import tarfile
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import IO, Any, BinaryIO, cast

from ember.errors import ImageSourceError
from ember.guest.oci.compression import decompressed
from ember.guest.oci.limits import MAX_TAR_TRAILER_BYTES

BLOCK = tarfile.BLOCKSIZE
_WINDOW = 1 << 20


class _Tap:
    """A read-only stream wrapper that hashes everything and keeps the last bytes read."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self._sha = hashlib.sha256()
        self._recent: deque[tuple[int, bytes]] = deque()
        self._kept = 0
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        if data:
            self._sha.update(data)
            self._recent.append((self.pos, data))
            self._kept += len(data)
            self.pos += len(data)
            while self._kept - len(self._recent[0][1]) >= _WINDOW:
                self._kept -= len(self._recent.popleft()[1])
        return data

    def recent(self, offset: int, n: int) -> bytes:
        """Bytes ``[offset, offset + n)`` if they were read lately (fewer at end of stream)."""
        out = bytearray()
        for start, data in self._recent:
            lo, hi = max(offset, start), min(offset + n, start + len(data))
            if lo < hi:
                out += data[lo - start : hi - start]
        return bytes(out)

    def drain(self, limit: int) -> int:
        extra = 0
        while chunk := self.read(1 << 16):
            extra += len(chunk)
            if extra > limit:
                break
        return extra

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class LayerTar:
    """``with LayerTar(path, name) as layer: for m in layer.members(): ...``"""

    def __init__(self, path: str, name: str) -> None:
        self.name = name
        self._file = open(path, "rb")  # noqa: SIM115 -- closed in close()
        try:
            self._stream = decompressed(self._file, name)
            self._tap = _Tap(self._stream)
            self._tar = tarfile.open(  # noqa: SIM115 -- reads self._file, closed in close()
                fileobj=cast(IO[bytes], self._tap), mode="r|"
            )
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> LayerTar:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()
        self._file.close()

    def members(self) -> Iterator[tarfile.TarInfo]:
        """Members in order; each member's data must be read before asking for the next."""
        while True:
            member = self._tar.next()
            # tarfile keeps every header it read; in stream mode we need none of them.
            cast(Any, self._tar).members.clear()
            if member is None:
                break
            yield member

    def data(self, member: tarfile.TarInfo) -> IO[bytes]:
        f = self._tar.extractfile(member)
        if f is None:
            raise ImageSourceError(f"layer {self.name}: {member.name!r} has no data")
        return f

    def finish(self) -> str:
        """Check the end-of-archive marker, read what follows, return the diff id."""
        end = self._tap.recent(self._tar.offset, BLOCK)
        if len(end) < BLOCK:
            raise ImageSourceError(
                f"corrupt or truncated layer {self.name}: archive ends without an "
                f"end-of-archive marker (at offset {self._tar.offset})"
            )
        if end.count(0) != BLOCK:
            raise ImageSourceError(
                f"corrupt or truncated layer {self.name}: bad tar header at offset "
                f"{self._tar.offset}"
            )
        if self._tap.drain(MAX_TAR_TRAILER_BYTES) > MAX_TAR_TRAILER_BYTES:
            raise ImageSourceError(
                f"corrupt layer {self.name}: more than "
                f"{MAX_TAR_TRAILER_BYTES} bytes after the end of archive"
            )
        return "sha256:" + self._tap.hexdigest()
