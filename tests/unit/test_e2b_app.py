"""The E2B front of the daemon, served in-process (the real app over httpx's ASGI
transport): E2B's error shapes, keys in X-API-KEY, tenants, quotas and envd's access
checks, before any guest is involved."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from ember.daemon.app import create_app
from ember.daemon.auth import new_key
from ember.e2b import SECRET_FILE
from ember.e2b.mapping import access_token
from ember.paths import Paths
from ember.store import Store, TemplateRecord
from ember.store.records import TenantRecord
from tests.unit.test_daemon_app import _row


def call(paths: Paths, method: str, url: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(paths))
        async with httpx.AsyncClient(transport=transport, base_url="http://emberd") as c:
            return await c.request(method, url, **kw)

    return asyncio.run(go())


def test_lifecycle_errors_are_e2b_shaped(paths: Paths) -> None:
    store = Store(paths.db)
    alice = {"x-api-key": new_key(store, "alice")[1]}
    r = call(paths, "GET", "/v2/sandboxes")
    assert r.status_code == 401 and r.json()["code"] == 401 and "API key" in r.json()["message"]
    r = call(paths, "GET", "/v2/sandboxes", headers={"x-api-key": "ek_nope_nope"})
    assert (r.status_code, r.json()["code"]) == (401, 401)
    r = call(paths, "POST", "/v2/sandboxes", headers=alice, json={"templateID": "nope"})
    assert (r.status_code, r.json()["code"]) == (404, 404) and "nope" in r.json()["message"]
    for bad in ({}, {"templateID": "base", "timeout": -1}, {"templateID": "base", "x": 1},
                {"templateID": "base", "metadata": {"ember.tenant": "bob"}},
                {"templateID": "base", "mcp": {"x": {}}}):
        r = call(paths, "POST", "/v2/sandboxes", headers=alice, json=bad)
        assert (r.status_code, r.json()["code"]) == (400, 400), (bad, r.text)
    r = call(paths, "GET", "/v2/sandboxes?nextToken=!!", headers=alice)
    assert r.status_code == 400
    store.put_template(TemplateRecord(name="t", source="dir:/", digest="sha256:0",
                                      image_path="/nonexistent", size_bytes=1, created_at=1.0))
    store.put_tenant(TenantRecord("alice", max_sandboxes=0))
    r = call(paths, "POST", "/sandboxes", headers=alice, json={"templateID": "t"})
    assert (r.status_code, r.json()["code"]) == (429, 429) and "retry-after" in r.headers


def test_tenants_see_only_their_own(paths: Paths) -> None:
    store = Store(paths.db)
    _row(store, "sb-bob", "bob")
    alice = {"x-api-key": new_key(store, "alice")[1]}
    bob = {"x-api-key": new_key(store, "bob")[1]}
    for method, url in (("GET", "/sandboxes/sb-bob"), ("DELETE", "/sandboxes/sb-bob"),
                        ("POST", "/v2/sandboxes/sb-bob/connect"),
                        ("POST", "/sandboxes/sb-bob/pause"),
                        ("GET", "/sandboxes/sb-bob/metrics")):
        r = call(paths, method, url, headers=alice)
        assert (r.status_code, r.json()["code"]) == (404, 404), (method, url, r.text)
    assert call(paths, "GET", "/v2/sandboxes", headers=alice).json() == []
    assert call(paths, "GET", "/sandboxes/sb-bob", headers=bob).json()["sandboxID"] == "sb-bob"


def test_envd_checks_the_access_token_first(paths: Paths) -> None:
    create_app(paths)  # makes the home's secret
    secret = (paths.home / SECRET_FILE).read_bytes()
    assert (paths.home / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    envd = {"e2b-sandbox-id": "sb-gone", "e2b-sandbox-port": "49983"}
    r = call(paths, "GET", "/health", headers=envd)
    assert (r.status_code, r.json()["code"]) == (401, 401)
    r = call(paths, "GET", "/health", headers={**envd, "x-access-token": access_token(
        b"x" * 32, "sb-gone")})
    assert r.status_code == 401
    good = {"x-access-token": access_token(secret, "sb-gone")}
    r = call(paths, "POST", "/process.Process/List", headers=good, json={})
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    r = call(paths, "GET", "/health", headers={**good, "e2b-sandbox-port": "8000"})
    assert r.status_code == 502 and "port is not open" in r.json()["message"]
    r = call(paths, "GET", "/health", headers={"e2b-sandbox-id": "../etc"})
    assert r.status_code == 401  # not a token for it, whatever the id says
