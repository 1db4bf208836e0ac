"""E2B's SDK configured as for E2B itself, by ``E2B_DOMAIN`` alone: the daemon on
``127.0.0.1:443`` with TLS (a test CA) and ``--ports-domain ember.test``; the SDK (in a
subprocess with its own mount namespace, whose ``/etc/hosts`` names ``api.ember.test``
and each sandbox's hosts) creates, runs, moves files and reaches a guest server at
``https://<get_host(port)>``. Nothing leaves this machine: every name is in that hosts
file, every address is loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.daemon import control
from ember.daemon.auth import new_key
from ember.paths import Paths
from ember.store import Store

pytest.importorskip("e2b")
pytestmark = pytest.mark.integration

DOMAIN = "ember.test"
DRIVE = Path(__file__).with_name("e2b_domain_drive.py")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=120)


def _certificates(d: Path) -> tuple[Path, Path, Path]:
    """A test CA, and a certificate it signed for ``api.<domain>`` and ``*.<domain>``."""
    ca, ca_key, cert, key, csr = (d / n for n in ("ca.pem", "ca.key", "cert.pem", "key.pem",
                                                  "req.csr"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=ember test CA", "-keyout", str(ca_key), "-out", str(ca),
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=api.{DOMAIN}",
             "-keyout", str(key), "-out", str(csr))
    ext = d / "ext.cnf"
    ext.write_text(f"subjectAltName=DNS:api.{DOMAIN},DNS:*.{DOMAIN}\n"
                   "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "1", "-out", str(cert), "-extfile", str(ext))
    return ca, cert, key


@pytest.fixture(scope="module")
def domain_daemon(ember_paths: Paths, debian_template: object,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", 443))
        except OSError as err:
            pytest.skip(f"127.0.0.1:443 is taken on this host: {err}")
    d = tmp_path_factory.mktemp("e2b-domain")
    ca, cert, key = _certificates(d)
    control.stop(ember_paths)
    control.start(ember_paths, listen="127.0.0.1:443", tls_cert=str(cert), tls_key=str(key),
                  ports_domain=DOMAIN)
    _, api_key = new_key(Store(ember_paths.db), "domain")
    hosts, resolv = d / "hosts", d / "resolv.conf"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 api.{DOMAIN}\n")
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    try:
        yield {"ca": str(ca), "hosts": str(hosts), "resolv": str(resolv), "key": api_key}
    finally:
        control.stop(ember_paths)


def _drive(daemon: dict[str, str], *args: str) -> str:
    """Run the drive in a mount namespace of its own: its /etc/hosts and resolv.conf are
    ours (loopback only), nobody else's changes."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("E2B_") and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env.update(E2B_DOMAIN=DOMAIN, E2B_API_KEY=daemon["key"], SSL_CERT_FILE=daemon["ca"],
               NO_PROXY="*")
    script = ('mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && '
              'shift 2 && exec "$@"')
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", daemon["hosts"],
                        daemon["resolv"], sys.executable, str(DRIVE), *args],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def test_the_sdk_by_domain_over_tls(domain_daemon: dict[str, str]) -> None:
    sandbox_id = _drive(domain_daemon, "create")
    with open(domain_daemon["hosts"], "a", encoding="ascii") as f:
        for port in (49983, 8000):
            f.write(f"127.0.0.1 {port}-{sandbox_id}.{DOMAIN}\n")
    assert _drive(domain_daemon, "use", sandbox_id).endswith("ok")
