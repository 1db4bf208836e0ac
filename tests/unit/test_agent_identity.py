"""The guest agent's identity files: rewritten in place (issue 12: no ext4 truncation on a
restored clone's create)."""

from __future__ import annotations

import os
from pathlib import Path

from ember.agent.identity import rewrite


def test_rewrite_overwrites_in_place_when_the_length_is_the_same(tmp_path: Path) -> None:
    f = tmp_path / "hostname"
    f.write_bytes(b"sb-000000000000\n")
    inode = f.stat().st_ino
    rewrite(str(f), b"sb-123456789abc\n")
    assert f.read_bytes() == b"sb-123456789abc\n"
    assert f.stat().st_ino == inode


def test_rewrite_shortens_lengthens_and_creates(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_bytes(b"127.0.0.1 localhost\n127.0.1.1 a-long-old-name  # ember\n")
    rewrite(str(f), b"127.0.0.1 localhost\n")
    assert f.read_bytes() == b"127.0.0.1 localhost\n"
    rewrite(str(f), b"x" * 10_000)
    assert f.read_bytes() == b"x" * 10_000
    new = tmp_path / "machine-id"
    old_umask = os.umask(0o022)
    try:
        rewrite(str(new), b"ab\n")
    finally:
        os.umask(old_umask)
    assert new.read_bytes() == b"ab\n" and new.stat().st_mode & 0o777 == 0o644
