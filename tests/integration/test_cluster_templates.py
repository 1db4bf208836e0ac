"""Templates across the nodes of a cluster: a template built on one node after it joined
is created through another node and runs on a node that did not hold it, which fetched it
from the holder (daemon to daemon), checked its digest and registered it; an explicit
``ember cluster pull``; a holder whose image was altered after registration is refused
with the typed error and nothing is kept; a pull killed midway registers nothing and the
daemon's next start sweeps its staging. Three nodes in namespaces (cluster_world), each
a real daemon with real guests; each node has a cache of its own for images (the kernel
and the guest runtime are the shared test cache's), so that a pull has something to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember import Sandbox
from ember.cluster.node import DEFAULT_DAEMON_PORT, DEFAULT_PORT
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


@pytest.fixture(scope="module")
def world() -> Iterator[ClusterWorld]:
    pytest.importorskip("ray", reason="the cluster extra is not installed")
    from ember.guest.kernel import build_kernel
    from ember.guest.runtime_bundle import build_runtime

    shared = Path(os.environ.get("EMBER_CACHE") or DEFAULT_TEST_CACHE)
    root = Path(tempfile.mkdtemp(prefix="ect-", dir="/tmp"))
    root.chmod(0o755)  # the jailed VMs read their images in the nodes' caches
    prep = Paths(home=root / "prep", cache=shared).ensure()
    build_kernel(prep)  # cache hits: what every node's cache links to
    build_runtime(prep)
    with checked_world(root, cache=shared) as w:
        for node in w.nodes:  # images of its own; the kernel and runtime shared
            node.cache = root / f"cache-{node.name}"
            node.cache.mkdir()
            node.cache.chmod(0o755)
            for heavy in ("kernels", "runtime"):
                (node.cache / heavy).symlink_to(shared / heavy)
        yield w


def _url(node: Node) -> str:
    return f"unix://{node.paths.daemon_socket}"


def _templates(node: Node) -> dict[str, Any]:
    store = Store(node.paths.db)
    try:
        return {t.name: t for t in store.list_templates()}
    finally:
        store.close()


def _where(world: ClusterWorld, sandbox_id: str) -> list[Node]:
    out = []
    for n in world.nodes:
        store = Store(n.paths.db)
        try:
            if sandbox_id in {r.id for r in store.list_sandboxes()}:
                out.append(n)
        finally:
            store.close()
    return out


def _busybox_tree(root: Path, extra: str | None = None) -> Path:
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    if extra:
        (root / "etc").mkdir()
        (root / "etc" / "motd").write_text(extra)
    return root


def _build(node: Node, name: str, tree: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(node.ember(
        "image", "build", name, "--from", f"dir:{tree}", "--free-mib", "16", "--json").stdout)
    return out


def _alter(img: Path, inside: str) -> None:
    """Flip one byte of file ``inside`` the ext4 image, where it lies on disk."""
    block = subprocess.run(["debugfs", "-R", f"bmap {inside} 0", str(img)], check=True,
                           capture_output=True, text=True, timeout=60).stdout.strip()
    stats = subprocess.run(["debugfs", "-R", "stats", str(img)], check=True,
                           capture_output=True, text=True, timeout=60).stdout
    size = int(next(ln.split(":")[1] for ln in stats.splitlines()
                    if ln.startswith("Block size:")))
    img.chmod(0o644)
    with open(img, "r+b") as f:
        f.seek(int(block) * size + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_template_built_on_one_node_is_created_on_another(world: ClusterWorld) -> None:
    n1, n2, n3 = world.nodes
    world.start_head()
    # n2 will hold the template but has no room for a 2-vCPU sandbox: Ray's soft
    # preference for the holder gives way, and the node it picks fetches the template.
    n2.ember("cluster", "join", f"{n1.ip}:{DEFAULT_PORT}", "--vcpus", "1",
             "--memory-mib", "2048")
    n3.ember("cluster", "join", f"{n1.ip}:{DEFAULT_PORT}", "--vcpus", "2",
             "--memory-mib", "2048")
    # Built on n2 after it joined: the directory says so at once (no rejoin).
    built = _build(n2, "bb", _busybox_tree(world.root / "bb-tree"))
    assert "bb" not in _templates(n1) and "bb" not in _templates(n3)

    t0 = time.monotonic()
    sb = Sandbox.create("bb", url=_url(n1), vcpus=2, timeout=600)
    took = time.monotonic() - t0
    [chosen] = _where(world, sb.id)
    assert chosen in (n1, n3), chosen.name
    print(f"\ncreate through n1 of a template only n2 held, placed on {chosen.name} "
          f"(pulled, checked, first boot): {took:.1f} s")
    pulled = _templates(chosen)["bb"]
    assert pulled.digest == built["digest"]
    assert pulled.config["pulled_from"] == json.loads(
        (n2.home / "cluster.json").read_text())["node_id"]
    assert Path(pulled.image_path).is_relative_to(chosen.cache / "images")
    assert not list((chosen.cache / "tmp").glob("pull-stage-*"))
    there = Sandbox.connect(sb.id, url=_url(chosen))
    assert there.exec(["busybox", "echo", "pulled"]).stdout == "pulled\n"
    there.close()
    Sandbox.kill(sb.id, url=_url(n1))

    # The explicit command on the node that still lacks it.
    other = n3 if chosen is n1 else n1
    got = json.loads(other.ember("cluster", "pull", "bb", "--json").stdout)
    print(f"ember cluster pull bb on {other.name}: {got['seconds']:.2f} s")
    assert got["digest"] == built["digest"] and "bb" in _templates(other)
    again = json.loads(other.ember("cluster", "pull", "bb", "--json").stdout)
    assert again["digest"] == built["digest"]  # held already: nothing to do

    # A holder whose image was altered after registration: refused, typed, nothing kept.
    bad = _build(n2, "bb-bad", _busybox_tree(world.root / "bad-tree", extra="hello\n"))
    hexd = bad["digest"].split(":")[1]
    _alter(n2.cache / "images" / hexd / "rootfs.ext4", "/bin/busybox")
    failed = other.ember("cluster", "pull", "bb-bad", "--json", check=False)
    print(f"pull of an altered template: exit {failed.returncode}: {failed.stderr.strip()}")
    assert failed.returncode == 1
    assert "TemplateDigestError" in failed.stderr and "nothing kept" in failed.stderr
    assert "bb-bad" not in _templates(other)
    assert not (other.cache / "images" / hexd).exists()
    assert not list((other.cache / "tmp").glob("pull-stage-*"))

    # A pull killed midway (its daemon SIGKILLed while it writes its staging): nothing is
    # registered, and the daemon's next start sweeps what it left.
    big_tree = _busybox_tree(world.root / "big-tree")
    (big_tree / "blob").write_bytes(os.urandom(96 << 20))
    big = _build(n2, "bb-big", big_tree)
    staging = other.cache / "tmp"
    puller = threading.Thread(target=other.ember, args=("cluster", "pull", "bb-big"),
                              kwargs={"check": False}, daemon=True)
    puller.start()
    wait_for("the pull's staging", lambda: list(staging.glob("pull-stage-*")), 120, 0.01)
    daemon_pid = other.run("cat", str(other.paths.daemon_lock)).stdout.split()[0]
    other.run("kill", "-9", daemon_pid)
    puller.join(120)
    assert list(staging.glob("pull-stage-*")), "the killed pull left no staging to sweep"
    assert "bb-big" not in _templates(other)
    other.ember("daemon", "start", "--listen", f"{other.ip}:{DEFAULT_DAEMON_PORT}")
    wait_for("the staging swept at the daemon's start",
             lambda: not list(staging.glob("pull-stage-*")), 60, 0.5)
    assert "bb-big" not in _templates(other)
    assert not (other.cache / "images" / big["digest"].split(":")[1]).exists()
