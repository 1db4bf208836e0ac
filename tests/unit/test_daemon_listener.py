"""The daemon's TCP listener: answers leave at once (no Nagle wait on a head then body)."""

from __future__ import annotations

import socket

import pytest

from ember.daemon.server import _bind_tcp
from ember.errors import HostError


def test_accepted_connections_send_without_delay() -> None:
    listener = _bind_tcp("127.0.0.1:0")
    try:
        with socket.create_connection(listener.getsockname()[:2]) as client:
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                assert client.fileno() >= 0
        assert not listener.get_inheritable()
    finally:
        listener.close()


@pytest.mark.parametrize("bad", ["8700", "127.0.0.1:", "127.0.0.1:http"])
def test_listen_address_must_name_host_and_port(bad: str) -> None:
    with pytest.raises(HostError, match="HOST:PORT"):
        _bind_tcp(bad)
