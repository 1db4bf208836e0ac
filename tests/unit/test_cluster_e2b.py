"""E2B's API through any node, without Ray or sockets: which requests are about which
sandbox and how each kind is carried (lifecycle vouched, envd and ports as they came),
and the layer against an in-process owning daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.cluster.directory import Directory, NodeEntry
from ember.cluster.record import ClusterRecord, save_record, save_secret
from ember.cluster.vouch import FORWARDED_HEADER, VOUCH_HEADER, verify
from ember.daemon import cluster_e2b, cluster_forward
from ember.daemon.auth import Principal
from ember.daemon.cluster_e2b import E2bClusterForward, Target, carried_headers, target_of
from ember.e2b import mapping as M
from ember.paths import Paths
from tests.unit.test_cluster_reach import app_holding_nothing

A, B = "a" * 56, "b" * 56
D = "localhost"


def _h(**kw: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in kw.items()]


def test_what_each_e2b_request_is_about() -> None:
    assert target_of("/sandboxes/sb-1", [], D) == Target("sb-1", "api")
    assert target_of("/sandboxes/sb-1/timeout", [], D) == Target("sb-1", "api")
    assert target_of("/v2/sandboxes/sb-1/connect", [], D) == Target("sb-1", "api")
    assert target_of("/sandboxes/metrics", [], D) is None  # many sandboxes: local
    assert target_of("/v2/sandboxes", [], D) is None and target_of("/sandboxes", [], D) is None
    # envd by E2B's headers, by its token alone, by Host.
    assert target_of("/process.Process/Start", _h(e2b_sandbox_id="sb-1"), D) == \
        Target("sb-1", "traffic")
    assert target_of("/files", _h(x_access_token="sb-2.tok"), D) == Target("sb-2", "traffic")
    assert target_of("/files", _h(host=f"{M.ENVD_PORT}-sb-3.localhost:7707"), D) == \
        Target("sb-3", "traffic")
    # A lifecycle call on which the SDK names the sandbox in its headers too.
    assert target_of("/sandboxes/sb-1", _h(e2b_sandbox_id="sb-1",
                                           e2b_sandbox_port=str(M.ENVD_PORT)), D) == \
        Target("sb-1", "api")
    # Ports: by E2B's headers (any path), the code interpreter's by Host, others by Host.
    assert target_of("/sandboxes/x", _h(e2b_sandbox_id="sb-1", e2b_sandbox_port="8000"),
                     D) == Target("sb-1", "traffic", 8000)
    assert target_of("/execute", _h(host="49999-sb-1.localhost"), D) == \
        Target("sb-1", "traffic", 49999)
    assert target_of("/", _h(host="8000-sb-1.localhost"), D) == Target("sb-1", "host", 8000)
    # Nothing about a sandbox, or hostile names.
    assert target_of("/v1/health", [], D) is None
    assert target_of("/files", _h(x_access_token="bad id!.x"), D) is None
    assert target_of("/files", _h(e2b_sandbox_id="sb-1", e2b_sandbox_port="99999"), D) is None
    assert target_of("/", _h(host="8000-sb-1.example.com"), D) is None


def test_what_a_carried_request_keeps() -> None:
    raw = _h(authorization="Basic dXNlcg==", x_access_token="sb-1.tok", host="n1:7707",
             connection="keep-alive", x_ember_vouch="forged")
    out = dict(carried_headers(raw, Target("sb-1", "traffic"), A, None, None))
    assert out[b"authorization"] == b"Basic dXNlcg=="  # envd's user, not a credential
    assert out[b"x-access-token"] == b"sb-1.tok" and out[b"e2b-sandbox-id"] == b"sb-1"
    assert b"connection" not in out and VOUCH_HEADER.encode() not in out  # forged: gone
    assert out[FORWARDED_HEADER.encode()] == A.encode()
    api = dict(carried_headers(_h(x_api_key="ek_1_s", authorization="Bearer ek_1_s"),
                               Target("sb-1", "api"), A, "v", b"x-api-key"))
    assert b"x-api-key" not in api and b"authorization" not in api
    assert api[VOUCH_HEADER.encode()] == b"v"
    port = dict(carried_headers(_h(host="8000-sb-1.localhost", authorization="Bearer k"),
                                Target("sb-1", "host", 8000), A, "v", b"authorization"))
    assert port[b"host"] == b"8000-sb-1.localhost" and b"authorization" not in port
    # Ember's credential in X-Ember-Authorization: Authorization is the guest's and stays.
    guest = carried_headers(_h(host="8000-sb-1.localhost", authorization="Basic g",
                               x_ember_authorization="Bearer k"),
                            Target("sb-1", "host", 8000), A, "v", b"x-ember-authorization")
    assert (b"authorization", b"Basic g") in guest and (b"x-ember-authorization", b"") in guest


def test_an_e2b_key_is_offered_to_the_lookup_as_a_bearer() -> None:
    scope = {"headers": _h(x_api_key="ek_1_s")}
    assert (b"authorization", b"Bearer ek_1_s") in cluster_e2b._as_bearer(scope)["headers"]
    own = {"headers": _h(x_api_key="ek_1_s", authorization="Bearer ek_2_t")}
    assert cluster_e2b._as_bearer(own) is own


def _world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Paths, Any]:
    paths = Paths(home=tmp_path, cache=tmp_path / "cache")
    save_record(paths, ClusterRecord(address="127.0.0.1:1", role="worker", node_ip="127.0.0.1",
                                     node_id=A, daemon="127.0.0.1:9"))
    save_secret(paths, "k")
    directory = Directory(nodes={B: NodeEntry(B, "192.0.2.2", True, "192.0.2.2:7707")},
                          sandboxes={"sb-1": B})
    monkeypatch.setattr(cluster_forward, "read_directory", lambda address: directory)
    monkeypatch.setattr(cluster_e2b, "principal_of",
                        lambda store, client, auth: Principal("alice", False))
    return paths, app_holding_nothing()


def _run(mw: E2bClusterForward, scope: dict[str, Any], body: bytes = b"") -> list[Any]:
    sent: list[dict[str, Any]] = []
    parts = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if parts:
            return parts.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError

    async def send(msg: Any) -> None:
        sent.append(msg)

    asyncio.run(mw(scope, receive, send))
    return sent


def test_lifecycle_and_envd_requests_go_to_the_owning_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, app = _world(tmp_path, monkeypatch)
    seen: list[dict[str, Any]] = []

    async def owner(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        seen.append({"path": scope["path"], "body": body,
                     "headers": {k.decode(): v.decode() for k, v in scope["headers"]}})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"owner"})

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not for this node")

    mw = E2bClusterForward(inner, paths, D)
    mw._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=owner))
    sent = _run(mw, {"type": "http", "method": "POST", "path": "/sandboxes/sb-1/timeout",
                     "query_string": b"", "app": app,
                     "headers": _h(x_api_key="ek_1_s", content_length="14")},
                b'{"timeout":60}')
    assert sent[0]["status"] == 200 and b"".join(m.get("body", b"") for m in sent[1:]) == \
        b"owner"
    got = seen[-1]
    assert got["body"] == b'{"timeout":60}' and "x-api-key" not in got["headers"]
    assert verify("k", got["headers"][VOUCH_HEADER], "POST", "/sandboxes/sb-1/timeout") == \
        "alice"
    _run(mw, {"type": "http", "method": "POST", "path": "/process.Process/Start",
              "query_string": b"", "app": app, "headers": _h(
                  host=f"{M.ENVD_PORT}-sb-1.localhost", x_access_token="sb-1.tok",
                  authorization="Basic dXNlcg==", content_length="2")}, b"{}")
    got = seen[-1]
    assert got["path"] == "/process.Process/Start"
    assert got["headers"]["x-access-token"] == "sb-1.tok"
    assert got["headers"]["authorization"] == "Basic dXNlcg=="
    assert got["headers"]["e2b-sandbox-id"] == "sb-1" and VOUCH_HEADER not in got["headers"]


def test_what_is_not_for_another_node_passes(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    paths, app = _world(tmp_path, monkeypatch)
    passed: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        passed.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = E2bClusterForward(inner, paths, D)
    for path, headers in (("/v2/sandboxes", []), ("/sandboxes/unknown", []),
                          ("/files", _h(e2b_sandbox_id="elsewhere-not")),
                          ("/sandboxes/sb-1", _h(x_ember_forwarded=B))):
        _run(mw, {"type": "http", "method": "GET", "path": path, "query_string": b"",
                  "app": app, "headers": headers})
    assert passed == ["/v2/sandboxes", "/sandboxes/unknown", "/files", "/sandboxes/sb-1"]
