"""The daemon serving a network: TCP with TLS (a certificate made here), API keys, tenants
that cannot see each other, quotas, and the Unix socket's peer uid deciding the tenant.
Traffic stays on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import Sandbox
from ember.daemon import control
from ember.daemon.auth import new_key
from ember.errors import QuotaExceededError, SandboxNotFoundError, UnauthorizedError
from ember.paths import Paths
from ember.store import Store
from ember.store.records import TenantRecord

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tls_url(ember_paths: Paths, debian_template: object,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=120)
    port = _free_port()
    old = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(cert)  # httpx and websockets trust our own CA
    control.stop(ember_paths)
    control.start(ember_paths, listen=f"127.0.0.1:{port}", tls_cert=str(cert),
                  tls_key=str(key))
    yield f"https://127.0.0.1:{port}"
    control.stop(ember_paths)
    if old is None:
        os.environ.pop("SSL_CERT_FILE", None)
    else:
        os.environ["SSL_CERT_FILE"] = old


def test_tls_keys_tenants_and_quotas(tls_url: str, ember_paths: Paths) -> None:
    store = Store(ember_paths.db)
    alice_rec, alice = new_key(store, "alice")
    _, bob = new_key(store, "bob")
    with pytest.raises(UnauthorizedError):
        Sandbox.list(url=tls_url)
    with pytest.raises(UnauthorizedError):
        Sandbox.list(url=tls_url, api_key=alice[:-4] + "AAAA")
    sb = Sandbox.create("debian-python", timeout=600, url=tls_url, api_key=alice)
    try:
        assert sb.exec("echo over tls").stdout == "over tls\n"
        assert [i.id for i in Sandbox.list(url=tls_url, api_key=alice)] == [sb.id]
        assert Sandbox.list(url=tls_url, api_key=bob) == []
        with pytest.raises(SandboxNotFoundError):  # another tenant's: 404, as if absent
            Sandbox.connect(sb.id, url=tls_url, api_key=bob)
        store.put_tenant(TenantRecord("alice", max_sandboxes=1))
        with pytest.raises(QuotaExceededError):
            Sandbox.create("debian-python", timeout=600, url=tls_url, api_key=alice)
        with pytest.raises(QuotaExceededError):
            sb.fork(1)
        term = sb.pty(["sh", "-c", "echo pty over wss"])  # the WebSocket over TLS too
        assert b"pty over wss" in b"".join(term.output())
        store.revoke_api_key(alice_rec.id, 1.0)
        with pytest.raises(UnauthorizedError):
            sb.exec("true")
    finally:
        Sandbox.connect(sb.id, url=f"unix://{ember_paths.daemon_socket}").kill()
        store.put_tenant(TenantRecord("alice"))


def test_plain_http_to_the_tls_port_gets_nothing(tls_url: str) -> None:
    port = int(tls_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = s.recv(200)
    assert b'"ok"' not in answer


def test_the_socket_peer_uid_decides_the_tenant(tls_url: str, ember_paths: Paths) -> None:
    sock = ember_paths.daemon_socket
    assert sock.stat().st_mode & 0o777 == 0o660
    probe = [sys.executable, "-c", (
        "import httpx, json, sys; t = httpx.HTTPTransport(uds=sys.argv[1]); "
        "c = httpx.Client(transport=t, base_url='http://e');"
        "print(json.dumps([c.get('/v1/health').json(), c.get('/v1/sandboxes').json()]))"),
        str(sock)]
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    nobody = {"user": 65534, "group": 65534, "extra_groups": [], "env": env,
              "capture_output": True, "text": True, "timeout": 60}
    denied = subprocess.run(probe, **nobody)  # type: ignore[call-overload]
    assert denied.returncode != 0, denied.stdout
    assert "ConnectError: [Errno 13] Permission denied" in denied.stderr, denied.stderr[-2000:]
    root_box = Sandbox.create("debian-python", timeout=600,
                              url=f"unix://{ember_paths.daemon_socket}")
    try:
        home_mode = ember_paths.home.stat().st_mode & 0o777
        os.chmod(ember_paths.home, home_mode | 0o001)  # let uid 65534 in, to see what it
        os.chmod(sock, 0o666)  # is allowed
        got = subprocess.run(probe, **nobody)  # type: ignore[call-overload]
        assert got.returncode == 0, (got.stderr[-600:], oct(ember_paths.home.stat().st_mode),
                                     oct(sock.stat().st_mode), str(sock))
        health, listed = json.loads(got.stdout)
        assert (health["tenant"], health["admin"]) == ("uid-65534", False)
        assert listed == []  # root's sandbox is not its own
    finally:
        os.chmod(sock, 0o660)
        os.chmod(ember_paths.home, home_mode)
        root_box.kill()
    assert Path(sock).exists()
