"""Tenants, API keys and E2B's API across an ember cluster: a tenant's quota holds across
nodes (creates through different nodes count together, of two at once at the limit only
one gets in, and a keeper started again keeps the count), a key made on one node works on
the others and a revocation on any node stops it everywhere within the bound, a fork over
the tenant's cluster-wide limit is refused and one within it counts, ``ember apikey ls``
/ ``ember tenant ls`` show the cluster's records, and E2B's SDK creates through one node a
sandbox Ray places on another, runs a command and reads a file through a third, and E2B's
lists through the head list it. Three nodes in namespaces (cluster_world), real daemons, guests."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from ember.cluster.node import DEFAULT_DAEMON_PORT, DEFAULT_PORT
from ember.cluster.quota import KEEPER_NAME
from ember.daemon.cluster_keys import GRACE_S, READ_TIMEOUT_S, TTL_S
from tests.integration.cluster_world import ClusterWorld, Node, wait_for
from tests.integration.test_cluster_placement import (  # noqa: F401 (the fixture)
    _holders,
    _ray_state,
    _where,
    pytestmark,
    world,
)
from tests.integration.test_cluster_reach import _py

#: A key revoked on one node is refused by every node within this.
REVOKE_BOUND_S = TTL_S + GRACE_S + READ_TIMEOUT_S + 5
#: A killed sandbox's placement actor ends (it looks every 2 s): its quota is free again.
RELEASE_BOUND_S = 60.0
CREATE = """
import json, sys
from ember import Sandbox, EmberError
try:
    sb = Sandbox.create("debian-python", url=sys.argv[1], api_key=sys.argv[2], timeout=600)
    print(json.dumps({"id": sb.id}))
except EmberError as err:
    print(json.dumps({"error": type(err).__name__, "message": str(err)}))
"""
KILL = """
import sys
from ember import Sandbox
Sandbox.kill(sys.argv[3], url=sys.argv[1], api_key=sys.argv[2])
print("{}")
"""
HEALTH = """
import json, sys, httpx
r = httpx.get(sys.argv[1] + "/v1/health", headers={"authorization": "Bearer " + sys.argv[2]},
              timeout=30)
print(json.dumps({"status": r.status_code}))
"""
KILL_KEEPER = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace="ember", logging_level="ERROR", log_to_driver=False,
         configure_logging=False)
ray.kill(ray.get_actor("ember-quota", namespace="ember"), no_restart=True)
print("{}")
"""
E2B_CREATE = """
import json, sys
from e2b import Sandbox
sbx = Sandbox.create("base", timeout=600, api_key=sys.argv[2], api_url=sys.argv[1],
                     sandbox_url=sys.argv[1])
print(json.dumps({"id": sbx.sandbox_id}))
"""
E2B_USE = """
import json, sys
from e2b import Sandbox
url, key, sid = sys.argv[1], sys.argv[2], sys.argv[3]
sbx = Sandbox.connect(sid, api_key=key, api_url=url, sandbox_url=url)
out = {"run": sbx.commands.run("echo e2b-$((6*7)) > /tmp/e2b.txt; cat /tmp/e2b.txt").stdout}
out["read"] = sbx.files.read("/tmp/e2b.txt")
out["info"] = sbx.get_info().sandbox_id
sbx.set_timeout(900)
print(json.dumps(out))
"""
FORK = """
import json, sys, httpx
r = httpx.post(sys.argv[1] + f"/v1/sandboxes/{sys.argv[3]}/fork", json={"n": 1},
               headers={"authorization": "Bearer " + sys.argv[2]}, timeout=300)
print(json.dumps({"status": r.status_code, "body": r.json()}))
"""
SNAP_RESTORE = """
import json, sys, httpx
url, key, sid = sys.argv[1], sys.argv[2], sys.argv[3]
h = {"authorization": "Bearer " + key}
snap = httpx.post(url + f"/v1/sandboxes/{sid}/snapshots", json={}, headers=h, timeout=300)
ref = snap.json()["id"]
r = httpx.post(url + f"/v1/snapshots/{ref}/restore", json={}, headers=h, timeout=300)
gone = httpx.delete(url + f"/v1/snapshots/{ref}", headers=h, timeout=60)
print(json.dumps({"snapshot": snap.status_code, "status": r.status_code, "body": r.json(),
                  "deleted": gone.status_code}))
"""
E2B_LIST = """
import json, sys, httpx
url, key, sid = sys.argv[1], sys.argv[2], sys.argv[3]
h = {"X-API-KEY": key}
out = {"v2": [s["sandboxID"] for s in httpx.get(url + "/v2/sandboxes", headers=h,
                                                 timeout=60).json()],
       "v1": [s["sandboxID"] for s in httpx.get(url + "/sandboxes", headers=h,
                                                 timeout=60).json()],
       "metrics": sorted(httpx.get(url + "/sandboxes/metrics", params={"sandbox_ids": sid},
                                   headers=h, timeout=60).json()["sandboxes"])}
print(json.dumps(out))
"""
E2B_KILL = """
import json, sys
from e2b import Sandbox
print(json.dumps({"killed": Sandbox.kill(sys.argv[3], api_key=sys.argv[2], api_url=sys.argv[1])}))
"""


def _tcp(node: Node) -> str:
    return f"http://{node.ip}:{DEFAULT_DAEMON_PORT}"


def _create(node: Node, key: str) -> dict[str, Any]:
    """A create through ``node``'s TCP listener, run on that node."""
    return _py(node, CREATE, _tcp(node), key)


def _named(node: Node, address: str) -> list[str]:
    return [a["name"] for a in _ray_state(node, address)["actors"]]


def _status(node: Node, key: str) -> int:
    return int(_py(node, HEALTH, _tcp(node), key)["status"])


def test_tenants_keys_and_e2b_across_the_cluster(world: ClusterWorld) -> None:  # noqa: F811
    n1, n2, n3 = world.nodes
    address = world.start_head()["address"]
    for node in (n2, n3):
        node.ember("cluster", "join", f"{n1.ip}:{DEFAULT_PORT}", "--vcpus", "4",
                   "--memory-mib", "4096")

    # Limits set on the head, a key made on B: both the cluster's.
    n1.ember("tenant", "set", "acme", "--max-sandboxes", "2")
    made = json.loads(n2.ember("apikey", "create", "--tenant", "acme", "--json").stdout)
    key, key_id = made["key"], made["id"]

    # Two creates through two different nodes (the key made on B works on C) ...
    first = _create(n2, key)
    second = _create(n3, key)
    assert "id" in first and "id" in second, (first, second)
    # ... and the third, through the head (which holds no sandbox of acme's), is over.
    t0 = time.monotonic()
    third = _create(n1, key)
    print(f"\nthird create of acme through the head: {third.get('error')} after "
          f"{time.monotonic() - t0:.1f} s")
    assert third["error"] == "QuotaExceededError", third
    assert "tenant acme" in third["message"] and "limit 2" in third["message"]
    holders = _holders(_ray_state(n1, address))
    assert len(holders) == 2, holders  # the refused create's placement actor is gone

    # One killed: once its placement actor is gone, two creates at once through two
    # nodes: exactly one fits.
    _py(n1, KILL, _tcp(n1), key, first["id"])
    wait_for("the killed sandbox's placement actor ends",
             lambda: len(_holders(_ray_state(n1, address))) == 1, RELEASE_BOUND_S, 1)
    both: dict[str, dict[str, Any]] = {}
    threads = [threading.Thread(target=lambda n=n: both.update({n.name: _create(n, key)}))
               for n in (n1, n3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    print(f"two at once at the limit: {both}")
    fits = [r["id"] for r in both.values() if "id" in r]
    over = [r for r in both.values() if r.get("error") == "QuotaExceededError"]
    assert len(fits) == 1 and len(over) == 1, both

    # The keeper killed (as when its node dies): the next one reads the book back from
    # Ray's KV, so acme is still at its limit.
    _py(n1, KILL_KEEPER, address)
    wait_for("the keeper gone", lambda: KEEPER_NAME not in _named(n1, address), 60, 1)
    again = _create(n2, key)
    assert again.get("error") == "QuotaExceededError", again

    # A fork counts cluster-wide too: acme is at 2 across the cluster, so a fork of one
    # (through the head, forwarded to its node) is refused by the keeper, whatever that
    # node holds itself, and leaves no placement actor.
    t0 = time.monotonic()
    forked = _py(n1, FORK, _tcp(n1), key, second["id"])
    print(f"fork over acme's cluster-wide limit: {forked} after "
          f"{time.monotonic() - t0:.1f} s (the source on "
          f"{[n.name for n in _where(world, second['id'])]}, the other on "
          f"{[n.name for n in _where(world, fits[0])]})")
    assert forked["status"] == 429 and forked["body"]["error"]["code"] == "quota_exceeded"
    message = forked["body"]["error"]["message"]
    assert "tenant acme" in message and "across the cluster" in message \
        and "limit 2" in message, message
    assert len(_holders(_ray_state(n1, address))) == 2
    # A restore too (on the snapshot's node: snapshots are not forwarded).
    [src] = _where(world, second["id"])
    t0 = time.monotonic()
    restored = _py(src, SNAP_RESTORE, _tcp(src), key, second["id"])
    print(f"snapshot, restore over the limit, delete on {src.name}: {restored['status']} "
          f"after {time.monotonic() - t0:.1f} s")
    assert restored["snapshot"] == 201 and restored["deleted"] == 204, restored
    assert restored["status"] == 429 and "across the cluster" in str(restored["body"]), restored
    assert len(_holders(_ray_state(n1, address))) == 2

    # One of the two killed: a fork of the other fits, on the source's node, and counts
    # while it lives (its placement actor holds it): the next create is over the limit.
    _py(n1, KILL, _tcp(n1), key, fits[0])
    wait_for("the killed sandbox's placement actor ends",
             lambda: len(_holders(_ray_state(n1, address))) == 1, RELEASE_BOUND_S, 1)
    t0 = time.monotonic()
    forked = _py(n1, FORK, _tcp(n1), key, second["id"])
    print(f"fork within acme's limit, through the head: {forked['status']} after "
          f"{time.monotonic() - t0:.1f} s")
    assert forked["status"] == 201, forked
    [clone] = [c["id"] for c in forked["body"]]
    assert _where(world, clone) == _where(world, second["id"])
    assert len(_holders(_ray_state(n1, address))) == 2
    over = _create(n2, key)
    assert over.get("error") == "QuotaExceededError" \
        and "across the cluster" in over["message"], over

    # The administrator's lists on C: the cluster's key (made on B) and limits (set on
    # the head), marked as another node's; on B, the key is its own.
    keys_c = json.loads(n3.ember("apikey", "ls", "--json").stdout)
    assert {k["id"]: k.get("where") for k in keys_c}.get(key_id) == "cluster", keys_c
    keys_b = json.loads(n2.ember("apikey", "ls", "--json").stdout)
    assert {k["id"]: k.get("where") for k in keys_b}.get(key_id) == "here", keys_b
    tenants_c = json.loads(n3.ember("tenant", "ls", "--json").stdout)
    assert [(t["name"], t["max_sandboxes"], t["where"]) for t in tenants_c
            if t["name"] == "acme"] == [("acme", 2, "cluster")], tenants_c

    # The key revoked on C (which did not make it): B, which made it, refuses it too.
    assert _status(n2, key) == 200
    n3.ember("apikey", "revoke", key_id)
    t0 = time.monotonic()
    wait_for("the revoked key refused on every node",
             lambda: all(_status(n, key) == 401 for n in (n2, n1, n3)), REVOKE_BOUND_S, 0.5)
    print(f"revoked on {n3.name}: refused everywhere after {time.monotonic() - t0:.1f} s")
    for sid in (second["id"], clone):
        n1.ember("rm", sid)

    # E2B's SDK: created through the head (no template there: placed on B or C), then
    # used through the third node: lifecycle, envd's commands and files, all forwarded.
    e2b_key = json.loads(n1.ember("apikey", "create", "--tenant", "bob", "--json").stdout)["key"]
    t0 = time.monotonic()
    sid = _py(n1, E2B_CREATE, _tcp(n1), e2b_key)["id"]
    print(f"E2B create through the head: {time.monotonic() - t0:.1f} s")
    [holder] = _where(world, sid)
    assert holder in (n2, n3)
    third_node = n3 if holder is n2 else n2
    t0 = time.monotonic()
    used = _py(third_node, E2B_USE, _tcp(third_node), e2b_key, sid)
    print(f"E2B connect, command, file read through {third_node.name}: "
          f"{time.monotonic() - t0:.1f} s")
    assert used == {"run": "e2b-42\n", "read": "e2b-42\n", "info": sid}
    # E2B's lists and many-sandbox metrics through the head, which does not hold it.
    t0 = time.monotonic()
    listed = _py(n1, E2B_LIST, _tcp(n1), e2b_key, sid)
    own = _py(holder, E2B_LIST, _tcp(holder), e2b_key, sid)
    print(f"E2B lists through the head: {listed} ({time.monotonic() - t0:.1f} s for both)")
    assert listed["v2"] == [sid] and listed["v1"] == [sid], listed
    assert listed["metrics"] == own["metrics"], (listed, own)
    assert _py(third_node, E2B_KILL, _tcp(third_node), e2b_key, sid) == {"killed": True}
    assert _where(world, sid) == []
