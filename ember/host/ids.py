"""Unprivileged uids (and same-numbered gids) for jailed VMM processes, one per sandbox.

The range is host-wide (every ember home on the host shares it), so allocations are files
in a host-wide directory on tmpfs (``/run/ember/ids/<uid>``, created with ``O_EXCL``; a
reboot, which ends every sandbox, clears them). A file holds the sandbox directory that owns
the uid. An allocation whose owner is gone and whose uid runs no process is stale (its
creator was killed) and is taken over; so leaks heal themselves on the next allocation.

Configure with ``EMBER_JAIL_IDS=FIRST-LAST`` (default :data:`DEFAULT_RANGE`, far above
the ranges ``/etc/subuid`` hands to rootless containers). ``EMBER_JAIL_SNAPSHOT_GID`` is
the group that may open snapshot RAM files (QEMU 7.2 opens a privately mapped RAM file
read-write, see ``docs/security.md``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.errors import BadRequestError, HostError

DEFAULT_RANGE = (2_000_000_000, 2_000_065_535)
DEFAULT_SNAPSHOT_GID = 1_999_999_999
IDS_DIR = Path("/run/ember/ids")
#: An allocation younger than this is never taken over (its sandbox may still be starting).
STALE_AFTER_S = 120.0
MAX_TRIES = 64


class IdsExhaustedError(HostError):
    """Every uid of the jail range is in use."""


@dataclass(frozen=True)
class IdRange:
    first: int
    last: int

    def __post_init__(self) -> None:
        if not 1000 <= self.first <= self.last < 2**32 - 1:
            raise BadRequestError(f"jail id range {self.first}-{self.last} must lie within "
                                  f"1000-{2**32 - 2} and not be empty")

    @classmethod
    def from_env(cls) -> IdRange:
        text = os.environ.get("EMBER_JAIL_IDS", "")
        if not text:
            return cls(*DEFAULT_RANGE)
        first, sep, last = text.partition("-")
        if not sep or not first.strip().isdigit() or not last.strip().isdigit():
            raise BadRequestError(f"EMBER_JAIL_IDS={text!r} must look like FIRST-LAST")
        return cls(int(first), int(last))

    def __len__(self) -> int:
        return self.last - self.first + 1


def snapshot_gid() -> int:
    text = os.environ.get("EMBER_JAIL_SNAPSHOT_GID", "")
    if text and not text.isdigit():
        raise BadRequestError(f"EMBER_JAIL_SNAPSHOT_GID={text!r} must be a number")
    return int(text) if text else DEFAULT_SNAPSHOT_GID


def uids_in_use() -> set[int]:
    """The real uids of every process on the host."""
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in (d / "status").read_text().splitlines():
                    if line.startswith("Uid:"):
                        found.add(int(line.split()[1]))
                        break
    return found


class IdAllocator:
    def __init__(self, id_range: IdRange | None = None, directory: Path = IDS_DIR) -> None:
        self.range = id_range or IdRange.from_env()
        self.dir = directory

    def allocate(self, owner: Path) -> int:
        """A uid no other sandbox holds, recorded as held by ``owner`` (a sandbox dir)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        busy = functools.cache(uids_in_use)  # the /proc scan, once, if needed
        for _ in range(MAX_TRIES):
            uid = self.range.first + secrets.randbelow(len(self.range))
            if self._claim(uid, owner):
                return uid
            if self._stale(uid, busy):
                with contextlib.suppress(OSError):
                    (self.dir / str(uid)).unlink()
                if self._claim(uid, owner):
                    return uid
        raise IdsExhaustedError(
            f"no free uid in the jail range {self.range.first}-{self.range.last} after "
            f"{MAX_TRIES} tries; widen EMBER_JAIL_IDS or destroy sandboxes")

    def _claim(self, uid: int, owner: Path) -> bool:
        try:
            fd = os.open(self.dir / str(uid), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(str(owner))
        return True

    def _stale(self, uid: int, busy: Callable[[], set[int]]) -> bool:
        """Held by a sandbox directory that is gone, old enough, and running nothing
        (``busy`` gives the uids in use; it scans /proc, so it is asked last)."""
        f = self.dir / str(uid)
        try:
            age = time.time() - f.stat().st_mtime
            text = f.read_text()
        except OSError:
            return False
        # An empty file: its allocator died between creating it and naming the owner.
        gone = not text.startswith("/") or not Path(text).is_dir()
        return age > STALE_AFTER_S and gone and uid not in busy()

    def release(self, owner: Path) -> None:
        """Free every uid held by ``owner``."""
        with contextlib.suppress(FileNotFoundError):
            for f in self.dir.iterdir():
                with contextlib.suppress(OSError):
                    if f.read_text() == str(owner):
                        f.unlink()

    def held_by(self, owner: Path) -> int | None:
        with contextlib.suppress(FileNotFoundError):
            for f in self.dir.iterdir():
                with contextlib.suppress(OSError):
                    if f.name.isdigit() and f.read_text() == str(owner):
                        return int(f.name)
        return None

    def sweep(self) -> list[int]:
        """Free allocations whose owner directory is gone and whose uid runs nothing."""
        busy = functools.cache(uids_in_use)  # the /proc scan, once, if needed
        freed = []
        with contextlib.suppress(FileNotFoundError):
            for f in self.dir.iterdir():
                if f.name.isdigit() and self._stale(int(f.name), busy):
                    with contextlib.suppress(OSError):
                        f.unlink()
                        freed.append(int(f.name))
        return freed


def chown_for(path: Path, uid: int, gid: int, mode: int) -> None:
    """Hand one file or directory made by root to a jail identity (never following links)."""
    try:
        os.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, mode)
    except OSError as err:
        if err.errno == errno.ENOENT:
            raise HostError(f"cannot hand {path} to uid {uid}: it does not exist") from err
        raise HostError(f"cannot hand {path} to uid {uid}: {err.strerror}") from err
