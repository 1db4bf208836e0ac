"""Advisory file locks (flock) that die with their holder: a sandbox's connected client, a
live image build's staging directory, a home's reaper."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ember.errors import SandboxStateError


class FileLock:
    """An exclusive flock on ``path``; released on close or when the holding process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if self._still_linked(fd):
                break
            os.close(fd)  # its holder unlinked the file as we opened it: take the new one
        else:
            return False
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return True

    def _still_linked(self, fd: int) -> bool:
        """True if ``self.path`` still names the file ``fd`` is open on."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def acquire(self, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                holder = self.holder()
                who = f" (held by pid {holder})" if holder else ""
                raise SandboxStateError(f"{what} is busy: another client is connected{who}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def mark(self, note: str) -> None:
        """Say, next to the holder's pid, what it holds the lock for (it must hold it)."""
        assert self._fd is not None, "mark() needs the lock held"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()} {note}".encode(), 0)

    def marked(self, note: str) -> bool:
        """Whether the lock's holder said it holds it for ``note``."""
        try:
            return self.path.read_text().split()[1:] == [note]
        except (OSError, IndexError):
            return False

    def holder(self) -> int | None:
        try:
            text = self.path.read_text().split()[0]
        except (OSError, IndexError):
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def sweep_abandoned(dirs: Iterable[Path]) -> list[str]:
    """Remove each directory whose ``.lock`` nobody holds (its writer died: killed,
    crashed, power lost); a live writer holds it. The names of those removed."""
    gone = []
    for d in dirs:
        lock = FileLock(d / ".lock")
        try:
            if not lock.try_acquire():
                continue  # a live writer
        except OSError:
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
        finally:
            lock.release()
    return gone


@contextlib.contextmanager
def locked_staging(parent: Path, prefix: str) -> Iterator[Path]:
    """A new staging directory ``parent/<prefix>...``, its ``.lock`` held while the work
    lives and removed after it; abandoned ones of the same prefix are swept first."""
    sweep_abandoned(parent.glob(f"{prefix}*"))
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    lock = FileLock(stage / ".lock")
    lock.try_acquire()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        lock.release()


def owner_gone(pid_text: str) -> bool:
    """True if ``pid_text`` (the pid a staging file or directory is named after) is a pid
    and no such process runs: what it was building can be removed. Our own pid is alive,
    so nothing this process is building ever counts as gone."""
    return pid_text.isdigit() and not Path(f"/proc/{pid_text}").exists()
