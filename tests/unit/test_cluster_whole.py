"""Issue 15's cluster-wide gaps, their I/O-free cores: forks and restores counted by the
quota keeper, the placement of what a node holds, the cluster's keys and tenants as
``ember apikey ls`` / ``ember tenant ls`` list them, and E2B's lists across nodes (the
peers a daemon asks). No Ray, no daemon."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ember.cluster.directory import Directory, NodeEntry
from ember.cluster.keys import (
    ELSEWHERE,
    HERE,
    HERE_ONLY,
    Registry,
    listed_keys,
    listed_tenants,
)
from ember.cluster.placement import created_ids, route_of
from ember.cluster.quota import BOOK_PREFIX, Book, Held, Limits, book_from_kv, held_value
from ember.daemon.cluster_peers import live_peers
from ember.store.records import ApiKeyRecord, TenantRecord

SHA = "ab" * 32


def test_a_fork_of_n_counts_n_sandboxes_and_all_their_shape() -> None:
    book = Book()
    limits = Limits(max_sandboxes=3)
    alive = {"c1", "f1"}
    assert book.admit("c1", Held("acme", 1, 256), limits, set) is None
    refused = book.admit("f1", Held("acme", 3, 768, sandboxes=3), limits, lambda: {"c1"})
    assert refused is not None and "would have 4 sandboxes" in refused \
        and "limit 3" in refused and "1 in use" in refused
    assert book.admit("f1", Held("acme", 2, 512, sandboxes=2), limits, lambda: {"c1"}) is None
    refused = book.admit("r1", Held("acme", 1, 256), limits, lambda: alive)
    assert refused is not None and "would have 4 sandboxes" in refused
    # The fork's clones all gone (its placement actor ended): room again.
    assert book.admit("r1", Held("acme", 1, 256), limits, lambda: {"c1"}) is None
    vcpus = Limits(max_vcpus=4)
    assert book.admit("f2", Held("acme", 4, 256, sandboxes=4), vcpus,
                      lambda: {"c1", "r1"}) is not None  # 2 in use + 4 > 4


def test_a_forks_book_entry_survives_a_keeper_restart() -> None:
    kv = {f"{BOOK_PREFIX}f".encode(): held_value(Held("acme", 4, 1024, sandboxes=4)),
          f"{BOOK_PREFIX}old".encode(): b'{"tenant": "acme", "vcpus": 1, "memory_mib": 256}',
          f"{BOOK_PREFIX}bad".encode(): json.dumps(
              {"tenant": "acme", "vcpus": 1, "memory_mib": 1, "sandboxes": 0}).encode()}
    assert book_from_kv(kv).entries == {"f": Held("acme", 4, 1024, 4),
                                        "old": Held("acme", 1, 256, 1)}


def test_a_placement_names_only_the_routes_a_holder_may_send() -> None:
    assert route_of("/v2/sandboxes") == "/v2/sandboxes"
    assert route_of("/v1/sandboxes/sb-1a2b/fork") == "/v1/sandboxes/sb-1a2b/fork"
    assert route_of("/v1/snapshots/snap:1/restore") == "/v1/snapshots/snap:1/restore"
    for hostile in ("/v1/sandboxes/x/exec", "/v1/sandboxes/../fork", "/v1/apikeys", 7,
                    None, "/v1/sandboxes/a/fork\n", "/v1/snapshots/a b/restore"):
        assert route_of(hostile) == "/v1/sandboxes"


def test_created_ids_of_a_create_a_restore_and_a_fork() -> None:
    assert created_ids({"id": "sb-1"}) == ["sb-1"]
    assert created_ids({"sandboxID": "e2b"}) == ["e2b"]
    assert created_ids([{"id": "a"}, {"id": "b"}, "junk"]) == ["a", "b"]


def _key(key_id: str, at: float, revoked: float | None = None) -> ApiKeyRecord:
    return ApiKeyRecord(id=key_id, tenant="acme", secret_sha256=SHA, created_at=at,
                        revoked_at=revoked)


def test_apikey_ls_shows_the_clusters_keys_marking_this_nodes() -> None:
    local = [_key("a1", 1.0), _key("b2", 2.0)]  # a1 published; b2 made before joining
    reg = Registry(keys={"a1": _key("a1", 1.0, revoked=9.0), "c3": _key("c3", 3.0)})
    rows = listed_keys(local, reg)
    assert [(k.id, where) for k, where in rows] == [("a1", HERE), ("b2", HERE_ONLY),
                                                    ("c3", ELSEWHERE)]
    assert rows[0][0].revoked_at == 9.0  # revoked on another node: revoked here too
    assert listed_keys([], Registry()) == []


def test_tenant_ls_shows_the_limits_that_apply_and_where_they_are_kept() -> None:
    local = [TenantRecord("acme", 5), TenantRecord("old", 1)]
    reg = Registry(tenants={"acme": Limits(max_sandboxes=2), "bob": Limits(max_vcpus=8)})
    rows = listed_tenants(local, reg)
    assert rows == [(TenantRecord("acme", 2), HERE), (TenantRecord("bob", None, 8), ELSEWHERE),
                    (TenantRecord("old", 1), HERE_ONLY)]


def test_the_peers_asked_are_the_other_live_nodes_with_a_daemon() -> None:
    d = Directory(nodes={
        "me": NodeEntry("me", "10.0.0.1", True, "10.0.0.1:7070"),
        "b": NodeEntry("b", "10.0.0.2", True, "10.0.0.2:7070"),
        "dead": NodeEntry("dead", "10.0.0.3", False, "10.0.0.3:7070"),
        "nodaemon": NodeEntry("nodaemon", "10.0.0.4", True, None)})
    assert [n.node_id for n in live_peers(d, "me")] == ["b"]


def test_e2b_lists_and_metrics_take_the_peers_answers(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """The E2B routes' cluster part, with the peers' answers faked at their I/O edge
    (:func:`ember.daemon.cluster_peers.ask_peers`): a malformed sandbox is left out, one
    listed twice counts once, and a peer's metrics are only taken for asked ids."""
    from ember.daemon.auth import Principal
    from ember.daemon.cluster_peers import PeerAnswer
    from ember.e2b import routes_lifecycle as R
    from ember.sdk.results import SandboxInfo
    from ember.sdk.wire import to_json

    peer = NodeEntry("b", "10.0.0.2", True, "10.0.0.2:7070")

    def info(sid: str) -> SandboxInfo:
        return SandboxInfo(id=sid, template="base", state="running", vcpus=1,
                           memory_mib=256, disk_mib=1024, created_at=1.0, expires_at=None,
                           accel="tcg", tenant="acme")

    async def ask(conn: Any, who: Any, path: str, query: str = "") -> list[PeerAnswer]:
        if path == "/v1/sandboxes":
            return [PeerAnswer(peer, [to_json(info("there")), {"id": 5}, to_json(info("here"))])]
        assert query == "sandbox_ids=here%2Cthere"  # no usage here yet for "here"
        return [PeerAnswer(peer, {"sandboxes": {"there": {"cpuCount": 1}, "x": {}}})]

    class Local:
        async def list(self) -> Any:
            return [info("here")]

        async def list_usage(self) -> Any:
            return []

    class Live:
        local = Local()

    monkeypatch.setattr(R, "ask_peers", ask)
    who = Principal("acme", False)
    got = asyncio.run(R._mine(Live(), who, object()))  # type: ignore[arg-type]
    assert [i.id for i in got] == ["here", "there"]
    assert asyncio.run(R._mine(Live(), who)) == [info("here")]  # type: ignore[arg-type]
    out = asyncio.run(R.e2b_metrics_many(Live(), who, object(),  # type: ignore[arg-type]
                                         "here,there"))
    assert out == {"sandboxes": {"there": {"cpuCount": 1}}}


def test_ask_peers_is_empty_for_a_forwarded_request_and_off_a_cluster(tmp_path: Any) -> None:
    """No peers for a request another node forwarded (it answers for itself only) nor on a
    home in no cluster."""
    from ember.cluster.vouch import FORWARDED_HEADER
    from ember.daemon.auth import Principal
    from ember.daemon.cluster_peers import ask_peers
    from ember.paths import Paths

    class Live:
        paths = Paths(tmp_path, tmp_path)

    seen: list[list[Any]] = []

    async def route(request: Request) -> JSONResponse:
        got = await ask_peers(request, Principal("acme", False), "/v1/sandboxes")
        seen.append(got)
        return JSONResponse({})

    app = Starlette(routes=[Route("/", route)])
    app.state.live = Live()

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await c.get("/", headers={FORWARDED_HEADER: "node"})
            await c.get("/")

    asyncio.run(go())
    assert seen == [[], []]


def test_the_cli_lists_mark_where_each_record_is_kept(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ember apikey ls`` / ``ember tenant ls`` with the cluster's reading faked at its
    edge (``_to_cluster``): a WHERE column and ``"where"`` in ``--json``."""
    from click.testing import CliRunner

    from ember.cli import apikey_cmds

    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    apikey_cmds._store().put_tenant(TenantRecord("mine", 1))
    reg = Registry(keys={"c3": _key("c3", 3.0)}, tenants={"bob": Limits(max_vcpus=8)})
    monkeypatch.setattr(apikey_cmds, "_to_cluster", lambda what, fn: reg)
    runner = CliRunner()
    got = runner.invoke(apikey_cmds.apikey, ["ls", "--json"])
    assert got.exit_code == 0, got.output
    assert [(k["id"], k["where"]) for k in json.loads(got.output)] == [("c3", ELSEWHERE)]
    got = runner.invoke(apikey_cmds.tenant, ["ls", "--json"])
    assert [(t["name"], t["where"]) for t in json.loads(got.output)] == [
        ("bob", ELSEWHERE), ("mine", HERE_ONLY)]
    for group in (apikey_cmds.apikey, apikey_cmds.tenant):
        table = runner.invoke(group, ["ls"])
        assert table.exit_code == 0 and "WHERE" in table.output, table.output


def test_a_fork_is_placed_here_and_a_tenants_placement_header_is_ignored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """decide_here, Ray's child faked at its edge: a tenant's fork on a node of a cluster
    goes to the keeper (a hard affinity to this node, n sandboxes), even when the tenant
    sends the placement actor's header; the actor's own request (the administrator's,
    with the header) is done here for the tenant it names."""
    from types import SimpleNamespace

    from ember.cluster.placement import PLACEMENT_HEADER, TENANT_HEADER
    from ember.daemon import cluster_create as C
    from ember.daemon.auth import Principal

    asked: list[dict[str, Any]] = []

    def ask(module: str, *args: str, stdin: bytes, **kw: Any) -> dict[str, Any]:
        asked.append(json.loads(stdin))
        return {"info": [{"id": "clone"}], "actor": "ember-sandbox-x"}

    rec = SimpleNamespace(address="10.0.0.1:6380", node_id="me")
    monkeypatch.setattr(C, "load_record", lambda paths: rec)
    monkeypatch.setattr("ember.cluster.child.ask", ask)
    store = SimpleNamespace(get_tenant=lambda t: None)
    live = SimpleNamespace(paths=None, mgr=SimpleNamespace(store=store))
    shape = C.Shape("microvm", 2, 512, 2)

    def decide(headers: dict[str, str], who: Principal) -> Any:
        request = SimpleNamespace(headers=headers)
        return asyncio.run(C.decide_here(request, live, who,  # type: ignore[arg-type]
                                         "/v1/sandboxes/sb-1/fork", {"n": 2}, shape))

    acme = Principal("acme", False)
    for headers in ({}, {PLACEMENT_HEADER: "x", TENANT_HEADER: "admin"}):
        got = decide(headers, acme)
        assert got.info == [{"id": "clone"}] and got.who == acme
    assert len(asked) == 2
    assert asked[0]["hard"] is True and asked[0]["prefer_node"] == "me" \
        and asked[0]["sandboxes"] == 2 and asked[0]["tenant"] == "acme" \
        and asked[0]["path"] == "/v1/sandboxes/sb-1/fork"
    got = decide({PLACEMENT_HEADER: "x", TENANT_HEADER: "acme"}, Principal("admin", True))
    assert got.info is None and got.who == acme and len(asked) == 2


def test_a_peer_that_does_not_answer_is_left_out_within_the_bound(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """ask_peers with one peer that answers and one that accepts and says nothing (real
    loopback sockets; the cluster's record and directory faked at their edge): the silent
    one is left out with a warning after the bound, never waited on."""
    import socket
    import threading
    import time
    from types import SimpleNamespace

    from ember.cluster.vouch import FORWARDED_HEADER, VOUCH_HEADER
    from ember.daemon import cluster_peers as P
    from ember.daemon.auth import Principal

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    talker = socket.socket()
    talker.bind(("127.0.0.1", 0))
    talker.listen(4)
    seen: list[bytes] = []

    def answer() -> None:
        conn, _ = talker.accept()
        with conn:
            seen.append(conn.recv(65536))
            body = b'[{"id": "sb-there"}]'
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                         % (len(body), body))

    threading.Thread(target=answer, daemon=True).start()
    directory = Directory(nodes={
        "me": NodeEntry("me", "127.0.0.1", True, "127.0.0.1:1"),
        "quiet": NodeEntry("quiet", "127.0.0.1", True,
                           f"127.0.0.1:{silent.getsockname()[1]}"),
        "talks": NodeEntry("talks", "127.0.0.1", True,
                           f"127.0.0.1:{talker.getsockname()[1]}")})

    class Cache:
        async def get(self, address: str) -> Directory:
            return directory

    rec = SimpleNamespace(address="127.0.0.1:6380", node_id="me", daemon="127.0.0.1:1")
    monkeypatch.setattr(P, "load_record", lambda paths: rec)
    monkeypatch.setattr(P, "load_secret", lambda paths: "s" * 64)
    monkeypatch.setattr(P, "PEER_TIMEOUT_S", 0.5)
    conn = SimpleNamespace(headers={}, app=SimpleNamespace(state=SimpleNamespace(
        live=SimpleNamespace(paths=None), directory=Cache())))
    t0 = time.monotonic()
    got = asyncio.run(P.ask_peers(conn, Principal("acme", False),  # type: ignore[arg-type]
                                  "/v1/sandboxes"))
    took = time.monotonic() - t0
    silent.close()
    talker.close()
    assert [(a.node.node_id, a.doc) for a in got] == [("talks", [{"id": "sb-there"}])]
    assert took < 5.0  # the bound (0.5 s here), generously
    assert "quiet" in caplog.text and "left out" in caplog.text
    request = seen[0].decode().lower()
    assert VOUCH_HEADER in request and FORWARDED_HEADER in request
