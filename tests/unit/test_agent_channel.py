"""The agent's channel: EOF and stop on a plain stream; SIGIO routing for the virtio port
(exercised on a socket, which raises SIGIO on input the same way)."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator

import pytest

from ember.agent.channel import Channel, VirtioPortChannel


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    host, guest = socket.socketpair()
    yield host, guest
    host.close()
    guest.close()


def test_read_write_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair
    channel = Channel(guest.fileno())
    host.sendall(b"abc")
    assert channel.read() == b"abc"
    assert channel.write(b"reply") is True
    assert host.recv(100) == b"reply"
    host.close()
    assert channel.read() == b""
    assert channel.write(b"after close") is False
    assert channel.wait_for_host() is False
    channel.close()


def test_big_write_waits_for_the_reader(pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair
    channel = Channel(guest.fileno())
    received = bytearray()

    def drain() -> None:
        while len(received) < 5_000_000:
            received.extend(host.recv(1 << 20))

    thread = threading.Thread(target=drain)
    thread.start()
    assert channel.write(b"y" * 5_000_000) is True
    thread.join(10)
    assert received == b"y" * 5_000_000
    channel.close()


def test_stop_wakes_read(pair: tuple[socket.socket, socket.socket]) -> None:
    channel = Channel(pair[1].fileno())
    channel.stop()
    assert channel.read() is None and channel.stopped
    channel.close()


def test_sigio_reaches_the_attached_thread(pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair
    previous = signal.signal(signal.SIGIO, lambda _s, _f: pytest.fail("SIGIO hit the main thread"))
    attached = threading.Event()
    got: list[object] = []
    channel = VirtioPortChannel(guest.fileno())

    def reader() -> None:
        channel.attach()
        attached.set()
        got.append(signal.sigtimedwait({signal.SIGIO}, 10.0))

    try:
        thread = threading.Thread(target=reader)
        thread.start()
        assert attached.wait(10)
        host.sendall(b"wake up")
        thread.join(15)
        assert got and got[0] is not None
        assert channel.read() == b"wake up"
    finally:
        signal.signal(signal.SIGIO, previous)
        channel.close()
