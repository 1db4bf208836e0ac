"""The code interpreter's front in-process (the real app over httpx's ASGI transport): which
requests reach it, its token check before anything else, its errors, before any guest."""

from __future__ import annotations

from typing import Any

from ember.daemon.app import create_app
from ember.daemon.port_proxy import domain_from_env, host_name
from ember.e2b import SECRET_FILE
from ember.e2b.envd import own_port_app
from ember.e2b.mapping import access_token, traffic_token
from ember.paths import Paths
from tests.unit.test_e2b_app import call

PORT = {"e2b-sandbox-port": "49999"}


def test_port_49999_is_told_apart_by_header_or_host() -> None:
    app = object()
    ports: dict[int, Any] = {49999: app}
    scope: dict[str, Any] = {"type": "http", "headers": [(b"e2b-sandbox-port", b"49999")]}
    assert own_port_app(scope, ports, "sbx.local") == (app, scope)
    for headers in ([(b"e2b-sandbox-port", b"49983")], [(b"e2b-sandbox-port", b"x9")],
                    [(b"host", b"49983-sb1.sbx.local")], [(b"host", b"49999-sb1.other")], []):
        assert own_port_app({"type": "http", "headers": headers}, ports, "sbx.local") is None
    got = own_port_app({"type": "http", "headers": [(b"host", b"49999-sb1.sbx.local:80")]},
                       ports, "sbx.local")
    assert got is not None and got[0] is app
    assert (b"e2b-sandbox-id", b"sb1") in got[1]["headers"]


def test_token_first_then_the_sandbox(paths: Paths) -> None:
    create_app(paths)  # makes the home's secret
    secret = (paths.home / SECRET_FILE).read_bytes()
    who = {**PORT, "e2b-sandbox-id": "sb-gone"}
    for path, method in (("/execute", "POST"), ("/contexts", "GET"), ("/contexts", "POST"),
                         ("/contexts/abc", "DELETE"), ("/contexts/abc/restart", "POST"),
                         ("/health", "GET")):
        r = call(paths, method, path, headers=who, json={"code": "1"})
        assert (r.status_code, r.json()["code"]) == (401, 401), (path, r.text)
        r = call(paths, method, path, headers={**who, "x-access-token": access_token(
            b"y" * 32, "sb-gone")}, json={"code": "1"})
        assert r.status_code == 401
    other = {**PORT, "e2b-sandbox-id": "sb-gone", "x-access-token": access_token(secret, "sb-2")}
    assert call(paths, "GET", "/contexts", headers=other).status_code == 401
    good = {**who, "x-access-token": access_token(secret, "sb-gone")}
    assert call(paths, "GET", "/health", headers=good).status_code == 204
    traffic = {**who, "e2b-traffic-access-token": traffic_token(secret, "sb-gone")}
    assert call(paths, "GET", "/health", headers=traffic).status_code == 204
    assert call(paths, "GET", "/health", headers={**traffic, "e2b-sandbox-id": "sb-2"}
                ).status_code == 401
    r = call(paths, "POST", "/execute", headers=good, json={"code": "1"})
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    host = host_name("sb-gone", 49999, domain_from_env())  # no E2b-Sandbox-* headers
    r = call(paths, "GET", "/contexts", headers={"host": host,
                                                  "x-access-token": good["x-access-token"]})
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    r = call(paths, "GET", "/nope", headers=good)
    assert r.status_code == 502  # the sandbox is looked up before the path is
