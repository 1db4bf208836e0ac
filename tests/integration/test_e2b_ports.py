"""``sandbox.get_host(port)`` of E2B's SDK against a real daemon and real guests: HTTP to a
server in the guest through the daemon's listener, carried by the agent (the sandboxes
have no network device), public and private (traffic token) sandboxes, bad input."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.test_e2b import api  # noqa: F401  (the daemon on TCP, API keys)

e2b = pytest.importorskip("e2b")
from e2b import Sandbox  # noqa: E402

pytestmark = pytest.mark.integration

PORT = 8000
SERVER = r'''
import hashlib, http.server, sys

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, body, status=200):
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-guest", "yes")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/big/"):
            n = int(self.path[5:])
            self.send_response(200)
            self.send_header("content-length", str(n))
            self.end_headers()
            block = bytes(range(256)) * 256
            while n:
                k = min(n, len(block))
                self.wfile.write(block[:k])
                n -= k
            return
        h = self.headers
        self._send(f"GET {self.path} host={h['host']} xff={h['x-forwarded-for']} "
                   f"token={h['e2b-traffic-access-token']}".encode())

    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("content-length", 0)))
        self._send(f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode(), 201)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''

#: Connections to the server's port still established in the guest (/proc/net/tcp: state 01).
ESTABLISHED = ("import sys; print(sum(1 for l in open('/proc/net/tcp').readlines()[1:] "
               "if l.split()[1].endswith(':' + sys.argv[1]) and l.split()[3] == '01'))")


def _serve(box: Sandbox, url: str, headers: dict[str, str]) -> None:
    """Start the test server in ``box`` and wait until it answers through the daemon."""
    box.files.write("/tmp/srv.py", SERVER)
    box.commands.run(f"python3 /tmp/srv.py {PORT}", background=True)
    deadline = time.monotonic() + 60
    while True:
        r = httpx.get(url + "/ready", headers=headers, timeout=30)
        if r.status_code == 200 or time.monotonic() > deadline:
            assert r.status_code == 200, r.text
            return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def public(api: dict[str, Any]) -> Iterator[Sandbox]:  # noqa: F811
    box = Sandbox.create("base", timeout=900, **api["opts"])
    try:
        _serve(box, api["url"], {"host": box.get_host(PORT)})
        yield box
    finally:
        box.kill()


def test_get_host_reaches_the_guest_server(public: Sandbox, api: dict[str, Any]) -> None:  # noqa: F811
    host = public.get_host(PORT)
    assert host == f"{PORT}-{public.sandbox_id}.localhost"
    r = httpx.get(api["url"] + "/some/path?q=1", headers={"host": host}, timeout=30)
    assert r.status_code == 200 and r.headers["x-guest"] == "yes"
    assert r.text.startswith(f"GET /some/path?q=1 host={host} xff=127.0.0.1 ")
    assert r.request.headers.get("x-api-key") is None  # no ember credential was needed
    assert public.get_info().sandbox_id == public.sandbox_id


def test_bodies_stream_both_ways(public: Sandbox, api: dict[str, Any]) -> None:  # noqa: F811
    """A 6 MiB upload and a 24 MiB download through the agent's flow control."""
    headers = {"host": public.get_host(PORT)}
    data = os.urandom(6 << 20)
    r = httpx.post(api["url"] + "/up", content=data, headers=headers, timeout=120)
    assert r.status_code == 201 and r.text == f"{len(data)} {hashlib.sha256(data).hexdigest()}"
    n = 24 << 20
    with httpx.stream("GET", api["url"] + f"/big/{n}", headers=headers, timeout=120) as r:
        assert r.status_code == 200
        digest, size = hashlib.sha256(), 0
        for chunk in r.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
    block = bytes(range(256)) * 256
    assert size == n
    assert digest.hexdigest() == hashlib.sha256(block * (n // len(block))).hexdigest()


def test_sandbox_headers_reach_the_port_too(public: Sandbox, api: dict[str, Any]) -> None:  # noqa: F811
    r = httpx.get(api["url"] + "/by-headers", timeout=30, headers={
        "e2b-sandbox-id": public.sandbox_id, "e2b-sandbox-port": str(PORT)})
    assert r.status_code == 200 and r.text.startswith("GET /by-headers ")


def test_a_closed_port_and_a_gone_client(public: Sandbox, api: dict[str, Any]) -> None:  # noqa: F811
    r = httpx.get(api["url"] + "/", headers={"host": public.get_host(PORT + 1)}, timeout=30)
    assert r.status_code == 502
    body = r.json()
    assert body["code"] == 502 and f"port {PORT + 1} is not open" in body["message"]
    assert body["sandboxId"] == public.sandbox_id
    # a client that goes away mid-download leaves no connection open in the guest
    headers = {"host": public.get_host(PORT)}
    for _ in range(3):
        with httpx.stream("GET", api["url"] + f"/big/{256 << 20}", headers=headers,
                          timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_bytes())
    public.files.write("/tmp/established.py", ESTABLISHED)
    deadline = time.monotonic() + 30
    while True:
        ss = public.commands.run(f"python3 /tmp/established.py {PORT:04X}")
        if ss.stdout.strip() == "0" or time.monotonic() > deadline:
            assert ss.stdout.strip() == "0", ss.stdout
            break
        time.sleep(0.5)
    r = httpx.get(api["url"] + "/after", headers=headers, timeout=30)
    assert r.status_code == 200


def test_a_kept_alive_connection_whose_server_went(public: Sandbox,
                                                  api: dict[str, Any]) -> None:  # noqa: F811
    """Connections to guest servers are kept alive between requests; one that the guest's
    server closed meanwhile is noticed and replaced, never answered with an error."""
    headers = {"host": public.get_host(PORT)}
    first = httpx.get(api["url"] + "/a", headers=headers, timeout=30)
    assert first.status_code == 200
    public.commands.run("pkill -f '[s]rv.py'; sleep 0.5", timeout=30)  # not this shell
    gone = httpx.get(api["url"] + "/b", headers=headers, timeout=30)
    assert gone.status_code == 502 and "is not open" in gone.json()["message"]
    _serve(public, api["url"], headers)
    again = httpx.get(api["url"] + "/c", headers=headers, timeout=30)
    assert again.status_code == 200 and again.text.startswith("GET /c ")


def test_private_ports_need_the_traffic_token(api: dict[str, Any]) -> None:  # noqa: F811
    box = Sandbox.create("base", timeout=600, network={"allow_public_traffic": False},
                         **api["opts"])
    try:
        token = box.traffic_access_token
        assert token
        host = box.get_host(PORT)
        box.files.write("/tmp/srv.py", SERVER)
        box.commands.run(f"python3 /tmp/srv.py {PORT}", background=True)
        r = httpx.get(api["url"] + "/", headers={"host": host}, timeout=30)
        assert r.status_code == 403 and "traffic access token" in r.json()["message"]
        wrong = httpx.get(api["url"] + "/", timeout=30,
                          headers={"host": host, "e2b-traffic-access-token": token[:-2] + "xx"})
        assert wrong.status_code == 403
        _serve(box, api["url"], {"host": host, "e2b-traffic-access-token": token})
        r = httpx.get(api["url"] + "/x", timeout=30,
                      headers={"host": host, "e2b-traffic-access-token": token})
        assert r.status_code == 200 and r.text.startswith("GET /x ")
    finally:
        box.kill()
    r = httpx.get(api["url"] + "/", headers={"host": host}, timeout=30)
    assert r.status_code in (401, 404, 502)  # gone


def test_unsupported_network_options_are_refused(api: dict[str, Any]) -> None:  # noqa: F811
    with pytest.raises(e2b.SandboxException) as err:
        Sandbox.create("base", network={"allow_out": ["10.0.0.1"]}, **api["opts"])
    assert "network.allowOut is not supported" in str(err.value)
