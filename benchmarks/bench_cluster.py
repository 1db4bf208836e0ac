"""Issue 15 figures, side by side in one run, on the tests' three-node world
(tests/integration/cluster_world.py: network and PID namespaces, no packet leaves this
machine), each node a real daemon with real guests:

* create latency: through the head, which holds no template, so Ray places every sandbox
  on another node, next to a create through a node that holds it (placed on itself), and
  next to a plain local create (a fourth node whose home is in no cluster);
* placement throughput: N creates at once through the three nodes, creates per second;
* time to report a lost node: a worker's raylet killed, until ``ember cluster nodes``
  on the head lists it DEAD (the node rejoins between repetitions);
* time to report a lost sandbox: a worker holding a sandbox cut off (its link down), until
  the head answers its info ``lost``, next to when the cut node fenced it (killed it
  itself); healed, the node rejoins between repetitions.

``--health fast`` starts the head with Ray's health checks shortened (a check every
second, given a second, three misses: the test's settings) and the daemons with a 15 s
fencing threshold; ``default`` keeps Ray's (about a minute to declare a cut-off node
dead) and ember's 90 s. ``--parts`` picks what runs.

Run (as root): .venv/bin/python benchmarks/bench_cluster.py [--reps 5] [--burst 6] [--lost 3]
    [--cut 3] [--health default|fast] [--parts create,reach,burst,dead,cut]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ember import Sandbox
from ember.cluster.node import DEFAULT_DAEMON_PORT, DEFAULT_PORT
from ember.daemon.cluster_watch import FENCE_ENV
from ember.guest.image import build_image
from ember.guest.kernel import build_kernel
from ember.paths import Paths
from ember.store import Store
from tests.conftest import DEFAULT_TEST_CACHE
from tests.integration.cluster_world import (
    VENV_BIN,
    ClusterWorld,
    Node,
    cluster_world,
    wait_for,
)

#: ``--health fast``: the head's environment (Ray's health checks) and the daemons' fencing.
FAST_HEALTH = ["RAY_health_check_period_ms=1000", "RAY_health_check_timeout_ms=1000",
               "RAY_health_check_failure_threshold=3"]
FAST_FENCE_S = 15.0


def url(node: Node) -> str:
    return f"unix://{Paths(home=node.home, cache=node.cache).daemon_socket}"


def timed_create(node: Node) -> tuple[float, str]:
    t0 = time.perf_counter()
    sb = Sandbox.create("debian-python", url=url(node), timeout=900)
    return time.perf_counter() - t0, sb.id


def kill_everywhere(world: ClusterWorld, ids: list[str]) -> None:
    """Kill each once, through the first node that lists it (a node of the cluster lists,
    and forwards to, the whole cluster)."""
    left = set(ids)
    for node in world.nodes:
        for info in Sandbox.list(url=url(node)):
            if info.id in left:
                left.discard(info.id)
                Sandbox.kill(info.id, url=url(node))


def reach(world: ClusterWorld, reps: int) -> None:
    """An exec and an 8 MiB read of a sandbox on another node, through the head (forwarded
    daemon to daemon) and on its own node."""
    head = world.nodes[0]
    sid = timed_create(head)[1]
    [info] = [i for i in Sandbox.list(url=url(head)) if i.id == sid]
    owner = next(n for n in world.nodes if (n.home / "cluster.json").exists()
                 and json.loads((n.home / "cluster.json").read_text())["node_id"] == info.node)
    data = os.urandom(8 << 20)
    Sandbox.connect(sid, url=url(owner)).files.write("/tmp/blob", data)
    print(f"reaching a sandbox on {owner.name} (exec `true`, n={reps}; read 8 MiB, n=5)")
    for name, via in (("through the head, forwarded", head), ("on its own node", owner)):
        sb = Sandbox.connect(sid, url=url(via))
        sb.exec("true")  # the first through the head reads the directory
        execs, reads = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            sb.exec("true")
            execs.append(time.perf_counter() - t0)
        for _ in range(5):
            t0 = time.perf_counter()
            assert sb.files.read("/tmp/blob") == data
            reads.append(time.perf_counter() - t0)
        print(f"  {name:28s} exec {ms(execs)}; read {ms(reads)}")
    kill_everywhere(world, [sid])


def state_via(via: Node, sid: str) -> str:
    try:
        return Sandbox.get_info(sid, url=url(via)).state
    except Exception as err:  # a 503 while the node is merely unreachable
        return type(err).__name__


def local_state(node: Node, sid: str) -> str:
    """As the node's own daemon has it (its registry: no other node asked)."""
    return Sandbox.get_info(sid, url=url(node)).state


def cut(world: ClusterWorld, node: Node, index: int, reps: int) -> None:
    """A sandbox on ``node``; its link cut: until the head says ``lost``, and until the
    node fenced it; healed, the node rejoins (Ray declared it dead) between repetitions."""
    import subprocess

    head = world.nodes[0]
    lost, fenced = [], []
    for _ in range(reps):
        sid = timed_create(node)[1]
        subprocess.run(["ip", "-n", world.switch, "link", "set", f"v{index}", "down"],
                       check=True)
        t0 = time.perf_counter()
        try:
            wait_for("reported lost", lambda sid=sid: state_via(head, sid) == "lost", 300,
                     0.25)
            lost.append(time.perf_counter() - t0)
            wait_for("fenced", lambda sid=sid: local_state(node, sid) != "running", 300,
                     0.25)
            fenced.append(time.perf_counter() - t0)
        finally:
            subprocess.run(["ip", "-n", world.switch, "link", "set", f"v{index}", "up"],
                           check=True)
        wait_for("its raylet gone", lambda: node.pid_of("raylet") is None, 120, 1)
        node.ember("cluster", "join", f"{head.ip}:{DEFAULT_PORT}", "--vcpus", "16",
                   "--memory-mib", "8192")
        Sandbox.kill(sid, url=url(node))  # its failed row
    print(f"a worker cut off: its sandbox reported lost through the head {med(lost)}")
    print(f"                  the cut node fenced it (its own kill)  {med(fenced)}")


def ms(xs: list[float]) -> str:
    return (f"{statistics.median(xs) * 1000:.1f} ms (min {min(xs) * 1000:.1f}, "
            f"max {max(xs) * 1000:.1f}, n={len(xs)})")


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f} s (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--burst", type=int, default=6)
    ap.add_argument("--lost", type=int, default=3)
    ap.add_argument("--cut", type=int, default=3)
    ap.add_argument("--health", choices=("default", "fast"), default="default")
    ap.add_argument("--parts", default="create,reach,burst,dead,cut")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    cache = Path(os.environ.get("EMBER_CACHE") or DEFAULT_TEST_CACHE)
    root = Path(tempfile.mkdtemp(prefix="ecl-bench-", dir="/tmp"))
    try:
        with cluster_world(root, n=4, cache=cache) as world:
            head, n2, n3, alone = world.nodes
            for node in (n2, n3, alone):
                paths = node.paths.ensure()
                build_kernel(paths)
                store = Store(paths.db)
                try:
                    build_image(paths, store, "debian-python", force=True)
                finally:
                    store.close()
            if args.health == "fast":
                for node in (head, n2, n3):
                    node.run("env", f"{FENCE_ENV}={FAST_FENCE_S:g}", str(VENV_BIN / "ember"),
                             "daemon", "start", "--listen", f"{node.ip}:{DEFAULT_DAEMON_PORT}")
                head.run("env", *FAST_HEALTH, str(VENV_BIN / "ember"), "cluster",
                         "start-head", "--redis", world.redis_address, "--redis-password",
                         world.redis_password, "--vcpus", "2", "--memory-mib", "2048")
            else:
                world.start_head()
            print(f"Ray's health checks and ember's fencing: {args.health}")
            for node in (n2, n3):
                node.ember("cluster", "join", f"{head.ip}:{DEFAULT_PORT}", "--vcpus", "16",
                           "--memory-mib", "8192")
            alone.ember("daemon", "start")  # in no cluster: the local baseline
            for node in (n2, n3, alone):  # each makes its template snapshot once
                kill_everywhere(world, [timed_create(node)[1]])

            remote, placed_here, local = [], [], []
            for _ in range(args.reps if "create" in parts else 0):
                for node, out in ((head, remote), (n2, placed_here), (alone, local)):
                    dt, sid = timed_create(node)
                    out.append(dt)
                    kill_everywhere(world, [sid])
            if remote:
                print("create latency (to a running sandbox, through the daemon's socket)")
                print(f"  through the head, placed on another node:  {med(remote)}")
                print(f"  through a node, placed on itself:          {med(placed_here)}")
                print(f"  local, in no cluster:                       {med(local)}")
            if "reach" in parts:
                reach(world, 20)
            if "cut" in parts:
                cut(world, n2, 2, args.cut)
            if "burst" not in parts:
                args.burst = 0

            if args.burst:
                t0 = time.perf_counter()
                asked = [world.nodes[i % 3] for i in range(args.burst)]
                with ThreadPoolExecutor(args.burst) as pool:
                    results = list(pool.map(timed_create, asked))
                wall = time.perf_counter() - t0
                print(f"placement throughput: {args.burst} creates at once through 3 nodes "
                      f"in {wall:.1f} s: {args.burst / wall:.2f} creates/s "
                      f"(each {med([r[0] for r in results])})")
                kill_everywhere(world, [r[1] for r in results])

            lost = []
            for _ in range(args.lost if "dead" in parts else 0):
                me = json.loads((n3.home / "cluster.json").read_text())
                raylet = n3.pid_of("raylet")
                assert raylet is not None
                os.kill(raylet, 9)
                t0 = time.perf_counter()
                wait_for("the lost node reported", lambda me=me: any(
                    n["node_id"] == me["node_id"] and not n["alive"]
                    for n in json.loads(
                        head.ember("cluster", "nodes", "--all", "--json").stdout)), 120, 0.5)
                lost.append(time.perf_counter() - t0)
                n3.ember("cluster", "leave")
                n3.ember("cluster", "join", f"{head.ip}:{DEFAULT_PORT}", "--vcpus", "16",
                         "--memory-mib", "8192")
            if lost:
                print(f"time to report a lost node (raylet killed -> DEAD on the head): "
                      f"{med(lost)}")
            for node in world.nodes:
                node.ember("daemon", "stop", check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
