"""A home removed under its daemon: the supervisor stops its sandboxes' processes and then
the daemon, even when stopping them fails (seen in CI: a cgroup's control file read as
the cgroup was going, ENODEV, ended the supervisor and left the daemon running)."""

from __future__ import annotations

import errno
import shutil
import threading
from pathlib import Path

import pytest

from ember.host.cgroupfs import CgroupFS
from ember.paths import Paths
from ember.runtime import reaper
from ember.runtime.confinement import Confinement


def _removed_home_ends(paths: Paths, monkeypatch: pytest.MonkeyPatch) -> bool:
    ended, stop, opened = threading.Event(), threading.Event(), threading.Event()
    real = reaper.SandboxManager

    def opening(p: Paths) -> object:
        mgr = real(p)
        opened.set()
        return mgr

    monkeypatch.setattr(reaper, "SandboxManager", opening)
    t = threading.Thread(target=reaper.supervise, args=(paths, stop, ended.set), daemon=True)
    t.start()
    assert opened.wait(30.0)  # its registry opened: the home goes while it supervises
    try:
        while paths.home.exists():  # the supervisor may be writing its SQLite files meanwhile
            shutil.rmtree(paths.home, ignore_errors=True)
        return ended.wait(30.0)
    finally:
        stop.set()
        t.join(10)


def test_the_daemon_stops_even_if_stopping_the_processes_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths(home=tmp_path / "home", cache=tmp_path / "cache",
                  ram=tmp_path / "ram").ensure()
    paths.ram.mkdir(parents=True, exist_ok=True)
    (paths.ram / "sb-1.ram").write_bytes(b"x")

    def broken(self: Confinement, live: object) -> None:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(Confinement, "sweep", broken)
    assert _removed_home_ends(paths, monkeypatch)
    assert not paths.ram.exists()


class _Vanishing(CgroupFS):
    """A cgroup whose control file is read while the cgroup is being removed."""

    def read(self, path: Path) -> str:
        raise OSError(errno.ENODEV, "No such device", str(path))


def test_a_cgroup_removed_under_a_signal_has_no_members_left(tmp_path: Path) -> None:
    _Vanishing().signal_members(tmp_path / "cgroup.procs", 9)  # no error, nobody signalled
    with pytest.raises(PermissionError):
        class _Denied(CgroupFS):
            def read(self, path: Path) -> str:
                raise PermissionError(errno.EACCES, "denied", str(path))

        _Denied().signal_members(tmp_path / "cgroup.procs", 9)
