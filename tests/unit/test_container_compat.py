"""The gVisor statx shim: built for real with the host's compiler, installed into a root
filesystem laid out in a temporary directory."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ember.engine.container import compat


@pytest.fixture
def shim(tmp_path: Path) -> Path:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this host")
    built = compat.statx_compat(tmp_path / "cache")
    assert built is not None
    return built


def test_shim_is_built_once_per_content_and_exports_only_statx(shim: Path,
                                                                tmp_path: Path) -> None:
    assert compat.statx_compat(tmp_path / "cache") == shim  # cached, not rebuilt
    assert shim.parent.parent == tmp_path / "cache" / "compat"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(shim)], capture_output=True,
                             text=True, check=True).stdout.split()
    assert "statx" in symbols and [s for s in symbols if len(s) > 1 and s.isidentifier()
                                   and s not in ("T", "statx")] == []


def test_shim_clears_only_at_no_automount(shim: Path, tmp_path: Path) -> None:
    """Preloaded into a real program, a statx call asking AT_NO_AUTOMOUNT|AT_SYMLINK_NOFOLLOW
    reaches the kernel (as strace sees it) with AT_SYMLINK_NOFOLLOW only, and still stats."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    code = ("import ctypes, os; libc = ctypes.CDLL(None); buf = ctypes.create_string_buffer(256)\n"
            "r = libc.statx(-100, b'/etc/hostname', 0x800 | 0x100, 0x7ff, buf)\n"
            "size = int.from_bytes(buf.raw[40:48], 'little')\n"
            "print(r, size == os.stat('/etc/hostname').st_size)")
    trace = tmp_path / "trace"
    for preload, flags in ((None, "AT_SYMLINK_NOFOLLOW|AT_NO_AUTOMOUNT"),
                           (str(shim), "AT_SYMLINK_NOFOLLOW,")):
        env = {"PATH": "/usr/bin:/bin", **({"LD_PRELOAD": preload} if preload else {})}
        out = subprocess.run(["strace", "-e", "trace=statx", "-o", str(trace), "python3",
                              "-c", code], capture_output=True, text=True, check=True,
                             env=env).stdout
        assert out.split() == ["0", "True"]
        calls = [c for c in trace.read_text().splitlines() if '"/etc/hostname"' in c]
        assert len(calls) == 1 and flags in calls[0], calls


def test_install_preloads_the_shim_and_keeps_the_images_list(shim: Path,
                                                              tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/ld.so.preload").write_text("/usr/lib/theirs.so\n")
    compat.install(root, shim)
    compat.install(root, shim)  # idempotent
    assert (root / "etc/ld.so.preload").read_text().split() == ["/usr/lib/theirs.so",
                                                               compat.GUEST_PATH]
    assert (root / compat.GUEST_PATH.lstrip("/")).read_bytes() == shim.read_bytes()


def test_install_never_writes_through_the_images_links(shim: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / ".ember").symlink_to(outside)
    compat.install(root, shim)
    assert list(outside.iterdir()) == [] and not (root / "etc/ld.so.preload").exists()
    (root / ".ember").unlink()
    (root / "etc/ld.so.preload").symlink_to(outside / "preload")
    compat.install(root, shim)
    assert not (outside / "preload").exists()


def test_install_skips_an_image_without_etc(shim: Path, tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    compat.install(root, shim)
    assert list(root.iterdir()) == []


def test_no_compiler_means_no_shim_and_a_warning(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert compat.statx_compat(tmp_path / "cache") is None
    assert "no C compiler" in caplog.text
