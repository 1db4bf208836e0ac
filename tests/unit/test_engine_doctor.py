"""diagnose() returns data: one Check per item, with an apt-get fix for what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.engine.doctor import Check, diagnose

NAMES = [
    "qemu-system-x86_64",
    "qemu-img",
    "accelerator",
    "/dev/kvm",
    "vhost-vsock",
    "cgroups",
    "free disk",
    "patchelf",
    "debootstrap",
    "mkfs.ext4",
    "linux-source-6.1",
]


def fake_root(root: Path, *, pvm: bool = True) -> Path:
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text("flags\t: fpu sse2\n")
    (root / "dev").mkdir()
    (root / "dev/kvm").write_text("")
    (root / "sys/module").mkdir(parents=True)
    if pvm:
        (root / "sys/module/kvm_pvm").mkdir()
    (root / "sys/fs/cgroup/unified").mkdir(parents=True)
    (root / "sys/fs/cgroup/unified/cgroup.controllers").write_text("")
    return root


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_missing_programs_get_apt_fixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("EMBER_ACCEL", raising=False)
    checks = by_name(diagnose(root=fake_root(tmp_path / "root"), home=tmp_path / "home"))
    assert set(NAMES) <= set(checks)
    assert checks["qemu-system-x86_64"].fix == "apt-get install -y qemu-system-x86"
    assert checks["qemu-img"].fix == "apt-get install -y qemu-utils"
    assert checks["patchelf"].fix == "apt-get install -y patchelf"
    assert checks["debootstrap"].fix == "apt-get install -y debootstrap"
    assert checks["mkfs.ext4"].fix == "apt-get install -y e2fsprogs"
    src = checks["linux-source-6.1"]
    assert not src.ok and src.fix is not None
    assert src.fix.startswith("apt-get install -y linux-source-6.1")
    for name in ("qemu-system-x86_64", "qemu-img", "patchelf"):
        assert not checks[name].ok


def test_host_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBER_ACCEL", raising=False)
    checks = by_name(diagnose(root=fake_root(tmp_path / "root"), home=tmp_path / "home"))
    accel = checks["accelerator"]
    assert accel.ok and accel.detail.startswith("tcg: /dev/kvm is kvm-pvm")
    assert "kvm_pvm loaded" in checks["/dev/kvm"].detail
    vsock = checks["vhost-vsock"]
    assert vsock.ok and "virtio-serial" in vsock.detail
    assert "hybrid" in checks["cgroups"].detail
    assert "GiB free" in checks["free disk"].detail  # a home that does not exist yet: parent


def test_vmx_host_without_dev_kvm_says_modprobe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMBER_ACCEL", raising=False)
    root = fake_root(tmp_path / "root", pvm=False)
    (root / "proc/cpuinfo").write_text("flags\t: fpu vmx\n")
    (root / "dev/kvm").unlink()
    kvm = by_name(diagnose(root=root, home=tmp_path))["/dev/kvm"]
    assert not kvm.ok and kvm.fix is not None and kvm.fix.startswith("modprobe kvm_intel")


def test_real_host_shape() -> None:
    checks = diagnose()
    assert [c.name for c in checks if c.name in NAMES] == NAMES
    assert len({c.name for c in checks}) == len(checks)
    for c in checks:
        assert c.detail
        assert c.ok or c.fix, c
