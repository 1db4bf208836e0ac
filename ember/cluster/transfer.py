"""A template's content as it travels between two daemons of a cluster (pure, no I/O
beyond reading a local file's holes): the holder's **manifest** (what the template is and
how big each file of its image directory is) and the **frames** each file is sent in.

A template's image directory (``images/<digest>/``) holds ``rootfs.ext4``, a sparse ext4
image (most of it free space: holes), and ``meta.json``. A file travels as a sequence of
frames, each ``offset (u64 BE) | length (u64 BE) | length bytes`` of data, only the data
regions of the file (holes stay holes on the receiving side), ended by one frame of length
0 whose offset is the file's size. Everything received is checked against the manifest:
offsets increase, every frame lies inside the file, the data adds up to what the manifest
announced, nothing follows the end. The manifest itself is bounded and validated where it
enters (:meth:`Manifest.from_json`). The content's digest is checked after the transfer
(:mod:`ember.guest.ext4_digest`).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import TemplateTransferError

#: The files of an image directory, in the order they travel.
FILES = ("meta.json", "rootfs.ext4")
#: Bounds of what a holder may announce.
MAX_IMAGE_BYTES = 256 << 30  # a rootfs.ext4's apparent size
MAX_META_BYTES = 1 << 20
MAX_CONFIG_CHARS = 256 << 10
FRAME = struct.Struct(">QQ")
#: How much data one frame carries at most (the sender's chunk; the receiver's bound).
MAX_FRAME_DATA = 4 << 20
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class FileEntry:
    name: str
    #: The file's apparent size (holes included).
    size: int
    #: The bytes of data the file is sent as (its data regions).
    data_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "data_bytes": self.data_bytes}


@dataclass(frozen=True)
class Manifest:
    """What a holder says about one of its templates."""

    name: str
    digest: str
    source: str
    size_bytes: int
    config: dict[str, Any] = field(default_factory=dict)
    files: tuple[FileEntry, ...] = ()

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def data_bytes(self) -> int:
        return sum(f.data_bytes for f in self.files)

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise TemplateTransferError(f"the manifest has no {name}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "source": self.source,
                "size_bytes": self.size_bytes, "config": self.config,
                "files": [f.to_json() for f in self.files]}

    @classmethod
    def from_json(cls, raw: object, *, name: str, digest: str | None = None) -> Manifest:
        """Validate a holder's answer for template ``name`` (and ``digest`` when the
        directory said which one is wanted); :class:`TemplateTransferError` otherwise."""
        def bad(why: str) -> TemplateTransferError:
            return TemplateTransferError(f"the holder's manifest of {name!r} is refused: {why}")

        if not isinstance(raw, dict):
            raise bad("not a JSON object")
        if raw.get("name") != name:
            raise bad(f"it names {str(raw.get('name'))[:80]!r}")
        got = raw.get("digest")
        if not isinstance(got, str) or not DIGEST_RE.match(got):
            raise bad("no valid digest")
        if digest is not None and got != digest:
            raise bad(f"its digest {got} is not the one the directory names ({digest})")
        source, size, config = raw.get("source"), raw.get("size_bytes"), raw.get("config")
        if not isinstance(source, str) or len(source) > 4096:
            raise bad("no valid source")
        if not isinstance(config, dict) or len(repr(config)) > MAX_CONFIG_CHARS:
            raise bad("no valid config")
        raw_files = raw.get("files")
        if not isinstance(raw_files, list) or len(raw_files) != len(FILES):
            raise bad(f"its files must be exactly {', '.join(FILES)}")
        files: list[FileEntry] = []
        for want, f in zip(FILES, raw_files, strict=True):
            if not isinstance(f, dict) or f.get("name") != want:
                raise bad(f"its files must be exactly {', '.join(FILES)}, in that order")
            fsize, fdata = f.get("size"), f.get("data_bytes")
            bound = MAX_META_BYTES if want == "meta.json" else MAX_IMAGE_BYTES
            if not isinstance(fsize, int) or not isinstance(fdata, int) \
                    or not _count(fsize) or not _count(fdata) or fsize > bound or fdata > fsize:
                raise bad(f"{want}: size {str(fsize)[:40]} / data {str(fdata)[:40]} out of "
                          f"bounds (at most {bound} bytes, data within the size)")
            files.append(FileEntry(want, fsize, fdata))
        if not _count(size) or size != files[-1].size:
            raise bad("size_bytes is not rootfs.ext4's size")
        return cls(name=name, digest=got, source=source, size_bytes=int(size),
                   config=dict(config), files=tuple(files))


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# --- the holder's side ------------------------------------------------------------------
def data_regions(path: Path) -> list[tuple[int, int]]:
    """``(offset, length)`` of each data region of a (sparse) file, by SEEK_DATA/SEEK_HOLE;
    the whole file as one region where the filesystem cannot say."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        out: list[tuple[int, int]] = []
        pos = 0
        try:
            while pos < size:
                try:
                    start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
                out.append((start, end - start))
                pos = end
        except (AttributeError, OSError):
            return [(0, size)] if size else []
        return out


def describe(path: Path) -> FileEntry:
    return FileEntry(path.name, path.stat().st_size,
                     sum(n for _, n in data_regions(path)))


def frames(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The frames ``path`` is sent as (its data regions, then the end frame)."""
    chunk = min(chunk, MAX_FRAME_DATA)
    regions = data_regions(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for start, length in regions:
            f.seek(start)
            left = length
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:  # the file shrank under us: the receiver sees a short file
                    break
                yield FRAME.pack(start + length - left, len(data)) + data
                left -= len(data)
    yield FRAME.pack(size, 0)


# --- the receiver's side (bytes in, writes out) -----------------------------------------
class FrameDecoder:
    """Parses one file's frames; ``feed`` answers the ``(offset, data)`` writes to make.
    Everything is checked against the manifest's ``entry``."""

    def __init__(self, entry: FileEntry) -> None:
        self.entry = entry
        self._buf = bytearray()
        self._need: tuple[int, int] | None = None  # (offset, length) of the frame being read
        self._next = 0  # the lowest offset the next frame may start at
        self.received = 0
        self.done = False

    def _fail(self, why: str) -> TemplateTransferError:
        return TemplateTransferError(f"the transfer of {self.entry.name} is refused: {why}")

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        if self.done and chunk:
            raise self._fail("data after the end")
        self._buf += chunk
        out: list[tuple[int, bytes]] = []
        while not self.done:
            if self._need is None:
                if len(self._buf) < FRAME.size:
                    break
                offset, length = FRAME.unpack_from(self._buf)
                del self._buf[:FRAME.size]
                if length == 0:
                    if offset != self.entry.size:
                        raise self._fail(f"it ends at {offset}, not at its size "
                                         f"{self.entry.size}")
                    if self.received != self.entry.data_bytes:
                        raise self._fail(f"{self.received} bytes of data came, "
                                         f"{self.entry.data_bytes} were announced")
                    self.done = True
                    if self._buf:
                        raise self._fail("data after the end")
                    break
                if length > MAX_FRAME_DATA:
                    raise self._fail(f"a frame of {length} bytes (at most {MAX_FRAME_DATA})")
                if offset < self._next or offset + length > self.entry.size:
                    raise self._fail(f"a frame at {offset}+{length} outside the file "
                                     f"({self.entry.size} bytes) or out of order")
                if self.received + length > self.entry.data_bytes:
                    raise self._fail(f"more data than the {self.entry.data_bytes} bytes "
                                     "announced")
                self._need = (offset, length)
            offset, length = self._need
            if len(self._buf) < length:
                break
            out.append((offset, bytes(self._buf[:length])))
            del self._buf[:length]
            self.received += length
            self._next = offset + length
            self._need = None
        return out

    def finish(self) -> None:
        """The stream ended: it must have ended with the end frame."""
        if not self.done:
            raise self._fail(f"the stream stopped after {self.received} of "
                             f"{self.entry.data_bytes} bytes of data")
