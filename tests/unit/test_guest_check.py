"""The check line is only taken from the console once it is complete."""

from __future__ import annotations

from ember.guest.check import CHECK_RE


def test_half_written_line_does_not_match() -> None:
    assert CHECK_RE.search(b"boot\r\nEMBER-CHECK kernel=6.1.192 digest=sha256:f51b5b9e15de") is None


def test_complete_line_matches_whole_digest() -> None:
    digest = "sha256:" + "ab" * 32
    m = CHECK_RE.search(f"x\r\nEMBER-CHECK kernel=6.1.192 digest={digest}\r\nmore".encode())
    assert m is not None
    assert m.group(1) == b"6.1.192" and m.group(2).decode() == digest
