"""Blobs on disk, checked against their descriptors: digest and size, while streaming."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from ember.errors import BuildError, ImageSourceError
from ember.guest.oci.limits import MAX_BLOB_BYTES
from ember.guest.oci.manifest import Descriptor

CHUNK = 1 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def disk_full(err: OSError, doing: str) -> BuildError:
    return BuildError(f"the disk is full while {doing}: {err}")


def _limit(desc: Descriptor) -> int:
    if desc.size is not None and desc.size > MAX_BLOB_BYTES:
        raise ImageSourceError(
            f"blob {desc.digest} is {desc.size} bytes (at most {MAX_BLOB_BYTES} allowed)"
        )
    return desc.size if desc.size is not None else MAX_BLOB_BYTES


def _check(desc: Descriptor, got_digest: str, got_size: int, where: str) -> None:
    if desc.size is not None and got_size != desc.size:
        raise ImageSourceError(
            f"blob {desc.digest} from {where} is truncated or oversized: "
            f"{got_size} bytes, expected {desc.size}"
        )
    if got_digest != desc.digest:
        raise ImageSourceError(
            f"blob {desc.digest} from {where} has the wrong digest (got {got_digest})"
        )


def copy_verified(
    src: Readable, dest: Path, desc: Descriptor, *, where: str, deadline: float | None = None
) -> None:
    """Stream ``src`` into ``dest`` (atomically) checking ``desc``'s digest and size."""
    alg = desc.digest.partition(":")[0]

    def check(got: str, size: int) -> None:
        _check(desc, got, size, where)

    _copy(src, dest, _limit(desc), alg, check, f"blob {desc.digest} from {where}", deadline)


def copy_bounded(src: Readable, dest: Path, limit: int, *, what: str) -> None:
    """Stream ``src`` into ``dest`` (atomically), refusing more than ``limit`` bytes."""
    _copy(src, dest, limit, "sha256", lambda _digest, _size: None, what, None)


def _copy(
    src: Readable,
    dest: Path,
    limit: int,
    alg: str,
    check: Callable[[str, int], None],
    what: str,
    deadline: float | None,
) -> None:
    h = hashlib.new(alg)
    partial = dest.with_name(dest.name + ".partial")
    size = 0
    try:
        with open(partial, "wb") as out:
            while chunk := src.read(min(CHUNK, limit + 1 - size)):
                size += len(chunk)
                if size > limit:
                    raise ImageSourceError(f"{what} is larger than {limit} bytes")
                if deadline is not None and time.monotonic() > deadline:
                    raise ImageSourceError(f"{what}: download timed out")
                h.update(chunk)
                out.write(chunk)
        check(f"{alg}:{h.hexdigest()}", size)
        os.replace(partial, dest)
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise disk_full(err, f"saving {what} to {dest}") from err
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (a FIFO would block forever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageSourceError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def verify_file(path: Path, desc: Descriptor, *, where: str) -> None:
    """Check that the file at ``path`` is exactly the blob ``desc`` describes."""
    limit = _limit(desc)
    try:
        with open_regular(path) as f:
            st = os.fstat(f.fileno())
            if st.st_size > limit or (desc.size is not None and st.st_size != desc.size):
                _check(desc, "(not hashed)", st.st_size, where)
            h = hashlib.new(desc.digest.partition(":")[0])
            size = 0
            while chunk := f.read(CHUNK):
                size += len(chunk)
                h.update(chunk)
    except FileNotFoundError as err:
        raise ImageSourceError(f"blob {desc.digest} is missing from {where}") from err
    except OSError as err:
        raise ImageSourceError(f"cannot read blob {desc.digest} from {where}: {err}") from err
    _check(desc, f"{h.name}:{h.hexdigest()}", size, where)


def read_small(src: Readable, limit: int, what: str, deadline: float | None = None) -> bytes:
    """Read all of ``src``, refusing more than ``limit`` bytes (or going past ``deadline``)."""
    parts: list[bytes] = []
    size = 0
    while chunk := src.read(limit + 1 - size):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ImageSourceError(f"{what} is larger than {limit} bytes")
        if deadline is not None and time.monotonic() > deadline:
            raise ImageSourceError(f"{what}: download timed out")
    return b"".join(parts)
