"""Lost sandboxes without Ray: which sandboxes a reading of the directory makes lost, what
every node answers for them (the info, the typed error, the cluster-wide list), what a node
does about its own records after a rejoin, the lost records' retention, and the
middleware's answers for a sandbox whose node Ray reports dead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ember import SandboxLostError
from ember.cluster.directory import Directory, NodeEntry, build
from ember.cluster.lost import (
    LOST_STATE,
    LOST_STATUS,
    expired,
    listed_lost,
    lost_error,
    lost_info,
    lost_on,
    reason,
    reconcile,
)
from ember.cluster.record import ClusterRecord, save_record, save_secret
from ember.daemon import cluster_forward
from ember.daemon.cluster_forward import merge_lists
from ember.daemon.errors import status_for
from ember.errors import error_for_code
from ember.paths import Paths
from ember.sdk.wire import error_from_body, sandbox_info
from tests.unit.test_cluster_reach import forward_once

A, B, C, OLD = "a" * 56, "b" * 56, "c" * 56, "0" * 56
DIED = 1_780_000_000.0
DEAD_B = NodeEntry(B, "192.0.2.2", False, "192.0.2.2:7707", DIED,
                   "health check failed due to missing too many heartbeats")


def _dir() -> Directory:
    return Directory(nodes={A: NodeEntry(A, "192.0.2.1", True, "192.0.2.1:7707"), B: DEAD_B,
                            C: NodeEntry(C, "192.0.2.3", True, "192.0.2.3:7707")},
                     sandboxes={"sb-1": B, "sb-2": C, "sb-3": B, "sb-4": OLD})


def test_a_sandbox_on_a_dead_node_is_lost_and_only_then() -> None:
    d = _dir()
    assert lost_on(d, "sb-1") == DEAD_B
    assert lost_on(d, "sb-2") is None  # its node lives
    assert lost_on(d, "sb-9") is None  # not recorded (a local create)
    gone = lost_on(d, "sb-4")  # a node Ray no longer lists
    assert gone is not None and gone.node_id == OLD and not gone.alive


def test_the_reason_names_the_node_and_when_and_why_it_died() -> None:
    why = reason(DEAD_B)
    assert why.startswith(f"node {B[:12]} (192.0.2.2) died at 2026-")
    assert why.endswith("Z: health check failed due to missing too many heartbeats")
    assert reason(NodeEntry(OLD, "", False, None)) == f"node {OLD[:12]} (address unknown) died"


def test_the_lost_info_and_error_travel_as_a_sandbox_info_and_a_typed_error() -> None:
    info = sandbox_info(lost_info("sb-1", DEAD_B))
    assert (info.id, info.state, info.node) == ("sb-1", LOST_STATE, B)
    assert info.error is not None and "died at" in info.error
    err = error_from_body(lost_error("sb-1", DEAD_B), LOST_STATUS)
    assert isinstance(err, SandboxLostError) and "192.0.2.2" in str(err)
    assert status_for(SandboxLostError("x")) == LOST_STATUS == 410
    assert type(error_for_code("sandbox_lost", "m")) is SandboxLostError


def test_the_cluster_wide_list_shows_a_dead_nodes_sandboxes_lost() -> None:
    d = _dir()
    out = merge_lists(A, [{"id": "sb-0", "state": "running"}],
                      [(NodeEntry(C, "192.0.2.3", True, "192.0.2.3:7707"),
                        [{"id": "sb-2", "state": "running"}]),
                       (DEAD_B, "Ray reports the node dead")], d)
    assert [(i["id"], i["node"], i["state"]) for i in out] == [
        ("sb-0", A, "running"), ("sb-2", C, "running"), ("sb-1", B, "lost"),
        ("sb-3", B, "lost")]
    assert listed_lost(d, DEAD_B) == out[2:]


def test_a_rejoined_node_kills_what_was_reported_lost_and_drops_the_records() -> None:
    # This home holds sb-1 (running; recorded on B, its identity before the rejoin: dead),
    # sb-3 (already failed), sb-2 (recorded on C, alive: not ours to touch), sb-5 (placed
    # on this node's current identity A), sb-6 (a local create, not recorded).
    d = Directory(nodes=_dir().nodes,
                  sandboxes={"sb-1": B, "sb-2": C, "sb-3": B, "sb-5": A, "sb-7": B})
    plan = reconcile(d, A, {"sb-1": "running", "sb-2": "running", "sb-3": "failed",
                            "sb-5": "running", "sb-6": "paused"})
    assert plan.kill == ("sb-1",)
    assert plan.forget == (("sb-1", B), ("sb-3", B))  # sb-7 is no local sandbox: kept


def test_a_node_declared_dead_reconciles_its_own_records_once_confirmed() -> None:
    d = _dir()  # this node is B, which Ray reports dead
    local = {"sb-1": "running", "sb-3": "failed"}
    assert reconcile(d, B, local) == reconcile(d, B, {})  # not yet confirmed: nothing
    plan = reconcile(d, B, local, own_dead=True)
    assert plan.kill == ("sb-1",) and plan.forget == (("sb-1", B), ("sb-3", B))
    assert reconcile(d, C, {"sb-2": "running"}, own_dead=True).kill == ()  # C lives


def test_lost_records_are_dropped_after_their_retention() -> None:
    d = _dir()
    assert expired(d, DIED + 10, retention_s=3600) == [("sb-4", OLD)]  # Ray forgot OLD
    assert expired(d, DIED + 3601, retention_s=3600) == [("sb-1", B), ("sb-3", B),
                                                         ("sb-4", OLD)]
    undated = Directory(nodes={B: NodeEntry(B, "192.0.2.2", False, None)},
                        sandboxes={"sb-1": B})
    assert expired(undated, DIED * 2) == []  # kept until B reconciles it itself


def test_the_directory_carries_when_and_why_a_node_died() -> None:
    d = build({A: ("192.0.2.1", True), B: ("192.0.2.2", False)},
              {b"sandbox/sb-1": B.encode()},
              {A: (None, ""), B: (DIED, "killed")})
    assert (d.nodes[B].died_at, d.nodes[B].death_reason) == (DIED, "killed")
    assert d.nodes[A].died_at is None
    again = Directory.from_json(json.loads(json.dumps(d.to_json())))
    assert again == d
    hostile = Directory.from_json({"nodes": [
        {"node_id": B, "ip": "x", "alive": False, "died_at": True, "death_reason": 7},
        {"node_id": C, "ip": "y", "alive": False, "died_at": -1, "death_reason": "z" * 9999}]})
    assert hostile.nodes[B].died_at is None and hostile.nodes[B].death_reason == ""
    assert hostile.nodes[C].died_at is None and len(hostile.nodes[C].death_reason) == 500


def _call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
          path: str) -> tuple[int, dict[str, Any]]:
    paths = Paths(home=tmp_path, cache=tmp_path / "cache")
    save_record(paths, ClusterRecord(address="127.0.0.1:1", role="worker",
                                     node_ip="127.0.0.1", node_id=A, daemon="127.0.0.1:9"))
    save_secret(paths, "k")
    monkeypatch.setattr(cluster_forward, "read_directory", lambda address: _dir())
    monkeypatch.setattr(cluster_forward, "_principal",
                        lambda scope: cluster_forward.Principal("admin", True))
    sent = forward_once(paths, method, path)
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_any_node_answers_for_a_lost_sandbox_at_once(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    status, body = _call(tmp_path, monkeypatch, "GET", "/v1/sandboxes/sb-1")
    assert status == 200 and body["state"] == "lost" and body["node"] == B
    status, body = _call(tmp_path, monkeypatch, "POST", "/v1/sandboxes/sb-1/exec")
    assert status == 410 and body["error"]["code"] == "sandbox_lost"
    status, body = _call(tmp_path, monkeypatch, "DELETE", "/v1/sandboxes/sb-3")
    assert status == 410 and "died at" in body["error"]["message"]
