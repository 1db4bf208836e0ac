"""File operations in a real microVM."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import BadRequestError, FsEvent, GuestPathNotFoundError, NotFoundError, Sandbox

pytestmark = pytest.mark.integration


def test_write_read_list_stat_rename_remove(shared_sandbox: Sandbox) -> None:
    fs = shared_sandbox.files
    fs.mkdir("/work/sub", parents=True)
    assert fs.write("/work/sub/a.txt", "hello") == 5
    assert fs.read_text("/work/sub/a.txt") == "hello"
    st = fs.stat("/work/sub/a.txt")
    assert (st.type, st.size, st.name) == ("file", 5, "a.txt")
    assert [e.name for e in fs.list("/work/sub")] == ["a.txt"]
    fs.rename("/work/sub/a.txt", "/work/sub/b.txt")
    assert not fs.exists("/work/sub/a.txt") and fs.exists("/work/sub/b.txt")
    # the guest sees what the files API wrote
    assert shared_sandbox.exec("cat /work/sub/b.txt").stdout == "hello"
    fs.remove("/work", recursive=True)
    assert not fs.exists("/work")


def test_large_file_roundtrip(shared_sandbox: Sandbox, tmp_path: Path) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "blob"
    src.write_bytes(blob)
    assert shared_sandbox.files.upload(src, "/tmp/blob") == len(blob)
    digest = shared_sandbox.exec("sha256sum /tmp/blob").stdout.split()[0]
    import hashlib

    assert digest == hashlib.sha256(blob).hexdigest()
    back = tmp_path / "back"
    assert shared_sandbox.files.download("/tmp/blob", back) == len(blob)
    assert back.read_bytes() == blob


def test_file_errors_are_typed(shared_sandbox: Sandbox, tmp_path: Path) -> None:
    fs = shared_sandbox.files
    with pytest.raises(GuestPathNotFoundError):
        fs.read("/no/such/file")
    with pytest.raises(NotFoundError):
        fs.list("/no/such/dir")
    with pytest.raises(BadRequestError, match="absolute"):
        fs.read("relative/path")
    with pytest.raises(BadRequestError):
        fs.read("/etc")  # a directory
    # a failed download leaves no partial local file
    with pytest.raises(NotFoundError):
        fs.download("/no/such/file", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_watch_a_directory(shared_sandbox: Sandbox) -> None:
    import threading

    fs = shared_sandbox.files
    fs.mkdir("/watched/sub", parents=True)
    with pytest.raises(GuestPathNotFoundError):
        fs.watch("/watched/no/such/dir")
    want = {("a.txt", "create"), ("a.txt", "write"), ("a.txt", "chmod"), ("a.txt", "rename"),
            ("b.txt", "create"), ("b.txt", "remove"), ("new", "create"),
            ("new/deep/f", "create"), ("sub/g", "create")}
    seen: set[tuple[str, str]] = set()
    with fs.watch("/watched", recursive=True) as w:
        guard = threading.Timer(120, w.close)  # never wait forever on a missing event
        guard.start()
        try:
            shared_sandbox.exec("cd /watched && echo hi > a.txt && chmod 600 a.txt && "
                                "mv a.txt b.txt && rm b.txt && mkdir -p new/deep && "
                                "echo x > new/deep/f && touch sub/g")
            for ev in w:
                seen.add((ev.name, ev.type))
                if want <= seen:
                    break
        finally:
            guard.cancel()
    assert want <= seen, want - seen
    # the watch is gone, the sandbox serves on; a watch ends when its directory goes
    with fs.watch("/watched/sub") as w:
        fs.remove("/watched", recursive=True)
        assert ("g", "remove") in {(e.name, e.type) for e in w}


def test_watching_a_huge_tree_is_bounded(shared_sandbox: Sandbox) -> None:
    """More directories than a watch follows (4096): the watch still starts, says at once
    that it lost events, still reports what it follows, and the sandbox serves on."""
    import threading
    import time

    shared_sandbox.exec("mkdir -p /huge && cd /huge && seq 4200 | xargs mkdir")
    t0 = time.monotonic()
    with shared_sandbox.files.watch("/huge", recursive=True) as w:
        took = time.monotonic() - t0
        guard = threading.Timer(120, w.close)  # never wait forever on a missing event
        guard.start()
        try:
            events = iter(w)
            first = next(events)
            assert (first.name, first.type) == ("", "overflow")
            shared_sandbox.files.write("/huge/top.txt", "x")
            assert ("top.txt", "create") in {(e.name, e.type) for e in
                                             _until(events, ("top.txt", "create"))}
        finally:
            guard.cancel()
        assert shared_sandbox.exec("echo alive").stdout == "alive\n"
    shared_sandbox.files.remove("/huge", recursive=True)
    print(f"a recursive watch of 4200 directories started in {took:.1f} s")


def _until(events: Iterator[FsEvent], want: tuple[str, str]) -> list[FsEvent]:
    seen = []
    for ev in events:
        seen.append(ev)
        if (ev.name, ev.type) == want:
            break
    return seen
