"""Reaching a sandbox on another node, without Ray or sockets: the directory built from
Ray's node table and KV records (hostile values included), the cluster vouch, what a
forwarded request carries, the cluster-wide list, and the middleware's answer when the
owning node's daemon does not answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.cluster.directory import Directory, NodeEntry, build
from ember.cluster.record import (
    ClusterRecord,
    clear_record,
    load_record,
    load_secret,
    save_record,
    save_secret,
)
from ember.cluster.vouch import FORWARDED_HEADER, MAX_SKEW_S, VOUCH_HEADER, sign, verify
from ember.daemon import cluster_forward
from ember.daemon.cluster_forward import (
    ClusterForward,
    forward_headers,
    merge_lists,
    sandbox_of,
    unavailable,
)
from ember.errors import NodeUnavailableError, UnauthorizedError
from ember.paths import Paths

A, B, C = "a" * 56, "b" * 56, "c" * 56


def _kv() -> dict[bytes, bytes]:
    return {f"node/{A}".encode(): b'{"daemon": "192.0.2.1:7707"}',
            f"node/{B}".encode(): b'{"daemon": "192.0.2.2:7707"}',
            b"node/" + b"d" * 56: b'{"daemon": "192.0.2.4:7707"}',  # Ray forgot it
            b"node/bad": b"not json",
            f"node/{C}".encode(): b'{"daemon": "evil host:1"}',
            b"sandbox/sb-1": B.encode(), b"sandbox/sb-2": A.encode(),
            b"sandbox/../x": B.encode(), b"sandbox/sb-3": b"no such/node"}


def test_the_directory_from_the_node_table_and_kv() -> None:
    d = build({A: ("192.0.2.1", True), B: ("192.0.2.2", True), C: ("192.0.2.3", False)},
              _kv())
    assert d.node_of("sb-1") == NodeEntry(B, "192.0.2.2", True, "192.0.2.2:7707")
    assert d.node_of("sb-2") is not None and d.node_of("sb-2").node_id == A  # type: ignore[union-attr]
    assert d.node_of("sb-9") is None
    assert "../x" not in d.sandboxes and "sb-3" not in d.sandboxes
    assert d.nodes[C].daemon is None  # an address that is no address is dropped
    assert not d.nodes["d" * 56].alive and d.nodes["d" * 56].daemon == "192.0.2.4:7707"
    assert [n.node_id for n in d.peers(A)] == [B, "d" * 56]  # alive first; C has no daemon
    assert Directory.from_json(json.loads(json.dumps(d.to_json()))) == d


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=20))
def test_hostile_directory_answers_never_crash(raw: Any) -> None:
    for doc in (raw, {"nodes": raw, "sandboxes": {}}, {"nodes": [], "sandboxes": raw},
                {"nodes": [raw, {"node_id": raw, "daemon": raw}]}):
        with contextlib.suppress(ValueError):
            Directory.from_json(doc)


def test_a_sandbox_on_an_unlisted_node_is_not_alive() -> None:
    d = Directory(nodes={}, sandboxes={"sb-1": B})
    assert d.node_of("sb-1") == NodeEntry(B, "", False, None)


def test_vouch_round_trip_and_refusals() -> None:
    now = 1_700_000_000.0
    v = sign("s3cret", "alice", "post", "/v1/sandboxes/sb-1/exec", now)
    assert verify("s3cret", v, "POST", "/v1/sandboxes/sb-1/exec", now + 5) == "alice"
    for secret, value, method, path, t in (
            ("other", v, "POST", "/v1/sandboxes/sb-1/exec", now),  # another cluster
            ("s3cret", v, "GET", "/v1/sandboxes/sb-1/exec", now),  # another method
            ("s3cret", v, "POST", "/v1/sandboxes/sb-2/exec", now),  # another sandbox
            ("s3cret", v, "POST", "/v1/sandboxes/sb-1/exec", now + MAX_SKEW_S + 1),  # old
            ("s3cret", v.replace("alice", "admin"), "POST", "/v1/sandboxes/sb-1/exec", now),
            ("s3cret", "garbage", "POST", "/", now),
            (None, v, "POST", "/v1/sandboxes/sb-1/exec", now)):
        with pytest.raises(UnauthorizedError):
            verify(secret, value, method, path, t)


def test_tenant_names_with_colons_do_not_confuse_the_vouch() -> None:
    v = sign("k", "a:b", "GET", "/x", 100.0)
    assert verify("k", v, "GET", "/x", 100.0) == "a:b"


def test_paths_that_are_about_a_sandbox() -> None:
    assert sandbox_of("/v1/sandboxes/sb-12ab") == "sb-12ab"
    assert sandbox_of("/v1/sandboxes/sb-12ab/files/content") == "sb-12ab"
    assert sandbox_of("/v1/sandboxes") is None
    assert sandbox_of("/v1/snapshots/x") is None
    assert sandbox_of("/v1/sandboxes/a b/exec") is None


def test_a_forwarded_request_carries_no_credentials_of_the_caller() -> None:
    raw = [(b"host", b"n1"), (b"authorization", b"Bearer ek_1_x"), (b"content-type", b"x/y"),
           (VOUCH_HEADER.encode(), b"forged"), (b"x-ember-tenant", b"admin"),
           (b"x-ember-placement", b"p"), (b"content-length", b"5")]
    out = forward_headers(raw, "alice:1:ff", A)
    assert dict(out) == {b"content-type": b"x/y", b"content-length": b"5",
                         VOUCH_HEADER.encode(): b"alice:1:ff",
                         FORWARDED_HEADER.encode(): A.encode()}


def test_the_cluster_wide_list() -> None:
    d = Directory(nodes={}, sandboxes={"sb-9": C, "sb-2": B})
    out = merge_lists(A, [{"id": "sb-1", "state": "running"}],
                      [(NodeEntry(B, "192.0.2.2", True, "192.0.2.2:7707"),
                        [{"id": "sb-2", "state": "running"}]),
                       (NodeEntry(C, "192.0.2.3", True, "192.0.2.3:7707"), "ConnectError")], d)
    assert [(i["id"], i["node"], i["state"]) for i in out] == [
        ("sb-1", A, "running"), ("sb-2", B, "running"), ("sb-9", C, "unknown")]
    assert "does not answer: ConnectError" in out[2]["error"]


def test_the_unavailable_answer_names_the_node() -> None:
    body = unavailable("sb-1", NodeEntry(B, "192.0.2.2", False, "192.0.2.2:7707"), "refused")
    assert body["error"]["code"] == NodeUnavailableError.code
    assert "192.0.2.2:7707" in body["error"]["message"]
    assert "Ray reports the node dead" in body["error"]["message"]


def test_the_secret_is_the_owners_alone(tmp_path: Path) -> None:
    paths = Paths(home=tmp_path, cache=tmp_path / "cache")
    assert load_secret(paths) is None
    save_secret(paths, "abc")
    assert load_secret(paths) == "abc"
    assert (tmp_path / "cluster.secret").stat().st_mode & 0o777 == 0o600
    rec = ClusterRecord(address="192.0.2.1:6380", role="worker", node_ip="192.0.2.2",
                        node_id=B, daemon="192.0.2.2:7707")
    save_record(paths, rec)
    assert load_record(paths) == rec
    assert "abc" not in (tmp_path / "cluster.json").read_text()
    clear_record(paths)
    assert load_secret(paths) is None


def _worker_home_and_a_closed_port(tmp_path: Path) -> tuple[Paths, int]:
    """A home joined as a worker (with the cluster's secret), and a port nothing listens
    on (a node whose daemon refuses)."""
    import socket

    paths = Paths(home=tmp_path, cache=tmp_path / "cache")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    save_record(paths, ClusterRecord(address="127.0.0.1:1", role="worker", node_ip="127.0.0.1",
                                     node_id=A, daemon="127.0.0.1:9"))
    save_secret(paths, "k")
    return paths, port


def test_a_dead_node_answers_503_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         ) -> None:
    """The middleware, with a directory that places the sandbox on a node whose daemon
    address refuses connections: a typed 503 well within the connect bound."""
    paths, port = _worker_home_and_a_closed_port(tmp_path)
    directory = Directory(nodes={B: NodeEntry(B, "127.0.0.1", True, f"127.0.0.1:{port}")},
                          sandboxes={"sb-1": B})
    monkeypatch.setattr(cluster_forward, "read_directory", lambda address: directory)
    monkeypatch.setattr(cluster_forward, "_principal",
                        lambda scope: cluster_forward.Principal("admin", True))
    t0 = time.monotonic()
    sent = forward_once(paths, "GET", "/v1/sandboxes/sb-1")
    assert time.monotonic() - t0 < cluster_forward.CONNECT_TIMEOUT_S + 2
    assert sent[0]["status"] == 503
    body = json.loads(sent[1]["body"])
    assert body["error"]["code"] == "node_unavailable"


def test_a_forwarded_request_is_vouched_for_and_carried_both_ways(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware against an in-process owning daemon (httpx's ASGI transport): the
    caller's body goes there, the vouch verifies with the cluster's secret, the caller's
    key does not travel, and the owner's status, headers and body come back."""
    import httpx

    paths = Paths(home=tmp_path, cache=tmp_path / "cache")
    save_record(paths, ClusterRecord(address="127.0.0.1:1", role="worker", node_ip="127.0.0.1",
                                     node_id=A, daemon="127.0.0.1:9"))
    save_secret(paths, "k")
    directory = Directory(nodes={B: NodeEntry(B, "192.0.2.2", True, "192.0.2.2:7707")},
                          sandboxes={"sb-1": B})
    monkeypatch.setattr(cluster_forward, "read_directory", lambda address: directory)
    monkeypatch.setattr(cluster_forward, "_principal",
                        lambda scope: cluster_forward.Principal("alice", False))
    seen: dict[str, Any] = {}

    async def owner(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        seen.update(path=scope["path"], query=scope["query_string"], body=body,
                    headers=headers)
        await send({"type": "http.response.start", "status": 207,
                    "headers": [(b"content-type", b"application/x-ndjson"),
                                (b"x-owner", b"b")]})
        for part in (b'{"a":1}\n', b'{"b":2}\n'):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not for this node")

    mw = ClusterForward(inner, paths)
    mw._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=owner))
    sent: list[dict[str, Any]] = []
    parts = [{"type": "http.request", "body": b"echo ", "more_body": True},
             {"type": "http.request", "body": b"hi", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if parts:
            return parts.pop(0)
        await asyncio.sleep(3600)  # the caller stays
        raise AssertionError

    async def send(msg: Any) -> None:
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/v1/sandboxes/sb-1/exec",
             "query_string": b"x=1", "app": app_holding_nothing(),
             "headers": [(b"authorization", b"Bearer ek_1_secret"),
                         (b"content-type", b"application/json"), (b"content-length", b"7")]}
    asyncio.run(mw.__call__(scope, receive, send))
    assert seen["path"] == "/v1/sandboxes/sb-1/exec" and seen["query"] == b"x=1"
    assert seen["body"] == b"echo hi"
    assert "authorization" not in seen["headers"]
    assert seen["headers"][FORWARDED_HEADER] == A
    assert verify("k", seen["headers"][VOUCH_HEADER], "POST",
                  "/v1/sandboxes/sb-1/exec") == "alice"
    assert sent[0]["status"] == 207 and (b"x-owner", b"b") in sent[0]["headers"]
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b'{"a":1}\n{"b":2}\n'
    assert sent[-1].get("more_body") is False


def test_a_refused_node_that_a_fresh_reading_says_died_answers_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose host died refuses (or is unreachable) before the daemon's last reading
    knew it dead: the forwarder reads again at once, and the sandbox is lost (410), not
    merely unavailable."""
    paths, port = _worker_home_and_a_closed_port(tmp_path)
    alive = Directory(nodes={B: NodeEntry(B, "127.0.0.1", True, f"127.0.0.1:{port}")},
                      sandboxes={"sb-1": B})
    dead = Directory(nodes={B: NodeEntry(B, "127.0.0.1", False, f"127.0.0.1:{port}")},
                     sandboxes={"sb-1": B})
    readings = iter([alive, dead])
    monkeypatch.setattr(cluster_forward, "read_directory", lambda address: next(readings))
    monkeypatch.setattr(cluster_forward, "MISS_REFRESH_S", 0.0)
    monkeypatch.setattr(cluster_forward, "_principal",
                        lambda scope: cluster_forward.Principal("admin", True))
    sent = forward_once(paths, "DELETE", "/v1/sandboxes/sb-1")
    assert sent[0]["status"] == 410
    assert json.loads(sent[1]["body"])["error"]["code"] == "sandbox_lost"


def forward_once(paths: Paths, method: str, path: str) -> list[dict[str, Any]]:
    """One request through the middleware of a node that holds no sandbox (read_directory
    and _principal patched by the caller): what it sent back."""

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not for this node")

    sent: list[dict[str, Any]] = []

    async def send(msg: Any) -> None:
        sent.append(msg)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "headers": [],
             "query_string": b"", "app": app_holding_nothing()}
    asyncio.run(ClusterForward(inner, paths)(scope, receive, send))
    return sent


def app_holding_nothing() -> Any:
    """The fake ASGI app of a node whose store holds no sandbox (``app.state.live``)."""

    class Store:
        def get_sandbox(self, sid: str) -> None:
            from ember.errors import SandboxNotFoundError
            raise SandboxNotFoundError(sid)

    class State:
        live = type("Live", (), {"mgr": type("Mgr", (), {"store": Store()})()})()

    return type("App", (), {"state": State()})()
