"""Resolve paths inside a root directory without ever leaving it.

Every lookup starts from a descriptor of the root and goes one component at a time with
``O_NOFOLLOW``; a symlink met on the way is followed only if it is relative and stays
inside the root (``..`` never climbs above it), so no path an image names can reach the
host. Absolute symlinks are kept as they are (they mean something inside the guest) but
are never followed while extracting.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ember.errors import ImageSourceError, UnsafeLayerError
from ember.guest.oci.limits import MAX_SYMLINK_HOPS

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Dir:
    """An open directory inside the root: its descriptor and its real path components."""

    fd: int
    parts: tuple[str, ...]

    def show(self, name: str = "") -> str:
        return "/" + "/".join((*self.parts, name) if name else self.parts)


def member_parts(name: str, what: str) -> tuple[str, ...]:
    """Split an archive member name into path components, refusing escapes.

    ``./`` prefixes, ``.`` and empty components are dropped; an absolute name, a ``..``
    component or a NUL byte is an :class:`UnsafeLayerError`. ``()`` means the root itself.
    """
    if "\0" in name:
        raise UnsafeLayerError(f"{what}: NUL byte in path {name!r}")
    if name.startswith("/"):
        raise UnsafeLayerError(f"{what}: absolute path {name!r}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeLayerError(f"{what}: path {name!r} climbs out with '..'")
    return parts


class RootDir:
    """A root directory held open by descriptor; resolves paths strictly below it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, _DIR_FLAGS)

    def __enter__(self) -> RootDir:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        os.close(self.fd)

    @contextmanager
    def directory(self, parts: Sequence[str], *, create: bool, what: str) -> Iterator[Dir | None]:
        """Open the directory at ``parts`` below the root.

        Missing components are created (mode 0755, owned by us) when ``create``, else the
        result is None. A symlink on the way is followed only within the root; a symlink
        that is absolute or climbs out raises :class:`UnsafeLayerError`.
        """
        stack = [os.dup(self.fd)]
        names: list[str] = []
        pending = deque(parts)
        hops = 0
        via = ""
        try:
            while pending:
                c = pending.popleft()
                if c in ("", "."):
                    continue
                if c == "..":
                    if len(stack) == 1:
                        raise UnsafeLayerError(f"{what}: path leads out of the root{via}")
                    os.close(stack.pop())
                    names.pop()
                    continue
                here = stack[-1]
                try:
                    st = os.stat(c, dir_fd=here, follow_symlinks=False)
                except FileNotFoundError:
                    if not create:
                        yield None
                        return
                    os.mkdir(c, 0o755, dir_fd=here)
                else:
                    if stat.S_ISLNK(st.st_mode):
                        target = os.readlink(c, dir_fd=here)
                        shown = "/" + "/".join((*names, c))
                        if target.startswith("/"):
                            raise UnsafeLayerError(
                                f"{what}: path goes through the absolute symlink {shown} -> "
                                f"{target}, which extraction does not follow"
                            )
                        via = f" (through the symlink {shown} -> {target})"
                        hops += 1
                        if hops > MAX_SYMLINK_HOPS:
                            raise UnsafeLayerError(f"{what}: too many levels of symlinks")
                        pending.extendleft(reversed(target.split("/")))
                        continue
                    if not stat.S_ISDIR(st.st_mode):
                        raise ImageSourceError(
                            f"{what}: /{'/'.join((*names, c))} is not a directory"
                        )
                stack.append(os.open(c, _DIR_FLAGS, dir_fd=here))
                names.append(c)
            yield Dir(stack[-1], tuple(names))
        finally:
            for fd in stack:
                os.close(fd)


def lstat_at(d: Dir, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=d.fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(d: Dir, name: str) -> None:
    """Remove ``name`` in ``d`` whatever it is (a directory with all it holds); no-op if absent."""
    st = lstat_at(d, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=d.fd)
    else:
        os.unlink(name, dir_fd=d.fd)


def list_at(d: Dir) -> list[str]:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=d.fd)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


@contextmanager
def child_dir(d: Dir, name: str) -> Iterator[Dir]:
    """Open the real (not symlinked) subdirectory ``name`` of ``d``."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=d.fd)
    try:
        yield Dir(fd, (*d.parts, name))
    finally:
        os.close(fd)
