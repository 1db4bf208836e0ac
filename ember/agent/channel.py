"""The byte stream to the host: any stream fd (tests use a socketpair), or the virtio port.

A virtio-serial port outlives host connections. While no host is connected, read() returns
0 and poll() reports POLLHUP at once, and writes cannot proceed; when a host connects, the
kernel sends SIGIO (O_ASYNC). :class:`VirtioPortChannel` waits for that signal with
``sigtimedwait`` instead of spinning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import struct
import threading
import time

from . import PORT_NAME

READ_CHUNK = 64 * 1024
PORT_POLL_INTERVAL = 0.01
"""Seconds between :func:`wait_for_port`'s looks (a look is a few system calls); short,
because the agent's start waits on it."""
_F_SETOWN_EX = 15  # fcntl.h; Python's fcntl module does not export it
_F_OWNER_TID = 0
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENODEV, errno.ENOTCONN, errno.EIO)


class Channel:
    """A non-blocking stream fd to the host; EOF means the host is gone for good."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._stop_r, self._stop_w = os.pipe()

    def attach(self) -> None:
        """Called once by the thread that will :meth:`read`."""

    def read(self) -> bytes | None:
        """The next bytes; ``b""`` when the host went away; ``None`` after :meth:`stop`."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._stop_r in ready:
                return None
            try:
                return os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError as err:
                if err.errno in _GONE:
                    return b""
                raise

    def wait_for_host(self) -> bool:
        """After EOF: wait for a host to connect; False if none will (a socket's peer)."""
        return False

    def write(self, data: bytes) -> bool:
        """Write all of ``data``; False if the host is gone (the rest is dropped).

        Callers serialise writes (whole frames under one lock).
        """
        view = memoryview(data)
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        poller.register(self._stop_r, select.POLLIN)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
                continue
            except BlockingIOError:
                pass
            except OSError as err:
                if err.errno in _GONE:
                    return False
                raise
            ready = dict(poller.poll())
            if self._stop_r in ready:
                return False
            events = ready.get(self.fd, 0)
            if events & (select.POLLHUP | select.POLLERR) and not events & select.POLLOUT:
                return False
        return True

    def stop(self) -> None:
        """Make :meth:`read` return None and pending writes give up."""
        os.write(self._stop_w, b"x")

    @property
    def stopped(self) -> bool:
        return bool(select.select([self._stop_r], [], [], 0)[0])

    def close(self) -> None:
        """Release the channel's own resources (the fd stays the caller's)."""
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class VirtioPortChannel(Channel):
    """The ``ember.agent`` virtio-serial port: survives host disconnects."""

    def attach(self) -> None:
        """Route the port's SIGIO to the calling (reader) thread, where it stays blocked.

        Only this thread blocks SIGIO; threads it starts unblock it (see
        :func:`~ember.agent.server.start_thread`), so exec'd programs get a clean mask.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})
        try:
            owner = struct.pack("ii", _F_OWNER_TID, threading.get_native_id())
            fcntl.fcntl(self.fd, _F_SETOWN_EX, owner)
        except OSError:
            fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_ASYNC)

    def wait_for_host(self) -> bool:
        signal.sigtimedwait({signal.SIGIO}, 1.0)
        return not self.stopped


def find_port(
    name: str = PORT_NAME, *, sys_dir: str = "/sys/class/virtio-ports", dev_dir: str = "/dev"
) -> str | None:
    """The device path of the virtio-serial port called ``name`` (udev may be absent).

    Plain ``os`` calls, not ``pathlib``: its import costs a TCG-emulated guest ~50 ms.
    """
    by_name = os.path.join(dev_dir, "virtio-ports", name)
    if os.path.exists(by_name):
        return by_name
    try:
        ports = sorted(os.listdir(sys_dir))
    except OSError:
        return None
    for port in ports:
        try:
            with open(
                os.path.join(sys_dir, port, "name"), encoding="utf-8", errors="replace"
            ) as file:
                port_name = file.read().strip()
        except OSError:
            continue
        device = os.path.join(dev_dir, port)
        if port_name == name and os.path.exists(device):
            return device
    return None


def wait_for_port(name: str = PORT_NAME, timeout: float = 60.0) -> str | None:
    """Poll :func:`find_port` until the port appears or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        path = find_port(name)
        if path is not None or time.monotonic() >= deadline:
            return path
        time.sleep(PORT_POLL_INTERVAL)
