"""The daemon's HTTP edge, served in-process (httpx's ASGI transport, the real app): bad
input is refused with a typed JSON error before any sandbox is touched."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.daemon.app import create_app
from ember.daemon.auth import new_key
from ember.daemon.middleware import MAX_JSON_BODY
from ember.paths import Paths
from ember.store import SandboxRecord, Store, TemplateRecord
from ember.store.records import TENANT_KEY, TenantRecord

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[Paths]:
    yield Paths(home=tmp_path / "home", cache=tmp_path / "cache",
                ram=tmp_path / "ram").ensure()


_KEYS: dict[tuple[Path, str], str] = {}


def key(paths: Paths, tenant: str = "admin") -> str:
    if (paths.home, tenant) not in _KEYS:
        _KEYS[paths.home, tenant] = new_key(Store(paths.db), tenant)[1]
    return _KEYS[paths.home, tenant]


def call(paths: Paths, method: str, url: str, *, tenant: str | None = "admin",
         **kw: Any) -> httpx.Response:
    """One request over ASGI (a TCP-like client: it needs an API key)."""
    headers = dict(kw.pop("headers", {}))
    if tenant is not None:
        headers["authorization"] = f"Bearer {key(paths, tenant)}"

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(paths))
        async with httpx.AsyncClient(transport=transport, base_url="http://emberd") as c:
            return await c.request(method, url, headers=headers, **kw)

    return asyncio.run(go())


def error_of(r: httpx.Response) -> tuple[int, str]:
    body = r.json()
    return r.status_code, body["error"]["code"]


def test_health(paths: Paths) -> None:
    r = call(paths, "GET", "/v1/health")
    assert r.status_code == 200 and r.json()["ok"] is True
    assert r.headers["x-request-id"]


def test_unknown_sandbox_is_a_typed_404(paths: Paths) -> None:
    r = call(paths, "GET", "/v1/sandboxes/sb-0000dead")
    assert error_of(r) == (404, "sandbox_not_found")
    r = call(paths, "POST", "/v1/sandboxes/sb-0000dead/exec", json={"cmd": "true"})
    assert error_of(r) == (404, "sandbox_not_found")


def test_unknown_route_and_method(paths: Paths) -> None:
    assert error_of(call(paths, "GET", "/v1/nothing"))[0] == 404
    assert error_of(call(paths, "PATCH", "/v1/sandboxes"))[0] == 405


@pytest.mark.parametrize("body", [
    b"{not json", b"[]", b'"text"', b'{"template": 7}', b'{"vcpus": 0}', b'{"vcpus": 1e9}',
    b'{"bogus_field": 1}', b'{"isolation": "chroot"}', b'{"env": {"A": 1}}',
    b'{"timeout": -1}', b'{"metadata": {"k": "' + b"v" * 5000 + b'"}}',
])
def test_bad_create_bodies(paths: Paths, body: bytes) -> None:
    r = call(paths, "POST", "/v1/sandboxes", content=body,
             headers={"content-type": "application/json"})
    status, code = error_of(r)
    assert (status, code) == (400, "bad_request"), r.text
    assert "invalid request" in r.json()["error"]["message"]


@pytest.mark.parametrize("body", [
    {"cmd": ""}, {"cmd": []}, {"cmd": [1, 2]}, {"cmd": "true", "timeout": 0},
    {"cmd": "true", "user": -1}, {"cmd": "true", "stdin": 5}, {"cmd": "true", "extra": 1},
])
def test_bad_exec_bodies(paths: Paths, body: dict[str, Any]) -> None:
    r = call(paths, "POST", "/v1/sandboxes/sb-0000dead/exec", json=body)
    assert error_of(r) == (400, "bad_request"), r.text


def test_bad_ids_and_paths(paths: Paths) -> None:
    assert error_of(call(paths, "GET", "/v1/sandboxes/" + "x" * 65))[1] == "bad_request"
    assert error_of(call(paths, "GET", "/v1/sandboxes/a%20b"))[1] == "bad_request"
    r = call(paths, "GET", "/v1/sandboxes/sb-1/files/stat")  # no path
    assert error_of(r)[1] == "bad_request"


def test_oversized_bodies_are_refused(paths: Paths) -> None:
    big = b'{"template": "' + b"x" * MAX_JSON_BODY + b'"}'
    r = call(paths, "POST", "/v1/sandboxes", content=big,
             headers={"content-type": "application/json"})
    assert error_of(r) == (413, "bad_request")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        for _ in range(MAX_JSON_BODY // 65536 + 2):
            yield b" " * 65536

    r = call(paths, "POST", "/v1/sandboxes", content=chunks(),
             headers={"content-type": "application/json"})
    assert error_of(r) == (413, "bad_request")


def test_lists_start_empty_and_metrics_count_errors(paths: Paths) -> None:
    assert call(paths, "GET", "/v1/sandboxes").json() == []
    assert call(paths, "GET", "/v1/snapshots").json() == []
    assert call(paths, "GET", "/v1/templates").json() == []

    async def go() -> str:
        transport = httpx.ASGITransport(app=create_app(paths))
        async with httpx.AsyncClient(transport=transport, base_url="http://e", headers={
                "authorization": f"Bearer {key(paths)}"}) as c:
            await c.get("/v1/sandboxes/sb-0000dead")
            return (await c.get("/metrics")).text

    text = asyncio.run(go())
    assert 'ember_errors_total{code="sandbox_not_found"} 1.0' in text


def test_openapi_document_is_committed_and_current(paths: Paths) -> None:
    from ember.daemon.openapi import document

    committed = (REPO / "docs/openapi.json").read_text()
    assert json.loads(committed) == json.loads(document()), (
        "docs/openapi.json is stale: regenerate it with `ember daemon openapi > "
        "docs/openapi.json`")
    spec = json.loads(committed)
    for route in ("/v1/sandboxes", "/v1/sandboxes/{sandbox_id}/exec",
                  "/v1/sandboxes/{sandbox_id}/files/content", "/v1/snapshots/{ref}/restore"):
        assert route in spec["paths"]


@pytest.mark.parametrize("authorization", [
    None, "", "Basic abc", "Bearer ", "Bearer ek_nope", "Bearer ek_0123456789ab_wrong",
    "Bearer " + "x" * 300,
])
def test_callers_without_a_valid_key_get_401(paths: Paths, authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    r = call(paths, "GET", "/v1/sandboxes", tenant=None, headers=headers)
    assert error_of(r) == (401, "unauthorized"), r.text
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_a_revoked_key_is_refused_at_once(paths: Paths) -> None:
    store = Store(paths.db)
    rec, token = new_key(store, "t1")
    headers = {"authorization": f"Bearer {token}"}
    assert call(paths, "GET", "/v1/health", tenant=None, headers=headers).json()["tenant"] == "t1"
    store.revoke_api_key(rec.id, 1.0)
    r = call(paths, "GET", "/v1/health", tenant=None, headers=headers)
    assert error_of(r) == (401, "unauthorized") and "revoked" in r.text
    stored = store.get_api_key(rec.id)
    assert stored is not None and token.split("_")[-1] not in stored.secret_sha256


def _row(store: Store, sid: str, tenant: str) -> None:
    store.add_sandbox(SandboxRecord(
        id=sid, template="t", state="failed", vcpus=1, memory_mib=256, disk_mib=1,
        timeout_s=None, created_at=1.0, expires_at=None, dir=f"/nonexistent/{sid}", pid=None,
        accel="tcg", metadata={TENANT_KEY: tenant}, error="a registry row for this test"))


def test_a_tenant_sees_only_its_own_sandboxes(paths: Paths) -> None:
    store = Store(paths.db)
    _row(store, "sb-00000000000a", "alice")
    _row(store, "sb-00000000000b", "bob")
    assert call(paths, "GET", "/v1/sandboxes/sb-00000000000a", tenant="alice").status_code == 200
    r = call(paths, "GET", "/v1/sandboxes/sb-00000000000a", tenant="bob")
    assert error_of(r) == (404, "sandbox_not_found")  # as if it did not exist: not 403
    for verb, path in (("DELETE", ""), ("POST", "/pause"), ("GET", "/logs"),
                       ("GET", "/files/stat?path=/")):
        r = call(paths, verb, f"/v1/sandboxes/sb-00000000000a{path}", tenant="bob")
        assert error_of(r) == (404, "sandbox_not_found"), (verb, path, r.text)
    ids = [i["id"] for i in call(paths, "GET", "/v1/sandboxes", tenant="bob").json()]
    assert ids == ["sb-00000000000b"]
    ids = sorted(i["id"] for i in call(paths, "GET", "/v1/sandboxes").json())  # admin
    assert ids == ["sb-00000000000a", "sb-00000000000b"]
    assert call(paths, "GET", "/metrics", tenant="bob").status_code == 404


def test_quota_answers_429_with_retry_after(paths: Paths) -> None:
    store = Store(paths.db)
    store.put_template(TemplateRecord(name="t", source="dir:/", digest="sha256:0",
                                      image_path="/nonexistent", size_bytes=1, created_at=1.0))
    store.put_tenant(TenantRecord("carol", max_sandboxes=0))
    r = call(paths, "POST", "/v1/sandboxes", tenant="carol", json={"template": "t"})
    assert error_of(r) == (429, "quota_exceeded")
    assert int(r.headers["retry-after"]) >= 1
    store.put_tenant(TenantRecord("carol", max_vcpus=2))
    r = call(paths, "POST", "/v1/sandboxes", tenant="carol", json={"template": "t", "vcpus": 3})
    assert error_of(r) == (429, "quota_exceeded") and "vCPUs" in r.text


def test_metadata_keys_of_the_daemon_are_refused(paths: Paths) -> None:
    r = call(paths, "POST", "/v1/sandboxes", json={"metadata": {"ember.tenant": "bob"}})
    assert error_of(r) == (400, "bad_request")


def test_pools_are_the_administrators_and_checked(paths: Paths) -> None:
    """Pool changes are refused with a typed error before anything starts: an unknown
    template, a size out of bounds, an unknown pool; a tenant cannot see pools at all."""
    r = call(paths, "PUT", "/v1/pools", json={"template": "nope", "size": 1})
    assert error_of(r) == (404, "template_not_found")
    assert error_of(call(paths, "PUT", "/v1/pools", json={"size": 10_000}))[0] == 400
    assert error_of(call(paths, "PUT", "/v1/pools", json={"size": 1, "x": 1}))[0] == 400
    r = call(paths, "DELETE", "/v1/pools/debian-python/1/256/-")
    assert error_of(r) == (404, "not_found") and "no pool" in r.json()["error"]["message"]
    assert call(paths, "GET", "/v1/pools").json() == []
    for method, url in (("GET", "/v1/pools"), ("DELETE", "/v1/pools/a/1/256/-")):
        assert error_of(call(paths, method, url, tenant="t1"))[0] == 404
    r = call(paths, "PUT", "/v1/pools", json={"template": "nope", "size": 1}, tenant="t1")
    assert error_of(r)[0] == 404


def test_template_builds_are_the_administrators_and_checked(paths: Paths) -> None:
    """Builds read host paths and run as root: a tenant gets 404; a bad request is refused
    before any build starts; an existing name needs force; removal of an unknown one is a
    typed 404."""
    Store(paths.db).put_template(TemplateRecord(
        name="base", source="dir:/x", digest="sha256:" + "0" * 64, image_path="/nonexistent",
        size_bytes=1, created_at=1.0))
    r = call(paths, "POST", "/v1/templates", json={"name": "t", "source": "dir:/"}, tenant="t1")
    assert error_of(r)[0] == 404
    for bad in ({"name": ""}, {"name": "t", "packages": ["; rm -rf /"]}, {"name": "t", "x": 1},
                {"name": "t", "free_mib": -1}):
        assert error_of(call(paths, "POST", "/v1/templates", json=bad))[0] == 400, bad
    r = call(paths, "POST", "/v1/templates", json={"name": "base", "source": "dir:/"})
    assert error_of(r) == (400, "bad_request") and "exists already" in r.text
    assert [t["name"] for t in call(paths, "GET", "/v1/templates", tenant="t1").json()] == ["base"]
    assert error_of(call(paths, "DELETE", "/v1/templates/nope")) == (404, "template_not_found")
    assert error_of(call(paths, "DELETE", "/v1/templates/base", tenant="t1"))[0] == 404
    # template snapshots: dropped by the administrator only, of a known template
    r = call(paths, "DELETE", "/v1/templates/base/snapshots", tenant="t1")
    assert error_of(r)[0] == 404
    assert call(paths, "DELETE", "/v1/templates/base/snapshots").json() == {"removed": []}
    r = call(paths, "DELETE", "/v1/templates/nope/snapshots")
    assert error_of(r) == (404, "template_not_found")
    assert call(paths, "GET", "/v1/templates").json()[0]["snapshots"] == []


def test_metrics_show_pools(paths: Paths) -> None:
    """A pool row in the registry appears as its size and its members by state."""
    from ember.store.records import PoolRecord

    Store(paths.db).put_pool(PoolRecord(key="debian-python/1/256/-", template="debian-python",
                                        vcpus=1, memory_mib=256, disk_mib=None, size=3,
                                        created_at=1.0))
    text = call(paths, "GET", "/metrics").text
    assert 'ember_pool_size{pool="debian-python/1/256/-"} 3.0' in text
    assert 'ember_pool_members{pool="debian-python/1/256/-",state="ready"} 0.0' in text
