"""The I/O edge of cgroup handling: every read, write, mkdir, rmdir and kill goes through
:class:`CgroupFS`, so that tests can substitute a fake kernel laid out in a temporary
directory while the logic in :mod:`ember.host.cgroups` runs unchanged.

Methods raise plain :class:`OSError`; callers wrap them with what they were doing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from pathlib import Path


class CgroupFS:
    """Cgroup filesystems and the ``/proc`` files that describe them (the real kernel).

    ``proc`` is where ``self/mountinfo``, ``self/cgroup`` and ``cgroups`` are read from.
    """

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc

    def read_proc(self, name: str) -> str | None:
        """``<proc>/<name>`` (e.g. ``self/mountinfo``), or None if it does not exist."""
        try:
            return (self.proc / name).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def read(self, path: Path) -> str:
        return path.read_text(encoding="utf-8", errors="replace")

    def write(self, path: Path, text: str) -> None:
        """One ``write(2)`` of ``text`` to an existing control file (no create, no truncate:
        cgroup control files act on each write, and a short write would be a different value)."""
        data = text.encode()
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)", str(path))

    def exists(self, path: Path) -> bool:
        return path.exists()

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def writable(self, path: Path) -> bool:
        return os.access(path, os.W_OK)

    def mkdir(self, path: Path) -> None:
        """Create one cgroup directory; an existing one is fine (idempotent)."""
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not path.is_dir():
                raise

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def subdirs(self, path: Path) -> list[str]:
        """Names of the child cgroups of ``path`` (empty if ``path`` does not exist)."""
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def pids_in(self, procs: Path) -> list[int]:
        """The pids listed in the ``cgroup.procs`` file ``procs``; none if the cgroup is
        gone (:func:`cgroup_gone`). Other errors raise OSError."""
        try:
            text = self.read(procs)
        except OSError as err:
            if cgroup_gone(err):
                return []
            raise
        return [int(w) for w in text.split() if w.isdigit()]

    def signal_members(self, procs: Path, sig: int) -> None:
        """Send ``sig`` to every process listed in the ``cgroup.procs`` file ``procs``.

        Safe against pid reuse: each listed pid is pinned with a pidfd, the file is read
        again, and only processes still listed are signalled (a pid that was freed and
        reused between the two reads cannot be a member, since its pidfd then refers to
        the dead process and signalling it fails harmlessly).
        """
        listed = self.pids_in(procs)
        if not hasattr(os, "pidfd_open"):  # pragma: no cover - Linux < 5.3 / non-Linux
            for pid in listed:
                _quiet_kill(pid, sig)
            return
        fds: dict[int, int] = {}
        try:
            for pid in listed:
                try:
                    fds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
            still = set(self.pids_in(procs))
            for pid, fd in fds.items():
                if pid in still:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, sig)
        finally:
            for fd in fds.values():
                os.close(fd)


def cgroup_gone(err: OSError) -> bool:
    """The cgroup was removed: its directory is gone (ENOENT), or its control file was
    opened as it was being removed (ENODEV, seen under cgroup v1)."""
    return err.errno in (errno.ENOENT, errno.ENODEV)


def _quiet_kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
