"""HTTP to exposed ports through the daemon (ember.daemon.port_proxy): Host names and paths
parsed without I/O (hostile ones too), headers filtered, and the proxy itself carrying
requests to a real HTTP server on loopback, in-process (httpx's ASGI transport)."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ember.daemon import port_proxy
from ember.daemon.app import create_app
from ember.daemon.auth import new_key
from ember.daemon.port_proxy import (
    PortProxy,
    check_domain,
    parse_host,
    request_headers,
    response_headers,
    rewrite_host_form,
    upstream_target,
)
from ember.errors import BadRequestError
from ember.net.forward import Exposed
from ember.paths import Paths
from ember.store import SandboxRecord, Store
from ember.store.records import TENANT_KEY

SID = "sb-00000000000a"


# --- pure parts ---------------------------------------------------------------------------
@pytest.mark.parametrize("host, hit", [
    (f"8000-{SID}.localhost", (SID, 8000)),
    (f"8000-{SID}.localhost:8080", (SID, 8000)),
    (f"8000-{SID.upper()}.LOCALHOST.", (SID, 8000)),
    (f"1-{SID}.localhost", (SID, 1)),
    (f"65536-{SID}.localhost", None),
    (f"0-{SID}.localhost", None),
    (f"8000-{SID}.example.com", None),
    (f"8000-{SID}.localhost:x", None),
    (f"{SID}.localhost", None),
    ("localhost", None),
    ("127.0.0.1:8080", None),
    ("[::1]:8080", None),
    (f"8000-a.b.{SID}.localhost", None),
    ("", None),
])
def test_host_names_name_a_port_of_a_sandbox(host: str, hit: tuple[str, int] | None) -> None:
    assert parse_host(host, "localhost") == hit


@given(st.text(max_size=400))
def test_any_host_header_parses_or_is_none(host: str) -> None:
    got = parse_host(host, "ports.example.com")
    assert got is None or (1 <= got[1] <= 65535 and 1 <= len(got[0]) <= 64)


def test_domains_are_checked() -> None:
    assert check_domain("Ports.Example.COM.") == "ports.example.com"
    for bad in ("", "a..b", "-a.b", "a_b.c", "x" * 64 + ".com", "a b"):
        with pytest.raises(BadRequestError):
            check_domain(bad)


def _scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "path": path, "raw_path": path.encode(), "headers": headers}


def test_the_host_form_becomes_the_path_form() -> None:
    s = rewrite_host_form(_scope("/a%20b/c", [(b"host", f"8000-{SID}.localhost".encode())]),
                          "localhost")
    assert s["path"] == f"/v1/sandboxes/{SID}/ports/8000/http/a%20b/c"
    assert s["raw_path"] == f"/v1/sandboxes/{SID}/ports/8000/http/a%20b/c".encode()
    assert s[port_proxy.HOST_FORM_KEY] is True
    other = _scope("/v1/health", [(b"host", b"localhost")])
    assert rewrite_host_form(other, "localhost") is other  # the API, untouched


def test_ember_credentials_never_reach_the_guest() -> None:
    path = f"/v1/sandboxes/{SID}/ports/80/http/"
    both = rewrite_host_form(_scope(path, [(b"authorization", b"Basic app"),
                                           (b"x-ember-authorization", b"Bearer ek_1_x")]), "l")
    assert dict(both["headers"])[b"authorization"] == b"Bearer ek_1_x"  # ember's
    assert both[port_proxy.APP_AUTH_KEY] == b"Basic app"  # the guest's
    empty = rewrite_host_form(_scope(path, [(b"authorization", b"Basic app"),
                                            (b"x-ember-authorization", b"")]), "l")
    assert b"authorization" not in dict(empty["headers"])  # the socket's peer decides
    sent = request_headers(both["headers"], app_authorization=both[port_proxy.APP_AUTH_KEY],
                           client="10.0.0.9", scheme="https", prefix=None)
    assert (b"authorization", b"Basic app") in sent
    assert not any(v.startswith(b"Bearer ek_") for _, v in sent)
    plain = request_headers([(b"authorization", b"Bearer ek_1_x")], app_authorization=None,
                            client=None, scheme="http", prefix=None)
    assert not any(k in (b"authorization", b"x-ember-authorization") for k, _ in plain)


def test_hop_by_hop_headers_are_dropped_and_forwarded_ones_added() -> None:
    given_headers = [(b"Host", b"h"), (b"Connection", b"keep-alive, X-Secret"),
                     (b"X-Secret", b"1"), (b"Upgrade", b"websocket"), (b"TE", b"trailers"),
                     (b"Transfer-Encoding", b"chunked"), (b"Accept", b"*/*"),
                     (b"X-Forwarded-For", b"1.2.3.4"), (b"X-Forwarded-Host", b"spoof")]
    out = request_headers(given_headers, app_authorization=None, client="10.0.0.9",
                          scheme="http", prefix="/v1/sandboxes/x/ports/1/http")
    assert dict(out) == {b"host": b"h", b"accept": b"*/*",
                         b"x-forwarded-for": b"1.2.3.4, 10.0.0.9",
                         b"x-forwarded-proto": b"http", b"x-forwarded-host": b"h",
                         b"x-forwarded-prefix": b"/v1/sandboxes/x/ports/1/http"}
    back = response_headers([(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
                             (b"Connection", b"close"), (b"Keep-Alive", b"timeout=5"),
                             (b"Content-Length", b"3")])
    assert back == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
                    (b"content-length", b"3")]


def test_the_guest_gets_the_path_after_the_prefix() -> None:
    prefix = f"/v1/sandboxes/{SID}/ports/8000/http".encode()
    assert upstream_target(prefix + b"/a%2Fb", b"q=1") == b"/a%2Fb?q=1"
    assert upstream_target(prefix + b"/", b"") == b"/"
    assert upstream_target(prefix, b"x") == b"/?x"


# --- the proxy, to a real server ------------------------------------------------------------
class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        size = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(size) if size else b""
        if self.headers.get("transfer-encoding") == "chunked":
            while (n := int(self.rfile.readline().strip(), 16)):
                body += self.rfile.read(n)
                self.rfile.readline()
            self.rfile.readline()
        doc = json.dumps({"method": self.command, "path": self.path, "body": len(body),
                          "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(201)
        self.send_header("Set-Cookie", "a=1")
        self.send_header("Set-Cookie", "b=2")
        self.send_header("Content-Length", str(len(doc)))
        self.end_headers()
        self.wfile.write(doc)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _via_proxy(port: int, method: str, url: str, **kw: Any) -> httpx.Response:
    proxy = PortProxy("localhost")
    exposed = Exposed(SID, 8000, "127.0.0.1", port)

    async def route(request: Request) -> Response:
        return await proxy.forward(request, exposed)

    app = Starlette(routes=[Route("/v1/sandboxes/{sid}/ports/{p}/http{rest:path}", route,
                                  methods=["GET", "POST", "PUT"])])

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://emberd") as c:
                return await c.request(method, url, **kw)
        finally:
            await proxy.aclose()

    return asyncio.run(go())


def test_requests_and_answers_are_carried(echo: int) -> None:
    base = f"/v1/sandboxes/{SID}/ports/8000/http"
    r = _via_proxy(echo, "GET", base + "/a%20b?x=1", headers={"connection": "close"})
    assert r.status_code == 201
    doc = r.json()
    assert (doc["method"], doc["path"], doc["body"]) == ("GET", "/a%20b?x=1", 0)
    assert doc["headers"]["x-forwarded-prefix"] == base
    assert doc["headers"]["host"] == "emberd"
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]

    async def chunks() -> Any:
        for _ in range(64):
            yield b"x" * 4096

    r = _via_proxy(echo, "POST", base + "/up", content=chunks())  # streamed, chunked
    assert r.json()["body"] == 64 * 4096 and r.json()["method"] == "POST"
    r = _via_proxy(echo, "PUT", base + "/up", content=b"12345")
    assert r.json()["body"] == 5
    r = _via_proxy(echo, "GET", base)
    assert r.status_code == 308 and r.headers["location"] == base + "/"


def test_nothing_listening_is_502_and_silence_is_504(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = int(s.getsockname()[1])
    r = _via_proxy(closed, "GET", f"/v1/sandboxes/{SID}/ports/8000/http/")
    assert r.status_code == 502 and r.json()["error"]["code"] == "network_error"
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    monkeypatch.setattr(port_proxy, "IO_TIMEOUT_S", 0.5)
    try:
        r = _via_proxy(int(silent.getsockname()[1]), "GET",
                       f"/v1/sandboxes/{SID}/ports/8000/http/")
    finally:
        silent.close()
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


# --- through the daemon's application -------------------------------------------------------
@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(home=tmp_path / "home", cache=tmp_path / "cache", ram=tmp_path / "ram").ensure()


def _call(paths: Paths, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(paths, ports_domain="ports.test"))
        async with httpx.AsyncClient(transport=transport, base_url="http://emberd") as c:
            return await c.request(method, url, headers=headers)

    return asyncio.run(go())


def test_ports_not_exposed_are_404_and_callers_need_credentials(paths: Paths) -> None:
    store = Store(paths.db)
    store.add_sandbox(SandboxRecord(
        id=SID, template="t", state="failed", vcpus=1, memory_mib=256, disk_mib=1,
        timeout_s=None, created_at=1.0, expires_at=None, dir=f"/nonexistent/{SID}", pid=None,
        accel="tcg", metadata={TENANT_KEY: "alice"}, error="a registry row for this test"))
    alice = {"authorization": f"Bearer {new_key(store, 'alice')[1]}"}
    bob = {"authorization": f"Bearer {new_key(store, 'bob')[1]}"}
    by_host = {"host": f"8000-{SID}.ports.test:9000"}
    path = f"/v1/sandboxes/{SID}/ports/8000/http/x"
    r = _call(paths, "GET", path, alice)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    assert "is not exposed" in r.json()["error"]["message"]
    r = _call(paths, "GET", "/x", {**by_host, **alice})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    for creds in (bob, {}):  # another tenant's sandbox is absent; no key: 401
        r = _call(paths, "GET", "/x", {**by_host, **creds})
        assert r.status_code == (404 if creds else 401), r.text
        r = _call(paths, "POST", path, creds)
        assert r.status_code == (404 if creds else 401), r.text
    ember_header = {"x-ember-authorization": alice["authorization"],
                    "authorization": "Basic Z3Vlc3Q6YXBw"}  # the guest's own credentials
    r = _call(paths, "GET", "/x", {**by_host, **ember_header})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = _call(paths, "GET", "/v1/sandboxes/sb-00000000dead/ports/80/http/", alice)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "sandbox_not_found")
    r = _call(paths, "GET", "/v1/health", {"host": "ports.test", **alice})  # the API itself
    assert r.json()["tenant"] == "alice"
