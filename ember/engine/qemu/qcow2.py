"""Read a qcow2 image's backing-file chain from its headers (no ``qemu-img`` process).

Only the header fields needed are read (QEMU's ``docs/interop/qcow2.txt``): the magic, the
version, and the offset and size of the backing file name. The file is host-made (ember's
own overlays and snapshot disks), but is still read with bounds.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ember.errors import EngineError

MAGIC = b"QFI\xfb"
MAX_NAME = 1023  # QEMU's own limit on a backing file name
MAX_DEPTH = 16


def backing_file(path: Path) -> Path | None:
    """The backing file named in ``path``'s header, resolved like QEMU does (a relative
    name is relative to the image's directory), or None for a standalone image."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != MAGIC:
                return None  # raw (or not qcow2): no backing file
            version, offset, size = struct.unpack(">IQI", header[4:20])
            if version not in (2, 3):
                raise EngineError(f"{path}: unsupported qcow2 version {version}")
            if offset == 0 or size == 0:
                return None
            if size > MAX_NAME:
                raise EngineError(f"{path}: backing file name of {size} bytes is too long")
            f.seek(offset)
            raw = f.read(size)
    except OSError as err:
        raise EngineError(f"cannot read disk image {path}: {err.strerror}") from err
    if len(raw) != size:
        raise EngineError(f"{path}: truncated backing file name")
    name = Path(raw.decode("utf-8", "surrogateescape"))
    return name if name.is_absolute() else path.parent / name


def backing_chain(path: Path) -> list[Path]:
    """``path`` and every backing file below it, top first."""
    chain = [path]
    while (nxt := backing_file(chain[-1])) is not None:
        if nxt in chain or len(chain) >= MAX_DEPTH:
            raise EngineError(f"{path}: backing chain loops or is deeper than {MAX_DEPTH}")
        chain.append(nxt)
    return chain
