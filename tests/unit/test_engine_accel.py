"""Accelerator detection against faked /dev, /proc and /sys trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.engine.accel import detect_accel, host_tsc_khz
from ember.errors import BadRequestError

FLAGS_PLAIN = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx lm"


#: The group a stock Debian host's /dev/kvm has (any non-root gid will do here).
KVM_GID = 4242


def fake_host(
    root: Path, *, flags: str = FLAGS_PLAIN, dev_kvm: bool = True, pvm: bool = False,
    mode: int = 0o660, gid: int = KVM_GID,
) -> Path:
    (root / "proc").mkdir(parents=True)
    cpu = f"processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: {flags}\n\n"
    (root / "proc/cpuinfo").write_text(cpu * 2)
    (root / "dev").mkdir()
    if dev_kvm:
        (root / "dev/kvm").write_text("")
        os.chmod(root / "dev/kvm", mode)
        if os.geteuid() == 0:
            os.chown(root / "dev/kvm", 0, gid)
    (root / "sys/module").mkdir(parents=True)
    if pvm:
        (root / "sys/module/kvm_pvm").mkdir()
    return root


def test_kvm_pvm_host_uses_tcg_and_says_why(tmp_path: Path) -> None:
    root = fake_host(tmp_path, pvm=True)
    d = detect_accel(root=root, env={})
    assert d.accel == "tcg"
    assert d.reason == (
        "/dev/kvm is kvm-pvm (no vmx/svm CPU flag, /sys/module/kvm_pvm present): it cannot "
        "run standard guest kernels, using TCG software emulation"
    )
    assert d.details["kvm_pvm"] == "loaded"
    assert d.details["cpu_virt_flags"] == "none"


@pytest.mark.parametrize("flag", ["vmx", "svm"])
def test_hardware_virtualization_uses_kvm(tmp_path: Path, flag: str) -> None:
    root = fake_host(tmp_path, flags=f"{FLAGS_PLAIN} {flag} ept")
    d = detect_accel(root=root, env={})
    assert d.accel == "kvm"
    assert flag in d.reason
    assert d.details["cpu_virt_flags"] == flag


def test_vmx_but_pvm_module_still_tcg(tmp_path: Path) -> None:
    root = fake_host(tmp_path, flags=f"{FLAGS_PLAIN} vmx", pvm=True)
    d = detect_accel(root=root, env={})
    assert d.accel == "tcg"
    assert "kvm-pvm" in d.reason and "no vmx/svm" not in d.reason


def test_no_dev_kvm_uses_tcg(tmp_path: Path) -> None:
    root = fake_host(tmp_path, flags=f"{FLAGS_PLAIN} vmx", dev_kvm=False)
    d = detect_accel(root=root, env={})
    assert d.accel == "tcg"
    assert d.reason.startswith("/dev/kvm does not exist")
    assert d.details["dev_kvm"] == "missing"


def test_dev_kvm_without_cpu_flag_uses_tcg(tmp_path: Path) -> None:
    d = detect_accel(root=fake_host(tmp_path), env={})
    assert d.accel == "tcg"
    assert "no vmx/svm flag" in d.reason


def test_unreadable_cpuinfo_is_tcg(tmp_path: Path) -> None:
    root = fake_host(tmp_path, flags="vmx")
    (root / "proc/cpuinfo").unlink()
    d = detect_accel(root=root, env={})
    assert d.accel == "tcg"
    assert d.details["cpu_virt_flags"].startswith("unreadable")


def test_probe_failure_falls_back_to_tcg(tmp_path: Path) -> None:
    # A regular file is not a KVM device: the ioctl fails and the probe says so.
    root = fake_host(tmp_path, flags=f"{FLAGS_PLAIN} vmx")
    d = detect_accel(root=root, env={}, probe=True)
    assert d.accel == "tcg"
    assert "probe failed" in d.reason
    assert "KVM_GET_API_VERSION" in d.details["probe"]


@pytest.mark.parametrize("forced", ["kvm", "tcg", " KVM "])
def test_env_override(tmp_path: Path, forced: str) -> None:
    root = fake_host(tmp_path, pvm=True)
    d = detect_accel(root=root, env={"EMBER_ACCEL": forced})
    assert d.accel == forced.strip().lower()
    assert d.reason == "forced by EMBER_ACCEL"
    assert d.details["detected"] == "tcg"
    assert "kvm-pvm" in d.details["detected_reason"]


def test_env_override_reads_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBER_ACCEL", "kvm")
    assert detect_accel(root=fake_host(tmp_path)).accel == "kvm"


def test_bad_env_override_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(BadRequestError, match="EMBER_ACCEL"):
        detect_accel(root=fake_host(tmp_path), env={"EMBER_ACCEL": "xen"})


def test_decision_is_frozen(tmp_path: Path) -> None:
    d = detect_accel(root=fake_host(tmp_path), env={})
    with pytest.raises(AttributeError):
        d.accel = "kvm"  # type: ignore[misc]


TSC_FLAGS = f"{FLAGS_PLAIN} constant_tsc nonstop_tsc tsc_known_freq"


def cpuinfo(root: Path, flags: str, mhz: str = "2596.142") -> Path:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    cpu = f"processor\t: 0\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n\n"
    (root / "proc/cpuinfo").write_text(cpu + cpu.replace("2596", "1200"))
    return root


def test_host_tsc_khz_from_an_invariant_known_tsc(tmp_path: Path) -> None:
    assert host_tsc_khz(cpuinfo(tmp_path, TSC_FLAGS)) == 2596142
    d = detect_accel(root=fake_host(tmp_path / "h", flags=TSC_FLAGS), env={})
    assert d.details.get("host_tsc_khz") is None  # fake_host writes no cpu MHz line


@pytest.mark.parametrize(
    "flags",
    [
        FLAGS_PLAIN,
        f"{FLAGS_PLAIN} constant_tsc nonstop_tsc",  # frequency not known exactly
        f"{TSC_FLAGS} aperfmperf",  # cpu MHz would be a sampled frequency
    ],
)
def test_host_tsc_khz_unknown(tmp_path: Path, flags: str) -> None:
    assert host_tsc_khz(cpuinfo(tmp_path, flags)) is None


def test_host_tsc_khz_not_with_cpufreq_or_nonsense(tmp_path: Path) -> None:
    root = cpuinfo(tmp_path, TSC_FLAGS)
    (root / "sys/devices/system/cpu/cpu0/cpufreq").mkdir(parents=True)
    assert host_tsc_khz(root) is None
    assert host_tsc_khz(cpuinfo(tmp_path / "b", TSC_FLAGS, mhz="fast")) is None
    assert host_tsc_khz(cpuinfo(tmp_path / "c", TSC_FLAGS, mhz="0.5")) is None
    assert host_tsc_khz(tmp_path / "nothing") is None


def test_decision_carries_host_tsc_khz(tmp_path: Path) -> None:
    root = fake_host(tmp_path, pvm=True)
    cpuinfo(root, TSC_FLAGS)
    assert detect_accel(root=root, env={}).details["host_tsc_khz"] == "2596142"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the jail (and chown) need root")


@needs_root
def test_jailed_kvm_needs_the_device_group(tmp_path: Path) -> None:
    d = detect_accel(root=fake_host(tmp_path, flags=f"{FLAGS_PLAIN} svm"), env={}, jail=True)
    assert d.accel == "kvm" and "usable by the jailed VMM" in d.reason
    assert f"group {KVM_GID}" in d.details["jail_kvm"]
    assert d.fix is None


@needs_root
@pytest.mark.parametrize(("mode", "gid", "why"), [
    (0o600, KVM_GID, "only its owner may open it"),
    (0o660, 0, "its group is root's"),
])
def test_a_device_the_jail_cannot_open_means_tcg_and_a_fix(
        tmp_path: Path, mode: int, gid: int, why: str) -> None:
    root = fake_host(tmp_path, flags=f"{FLAGS_PLAIN} vmx", mode=mode, gid=gid)
    d = detect_accel(root=root, env={}, jail=True)
    assert d.accel == "tcg"
    assert f"/dev/kvm is {mode:04o} root:" in d.reason and why in d.reason
    assert d.reason.endswith("using TCG software emulation")
    assert d.fix is not None and "chmod 0660 /dev/kvm" in d.fix
    # As root without the jail, the same device is usable.
    assert detect_accel(root=root, env={}, jail=False).accel == "kvm"
    # Forcing KVM keeps the fix for doctor (and confinement refuses the create).
    forced = detect_accel(root=root, env={"EMBER_ACCEL": "kvm"}, jail=True)
    assert forced.accel == "kvm" and forced.fix == d.fix


@needs_root
def test_world_writable_device_needs_no_group(tmp_path: Path) -> None:
    root = fake_host(tmp_path, flags=f"{FLAGS_PLAIN} vmx", mode=0o666, gid=0)
    d = detect_accel(root=root, env={}, jail=True)
    assert d.accel == "kvm" and "every user" in d.details["jail_kvm"]
