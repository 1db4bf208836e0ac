"""Whether a jailed VMM can open ``/dev/kvm``, and with which supplementary group.

A jailed QEMU runs as an allocated, unprivileged uid (see :mod:`ember.host.ids`), so the
root-run checks of the caller say nothing about it. Debian's udev rule makes ``/dev/kvm``
``0660 root:kvm``: the jail then gets the device's group among its supplementary groups,
and nothing more. That group grants nothing else inside the jail, whose mount namespace
holds only ``/dev/kvm`` and the sandbox's own files. The device's mode is never widened.

:func:`kvm_access` judges from the device's mode and owner (cheap, no process);
``probe=True`` also opens the device as the jail would (a child process with an unprivileged
uid and exactly those groups) and asks it for a VM, which catches what the mode cannot show
(an LSM, a broken module).
"""

from __future__ import annotations

import grp
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError
from ember.host.ids import IdRange

DEV_KVM = Path("/dev/kvm")
#: The fix on a host where the jail cannot open the device (what Debian's udev rule does).
FIX = ("give /dev/kvm a group of its own, read-writable by that group: "
       "groupadd -r kvm; chgrp kvm /dev/kvm; chmod 0660 /dev/kvm (and keep it across reboots "
       "with the udev rule KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\", which Debian's udev "
       "package ships)")
PROBE_TIMEOUT_S = 10.0
#: What the probe child runs: open the device, check the API version, create a VM.
_PROBE = """
import fcntl, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
except OSError as e:
    print("open failed:", e.strerror); sys.exit(2)
try:
    v = fcntl.ioctl(fd, 0xAE00)
    if v != 12:
        print("unexpected KVM API version", v); sys.exit(3)
    vm = fcntl.ioctl(fd, 0xAE01, 0)
    os.close(vm)
except OSError as e:
    print("KVM ioctl failed:", e.strerror); sys.exit(4)
print("ok")
"""


@dataclass(frozen=True)
class KvmAccess:
    """Whether a jailed VMM can use ``/dev/kvm``; ``groups`` are what the jail must add."""

    ok: bool
    detail: str
    groups: tuple[int, ...] = ()
    fix: str | None = None


def describe_mode(st: os.stat_result) -> str:
    """``0660 root:kvm`` (names where the host has them)."""
    def _user(uid: int) -> str:
        return "root" if uid == 0 else str(uid)

    def _group(gid: int) -> str:
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)

    return f"{stat.S_IMODE(st.st_mode):04o} {_user(st.st_uid)}:{_group(st.st_gid)}"


def judge_mode(st: os.stat_result) -> KvmAccess:
    """What the device's mode and owner allow a jailed (unprivileged, non-owner) uid."""
    mode = stat.S_IMODE(st.st_mode)
    shown = describe_mode(st)
    if mode & 0o006 == 0o006:
        return KvmAccess(True, f"{shown}: read-writable by every user (the jail needs no "
                         "group; a 0660 mode with a kvm group is safer)")
    if mode & 0o060 == 0o060 and st.st_gid != 0:
        return KvmAccess(True, f"{shown}: the jailed VMM gets group {st.st_gid} among its "
                         "supplementary groups", groups=(st.st_gid,))
    why = ("its group is root's, which a jail never gets" if mode & 0o060 == 0o060
           else "only its owner may open it")
    return KvmAccess(False, f"{shown}: a jailed VMM (an unprivileged uid) cannot open it: "
                     f"{why}", fix=FIX)


def probe_as_jail(dev: Path, groups: tuple[int, ...], uid: int) -> tuple[bool, str]:
    """Open ``dev`` and create a VM as ``uid`` with ``groups``, as the jail would."""
    from ember.proc import run  # the one subprocess helper

    try:
        done = run([sys.executable, "-I", "-S", "-c", _PROBE, str(dev)],
                   what="probe /dev/kvm as the jail", timeout=PROBE_TIMEOUT_S, check=False,
                   env={}, cwd="/", user=uid, group=uid, extra_groups=list(groups))
    except EmberError as err:
        return False, f"the probe did not run: {err}"
    said = (done.stdout.strip() or done.stderr.strip()).splitlines()
    text = said[-1] if said else f"exit {done.returncode}"
    return done.returncode == 0 and text == "ok", text


def kvm_access(dev: Path = DEV_KVM, *, probe: bool = False) -> KvmAccess:
    """Whether the jail can use ``dev`` (``probe``: and did, as an unprivileged uid)."""
    try:
        st = dev.stat()
    except OSError as err:
        return KvmAccess(False, f"cannot stat {dev}: {err.strerror}")
    judged = judge_mode(st)
    if not judged.ok or not probe:
        return judged
    if os.geteuid() != 0:
        return judged  # only root can take another uid; the jail is off then anyway
    ok, said = probe_as_jail(dev, judged.groups, IdRange.from_env().last)
    if ok:
        return KvmAccess(True, f"{judged.detail}; opened it and created a VM as a jail uid",
                         judged.groups)
    return KvmAccess(False, f"{describe_mode(st)}: a jailed VMM cannot use it ({said})",
                     judged.groups, FIX)
