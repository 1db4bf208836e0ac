"""Open a layer blob as an uncompressed byte stream, choosing the codec by magic bytes."""

from __future__ import annotations

import bz2
import gzip
import importlib
import lzma
import zlib
from typing import BinaryIO, cast

from ember.errors import ImageSourceError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"


def codec_of(head: bytes) -> str:
    """``"gzip"``, ``"zstd"``, ``"xz"``, ``"bzip2"`` or ``"none"`` from a blob's first bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(BZIP2_MAGIC):
        return "bzip2"
    return "none"


def decompressed(f: BinaryIO, name: str) -> BinaryIO:
    """Wrap the seekable file ``f`` (at offset 0) in the decoder its magic bytes call for."""
    head = f.read(8)
    f.seek(0)
    codec = codec_of(head)
    if codec == "gzip":
        return cast(BinaryIO, gzip.GzipFile(fileobj=f, mode="rb"))
    if codec == "xz":
        return cast(BinaryIO, lzma.LZMAFile(f))
    if codec == "bzip2":
        return cast(BinaryIO, bz2.BZ2File(f))
    if codec == "zstd":
        return _zstd(f, name)
    return f


def _zstd(f: BinaryIO, name: str) -> BinaryIO:
    try:
        stdlib = importlib.import_module("compression.zstd")
    except ModuleNotFoundError:
        pass
    else:
        return cast(BinaryIO, stdlib.ZstdFile(f))
    try:
        zstandard = importlib.import_module("zstandard")
    except ModuleNotFoundError:
        raise ImageSourceError(
            f"layer {name} is zstd-compressed, but this Python cannot decode zstd: "
            "use Python 3.14 or later, or install the 'zstandard' package"
        ) from None
    reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    return cast(BinaryIO, reader)


def decode_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a decoder raises on corrupt or truncated input (besides tarfile's)."""
    errors: list[type[BaseException]] = [EOFError, zlib.error, lzma.LZMAError]
    for module in ("compression.zstd", "zstandard"):
        try:
            err = getattr(importlib.import_module(module), "ZstdError", None)
        except ModuleNotFoundError:
            continue
        if isinstance(err, type) and issubclass(err, BaseException):
            errors.append(err)
    return tuple(errors)
