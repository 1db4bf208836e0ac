"""HTTP over a Unix socket with one shared TLS context (ember/uds_http.py)."""

from __future__ import annotations

import asyncio
import http.server
import socketserver
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember import uds_http
from tests.serving import serving


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.path.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "s.sock")
    with serving(_Server(path, _Hello)):
        yield path


def test_requests_go_over_the_socket(sock: str) -> None:
    with httpx.Client(transport=uds_http.uds_transport(sock), base_url="http://x") as c:
        assert c.get("/v1/health").text == "/v1/health"

    async def go() -> list[str]:
        async with httpx.AsyncClient(transport=uds_http.async_uds_transport(
                sock, keepalive=False), base_url="http://x") as c:
            return [(await c.get(f"/{i}")).text for i in range(3)]

    assert asyncio.run(go()) == ["/0", "/1", "/2"]


def test_every_transport_shares_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []
    real = httpx.create_ssl_context

    def counting() -> object:
        made.append(real())
        return made[-1]

    monkeypatch.setattr(httpx, "create_ssl_context", counting)
    uds_http._tls.cache_clear()
    try:
        for _ in range(3):
            uds_http.uds_transport("/nowhere")
            uds_http.async_uds_transport("/nowhere", keepalive=False)
        assert len(made) == 1
    finally:
        uds_http._tls.cache_clear()
