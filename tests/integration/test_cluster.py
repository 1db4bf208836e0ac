"""ember cluster, nodes and membership: three hosts in namespaces (cluster_world) join a
real Ray cluster whose head keeps its state in Redis; what each advertises, leaving, a
killed raylet, and a killed and restarted head, all read through ``ember cluster nodes``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.cluster.node import DEFAULT_PORT
from ember.store import Store
from ember.store.records import TemplateRecord
from tests.integration.cluster_world import (
    MARKS,
    ClusterWorld,
    Node,
    checked_world,
    wait_for,
)

pytestmark = MARKS
#: How long Ray may take to declare a killed raylet dead. Ray's defaults (a health check
#: every 3 s, 5 misses) measured 13-15 s here; the bound leaves room for a loaded machine.
DEAD_BOUND_S = 90.0


@pytest.fixture
def world() -> Iterator[ClusterWorld]:
    pytest.importorskip("ray", reason="the cluster extra is not installed")
    root = Path(tempfile.mkdtemp(prefix="ecl-", dir="/tmp"))
    with checked_world(root) as w:
        yield w



def _join(node: Node, world: ClusterWorld, vcpus: int, memory_mib: int) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(node.ember(
        "cluster", "join", f"{world.head.ip}:{DEFAULT_PORT}", "--vcpus", str(vcpus),
        "--memory-mib", str(memory_mib), "--json").stdout)
    return out


def _alive(node: Node) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in node.nodes() if n["alive"]}


def _give_template(node: Node, name: str) -> None:
    store = Store(node.paths.ensure().db)
    try:
        store.put_template(TemplateRecord(name=name, source="test", digest="sha256:" + "0" * 64,
                                          image_path="/nonexistent", size_bytes=0,
                                          created_at=time.time()))
    finally:
        store.close()


def test_nodes_join_advertise_leave_and_die(world: ClusterWorld) -> None:
    n1, n2, n3 = world.nodes
    head = world.start_head()
    assert head["role"] == "head" and head["address"] == f"{n1.ip}:{DEFAULT_PORT}"
    assert head["redis"] == world.redis_address
    _give_template(n2, "py-test")
    w2 = _join(n2, world, 4, 4096)
    w3 = _join(n3, world, 6, 6144)
    assert w2["role"] == w3["role"] == "worker"

    expected = {head["node_id"]: (n1.ip, 2, 2048, True), w2["node_id"]: (n2.ip, 4, 4096, False),
                w3["node_id"]: (n3.ip, 6, 6144, False)}
    for seer in world.nodes:  # any node's view is the cluster's
        alive = _alive(seer)
        assert set(alive) == set(expected), (seer.name, alive)
        for node_id, (ip, vcpus, mem, is_head) in expected.items():
            row = alive[node_id]
            adv = row["advertised"]
            assert (row["ip"], adv["vcpus"], adv["memory_mib"], row["head"]) == \
                (ip, vcpus, mem, is_head)
            assert "microvm" in adv["tiers"] and adv["accel"] in ("kvm", "tcg")
            assert row["resources"]["ember:vcpus"] == vcpus
            assert row["resources"][f"ember:accel:{adv['accel']}"] == 1
        assert alive[w2["node_id"]]["advertised"]["templates"] == ["py-test"]
        assert alive[w2["node_id"]]["resources"]["ember:template:py-test"] == 1

    # Joining started the member's daemon, which says which cluster its home belongs to.
    status = json.loads(n2.ember("daemon", "status", "--json").stdout)
    assert status["running"]
    assert status["cluster"]["role"] == "worker"
    assert status["cluster"]["node_id"] == w2["node_id"]
    assert status["cluster"]["address"] == head["address"]
    assert "cluster: worker of" in n2.ember("daemon", "status").stdout
    n2.ember("daemon", "stop")

    # A node that leaves is gone from the live view at once, dead in the full one.
    n3.ember("cluster", "leave")
    assert not (n3.home / "cluster.json").exists()
    assert n3.pid_of("raylet") is None
    assert w3["node_id"] not in _alive(n1)
    assert {n["node_id"]: n["state"] for n in n1.nodes("--all")}[w3["node_id"]] == "DEAD"
    assert "no Ray node runs on this host" in n3.ember("cluster", "nodes", check=False).stderr

    # A raylet killed: the head reports its node dead within a bound (measured, printed).
    raylet = n2.pid_of("raylet")
    assert raylet is not None
    os.kill(raylet, 9)
    t0 = time.monotonic()
    wait_for("the head reports the killed node dead",
             lambda: {n["node_id"]: n["alive"] for n in n1.nodes("--all")}
             .get(w2["node_id"]) is False, DEAD_BOUND_S, 0.5)
    print(f"\nkilled raylet reported dead after {time.monotonic() - t0:.1f} s")
    assert set(_alive(n1)) == {head["node_id"]}


def test_head_restart_keeps_nodes_and_resources(world: ClusterWorld) -> None:
    n1, n2, n3 = world.nodes
    old_head = world.start_head()
    w2 = _join(n2, world, 4, 4096)
    w3 = _join(n3, world, 6, 6144)
    before = _alive(n2)
    assert set(before) == {old_head["node_id"], w2["node_id"], w3["node_id"]}

    n1.kill()  # GCS, raylet and all of the head's processes at once
    assert n2.pid_of("raylet") and n3.pid_of("raylet")
    t0 = time.monotonic()
    n1.boot()
    new_head = world.start_head()  # same Redis, address and port: the cluster resumes
    print(f"\nhead restarted (ember cluster start-head) in {time.monotonic() - t0:.1f} s")
    assert new_head["node_id"] != old_head["node_id"]

    def back() -> dict[str, dict[str, Any]] | None:
        alive = _alive(n3)
        want = {new_head["node_id"], w2["node_id"], w3["node_id"]}
        return alive if set(alive) == want else None

    alive = wait_for("the workers are members of the restarted head", back, 60, 1)
    print(f"cluster whole again {time.monotonic() - t0:.1f} s after the head's restart began")
    for node_id in (w2["node_id"], w3["node_id"]):  # the same nodes, the same resources
        assert alive[node_id]["resources"] == before[node_id]["resources"]
        assert alive[node_id]["advertised"] == before[node_id]["advertised"]
    assert alive[new_head["node_id"]]["head"]
    states = {n["node_id"]: n["state"] for n in n2.nodes("--all")}
    assert states[old_head["node_id"]] == "DEAD"
    assert json.loads((n2.home / "cluster.json").read_text())["node_id"] == w2["node_id"]
