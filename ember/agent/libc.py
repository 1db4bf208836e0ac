"""The libc calls init and the agent need, through ctypes: mount(2), reboot(2) and
inotify(7), which Python's stdlib lacks, and sethostname(2), which only the ``socket`` module
has (init does not import it:
that costs a TCG-emulated guest ~30 ms, and ctypes is loaded here anyway)."""

from __future__ import annotations

import ctypes
import functools
import os

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20

RB_AUTOBOOT = 0x01234567
"""reboot(2) command that restarts the machine; with QEMU's -no-reboot it ends QEMU."""


@functools.cache
def _libc() -> ctypes.CDLL:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return ctypes.CDLL("libc.so.6", use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); raise OSError on failure."""
    libc = _libc()
    rc = libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def sethostname(name: str) -> None:
    """sethostname(2); raise OSError on failure."""
    raw = name.encode()
    if _libc().sethostname(raw, ctypes.c_size_t(len(raw))) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def reboot(command: int = RB_AUTOBOOT) -> None:
    """reboot(2); returns only on failure (raising OSError)."""
    rc = _libc().reboot(ctypes.c_int(command))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"reboot: {os.strerror(err)}")


def inotify_init1(flags: int) -> int:
    """inotify_init1(2): a new inotify fd; raise OSError on failure."""
    fd = int(_libc().inotify_init1(ctypes.c_int(flags)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    return fd


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    """inotify_add_watch(2): the watch descriptor; raise OSError (with ``filename``)."""
    wd = int(_libc().inotify_add_watch(ctypes.c_int(fd), os.fsencode(path),
                                       ctypes.c_uint32(mask)))
    if wd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return wd


def inotify_rm_watch(fd: int, wd: int) -> None:
    """inotify_rm_watch(2); errors (a watch the kernel already dropped) are ignored."""
    _libc().inotify_rm_watch(ctypes.c_int(fd), ctypes.c_int(wd))
