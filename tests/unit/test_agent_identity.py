"""The guest agent's identity files: rewritten in place (issue 12: no ext4 truncation on a
restored clone's create)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.agent import identity
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


def test_write_identity_keeps_the_rest_of_hosts_byte_for_byte(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hosts").write_bytes(b"127.0.0.1\tlocalhost\n10.0.0.1 caf\xe9  \xff\n"
                                b"127.0.1.1\told-name  # ember\n")
    real_open = os.open

    def into_tmp(path: str, flags: int, mode: int = 0o777) -> int:
        return real_open(str(etc / Path(path).name) if path.startswith("/etc/") else path,
                         flags, mode)

    monkeypatch.setattr(identity.os, "open", into_tmp)
    identity.write_identity("sb-123456789abc")
    # not UTF-8, and kept as it was: only ember's own line is replaced
    assert (etc / "hosts").read_bytes() == (b"127.0.0.1\tlocalhost\n10.0.0.1 caf\xe9  \xff\n"
                                            b"127.0.1.1\tsb-123456789abc  # ember\n")
    assert (etc / "hostname").read_bytes() == b"sb-123456789abc\n"
    machine_id = (etc / "machine-id").read_bytes()
    assert len(machine_id) == 33 and int(machine_id, 16) >= 0
