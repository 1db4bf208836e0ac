"""Snapshots, restore, fork and pause/resume with real guests (issue 5)."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import (
    BadRequestError,
    Sandbox,
    SandboxStateError,
    SnapshotError,
    SnapshotNotFoundError,
)
from ember.paths import Paths
from tests.conftest import qemu_pids_under

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def origin(ember_paths: Paths, debian_template) -> Iterator[Sandbox]:  # type: ignore[no-untyped-def]
    """A booted sandbox (its RAM a shared file, which its snapshots copy) with a file and a
    background counter, snapshotted as 'origin'."""
    sb = Sandbox.create(timeout=3600, paths=ember_paths, boot="cold")
    sb.files.write("/root/before.txt", "written before the snapshot\n")
    sb.exec("nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /root/counter; "
            "sleep 0.05; done' >/dev/null 2>&1 &").check()
    deadline = time.monotonic() + 30
    while not sb.files.exists("/root/counter") and time.monotonic() < deadline:
        time.sleep(0.05)
    yield sb
    sb.kill()


def _counter(sb: Sandbox) -> int:
    return int(sb.files.read_text("/root/counter").strip() or "0")


def _urandom(sb: Sandbox) -> str:
    return sb.exec("head -c 16 /dev/urandom | od -An -tx1").stdout.replace(" ", "").strip()


def test_restore_keeps_files_and_running_processes(origin: Sandbox, ember_paths: Paths) -> None:
    snap = origin.snapshot("origin")
    assert snap.name == "origin" and snap.ram_file and snap.pause_s is not None
    # content-addressed: the id is the digest of the manifest
    manifest = (ember_paths.snapshots / snap.id / "manifest.json").read_bytes()
    assert hashlib.sha256(manifest).hexdigest() == snap.id
    assert origin.exec("echo still running").stdout == "still running\n"  # source continues
    # What snapshot() returned restores as its name does (issue 11: it used to crash).
    with Sandbox.restore(snap, paths=ember_paths) as r:
        assert r.id != origin.id and r.info().snapshot == snap.id
        assert r.files.read_text("/root/before.txt") == "written before the snapshot\n"
        first = _counter(r)
        time.sleep(0.5)
        assert _counter(r) > first  # the loop running at snapshot time goes on
        assert r.exec("hostname").stdout.strip() == r.id
        guest_now = float(r.exec("date +%s.%N").stdout)
        assert abs(guest_now - time.time()) < 5  # clock corrected after restore
        r.files.write("/root/after.txt", "restored only")
    assert not origin.files.exists("/root/after.txt")  # own disk overlay


def test_fork_clones_differ_and_share_nothing_writable(origin: Sandbox,
                                                        ember_paths: Paths) -> None:
    before = {s.id for s in Sandbox.list_snapshots(paths=ember_paths)}
    clones = origin.fork(3)
    try:
        ids = {c.id for c in clones}
        assert len(ids) == 3 and origin.id not in ids
        assert {c.exec("hostname").stdout.strip() for c in clones} == ids
        assert len({_urandom(c) for c in clones} | {_urandom(origin)}) == 4
        clones[0].files.write("/root/mine", "0")
        assert not clones[1].files.exists("/root/mine")
        for c in clones:
            assert c.files.read_text("/root/before.txt").startswith("written before")
        fork_snaps = {s.id for s in Sandbox.list_snapshots(paths=ember_paths)} - before
        assert len(fork_snaps) == 1  # one unnamed snapshot behind the clones
        (fork_snap,) = fork_snaps
        with pytest.raises(SandboxStateError, match="in use"):
            Sandbox.delete_snapshot(fork_snap, paths=ember_paths)
    finally:
        for c in clones:
            c.kill()
    # the unnamed snapshot goes with its last clone
    assert not (ember_paths.snapshots / fork_snap).exists()
    assert fork_snap not in {s.id for s in Sandbox.list_snapshots(paths=ember_paths)}


def test_snapshot_while_streaming_is_consistent(origin: Sandbox, ember_paths: Paths) -> None:
    p = origin.spawn("for i in $(seq 1 40); do echo $i; echo $i >> /root/stream; sleep 0.05; "
                     "done", timeout=120)
    time.sleep(0.6)
    snap = origin.snapshot("streaming")
    out = p.wait().stdout.split()
    assert out == [str(i) for i in range(1, 41)]  # the source's stream lost nothing
    with Sandbox.restore(snap.id, paths=ember_paths) as r:
        deadline = time.monotonic() + 60
        lines: list[str] = []
        while time.monotonic() < deadline:
            lines = r.files.read_text("/root/stream").split()
            if lines and lines[-1] == "40":
                break
            time.sleep(0.2)
        assert lines == [str(i) for i in range(1, 41)]  # it finished where it left off
    Sandbox.delete_snapshot("streaming", paths=ember_paths)


def test_pause_and_resume(origin: Sandbox, ember_paths: Paths) -> None:
    origin.pause()
    try:
        assert origin.info().state == "paused"
        with pytest.raises(SandboxStateError, match="paused"):
            origin.exec("true")
        frozen = _counter_raw(ember_paths, origin)
        time.sleep(0.4)
        assert _counter_raw(ember_paths, origin) == frozen
    finally:
        origin.resume()
    assert origin.info().state == "running"
    assert origin.exec("echo back").stdout == "back\n"


def _counter_raw(paths: Paths, sb: Sandbox) -> str:
    """The paused guest's counter as the host sees it: its shared RAM file does not change."""
    return hashlib.sha256((paths.ram / f"{sb.id}.ram").read_bytes()).hexdigest()


def _copy_snapshot(paths: Paths, name: str) -> tuple[str, Path]:
    """Snapshot id and directory of ``name``."""
    (snap,) = [s for s in Sandbox.list_snapshots(paths=paths) if s.name == name]
    return snap.id, paths.snapshots / snap.id



def test_corrupt_and_mismatched_snapshots_are_refused(origin: Sandbox,
                                                      ember_paths: Paths) -> None:
    origin.snapshot("victim")
    _, d = _copy_snapshot(ember_paths, "victim")
    before = {i.id for i in Sandbox.list(paths=ember_paths)}
    qemus = set(qemu_pids_under(ember_paths.home))

    def refused(match: str) -> None:
        with pytest.raises(SnapshotError, match=match):
            Sandbox.restore("victim", paths=ember_paths)
        assert {i.id for i in Sandbox.list(paths=ember_paths)} == before
        assert {x.name for x in ember_paths.sandboxes.iterdir()} == before
        assert set(qemu_pids_under(ember_paths.home)) == qemus

    state = (d / "state").read_bytes()
    (d / "state").write_bytes(state[: len(state) // 2])  # truncated
    refused("truncated")
    ram = bytearray((d / "ram").read_bytes())
    (d / "state").write_bytes(state)
    ram[4096 * 7] ^= 0xFF  # same size, one byte flipped
    (d / "ram").write_bytes(bytes(ram))
    refused("corrupt")
    ram[4096 * 7] ^= 0xFF
    (d / "ram").write_bytes(bytes(ram))
    db = sqlite3.connect(ember_paths.db)
    (digest,) = db.execute("SELECT digest FROM templates WHERE name='debian-python'").fetchone()
    db.execute("UPDATE templates SET digest='sha256:other' WHERE name='debian-python'")
    db.commit()
    try:
        refused("rebuilt")
    finally:
        db.execute("UPDATE templates SET digest=? WHERE name='debian-python'", (digest,))
        db.commit()
        db.close()
    with Sandbox.restore("victim", paths=ember_paths) as r:  # intact again: restores
        assert r.exec("true").exit_code == 0
    with pytest.raises(SnapshotNotFoundError):
        Sandbox.restore("no-such-snapshot", paths=ember_paths)
    with pytest.raises(BadRequestError, match="snapshot must be"):
        Sandbox.restore(42, paths=ember_paths)  # type: ignore[arg-type]
    with pytest.raises(BadRequestError):
        origin.snapshot("bad/name")
    Sandbox.delete_snapshot("victim", paths=ember_paths)
    assert not d.exists()


def test_killed_snapshot_writer_leaves_nothing_and_the_guest_resumes(
        origin: Sandbox, ember_paths: Paths) -> None:
    code = ("import sys; from ember.sdk.async_sandbox import manager; "
            "manager().snapshot(sys.argv[1], None)")
    env = {**os.environ, "EMBER_HOME": str(ember_paths.home)}
    for delay in (0.35, 0.45, 0.55, 0.65):
        child = subprocess.Popen([sys.executable, "-c", code, origin.id], env=env)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert origin.info().state in ("running", "snapshotting")
    # the next use reconciles: guest resumed, registry consistent
    assert origin.info().state == "running"
    assert origin.exec("echo alive").stdout == "alive\n"
    origin.snapshot("after-kills")  # also sweeps staging left by the killed writers
    assert not [p for p in ember_paths.snapshots.iterdir() if p.name.startswith(".staging")]
    Sandbox.delete_snapshot("after-kills", paths=ember_paths)
