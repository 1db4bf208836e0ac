"""Reaching a sandbox through any node of the cluster: a sandbox placed on node B answers
exec, files and info through A and through C (forwarded daemon to daemon, Ray only asked
where), with the caller's API key checked where it arrives; ``ember ls`` on any node lists
the whole cluster with each sandbox's node; B's daemon killed, requests through A get
NodeUnavailableError within a bound, and a list reports B's sandbox instead of waiting.
Three nodes in namespaces (cluster_world), real daemons and guests."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import httpx
import pytest

from ember import NodeUnavailableError, Sandbox
from ember.cluster.node import DEFAULT_DAEMON_PORT, DEFAULT_PORT
from ember.daemon.cluster_forward import CONNECT_TIMEOUT_S, LOOKUP_TIMEOUT_S
from tests.integration.cluster_world import ClusterWorld, Node, wait_for
from tests.integration.test_cluster_placement import (  # noqa: F401 (the fixture)
    _url,
    _where,
    pytestmark,
    world,
)

#: A request for a sandbox whose node's daemon is dead answers within this.
UNAVAILABLE_BOUND_S = LOOKUP_TIMEOUT_S + CONNECT_TIMEOUT_S + 10
#: A node's own client over TCP with an API key, run inside that node's namespaces.
CLIENT = """
import json, sys
from ember import Sandbox, EmberError
url, key, sid = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
try:
    sb = Sandbox.connect(sid, url=url, api_key=key)
    out["exec"] = sb.exec("echo tenant-$((6*7))").stdout
    sb.close()
except EmberError as err:
    out["error"] = type(err).__name__
print(json.dumps(out))
"""
CREATE = """
import json, sys
from ember import Sandbox
sb = Sandbox.create("debian-python", url=sys.argv[1], api_key=sys.argv[2], timeout=600)
print(json.dumps({"id": sb.id}))
sb.close()
"""


def _py(node: Node, code: str, *args: str) -> dict[str, Any]:
    py = node.env()["PATH"].split(":")[0] + "/python"
    out: dict[str, Any] = json.loads(node.run(py, "-c", code, *args).stdout.splitlines()[-1])
    return out


def _ls(node: Node) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(node.ember("ls", "--json").stdout)
    return out


def test_a_sandbox_is_reached_through_any_node(world: ClusterWorld) -> None:  # noqa: F811
    n1, n2, n3 = world.nodes
    world.start_head()
    for node in (n2, n3):
        node.ember("cluster", "join", f"{n1.ip}:{DEFAULT_PORT}", "--vcpus", "4",
                   "--memory-mib", "4096")
    ids = {n.name: json.loads(n.ember("daemon", "status", "--json").stdout)["cluster"]["node_id"]
           for n in world.nodes}

    sb = Sandbox.create("debian-python", url=_url(n1), timeout=600)  # the head has no template
    [b] = _where(world, sb.id)
    c = n3 if b is n2 else n2
    print(f"\nplaced on {b.name}; reaching it through {n1.name} and {c.name}")
    for via in (n1, c):
        t0 = time.monotonic()
        there = Sandbox.connect(sb.id, url=_url(via))
        assert there.exec("echo through").stdout == "through\n"
        print(f"exec through {via.name}: {time.monotonic() - t0:.2f} s (first, a lookup)")
        t0 = time.monotonic()
        assert there.exec("echo again").stdout == "again\n"
        print(f"exec through {via.name} again: {time.monotonic() - t0:.3f} s")
        data = bytes(range(256)) * 4096  # 1 MiB, streamed both ways
        there.files.write(f"/tmp/from-{via.name}", data)
        assert there.files.read(f"/tmp/from-{via.name}") == data
        assert Sandbox.get_info(sb.id, url=_url(via)).id == sb.id
        there.close()
    # A terminal through A: keys in, output out, the exit code (a WebSocket, carried).
    term = Sandbox.connect(sb.id, url=_url(n1)).pty(
        ["sh", "-c", "stty size; read x; echo got:$x; exit 3"], rows=10, cols=50)
    seen, out = b"", term.output()
    while b"10 50" not in seen:
        seen += next(out)
    term.write("hi\r")
    for chunk in out:
        seen += chunk
    assert b"got:hi" in seen and term.wait() == 3

    # Written through A, read on B itself: one sandbox.
    on_b = Sandbox.connect(sb.id, url=_url(b))
    t0 = time.monotonic()
    assert on_b.exec("echo direct").stdout == "direct\n"
    print(f"exec on {b.name} itself: {time.monotonic() - t0:.3f} s")
    assert on_b.files.read(f"/tmp/from-{n1.name}") == bytes(range(256)) * 4096
    on_b.close()

    # An exposed port, exposed through C, answers HTTP through A (path and Host forms).
    via_c = Sandbox.connect(sb.id, url=_url(c))
    exposed = via_c.expose(8000)
    via_c.spawn(["python3", "-m", "http.server", "8000", "--directory", "/tmp"])
    via_c.close()
    assert exposed.http_path is not None and exposed.http_host is not None
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(n1.paths.daemon_socket)),
                      base_url="http://emberd", timeout=30) as a:
        wait_for("the guest's web server answers through A", lambda: a.get(
            exposed.http_path + f"/from-{n1.name}").status_code == 200, 60, 0.5)
        assert a.get(exposed.http_path + f"/from-{n1.name}").content == bytes(range(256)) * 4096
        r = a.get("/", headers={"host": exposed.http_host})
        assert r.status_code == 200 and f"from-{c.name}" in r.text

    # A sandbox made on C without placement (as a placement actor's create is): the
    # directory does not know it, the nodes are asked; reached through A.
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(c.paths.daemon_socket)),
                      timeout=600) as raw:
        made = raw.post("http://emberd/v1/sandboxes", json={"template": "debian-python"},
                        headers={"x-ember-placement": "none"})
    assert made.status_code == 201, made.text
    unplaced = made.json()["id"]
    assert _where(world, unplaced) == [c]
    t0 = time.monotonic()
    assert Sandbox.connect(unplaced, url=_url(n1)).exec("echo found").stdout == "found\n"
    print(f"exec through {n1.name} on a sandbox made on {c.name} without placement: "
          f"{time.monotonic() - t0:.2f} s (first: the nodes asked)")
    Sandbox.kill(unplaced, url=_url(n1))
    assert _where(world, unplaced) == []  # killed on C, through A

    # An API key made on the head: its tenant's sandbox, reached over TCP through the head
    # (the key is checked there; B believes the head's vouch), and not with a made-up key.
    key = json.loads(n1.ember("apikey", "create", "--tenant", "alice", "--json").stdout)["key"]
    head_tcp = f"http://{n1.ip}:{DEFAULT_DAEMON_PORT}"
    alice = _py(n1, CREATE, head_tcp, key)["id"]
    assert _py(n1, CLIENT, head_tcp, key, alice) == {"exec": "tenant-42\n"}
    assert _py(n1, CLIENT, head_tcp, key, sb.id) == {"error": "SandboxNotFoundError"}
    assert _py(n1, CLIENT, head_tcp, "ek_0000_nope", alice) == {"error": "UnauthorizedError"}
    [alices] = _where(world, alice)  # a forged vouch to the node that holds it (another
    # node's socket, as root, is the administrator's and forwards as such)
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(alices.paths.daemon_socket))) as raw:
        forged = raw.get(f"http://emberd/v1/sandboxes/{alice}",  # another cluster's secret
                         headers={"x-ember-vouch": f"alice:{int(time.time())}:{'0' * 64}"})
    assert forged.status_code == 401, forged.text

    # ember ls on C: the whole cluster, each sandbox with its node.
    listed = {i["id"]: i for i in _ls(c)}
    assert listed[sb.id]["node"] == ids[b.name]
    assert listed[alice]["node"] in (ids[n2.name], ids[n3.name])
    assert {i["node"] for i in listed.values()} <= set(ids.values())
    table = c.ember("ls").stdout
    assert "NODE" in table and ids[b.name][:12] in table

    # B's daemon killed: through A, a typed error within the bound; ls reports it.
    daemon_pid = b.run("cat", str(b.paths.daemon_lock)).stdout.split()[0]
    b.run("kill", "-9", daemon_pid)
    wait_for("B's daemon gone", lambda: _gone(b, daemon_pid), 30, 0.2)
    t0 = time.monotonic()
    with pytest.raises(NodeUnavailableError, match="does not answer"):
        Sandbox.connect(sb.id, url=_url(n1)).exec("echo never")
    took = time.monotonic() - t0
    print(f"B's daemon dead: NodeUnavailableError through A after {took:.2f} s")
    assert took < UNAVAILABLE_BOUND_S
    t0 = time.monotonic()
    listed = {i["id"]: i for i in _ls(n1)}
    print(f"ls with B's daemon dead: {time.monotonic() - t0:.2f} s")
    assert listed[sb.id]["state"] == "unknown" and "does not answer" in listed[sb.id]["error"]

    # B's daemon back: reached again; everything killed through A, nothing left.
    b.ember("daemon", "start", "--listen", f"{b.ip}:{DEFAULT_DAEMON_PORT}")
    wait_for("reached again through A", lambda: _exec_ok(n1, sb.id), 60, 1)

    # B cut off (its link down; back before Ray's health check gives it up, about 15 s):
    # the connect timeout bounds the answer, and a list does not wait for B.
    subprocess.run(["ip", "-n", b.netns, "link", "set", "eth0", "down"], check=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(NodeUnavailableError, match="does not answer"):
            Sandbox.connect(sb.id, url=_url(n1)).exec("echo never")
        took = time.monotonic() - t0
        t0 = time.monotonic()
        listed = {i["id"]: i for i in _ls(n1)}
        print(f"B cut off: NodeUnavailableError through A after {took:.2f} s, "
              f"ls in {time.monotonic() - t0:.2f} s")
        assert took < UNAVAILABLE_BOUND_S
        assert listed[sb.id]["state"] == "unknown"
    finally:
        subprocess.run(["ip", "-n", b.netns, "link", "set", "eth0", "up"], check=True)
    wait_for("reached again through A", lambda: _exec_ok(n1, sb.id), 60, 1)
    for sid in (sb.id, alice):
        Sandbox.kill(sid, url=_url(n1))
    wait_for("no sandbox left anywhere",
             lambda: not [i for i in _ls(c) if i["state"] in ("running", "booting")], 60, 1)
    # Their placement actors end and take their directory records with them.
    wait_for("no sandbox left in the directory", lambda: not _directory(n1)["sandboxes"],
             60, 1)
    nodes = {n["node_id"]: n for n in _directory(n1)["nodes"]}
    assert nodes[ids[b.name]]["daemon"] == f"{b.ip}:{DEFAULT_DAEMON_PORT}"


def _directory(node: Node) -> dict[str, Any]:
    """The cluster's directory as a daemon reads it (the same child process)."""
    rec = json.loads((node.home / "cluster.json").read_text())
    py = node.env()["PATH"].split(":")[0] + "/python"
    out: dict[str, Any] = json.loads(node.run(py, "-m", "ember.cluster.directory",
                                              rec["address"]).stdout)["directory"]
    return out


def _gone(node: Node, pid: str) -> bool:
    """The process is gone or a zombie (the node's PID 1 may not reap it)."""
    stat = node.run("cat", f"/proc/{pid}/stat", check=False).stdout
    return not stat or stat.rsplit(") ", 1)[-1].startswith("Z")


def _exec_ok(via: Node, sid: str) -> bool:
    try:
        return Sandbox.connect(sid, url=_url(via)).exec("true").exit_code == 0
    except NodeUnavailableError:
        return False
