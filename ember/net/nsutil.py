"""Network namespaces from a threaded process: each operation runs in a short-lived thread
that enters the namespace (``setns`` of the network namespace is per thread), so that the
daemon itself never changes namespace and never forks for it."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ember.errors import NetworkError

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


NetnsError = NetworkError  # a namespace could not be made, entered or removed

def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"{what}: {os.strerror(err)}")


def _enter(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise NetnsError(f"cannot open network namespace {path}: {err.strerror}") from None
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns({path})")
    finally:
        os.close(fd)


def in_netns(path: Path | None, fn: Callable[[], T], *, create: bool = False) -> T:
    """Run ``fn`` in a thread inside the namespace at ``path`` (None: this process's own).
    ``create``: a new namespace, bound at ``path`` first (which must not exist)."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            if create:
                assert path is not None
                _create_here(path)
            elif path is not None:
                _enter(path)
            box["ok"] = fn()
        except BaseException as err:  # handed to the caller's thread
            box["err"] = err

    thread = threading.Thread(target=body, name="ember-netns", daemon=True)
    thread.start()
    thread.join()
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    return box["ok"]  # type: ignore[return-value]


def _create_here(path: Path) -> None:
    """Unshare this thread's network namespace and bind it at ``path`` (as ``ip netns add``
    does, so that ``ip netns`` sees it; the directory is a shared mount)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if not _is_mountpoint(path.parent):
        d = bytes(path.parent)
        _check(_libc.mount(d, d, b"none", MS_BIND | MS_REC, None), f"bind {path.parent}")
    d = bytes(path.parent)
    _libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise NetnsError(f"network namespace {path.name} exists already") from None
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        _check(_libc.mount(b"/proc/thread-self/ns/net", bytes(path), b"none", MS_BIND, None),
               f"bind the namespace at {path}")
    except NetnsError:
        path.unlink(missing_ok=True)
        raise


def _is_mountpoint(path: Path) -> bool:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            return any(line.split()[4] == str(path) for line in f)
    except OSError:
        return False


def remove_netns(path: Path) -> bool:
    """Unbind and delete a namespace's name (its links go when nothing uses it); False if
    there was none."""
    if not path.exists():
        return False
    if _libc.umount2(bytes(path), MNT_DETACH) != 0 and ctypes.get_errno() not in (
            errno.EINVAL, errno.ENOENT):
        raise NetnsError(f"cannot unmount {path}: {os.strerror(ctypes.get_errno())}")
    path.unlink(missing_ok=True)
    return True


def write_sysctl(name: str, value: str) -> None:
    """Write ``/proc/sys/<name>`` (of the calling thread's network namespace)."""
    with open(f"/proc/sys/{name.replace('.', '/')}", "w", encoding="ascii") as f:
        f.write(value)
