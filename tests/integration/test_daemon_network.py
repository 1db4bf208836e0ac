"""The daemon serving a network: TCP with TLS (a certificate made here), API keys, tenants
that cannot see each other, quotas, and the Unix socket's peer uid deciding the tenant;
HTTP to exposed ports through the daemon, by Host and by path, across a daemon restart.
Traffic stays on loopback and in namespaces the tests create (tests/integration/networld.py)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember import Sandbox
from ember.daemon import control
from ember.daemon.auth import new_key
from ember.errors import QuotaExceededError, SandboxNotFoundError, UnauthorizedError
from ember.paths import Paths
from ember.store import Store
from ember.store.records import ExposedPortRecord, TenantRecord
from tests.integration.networld import fake_world

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


# --- HTTP to exposed ports through the daemon ---------------------------------------------
DOMAIN = "ports.test"


@pytest.fixture(scope="module")
def net_daemon(ember_paths: Paths, debian_template: object) -> Iterator[str]:
    """The daemon on its socket and on TCP (its URL), with a fake host for sandbox networks
    and ``ports.test`` as its ports domain."""
    with fake_world() as world:
        old = os.environ.get("EMBER_NET_HOST_NS")
        os.environ["EMBER_NET_HOST_NS"] = world.host  # the daemon started here inherits it
        url = f"http://127.0.0.1:{_free_port()}"
        control.stop(ember_paths)
        control.start(ember_paths, listen=url.removeprefix("http://"), ports_domain=DOMAIN)
        try:
            yield url
        finally:
            control.stop(ember_paths)
            if old is None:
                os.environ.pop("EMBER_NET_HOST_NS", None)
            else:
                os.environ["EMBER_NET_HOST_NS"] = old


def _raw_get(host: str, port: int, path: str) -> bytes:
    with socket.create_connection((host, port), timeout=60) as c:
        c.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        reply = b""
        while chunk := c.recv(65536):
            reply += chunk
    return reply


def test_http_to_exposed_ports_by_host_and_path_survives_a_daemon_restart(
        net_daemon: str, ember_paths: Paths) -> None:
    sock = f"unix://{ember_paths.daemon_socket}"
    store = Store(ember_paths.db)
    _, bob = new_key(store, "bob")
    sb = Sandbox.create("debian-python", timeout=600, url=sock, network={"internet": False})
    uds = httpx.Client(transport=httpx.HTTPTransport(uds=str(ember_paths.daemon_socket)),
                       base_url="http://emberd", timeout=120)
    try:
        sb.exec("mkdir -p /srv/www && echo hello from the guest > /srv/www/index.txt && "
                "head -c 3000000 /dev/urandom > /srv/www/big.bin").check()
        digest = sb.exec("sha256sum /srv/www/big.bin").check().stdout.split()[0]
        sb.spawn(["python3", "-m", "http.server", "8000", "--directory", "/srv/www"])
        exposed = sb.expose(8000)
        assert exposed.http_host == f"8000-{sb.id}.{DOMAIN}"
        assert exposed.http_path == f"/v1/sandboxes/{sb.id}/ports/8000/http"
        deadline = time.monotonic() + 90
        while (r := uds.get(exposed.http_path + "/index.txt")).status_code != 200:
            assert r.status_code == 502, r.text  # nothing listens yet
            assert time.monotonic() < deadline, "the guest's web server never answered"
            time.sleep(0.5)
        assert r.text == "hello from the guest\n"
        by_host = {"host": f"{exposed.http_host}:8080"}
        r = uds.get("/index.txt", headers=by_host)
        assert (r.status_code, r.text) == (200, "hello from the guest\n")
        with uds.stream("GET", "/big.bin", headers=by_host) as big:  # streamed through
            data = b"".join(big.iter_raw())
        assert hashlib.sha256(data).hexdigest() == digest
        r = uds.get(exposed.http_path)  # no slash: the guest's relative links need one
        assert r.status_code == 308 and r.headers["location"] == exposed.http_path + "/"
        for path, host in ((f"/v1/sandboxes/{sb.id}/ports/8001/http/", None),
                           ("/", f"8001-{sb.id}.{DOMAIN}"),
                           ("/", f"8000-sb-00000000dead.{DOMAIN}")):
            r = uds.get(path, headers={"host": host} if host else {})
            assert r.status_code == 404 and r.json()["error"]["code"].endswith("not_found"), \
                (path, host, r.text)
        tcp = httpx.Client(base_url=net_daemon, timeout=60)
        assert tcp.get(exposed.http_path + "/index.txt").status_code == 401  # no key
        r = tcp.get("/index.txt", headers={**by_host, "authorization": f"Bearer {bob}"})
        assert r.status_code == 404, r.text  # another tenant's sandbox: as if absent
        sb.expose(8002)
        r = uds.get(f"/v1/sandboxes/{sb.id}/ports/8002/http/")
        assert (r.status_code, r.json()["error"]["code"]) == (502, "network_error"), r.text

        store.put_exposed_port(ExposedPortRecord("sb-00000000dead", 80, 1))  # long gone
        control.stop(ember_paths)
        with pytest.raises(OSError):  # the daemon's listener went with it
            _raw_get(exposed.host, exposed.host_port, "/index.txt")
        control.start(ember_paths, listen=net_daemon.removeprefix("http://"),
                      ports_domain=DOMAIN)
        again = Sandbox.connect(sb.id, url=sock)
        back = again.ports()
        assert [p.port for p in back] == [8000, 8002]
        assert back[0].host_port == exposed.host_port  # the same host port: it was free
        assert _raw_get(exposed.host, exposed.host_port, "/index.txt").endswith(
            b"hello from the guest\n")
        r = uds.get("/index.txt", headers=by_host)
        assert (r.status_code, r.text) == (200, "hello from the guest\n")
        assert {r.sandbox_id for r in store.list_exposed_ports()} == {sb.id}  # dead: dropped
        again.unexpose(8000)
        assert uds.get("/index.txt", headers=by_host).status_code == 404
        assert [r.port for r in store.list_exposed_ports(sb.id)] == [8002]
    finally:
        uds.close()
        Sandbox.connect(sb.id, url=sock).kill()
    assert store.list_exposed_ports(sb.id) == []
    store.close()


def test_an_idle_paused_sandbox_is_woken_by_http_after_a_daemon_restart(
        net_daemon: str, ember_paths: Paths) -> None:
    """Scale to zero survives a restart: the idle period is kept, a sandbox found paused is
    taken as idle-paused, and an HTTP request through the daemon resumes it."""
    sock = f"unix://{ember_paths.daemon_socket}"
    sb = Sandbox.create("debian-python", timeout=600, url=sock, network={"internet": False})
    uds = httpx.Client(transport=httpx.HTTPTransport(uds=str(ember_paths.daemon_socket)),
                       base_url="http://emberd", timeout=120)
    try:
        sb.exec("mkdir -p /srv/www && echo awake > /srv/www/index.txt").check()
        sb.spawn(["python3", "-m", "http.server", "8000", "--directory", "/srv/www"])
        exposed = sb.expose(8000, pause_after_idle=2)
        by_host = {"host": exposed.http_host or ""}
        deadline = time.monotonic() + 90
        while uds.get("/index.txt", headers=by_host).status_code != 200:
            assert time.monotonic() < deadline, "the guest's web server never answered"
            time.sleep(0.5)
        deadline = time.monotonic() + 60
        while Sandbox.get_info(sb.id, url=sock).state != "paused":
            assert time.monotonic() < deadline, "the idle sandbox was never paused"
            time.sleep(0.2)
        control.stop(ember_paths)
        control.start(ember_paths, listen=net_daemon.removeprefix("http://"),
                      ports_domain=DOMAIN)
        assert Sandbox.get_info(sb.id, url=sock).state == "paused"
        r = uds.get("/index.txt", headers=by_host)
        assert (r.status_code, r.text) == (200, "awake\n")
        assert Sandbox.get_info(sb.id, url=sock).state == "running"
    finally:
        uds.close()
        Sandbox.connect(sb.id, url=sock).kill()


def test_cli_create_and_run_take_network_limits(net_daemon: str, ember_paths: Paths) -> None:
    """``ember create`` and ``ember run`` give a sandbox its limits from the start."""
    def ember(*args: str) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True,
                            text=True, timeout=600, env={**os.environ,
                                                         "EMBER_HOME": str(ember_paths.home)})
        assert cp.returncode == 0, (args, cp.stdout, cp.stderr[-2000:])
        return cp

    info = json.loads(ember("create", "--network", "off", "--rate-in", "4", "--rate-out",
                            "2.5", "--max-connections", "8", "--json").stdout)
    try:
        assert info["network"]["rate_in_mbit"] == 4 and info["network"]["rate_out_mbit"] == 2.5
        assert info["network"]["max_connections"] == 8 and info["network"]["internet"] is False
        shown = ember("network", "show", info["id"]).stdout
        assert "rate out 2.5 Mbit/s, rate in 4 Mbit/s, max connections 8" in shown, shown
    finally:
        ember("rm", info["id"])
    cp = ember("run", "--network", "internet", "--max-connections", "3", "--",
               "cat /sys/class/net/eth0/operstate")
    assert cp.stdout.strip() == "up"
