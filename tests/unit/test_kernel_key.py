"""The guest kernel's cache key, its config fragment and the cache lookup (no build, no VM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.errors import MissingDependencyError
from ember.guest import kernel as kmod
from ember.guest.kernel import (
    FRAGMENT,
    RECIPE_VERSION,
    Kernel,
    find_kernel,
    kernel_key,
    key_for,
    parse_config,
    require_kernel,
    unmet_options,
)
from ember.paths import Paths

FRAG = b"CONFIG_64BIT=y\n# CONFIG_PCI is not set\n"

#: What the guest (a Python agent on virtio-mmio devices) cannot do without.
_REQUIRED = (
    "64BIT SMP PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE BINFMT_ELF BINFMT_SCRIPT "
    "DEVTMPFS DEVTMPFS_MOUNT PROC_FS SYSFS TMPFS SHMEM FUTEX EPOLL EVENTFD TIMERFD SIGNALFD "
    "INOTIFY_USER FHANDLE AIO POSIX_TIMERS FILE_LOCKING MULTIUSER UNIX98_PTYS "
    "HYPERVISOR_GUEST PARAVIRT KVM_GUEST PVH VIRTIO VIRTIO_MMIO VIRTIO_MMIO_CMDLINE_DEVICES "
    "VIRTIO_BLK VIRTIO_NET VIRTIO_CONSOLE VIRTIO_BALLOON VSOCKETS VIRTIO_VSOCKETS "
    "HW_RANDOM_VIRTIO NET INET UNIX PACKET EXT4_FS OVERLAY_FS SQUASHFS CGROUPS MEMCG "
    "CGROUP_SCHED CGROUP_PIDS NAMESPACES USER_NS PID_NS NET_NS IPC_NS UTS_NS SECCOMP "
    "SECCOMP_FILTER POSIX_MQUEUE SYSVIPC"
)
REQUIRED_Y = _REQUIRED.split()


def test_key_is_stable() -> None:
    assert key_for("6.1.192-2", FRAG) == key_for("6.1.192-2", FRAG)
    assert key_for("6.1.192-2", FRAG, RECIPE_VERSION) == key_for("6.1.192-2", FRAG)
    assert len(key_for("6.1.192-2", FRAG)) == 64


@pytest.mark.parametrize(
    "other",
    [
        ("6.1.193-1", FRAG, RECIPE_VERSION),
        ("6.1.192-2", FRAG + b"CONFIG_IPV6=y\n", RECIPE_VERSION),
        ("6.1.192-2", FRAG, RECIPE_VERSION + " (changed)"),
        ("6.1.192-", b"2" + FRAG, RECIPE_VERSION),  # moving bytes across fields changes it too
    ],
)
def test_key_changes_with_each_input(other: tuple[str, bytes, str]) -> None:
    assert key_for(*other) != key_for("6.1.192-2", FRAG, RECIPE_VERSION)


def test_kernel_key_uses_installed_version_and_fragment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmod, "source_version", lambda: "9.9-test")
    assert kernel_key() == key_for("9.9-test", FRAGMENT.read_bytes())


def test_fragment_enables_what_the_guest_needs() -> None:
    frag = parse_config(FRAGMENT.read_text())
    missing = [o for o in REQUIRED_Y if frag.get(f"CONFIG_{o}") != "y"]
    assert not missing


def test_fragment_has_no_modules_pci_or_acpi() -> None:
    frag = parse_config(FRAGMENT.read_text())
    for off in ("MODULES", "PCI", "ACPI"):
        assert frag[f"CONFIG_{off}"] == "n"
    assert not [k for k, v in frag.items() if v == "m"]


def test_parse_config_reads_both_forms() -> None:
    text = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\n# a comment\nCONFIG_D=64\n'
    assert parse_config(text) == {
        "CONFIG_A": "y",
        "CONFIG_B": "n",
        "CONFIG_C": '"x y"',
        "CONFIG_D": "64",
    }


def test_unmet_options_catches_drops_and_additions() -> None:
    fragment = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_PCI is not set\n"
    assert unmet_options(fragment, "CONFIG_A=y\nCONFIG_B=y\n") == []
    assert unmet_options(fragment, "CONFIG_A=y\n# CONFIG_B is not set\n") == ["CONFIG_B=y (got n)"]
    assert unmet_options(fragment, "CONFIG_A=y\nCONFIG_B=y\nCONFIG_PCI=y\n") == [
        "CONFIG_PCI=n (got y)"
    ]
    assert unmet_options(fragment, "") == ["CONFIG_A=y (got n)", "CONFIG_B=y (got n)"]


def _entry(paths: Paths, key: str, *, files: tuple[str, ...] = kmod.ENTRY_FILES) -> Path:
    d = paths.kernels / key
    d.mkdir(parents=True)
    for name in files:
        (d / name).write_bytes(b"x")
    if "meta.json" in files:
        (d / "meta.json").write_text(json.dumps({"release": "6.1.0-test"}))
    return d


@pytest.fixture
def fake_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Paths:
    monkeypatch.setattr(kmod, "source_version", lambda: "9.9-test")
    return Paths(home=tmp_path / "home", cache=tmp_path / "cache").ensure()


def test_find_kernel_returns_the_complete_entry_for_the_current_key(fake_source: Paths) -> None:
    key = kernel_key()
    d = _entry(fake_source, key)
    assert find_kernel(fake_source) == Kernel(
        key=key, dir=d, bzimage=d / "bzImage", vmlinux=d / "vmlinux", release="6.1.0-test"
    )
    assert require_kernel(fake_source).dir == d


def test_other_keys_and_incomplete_entries_are_not_found(fake_source: Paths) -> None:
    _entry(fake_source, key_for("0.1-old", FRAGMENT.read_bytes()))
    _entry(fake_source, kernel_key(), files=("bzImage", "config", "meta.json"))
    assert find_kernel(fake_source) is None
    with pytest.raises(MissingDependencyError, match="run: ember kernel build"):
        require_kernel(fake_source)


def test_no_source_package_means_no_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kmod, "_installed_versions", lambda _pkgs: {})
    paths = Paths(home=tmp_path, cache=tmp_path / "cache")
    assert find_kernel(paths) is None
    with pytest.raises(MissingDependencyError, match="no guest kernel built"):
        require_kernel(paths)
