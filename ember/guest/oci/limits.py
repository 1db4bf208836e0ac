"""Bounds on everything an image source can make ember read, keep or wait for."""

from __future__ import annotations

#: Largest manifest, index, image config or docker ``manifest.json`` we read into memory.
MAX_JSON_BYTES = 4 << 20
#: Most layers one image may have.
MAX_LAYERS = 256
#: Largest single blob (a compressed layer) we download or copy.
MAX_BLOB_BYTES = 64 << 30
#: How many index levels (index -> index -> manifest) we follow.
MAX_INDEX_DEPTH = 3
#: How many symlinks one path may go through while extracting (like Linux's MAXSYMLINKS).
MAX_SYMLINK_HOPS = 40
#: Most members a ``docker save`` tarball may hold (it holds a few per layer).
MAX_ARCHIVE_MEMBERS = 100_000
#: Most bytes after a layer's end-of-archive marker (tar record padding is about 10 KiB).
MAX_TAR_TRAILER_BYTES = 16 << 20
#: Seconds one socket operation (connect, one read) may take.
HTTP_TIMEOUT = 30.0
#: Seconds a whole manifest or token request may take.
HTTP_SMALL_DEADLINE = 120.0
#: Seconds a whole blob download may take.
HTTP_BLOB_DEADLINE = 3600.0
#: Largest registry error body or token response we read.
MAX_HTTP_SMALL_BYTES = 64 << 10
