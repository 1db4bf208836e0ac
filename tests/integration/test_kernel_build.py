"""The real guest kernel build (about 3.5 minutes with 2 cores the first time; cached after).

The kernel goes to ``$EMBER_CACHE`` (a persistent cache, so later runs reuse it) or to a
temporary cache for this session. The failure tests use a cache of their own so that they
never touch the shared one; they borrow the shared unpacked source tree through a symlink.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.errors import BuildError
from ember.guest import kernel as kmod
from ember.guest.kernel import (
    FRAGMENT,
    Kernel,
    build_kernel,
    find_kernel,
    parse_config,
    require_kernel,
    source_tree,
    source_version,
    unmet_options,
)
from ember.paths import Paths

pytestmark = pytest.mark.integration

KEY_OPTIONS = (
    "64BIT",
    "SMP",
    "SERIAL_8250_CONSOLE",
    "VIRTIO_MMIO",
    "VIRTIO_MMIO_CMDLINE_DEVICES",
    "VIRTIO_BLK",
    "VIRTIO_CONSOLE",
    "VIRTIO_NET",
    "VIRTIO_VSOCKETS",
    "HW_RANDOM_VIRTIO",
    "EXT4_FS",
    "OVERLAY_FS",
    "PVH",
    "DEVTMPFS_MOUNT",
    "FUTEX",
    "EPOLL",
    "SECCOMP_FILTER",
    "UNIX98_PTYS",
)


@pytest.fixture(scope="module")
def cache_paths(ember_paths: Paths, tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """The suite's shared persistent cache (see conftest): the kernel is built once per host."""
    return Paths(home=tmp_path_factory.mktemp("kernel-home"), cache=ember_paths.cache).ensure()


@pytest.fixture(scope="module")
def built(cache_paths: Paths) -> Kernel:
    return build_kernel(cache_paths)


def test_build_produces_a_bootable_image_and_a_checked_config(built: Kernel) -> None:
    with built.bzimage.open("rb") as f:
        f.seek(0x202)
        assert f.read(4) == b"HdrS"  # the x86 boot protocol's header magic
    assert built.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert built.release.startswith("6.1.")
    config = (built.dir / "config").read_text()
    got = parse_config(config)
    assert [o for o in KEY_OPTIONS if got.get(f"CONFIG_{o}") != "y"] == []
    for off in ("MODULES", "PCI", "ACPI"):
        assert got.get(f"CONFIG_{off}", "n") == "n"
    assert unmet_options(FRAGMENT.read_text(), config) == []


def test_second_build_reuses_the_cache_entry(cache_paths: Paths, built: Kernel) -> None:
    inode = built.bzimage.stat().st_ino
    lines: list[str] = []
    again = build_kernel(cache_paths, progress=lines.append)
    assert again == built
    assert lines == []  # nothing unpacked, configured or compiled
    assert built.bzimage.stat().st_ino == inode
    assert find_kernel(cache_paths) == built
    assert require_kernel(cache_paths) == built


def _leftovers(paths: Paths) -> list[Path]:
    return [*paths.kernels.iterdir(), *paths.cache_tmp.iterdir()]


@pytest.fixture
def own_cache(tmp_path: Path) -> Paths:
    return Paths(home=tmp_path / "home", cache=tmp_path / "cache").ensure()


@pytest.fixture
def borrowed_source(own_cache: Paths, cache_paths: Paths, built: Kernel) -> Iterator[Paths]:
    """``own_cache`` with the shared unpacked source tree (already there after ``built``)."""
    version = source_version()
    shared, mine = source_tree(cache_paths, version), source_tree(own_cache, version)
    if not shared.is_dir():  # the kernel came from the cache: unpack the source once
        shared.parent.mkdir(parents=True, exist_ok=True)
        kmod._ensure_source(cache_paths, shared, version, lambda _line: None)
    mine.parent.mkdir(parents=True)
    mine.symlink_to(shared, target_is_directory=True)
    yield own_cache


def test_corrupt_source_tarball_leaves_nothing_behind(
    own_cache: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "linux-source-6.1.tar.xz"
    bad.write_bytes(b"\xfd7zXZ\x00" + os.urandom(4096))
    monkeypatch.setattr(kmod, "SOURCE_TARBALL", bad)
    with pytest.raises(BuildError, match="unpacking"):
        build_kernel(own_cache)
    assert _leftovers(own_cache) == []
    assert not source_tree(own_cache, source_version()).exists()


def test_option_dropped_by_kconfig_fails_the_build(
    borrowed_source: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fragment = tmp_path / "kernel-fragment.config"
    # SQUASHFS sits behind MISC_FILESYSTEMS, which tinyconfig turns off.
    fragment.write_text("CONFIG_64BIT=y\nCONFIG_BLOCK=y\nCONFIG_SQUASHFS=y\n")
    monkeypatch.setattr(kmod, "FRAGMENT", fragment)
    with pytest.raises(BuildError, match=r"CONFIG_SQUASHFS=y \(got n\)"):
        build_kernel(borrowed_source)
    assert _leftovers(borrowed_source) == []


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text.encode() in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except OSError:
            continue
    return found


def test_interrupted_compile_leaves_nothing_behind(borrowed_source: Paths) -> None:
    def interrupt_once_compiling(line: str) -> None:
        if line.startswith("compiling: "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_kernel(borrowed_source, jobs=2, progress=interrupt_once_compiling)
    assert _leftovers(borrowed_source) == []
    assert _processes_mentioning(str(borrowed_source.cache)) == []
