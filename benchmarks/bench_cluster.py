"""Issue 15 figures, side by side in one run, on the tests' three-node world
(tests/integration/cluster_world.py: network and PID namespaces, no packet leaves this
machine), each node a real daemon with real guests:

* create latency: through the head, which holds no template, so Ray places every sandbox
  on another node, next to a create through a node that holds it (placed on itself), and
  next to a plain local create (a fourth node whose home is in no cluster);
* placement throughput: N creates at once through the three nodes, creates per second;
* time to report a lost node: a worker's raylet killed, until ``ember cluster nodes``
  on the head lists it DEAD (the node rejoins between repetitions).

Run (as root): .venv/bin/python benchmarks/bench_cluster.py [--reps 5] [--burst 6] [--lost 3]
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
from ember.cluster.node import DEFAULT_PORT
from ember.guest.image import build_image
from ember.guest.kernel import build_kernel
from ember.paths import Paths
from ember.store import Store
from tests.conftest import DEFAULT_TEST_CACHE
from tests.integration.cluster_world import ClusterWorld, Node, cluster_world, wait_for


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
    args = ap.parse_args()
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
            world.start_head()
            for node in (n2, n3):
                node.ember("cluster", "join", f"{head.ip}:{DEFAULT_PORT}", "--vcpus", "16",
                           "--memory-mib", "8192")
            alone.ember("daemon", "start")  # in no cluster: the local baseline
            for node in (n2, n3, alone):  # each makes its template snapshot once
                kill_everywhere(world, [timed_create(node)[1]])

            remote, placed_here, local = [], [], []
            for _ in range(args.reps):
                for node, out in ((head, remote), (n2, placed_here), (alone, local)):
                    dt, sid = timed_create(node)
                    out.append(dt)
                    kill_everywhere(world, [sid])
            print("create latency (to a running sandbox, through the daemon's socket)")
            print(f"  through the head, placed on another node:  {med(remote)}")
            print(f"  through a node, placed on itself:          {med(placed_here)}")
            print(f"  local, in no cluster:                       {med(local)}")

            reach(world, 20)

            t0 = time.perf_counter()
            asked = [world.nodes[i % 3] for i in range(args.burst)]
            with ThreadPoolExecutor(args.burst) as pool:
                results = list(pool.map(timed_create, asked))
            wall = time.perf_counter() - t0
            print(f"placement throughput: {args.burst} creates at once through 3 nodes in "
                  f"{wall:.1f} s: {args.burst / wall:.2f} creates/s "
                  f"(each {med([r[0] for r in results])})")
            kill_everywhere(world, [r[1] for r in results])

            lost = []
            for _ in range(args.lost):
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
            print(f"time to report a lost node (raylet killed -> DEAD on the head): {med(lost)}")
            for node in world.nodes:
                node.ember("daemon", "stop", check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
