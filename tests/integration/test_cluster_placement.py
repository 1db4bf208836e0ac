"""Placement on an ember cluster: ``Sandbox.create`` through any node's daemon is placed by
Ray (a detached named actor per sandbox holding its resources), and the chosen node's
daemon boots the real guest, which is no child of a Ray worker. Three nodes in namespaces
(cluster_world), each a real daemon; the shared test cache gives the guests."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember import EmberError, QuotaExceededError, Sandbox
from ember.cluster.node import DEFAULT_PORT
from ember.cluster.placement import ACTOR_PREFIX, NAMESPACE, PLACE_TIMEOUT_S
from ember.paths import Paths
from ember.store import Store
from tests.conftest import DEFAULT_TEST_CACHE
from tests.integration.cluster_world import (
    MARKS,
    ClusterWorld,
    Node,
    checked_world,
    wait_for,
)

pytestmark = MARKS
#: How long a placement actor may take to notice its sandbox is gone (it looks every 2 s).
RELEASE_BOUND_S = 60.0
RAY_STATE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False,
         configure_logging=False)
print(json.dumps({"actors": ray.util.list_named_actors(all_namespaces=True),
                  "available": ray.available_resources()}))
"""


@pytest.fixture
def world() -> Iterator[ClusterWorld]:
    pytest.importorskip("ray", reason="the cluster extra is not installed")
    from ember.guest.image import build_image
    from ember.guest.kernel import build_kernel

    root = Path(tempfile.mkdtemp(prefix="ecl-", dir="/tmp"))
    cache = Path(os.environ.get("EMBER_CACHE") or DEFAULT_TEST_CACHE)
    with checked_world(root, cache=cache) as w:
        for node in w.nodes[1:]:  # the head holds no template: what it is asked goes on
            paths = node.paths.ensure()
            build_kernel(paths)
            store = Store(paths.db)
            try:
                build_image(paths, store, "debian-python", force=True)  # a cache hit
            finally:
                store.close()
        yield w


def _url(node: Node) -> str:
    return f"unix://{Paths(home=node.home, cache=node.cache).daemon_socket}"


def _ray_state(node: Node, address: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(node.run(
        str(Path(node.env()["PATH"].split(":")[0]) / "python"), "-c", RAY_STATE,
        address).stdout)
    return out


def _wait_holders(head: Node, address: str, n: int, what: str) -> None:
    """Ray ends a killed actor a moment after ``ray.kill`` returns: wait, bounded."""
    wait_for(what, lambda: len(_holders(_ray_state(head, address))) == n, 30, 0.5)


def _holders(state: dict[str, Any]) -> list[str]:
    return sorted(a["name"] for a in state["actors"]
                  if a["namespace"] == NAMESPACE and a["name"].startswith(ACTOR_PREFIX))


def _where(world: ClusterWorld, sandbox_id: str) -> list[Node]:
    """The nodes whose own home holds the sandbox (their registries: a daemon's list is
    the whole cluster's)."""
    out = []
    for n in world.nodes:
        if n.holder is None or not n.paths.db.exists():
            continue
        store = Store(n.paths.db)
        try:
            if sandbox_id in {r.id for r in store.list_sandboxes()}:
                out.append(n)
        finally:
            store.close()
    return out


def _vmm_of(node: Node, sandbox_id: str) -> list[int]:
    """Host pids of the sandbox's VMM: the QEMU whose pid, as the node's daemon recorded it
    (in the node's PID namespace; QEMU's jail nests another), is the registry's."""
    store = Store(node.paths.db)
    try:
        pid = store.get_sandbox(sandbox_id).pid
    finally:
        store.close()
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                status = (d / "status").read_text()
            except OSError:
                continue
            fields = dict(ln.split(":\t", 1) for ln in status.splitlines() if ":\t" in ln)
            nspid = fields.get("NSpid", "").split()
            if fields.get("Name", "").startswith("qemu-system") and len(nspid) > 1 \
                    and int(nspid[1]) == pid and node.init_pid in _lineage(int(d.name)):
                out.append(int(d.name))
    return out


def _lineage(pid: int) -> list[int]:
    out = []
    while pid > 1:
        out.append(pid)
        status = Path(f"/proc/{pid}/status").read_text()
        pid = int(status.split("PPid:", 1)[1].split()[0])
    return out


def _ancestors(pid: int) -> list[str]:
    names = []
    while pid > 1:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        names.append(fields["Name"].strip())
        pid = int(fields["PPid"])
    return names


def test_creates_through_any_node_are_placed_by_ray(world: ClusterWorld) -> None:
    n1, n2, n3 = world.nodes
    address = world.start_head()["address"]
    for node, vcpus in ((n2, 4), (n3, 2)):
        node.ember("cluster", "join", f"{n1.ip}:{DEFAULT_PORT}", "--vcpus", str(vcpus),
                   "--memory-mib", "4096")
    # start-head and join started every node's daemon: Ray's actors never start one
    total = _ray_state(n1, address)["available"]["ember:vcpus"]
    assert total == 2 + 4 + 2

    # Through the head, which has no template: Ray puts it where the template is.
    t0 = time.monotonic()
    sb = Sandbox.create("debian-python", url=_url(n1), timeout=600)
    print(f"\ncreate through the head, placed on another node: {time.monotonic() - t0:.1f} s")
    [chosen] = _where(world, sb.id)
    assert chosen in (n2, n3)
    there = Sandbox.connect(sb.id, url=_url(chosen))  # not `with`: that would kill it
    assert there.exec("echo placed").stdout == "placed\n"
    there.close()
    state = _ray_state(n1, address)
    assert len(_holders(state)) == 1  # a detached named actor holds its resources
    assert state["available"]["ember:vcpus"] == total - 1
    qemu = _vmm_of(chosen, sb.id)
    assert len(qemu) == 1, qemu
    lineage = _ancestors(qemu[0])
    assert not [a for a in lineage if a.startswith("ray::") or a in ("raylet", "gcs_server")], \
        lineage  # the daemon's VM, not a Ray worker's child

    # Through a node that has the template: it stays there (soft affinity to the asker).
    t0 = time.monotonic()
    local = Sandbox.create("debian-python", url=_url(n2), timeout=600)
    print(f"create through a node, placed on itself: {time.monotonic() - t0:.1f} s")
    assert _where(world, local.id) == [n2]
    assert len(_holders(_ray_state(n1, address))) == 2

    # No node has room: 429 (QuotaExceededError) after a bounded wait, never a hang.
    t0 = time.monotonic()
    with pytest.raises(QuotaExceededError, match="no node of the cluster has room"):
        Sandbox.create("debian-python", url=_url(n3), vcpus=8, timeout=600)
    assert time.monotonic() - t0 < PLACE_TIMEOUT_S + 60
    print(f"cluster full answered after {time.monotonic() - t0:.1f} s")
    _wait_holders(n1, address, 2, "the refused create's actor ends")  # ray.kill: async

    # The chosen node's error comes back as the same error, and its actor ends.
    with pytest.raises(EmberError) as failed:
        Sandbox.create("debian-python", url=_url(n1), boot="cold", boot_timeout=0.05,
                       timeout=600)
    print(f"a failing create, placed: {type(failed.value).__name__}: {failed.value}")
    assert "placement failed" not in str(failed.value)
    _wait_holders(n1, address, 2, "the failed create's actor ends")

    # A sandbox that ends gives its resources back: its actor ends too.
    Sandbox.kill(sb.id, url=_url(chosen))
    Sandbox.kill(local.id, url=_url(n2))
    t0 = time.monotonic()
    wait_for("the placement actors end with their sandboxes",
             lambda: not _holders(_ray_state(n1, address)), RELEASE_BOUND_S, 1)
    print(f"placement actors gone {time.monotonic() - t0:.1f} s after their sandboxes")
    assert _ray_state(n1, address)["available"]["ember:vcpus"] == total

    # The head down: a node still creates, locally, once Ray does not answer.
    n1.kill()
    t0 = time.monotonic()
    alone = Sandbox.create("debian-python", url=_url(n2), timeout=600)
    print(f"create with the head down (local fallback) took {time.monotonic() - t0:.1f} s")
    assert _where(world, alone.id) == [n2]
    Sandbox.kill(alone.id, url=_url(n2))
