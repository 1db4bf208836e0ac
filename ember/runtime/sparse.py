"""Sparse-aware file copy and content digest (guest RAM files are mostly holes).

Both walk a file's data extents with ``SEEK_DATA``/``SEEK_HOLE``: a 256 MiB RAM file of
which the guest touched 40 MiB costs 40 MiB of I/O, not 256. The digest treats a hole
and a run of zero bytes alike, so it depends on the content only, not on how sparse the
file happens to be.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20
_ZERO = bytes(CHUNK)
_ZERO_MARK = b"\0" * 32


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data extent of the open file ``fd``."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size) - start
        pos = end


def copy_sparse(src: Path, dst: Path) -> int:
    """Copy ``src`` to a new file ``dst`` keeping holes; return the bytes copied."""
    copied = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        os.ftruncate(fout.fileno(), size)
        for offset, length in data_extents(fin.fileno(), size):
            os.lseek(fout.fileno(), offset, os.SEEK_SET)
            done = 0
            while done < length:
                n = os.sendfile(fout.fileno(), fin.fileno(), offset + done, length - done)
                if n == 0:
                    raise OSError(f"{src} shrank while it was copied")
                done += n
            copied += length
    return copied


def digest(path: Path) -> str:
    """sha256 over the sha256 of each 1 MiB chunk (holes and zero chunks alike)."""
    outer = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        outer.update(size.to_bytes(8, "big"))
        pos = 0
        for offset, length in data_extents(fd, size):
            first = max(pos, offset - offset % CHUNK)  # a chunk is hashed once
            for _ in range(pos, first, CHUNK):
                outer.update(_ZERO_MARK)
            pos = first
            end = offset + length
            while pos < end:
                chunk = os.pread(fd, min(CHUNK, size - pos), pos)
                if chunk == _ZERO[: len(chunk)]:
                    outer.update(_ZERO_MARK)
                else:
                    outer.update(hashlib.sha256(chunk).digest())
                pos += CHUNK
        for _ in range(pos, size, CHUNK):
            outer.update(_ZERO_MARK)
    return outer.hexdigest()
