"""Templates across the nodes of a cluster (docs/cluster.md, "Templates across nodes"):
the tests' three-node world (tests/integration/cluster_world.py: namespaces on this
machine), each node with an image cache of its own (the kernel and guest runtime shared),
a template held by node 2 only:

* time to pull it to another node (``ember cluster pull T --json``: the transfer, the
  digest check read from the ext4 image, the registration), the node's copy removed
  between repetitions;
* a create through node 3 of a template it did not hold (Ray places it there: the holder
  has no room for its 2 vCPUs; the node pulls, boots and makes its template snapshot),
  next to a create of one it holds whose template snapshot is not made yet (a boot and
  the snapshot) and a create of one it holds with its snapshot (a restore).

Templates: ``bb`` (busybox, built here from a directory) and, with ``--debian``, the test
cache's ``debian-python`` image registered on node 2.

Run (as root): .venv/bin/python benchmarks/bench_cluster_templates.py [--reps 3] [--debian]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ember import Sandbox
from ember.cluster.node import DEFAULT_PORT
from ember.guest.kernel import build_kernel
from ember.guest.runtime_bundle import build_runtime
from ember.paths import Paths
from ember.store import Store, TemplateRecord
from tests.conftest import DEFAULT_TEST_CACHE
from tests.integration.cluster_world import Node, cluster_world


def url(node: Node) -> str:
    return f"unix://{node.paths.daemon_socket}"


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f}), n={len(xs)}"


def forget(node: Node, name: str) -> None:
    """``name`` no longer on ``node``: its template snapshots, the template, its image."""
    node.ember("image", "snapshot", "rm", name, check=False)
    store = Store(node.paths.db)
    try:
        digest = store.get_template(name).digest
    finally:
        store.close()
    node.ember("image", "rm", name)
    shutil.rmtree(node.cache / "images" / digest.split(":")[1])


def timed_create(node: Node, name: str) -> float:
    t0 = time.perf_counter()
    sb = Sandbox.create(name, url=url(node), vcpus=2, timeout=900)
    took = time.perf_counter() - t0
    store = Store(node.paths.db)  # placed here: the holder has no room
    try:
        assert sb.id in {r.id for r in store.list_sandboxes()}, "not placed on node 3"
    finally:
        store.close()
    Sandbox.kill(sb.id, url=url(node))
    return took


def register_debian(node: Node, shared: Path) -> str:
    """The shared cache's debian-python image, copied into ``node``'s cache and registered
    there only."""
    meta, src = None, shared
    for d in sorted((shared / "images").iterdir()):
        m = d / "meta.json"
        if m.is_file() and json.loads(m.read_text()).get("source") == "debian:bookworm" \
                and json.loads(m.read_text()).get("packages") == [
                    "python3", "coreutils", "procps", "ca-certificates"]:
            meta = json.loads(m.read_text())
            src = d
    if meta is None:
        raise SystemExit("no debian-python image in the test cache: build it first")
    dst = node.cache / "images" / src.name
    dst.mkdir(parents=True)
    subprocess.run(["cp", "--sparse=always", str(src / "rootfs.ext4"), str(src / "meta.json"),
                    str(dst)], check=True, timeout=600)
    store = Store(node.paths.db)
    try:
        store.put_template(TemplateRecord(
            name="debian-python", source=meta["source"], digest=meta["digest"],
            image_path=str(dst / "rootfs.ext4"), size_bytes=int(meta["size_bytes"]),
            created_at=time.time(), config={"oci": {}, "packages": meta["packages"]}),
            replace=True)
    finally:
        store.close()
    node.ember("daemon", "stop", check=False)  # it publishes what it holds when it starts
    node.ember("daemon", "start", "--listen", f"{node.ip}:7707")
    return str(meta["digest"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--debian", action="store_true", help="also debian-python (248 MiB)")
    args = ap.parse_args()
    shared = Path(os.environ.get("EMBER_CACHE") or DEFAULT_TEST_CACHE)
    root = Path(tempfile.mkdtemp(prefix="ebt-", dir="/tmp"))
    root.chmod(0o755)
    try:
        prep = Paths(home=root / "prep", cache=shared).ensure()
        build_kernel(prep)
        build_runtime(prep)
        with cluster_world(root, cache=shared) as w:
            head, n2, n3 = w.nodes
            for node in w.nodes:
                node.cache = root / f"cache-{node.name}"
                node.cache.mkdir()
                node.cache.chmod(0o755)
                for heavy in ("kernels", "runtime"):
                    (node.cache / heavy).symlink_to(shared / heavy)
            try:
                head.ember("cluster", "start-head", "--redis", w.redis_address,
                           "--redis-password", w.redis_password, "--vcpus", "1",
                           "--memory-mib", "4096")
                for node, vcpus in ((n2, "1"), (n3, "4")):
                    node.ember("cluster", "join", f"{head.ip}:{DEFAULT_PORT}", "--vcpus",
                               vcpus, "--memory-mib", "4096")
                tree = root / "bb-tree"
                (tree / "bin").mkdir(parents=True)
                shutil.copy2("/bin/busybox", tree / "bin" / "busybox")
                os.symlink("busybox", tree / "bin" / "sh")
                n2.ember("image", "build", "bb", "--from", f"dir:{tree}", "--free-mib", "16")
                names = ["bb"]
                if args.debian:
                    register_debian(n2, shared)
                    names.append("debian-python")
                for name in names:
                    pulls, not_held, held_first, held = [], [], [], []
                    for _ in range(args.reps):
                        got = json.loads(n3.ember("cluster", "pull", name, "--json").stdout)
                        pulls.append(float(got["seconds"]))
                        forget(n3, name)
                        not_held.append(timed_create(n3, name))
                        n3.ember("image", "snapshot", "rm", name)
                        held_first.append(timed_create(n3, name))
                        held.append(timed_create(n3, name))
                        forget(n3, name)
                    store = Store(n2.paths.db)
                    t = store.get_template(name)
                    store.close()
                    data = Path(t.image_path).stat().st_blocks * 512
                    print(f"template {name} ({t.size_bytes >> 20} MiB image, "
                          f"{data >> 20} MiB of data), held by node 2 only")
                    print(f"  ember cluster pull on node 3:                       {med(pulls)}")
                    print(f"  create on node 3, template not held (pull + boot):  "
                          f"{med(not_held)}")
                    print(f"  create on node 3, held, no template snapshot yet:   "
                          f"{med(held_first)}")
                    print(f"  create on node 3, held, from its template snapshot: {med(held)}")
                    print(f"  ratio not held / held without snapshot: "
                          f"{statistics.median(not_held) / statistics.median(held_first):.2f}x")
            finally:
                for node in w.nodes:
                    node.ember("daemon", "stop", check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
