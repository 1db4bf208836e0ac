"""What makes one guest distinct from its siblings: hostname, machine-id, kernel RNG state,
clock.

A sandbox restored from a snapshot (a fork clone, a pooled or pre-baked sandbox) starts
with its parent's memory: the same hostname, the same kernel CRNG state, a clock frozen at
snapshot time. The host sends fresh values in every ``hello``; the agent applies them here.
Only ``fcntl`` and ``os`` are imported (cheap on a TCG guest).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time


def log(message: str) -> None:
    """One line on stderr (the guest console); never raises. (Not the agent's threads.log:
    init imports this module and should not pay for ``threading``.)"""
    with contextlib.suppress(OSError):
        os.write(2, f"ember-agent: {message}\n".encode(errors="replace"))


RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
MAX_ENTROPY_BYTES = 64
MAX_HOSTS_BYTES = 1 << 20  # what is kept of a guest's /etc/hosts


def set_clock(host_time: float) -> None:
    """Set the guest's wall clock from the host's (there is no RTC); only when it is off by
    more than a second, and only as root (tests run the agent unprivileged on the host)."""
    if os.geteuid() != 0 or abs(time.time() - host_time) < 1.0:
        return
    with contextlib.suppress(OSError):
        time.clock_settime(time.CLOCK_REALTIME, host_time)


def reseed(entropy: bytes) -> bool:
    """Mix host-provided bytes into the kernel's pool, credit them, and reseed the CRNG at
    once, so that a clone's ``getrandom()`` output diverges from its siblings' immediately.
    True if the kernel took them (root only)."""
    if os.geteuid() != 0 or not entropy:
        return False
    data = entropy[:MAX_ENTROPY_BYTES]
    info = struct.pack("ii", len(data) * 8, len(data)) + data
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY)
    except OSError as err:
        log(f"cannot open /dev/urandom to reseed: {err}")
        return False
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
        return True
    except OSError as err:
        log(f"cannot reseed the kernel RNG: {err}")
        return False
    finally:
        os.close(fd)


def set_hostname(name: str) -> bool:
    """Change the hostname (UTS name, /etc/hostname, /etc/hosts) if it differs; root only."""
    if os.geteuid() != 0 or os.uname().nodename == name:
        return False
    try:
        fd = os.open("/proc/sys/kernel/hostname", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, name.encode())
        finally:
            os.close(fd)
    except OSError as err:
        log(f"cannot set the hostname {name}: {err}")
        return False
    try:
        write_identity(name)
    except OSError as err:
        log(f"cannot write /etc/hostname or /etc/hosts: {err}")
    return True


GRND_INSECURE = 0x0004  # getrandom(2) that never blocks (Linux 5.6+); not in ``os``


def new_machine_id() -> str:
    """A fresh /etc/machine-id: 128 random bits as 32 hex digits. Written whenever the
    guest learns a new name (its boot, a restored clone's first hello), so every sandbox
    has its own. Never blocks, even before the kernel's RNG is seeded at boot."""
    try:
        raw = os.getrandom(16, GRND_INSECURE)
    except OSError:  # an older kernel: the RNG is seeded once a guest has run this far
        raw = os.urandom(16)
    return raw.hex()


def write_identity(hostname: str) -> None:
    """/etc/hostname, /etc/machine-id and a /etc/hosts entry, so that programs resolving the
    hostname work and programs keyed by the machine id tell sandboxes apart. Bytes
    throughout (whatever else /etc/hosts holds is kept as it is). Raises OSError."""
    name = hostname.encode()
    rewrite("/etc/hostname", name + b"\n")
    rewrite("/etc/machine-id", new_machine_id().encode() + b"\n")
    try:
        fd = os.open("/etc/hosts", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        lines = [b"127.0.0.1\tlocalhost", b"::1\tlocalhost ip6-localhost ip6-loopback"]
    else:
        try:
            lines = [ln for ln in os.read(fd, MAX_HOSTS_BYTES).splitlines()
                     if b"# ember" not in ln]
        finally:
            os.close(fd)
    lines.append(b"127.0.1.1\t" + name + b"  # ember")
    rewrite("/etc/hosts", b"\n".join(lines) + b"\n")


def rewrite(path: str, data: bytes) -> None:
    """Make a small file hold ``data``, overwriting it in place and truncating it only if
    it was longer. A restored clone's new identity has the same lengths as its snapshot's,
    and ext4 handles a file truncated and written again by freeing its blocks, allocating
    new ones and writing them out at once (``auto_da_alloc``): under TCG that kernel code
    was translated anew in every clone. Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        done = 0
        while done < len(data):
            wrote = os.pwrite(fd, data[done:], done)
            if wrote <= 0:
                raise OSError(f"cannot write {path}: nothing written")
            done += wrote
        if os.fstat(fd).st_size != len(data):
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
