"""Failures of an ember cluster (docs/cluster.md, "Failures"), on three nodes in namespaces
(cluster_world), real daemons and guests, one world:

* the head killed (its whole host) and started again: the workers' sandboxes keep running
  and stay reachable through another node meanwhile (no node fences: the head's host
  refuses, no GCS runs), and the restarted head reaches them with the same ids;
* node B cut off (its link down): through the head its sandbox is reported ``lost`` (state
  and reason) within the bound, any other operation answers SandboxLostError at once,
  ``ember ls`` on C shows it lost with its node; B fences (its VM gone, its row failed with
  the reason) past its threshold; healed, B reconciles (Ray declared it dead: the record
  is dropped), joins again, places a new sandbox, and leaks nothing;
* node C's host killed (daemon, raylet, VMs): its sandbox is reported lost.

Ray's health checks are shortened for the test through the head's environment (about 6 s
to declare a node dead instead of about a minute); the daemons' fencing threshold is 15 s.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import httpx
import pytest

from ember import NodeUnavailableError, Sandbox, SandboxLostError
from ember.cluster.node import DEFAULT_DAEMON_PORT, DEFAULT_PORT
from ember.daemon.cluster_forward import DIRECTORY_TTL_S, LOOKUP_TIMEOUT_S
from ember.daemon.cluster_watch import FENCE_ENV, LOOK_INTERVAL_S, READ_EVERY_S
from tests.integration.cluster_world import VENV_BIN, ClusterWorld, Node, wait_for
from tests.integration.leaks import leaks
from tests.integration.test_cluster_placement import (  # noqa: F401 (the fixture)
    _holders,
    _ray_state,
    _url,
    _vmm_of,
    _where,
    pytestmark,
    world,
)

#: Ray's health checks for the test (the head's environment): a check every second, each
#: given a second, three misses: a node is dead about 6 s after it stops answering.
RAY_HEALTH = ["RAY_health_check_period_ms=1000", "RAY_health_check_timeout_ms=1000",
              "RAY_health_check_failure_threshold=3"]
RAY_DETECT_S = 3 * (1 + 1) + 5  # three misses, plus Ray's initial delay as a margin
FENCE_S = 15.0
#: A dead node's sandbox is reported lost within Ray's detection, a directory reading's
#: age and one reading; the bound leaves room for a loaded machine.
LOST_BOUND_S = RAY_DETECT_S + DIRECTORY_TTL_S + LOOKUP_TIMEOUT_S + 30
#: The cut-off node fences within its threshold and a look or two (plus the kill).
FENCED_BOUND_S = FENCE_S + 4 * LOOK_INTERVAL_S + 40
#: A healed node reads that Ray declared it dead within two readings and reconciles.
RECONCILED_BOUND_S = 2 * READ_EVERY_S + 2 * LOOKUP_TIMEOUT_S + 30


def _start_daemon(node: Node) -> None:
    """The node's daemon with the test's fencing threshold, listening for the others."""
    node.run("env", f"{FENCE_ENV}={FENCE_S:g}", str(VENV_BIN / "ember"), "daemon", "start",
             "--listen", f"{node.ip}:{DEFAULT_DAEMON_PORT}")


def _start_head(w: ClusterWorld) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(w.head.run(
        "env", *RAY_HEALTH, str(VENV_BIN / "ember"), "cluster", "start-head", "--redis",
        w.redis_address, "--redis-password", w.redis_password, "--vcpus", "2",
        "--memory-mib", "2048", "--json").stdout)
    return out


def _join(node: Node, w: ClusterWorld) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(node.ember(
        "cluster", "join", f"{w.head.ip}:{DEFAULT_PORT}", "--vcpus", "4",
        "--memory-mib", "4096", "--json").stdout)
    return out


def _local(node: Node, sid: str) -> dict[str, Any]:
    """The sandbox as the node's own registry has it (its daemon, over its socket)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(node.paths.daemon_socket)),
                      timeout=30) as c:
        r = c.get(f"http://emberd/v1/sandboxes/{sid}")
    out: dict[str, Any] = r.json()
    return out


def _state_via(via: Node, sid: str) -> str:
    try:
        return Sandbox.get_info(sid, url=_url(via)).state
    except Exception as err:  # reported in the wait's message
        return f"{type(err).__name__}: {err}"[:200]


def _ls(node: Node) -> dict[str, dict[str, Any]]:
    return {i["id"]: i for i in json.loads(node.ember("ls", "--json").stdout)}


def test_lost_nodes_fencing_head_restart_and_rejoin(world: ClusterWorld) -> None:  # noqa: F811
    n1, n2, n3 = world.nodes
    for node in world.nodes:
        _start_daemon(node)
    head = _start_head(world)
    ids = {n2.name: _join(n2, world)["node_id"], n3.name: _join(n3, world)["node_id"]}
    sb_b = Sandbox.create("debian-python", url=_url(n2), timeout=600).id  # placed on itself
    sb_c = Sandbox.create("debian-python", url=_url(n3), timeout=600).id
    assert (_where(world, sb_b), _where(world, sb_c)) == ([n2], [n3])
    for via in (n1, n3):
        assert Sandbox.connect(sb_b, url=_url(via)).exec("echo via").stdout == "via\n"

    # The head's host dies and comes back: nobody fences (its host refuses: no GCS runs),
    # the sandboxes stay reachable through C meanwhile, and through the new head after.
    n1.kill()
    t0 = time.monotonic()
    while time.monotonic() - t0 < FENCE_S + 5:  # longer than the fencing threshold
        assert Sandbox.connect(sb_b, url=_url(n3)).exec("true").exit_code == 0
        time.sleep(2)
    n1.boot()
    _start_daemon(n1)
    new_head = _start_head(world)
    assert new_head["node_id"] != head["node_id"]
    print(f"\nhead down and back in {time.monotonic() - t0:.1f} s; nothing fenced")
    for sid, node in ((sb_b, n2), (sb_c, n3)):
        assert _local(node, sid)["state"] == "running"
        assert Sandbox.connect(sid, url=_url(n1)).exec("echo same").stdout == "same\n"

    # B cut off: the head reports its sandbox lost, with the reason, within the bound.
    subprocess.run(["ip", "-n", world.switch, "link", "set", "v2", "down"], check=True)
    cut = time.monotonic()
    try:
        wait_for("B's sandbox reported lost through the head",
                 lambda: _state_via(n1, sb_b) == "lost", LOST_BOUND_S, 0.5)
        lost_after = time.monotonic() - cut
        info = Sandbox.get_info(sb_b, url=_url(n1))
        assert info.node == ids[n2.name] and info.error is not None
        assert f"node {ids[n2.name][:12]} ({n2.ip}) died at" in info.error
        t0 = time.monotonic()
        with pytest.raises(SandboxLostError, match="is lost"):
            Sandbox.connect(sb_b, url=_url(n1)).exec("echo never")
        typed_after = time.monotonic() - t0
        listed = wait_for("C lists B's sandbox lost", lambda: _ls_if(n3, sb_b, "lost"),
                          DIRECTORY_TTL_S + LOOKUP_TIMEOUT_S + 10, 0.5)
        assert listed[sb_b]["node"] == ids[n2.name] and listed[sb_c]["state"] == "running"
        print(f"B cut off: lost through the head after {lost_after:.1f} s; "
              f"SandboxLostError in {typed_after:.2f} s")
        # B fences: past its threshold its placed sandbox is killed, the reason kept.
        try:
            wait_for("B fences its sandbox", lambda: (_local(n2, sb_b).get("error") or "")
                     .startswith("fenced: this node has not reached"), FENCED_BOUND_S, 0.5)
        except AssertionError:
            print(f"B's sandbox: {_local(n2, sb_b)}\nB's log:\n{_log_tail(n2)}")
            raise
        fenced_after = time.monotonic() - cut
        assert _local(n2, sb_b)["state"] == "failed"
        assert _vmm_of(n2, sb_b) == []
        print(f"B fenced its sandbox {fenced_after:.1f} s after the cut "
              f"(reported lost at {lost_after:.1f} s)")
    finally:
        subprocess.run(["ip", "-n", world.switch, "link", "set", "v2", "up"], check=True)

    # Healed: Ray declared B dead (its raylet exits); B reconciles: its lost record goes.
    def reconciled() -> bool:
        return sb_b not in _directory(n1)["sandboxes"]

    wait_for("B drops its lost record", reconciled, RECONCILED_BOUND_S, 2)
    wait_for("B's raylet gone (Ray declared it dead)", lambda: n2.pid_of("raylet") is None,
             60, 1)
    # B's watch reads that Ray declared it dead (twice, 3 s apart): lost is final there too.
    fence = wait_for("B reads that it was declared dead", lambda: _fence_if_dead(n2),
                     RECONCILED_BOUND_S, 1)
    print(f"B's watch after the heal: {fence}")
    again = _join(n2, world)  # B comes back as a new node
    assert again["node_id"] != ids[n2.name]
    sb_b2 = Sandbox.create("debian-python", url=_url(n2), timeout=600).id
    assert _where(world, sb_b2) == [n2]
    assert Sandbox.connect(sb_b2, url=_url(n1)).exec("echo back").stdout == "back\n"
    Sandbox.kill(sb_b, url=_url(n2))  # its failed row: B's own, removed on B
    Sandbox.kill(sb_b2, url=_url(n1))
    wait_for("B's new sandbox's actor ends", lambda: len(
        _holders(_ray_state(n1, new_head["address"]))) == 1, 60, 1)  # C's only
    assert leaks(n2.paths) == {}

    # C's host killed (daemon, raylet, VMs): its sandbox is reported lost, typed error.
    n3.kill()
    t0 = time.monotonic()
    wait_for("C's sandbox reported lost through the head",
             lambda: _state_via(n1, sb_c) == "lost", LOST_BOUND_S, 0.5)
    print(f"C killed: lost through the head after {time.monotonic() - t0:.1f} s")
    # Through B: lost too (B reads the directory again when C cannot be reached; a
    # reading B took less than a second before Ray decided may answer 503 once).
    wait_for("a kill through B answers SandboxLostError",
             lambda: _kill_is_lost(n2, sb_c), 2 * LOOKUP_TIMEOUT_S + 10, 1)
    wait_for("B lists C's sandbox lost", lambda: _ls_if(n2, sb_c, "lost"),
             DIRECTORY_TTL_S + LOOKUP_TIMEOUT_S + 10, 0.5)
    wait_for("C's actor is gone with its node",
             lambda: not _holders(_ray_state(n1, new_head["address"])), 60, 1)


def _kill_is_lost(via: Node, sid: str) -> bool:
    try:
        Sandbox.kill(sid, url=_url(via))
    except SandboxLostError:
        return True
    except NodeUnavailableError:
        return False
    raise AssertionError(f"a kill of {sid} through {via.name} succeeded: it was lost")


def _fence_if_dead(node: Node) -> dict[str, Any] | None:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(node.paths.daemon_socket)),
                      timeout=30) as c:
        fence: dict[str, Any] | None = c.get("http://emberd/v1/health").json()["fence"]
    reason = (fence or {}).get("reason") or ""
    return fence if reason.startswith("Ray reports this node dead") else None


def _log_tail(node: Node) -> str:
    try:
        lines = (node.paths.logs / "ember.log").read_text(errors="replace").splitlines()
    except OSError as err:
        return str(err)
    return "\n".join(ln for ln in lines if "ember.daemon.access" not in ln
                     and ("cluster" in ln or "fenc" in ln or "sandbox" in ln))[-6000:]


def _ls_if(node: Node, sid: str, state: str) -> dict[str, dict[str, Any]] | None:
    listed = _ls(node)
    return listed if listed.get(sid, {}).get("state") == state else None


def _directory(node: Node) -> dict[str, Any]:
    rec = json.loads((node.home / "cluster.json").read_text())
    py = node.env()["PATH"].split(":")[0] + "/python"
    out: dict[str, Any] = json.loads(node.run(py, "-m", "ember.cluster.directory",
                                              rec["address"]).stdout)["directory"]
    return out
