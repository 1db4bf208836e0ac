"""The jail's spec, uid allocation, qcow2 backing chains and confinement limits (no VM)."""

from __future__ import annotations

import marshal
import os
import struct
import time
from pathlib import Path

import pytest

from ember.engine.qemu.qcow2 import backing_chain, backing_file
from ember.errors import BadRequestError, EngineError
from ember.host.ids import IdAllocator, IdRange, IdsExhaustedError
from ember.host.jail import Bind, JailSpec
from ember.runtime.confinement import limits_for
from ember.store import SandboxRecord


def _spec(**kw: object) -> JailSpec:
    base: dict[str, object] = dict(uid=2_000_000_001, gid=2_000_000_001, hostname="sb-1",
                                   root=Path("/r"), log=Path("/l"))
    base.update(kw)
    return JailSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("uid", [0, -1, True, 2**32 - 1, "5"])
def test_jail_refuses_root_and_bogus_ids(uid: object) -> None:
    with pytest.raises(BadRequestError):
        _spec(uid=uid)
    with pytest.raises(BadRequestError):
        _spec(groups=(uid,))


def test_bind_needs_an_absolute_path_without_dotdot() -> None:
    for bad in ("rel/path", "/a/../etc"):
        with pytest.raises(BadRequestError):
            Bind(Path(bad))


def test_with_binds_adds_each_source_once() -> None:
    s = _spec(binds=(Bind(Path("/a")),)).with_binds(Bind(Path("/a"), writable=True),
                                                      Bind(Path("/b")))
    assert [b.source for b in s.binds] == [Path("/a"), Path("/b")]
    assert s.binds[0].writable is False


def test_spec_encoding_carries_everything_the_jailer_needs() -> None:
    s = _spec(binds=(Bind(Path("/k"), writable=True),), rlimits=(("nofile", 10, 20),),
              cgroup_procs=(Path("/sys/fs/cgroup/x/cgroup.procs"),), groups=(7000,))
    doc = marshal.loads(s.encode(["/usr/bin/qemu", "-x"]))
    assert doc["argv"] == ["/usr/bin/qemu", "-x"]
    assert doc["uid"] == doc["gid"] == 2_000_000_001 and doc["groups"] == [7000]
    assert {"source": "/k", "writable": True, "exec": False, "device": False} in doc["binds"]
    assert {"source": "/usr", "exec": True} in doc["binds"]  # system binds come first
    assert doc["rlimits"] == {"nofile": [10, 20]}
    assert doc["network"] is False
    assert doc["no_thp"] is False
    assert marshal.loads(_spec(no_thp=True).encode(["/bin/x"]))["no_thp"] is True


def test_ids_are_unique_and_released(tmp_path: Path) -> None:
    ids = IdAllocator(IdRange(5000, 5003), tmp_path)
    got = {ids.allocate(tmp_path / f"sb{i}") for i in range(4)}
    assert got == {5000, 5001, 5002, 5003}
    with pytest.raises(IdsExhaustedError):
        ids.allocate(tmp_path / "sb4")
    freed = ids.held_by(tmp_path / "sb2")
    ids.release(tmp_path / "sb2")
    assert ids.held_by(tmp_path / "sb2") is None
    assert ids.allocate(tmp_path / "sb5") == freed  # the only free one


def test_a_stale_allocation_is_taken_over(tmp_path: Path) -> None:
    ids = IdAllocator(IdRange(5000, 5000), tmp_path / "ids")
    ids.allocate(tmp_path / "gone")  # its owner directory never existed: it died
    old = time.time() - 3600
    os.utime(tmp_path / "ids" / "5000", (old, old))
    assert ids.allocate(tmp_path / "new") == 5000
    assert ids.held_by(tmp_path / "new") == 5000


def test_a_live_allocation_is_never_taken_over(tmp_path: Path) -> None:
    owner = tmp_path / "live"
    owner.mkdir()
    ids = IdAllocator(IdRange(5000, 5000), tmp_path / "ids")
    ids.allocate(owner)
    old = time.time() - 3600
    os.utime(tmp_path / "ids" / "5000", (old, old))
    with pytest.raises(IdsExhaustedError):
        ids.allocate(tmp_path / "other")
    assert ids.sweep() == []
    owner.rmdir()
    assert ids.sweep() == [5000]


@pytest.mark.parametrize("text", ["", "1-2", "x-y", "5000", "9-5000"])
def test_id_range_from_env(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("EMBER_JAIL_IDS", text)
    if text == "":
        assert IdRange.from_env().first == 2_000_000_000
    else:
        with pytest.raises(BadRequestError):
            IdRange.from_env()


def _qcow2(path: Path, backing: bytes | None, version: int = 3) -> None:
    name = backing or b""
    header = b"QFI\xfb" + struct.pack(">IQI", version, 72 if name else 0, len(name))
    path.write_bytes(header.ljust(72, b"\0") + name)


def test_backing_chain_follows_headers(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(b"\0" * 512)
    _qcow2(tmp_path / "mid.qcow2", str(tmp_path / "base.raw").encode())
    _qcow2(tmp_path / "top.qcow2", b"mid.qcow2")  # relative: to the image's directory
    assert backing_chain(tmp_path / "top.qcow2") == [
        tmp_path / "top.qcow2", tmp_path / "mid.qcow2", tmp_path / "base.raw"]
    assert backing_file(tmp_path / "base.raw") is None


def test_backing_chain_refuses_loops_and_bad_headers(tmp_path: Path) -> None:
    _qcow2(tmp_path / "a.qcow2", b"b.qcow2")
    _qcow2(tmp_path / "b.qcow2", b"a.qcow2")
    with pytest.raises(EngineError, match="loops"):
        backing_chain(tmp_path / "a.qcow2")
    _qcow2(tmp_path / "v9.qcow2", b"x", version=9)
    with pytest.raises(EngineError, match="version 9"):
        backing_file(tmp_path / "v9.qcow2")
    (tmp_path / "cut.qcow2").write_bytes(
        b"QFI\xfb" + struct.pack(">IQI", 3, 72, 50)[:16].ljust(16, b"\0") + b"\0" * 60)
    with pytest.raises(EngineError, match="truncated"):
        backing_file(tmp_path / "cut.qcow2")


def test_limits_follow_the_sandbox_size() -> None:
    rec = SandboxRecord(id="sb-1", template="t", state="running", vcpus=2, memory_mib=512,
                        disk_mib=2048, timeout_s=None, created_at=0.0, expires_at=None,
                        dir="/d", pid=None, accel="tcg")
    lim = limits_for(rec)
    assert lim.cpus == 2.0
    assert 512 < lim.memory_mib <= 512 + 256
    assert lim.fsize_mib == 2048 + 64


def test_an_allocation_whose_owner_was_never_written_is_stale(tmp_path: Path) -> None:
    ids = IdAllocator(IdRange(5000, 5000), tmp_path / "ids")
    (tmp_path / "ids").mkdir()
    (tmp_path / "ids" / "5000").write_text("")  # killed between O_EXCL create and write
    old = time.time() - 3600
    os.utime(tmp_path / "ids" / "5000", (old, old))
    assert ids.sweep() == [5000]
