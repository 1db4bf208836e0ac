"""Sparse copy keeps content and holes; the digest depends on content only."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ember.runtime.sparse import CHUNK, copy_sparse, digest


def _write(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data[: max(0, size - offset)])


def _dense(path: Path, dst: Path) -> None:
    dst.write_bytes(path.read_bytes())


pieces = st.lists(st.tuples(st.integers(0, 5 * CHUNK), st.binary(min_size=1, max_size=5000)),
                  max_size=6)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 6 * CHUNK), parts=pieces)
def test_copy_and_digest(tmp_path_factory, size: int, parts: list[tuple[int, bytes]]) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("sparse")
    src, copy, dense = d / "src", d / "copy", d / "dense"
    _write(src, size, parts)
    copy_sparse(src, copy)
    _dense(src, dense)
    assert copy.read_bytes() == src.read_bytes()
    assert digest(src) == digest(copy) == digest(dense)


def test_copy_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    _write(src, 64 * CHUNK, [(3 * CHUNK, b"x" * 4096)])
    copied = copy_sparse(src, tmp_path / "out")
    assert copied < 2 * CHUNK
    assert os.stat(tmp_path / "out").st_blocks * 512 < 2 * CHUNK


def test_digest_changes_with_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, 4 * CHUNK, [(CHUNK, b"one")])
    _write(b, 4 * CHUNK, [(CHUNK, b"two")])
    assert digest(a) != digest(b)
    _write(b, 5 * CHUNK, [(CHUNK, b"one")])
    assert digest(a) != digest(b)  # size counts
