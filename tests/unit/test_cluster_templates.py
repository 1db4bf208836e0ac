"""Templates across the nodes of a cluster, without Ray or a VM: the holder's manifest and
the frames a file travels in (hostile ones included), who holds what in the directory,
the node a placement prefers, the digest of an ext4 image read with debugfs, and a whole
pull from a real holder daemon on loopback (served by uvicorn), a corrupt one included."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.cluster.directory import Directory, NodeEntry
from ember.cluster.templates import (
    holders_from_kv,
    parse_holders,
    preferred_node,
    sources,
    wanted_digest,
)
from ember.cluster.transfer import FRAME, FileEntry, FrameDecoder, Manifest, frames
from ember.errors import TemplateDigestError, TemplateTransferError
from ember.guest.digest import tree_digest
from ember.guest.ext4_digest import image_digest, parse_listing
from ember.paths import Paths

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
A, B, C = "a" * 56, "b" * 56, "c" * 56


def _manifest(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "py", "digest": D1, "source": "dir:/x", "size_bytes": 1 << 30,
        "config": {"oci": {}},
        "files": [{"name": "meta.json", "size": 400, "data_bytes": 400},
                  {"name": "rootfs.ext4", "size": 1 << 30, "data_bytes": 50 << 20}]}
    raw.update(over)
    return raw


# --- the manifest ---------------------------------------------------------------------------
def test_a_manifest_round_trips_and_is_checked_against_the_directory() -> None:
    m = Manifest.from_json(_manifest(), name="py", digest=D1)
    assert m.hex == "1" * 64 and m.data_bytes == 400 + (50 << 20)
    assert Manifest.from_json(m.to_json(), name="py") == m
    with pytest.raises(TemplateTransferError, match="not the one the directory names"):
        Manifest.from_json(_manifest(), name="py", digest=D2)
    with pytest.raises(TemplateTransferError, match="names"):
        Manifest.from_json(_manifest(), name="other")


@pytest.mark.parametrize("over", [
    {"digest": "sha256:xyz"}, {"digest": None}, {"source": 3}, {"config": []},
    {"files": []}, {"files": [{"name": "rootfs.ext4", "size": 1, "data_bytes": 1}]},
    {"files": [{"name": "rootfs.ext4", "size": 1 << 30, "data_bytes": 1},
               {"name": "meta.json", "size": 4, "data_bytes": 4}]},  # order
    {"files": [{"name": "meta.json", "size": 2 << 20, "data_bytes": 1},  # meta too big
               {"name": "rootfs.ext4", "size": 1 << 30, "data_bytes": 1}]},
    {"files": [{"name": "meta.json", "size": 4, "data_bytes": 5},  # data beyond the size
               {"name": "rootfs.ext4", "size": 1 << 30, "data_bytes": 1}]},
    {"files": [{"name": "meta.json", "size": True, "data_bytes": 1},
               {"name": "rootfs.ext4", "size": 1 << 30, "data_bytes": 1}]},
    {"files": [{"name": "meta.json", "size": 4, "data_bytes": 4},
               {"name": "rootfs.ext4", "size": 1 << 40, "data_bytes": 1}]},  # over the bound
    {"size_bytes": 5},
])
def test_hostile_manifests_are_refused(over: dict[str, Any]) -> None:
    with pytest.raises(TemplateTransferError):
        Manifest.from_json(_manifest(**over), name="py")


@settings(deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=12))
def test_any_json_is_a_manifest_or_a_typed_refusal(raw: Any) -> None:
    with contextlib.suppress(TemplateTransferError):
        Manifest.from_json(raw, name="py")


# --- the frames ---------------------------------------------------------------------------
def _sparse(path: Path) -> bytes:
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 5000)
        f.seek(6 << 20)
        f.write(os.urandom(70_000))
    return path.read_bytes()


def test_a_sparse_file_travels_without_its_holes(tmp_path: Path) -> None:
    src = tmp_path / "rootfs.ext4"
    content = _sparse(src)
    stream = b"".join(frames(src, chunk=4096))
    data = sum(n for _, n in _regions(stream))
    assert data < 1 << 20  # the holes did not travel
    entry = FileEntry("rootfs.ext4", len(content), data)
    out = bytearray(len(content))
    dec = FrameDecoder(entry)
    for i in range(0, len(stream), 777):  # any chunking
        for off, piece in dec.feed(stream[i:i + 777]):
            out[off:off + len(piece)] = piece
    dec.finish()
    assert bytes(out) == content


def _regions(stream: bytes) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < len(stream):
        off, n = FRAME.unpack_from(stream, pos)
        pos += FRAME.size + n
        if n:
            out.append((off, n))
    return out


def _frame(off: int, data: bytes) -> bytes:
    return FRAME.pack(off, len(data)) + data


@pytest.mark.parametrize(("stream", "why"), [
    (_frame(0, b"abc") + FRAME.pack(10, 0), "announced"),  # less data than announced
    (_frame(8, b"abcd") + _frame(0, b"abcd") + FRAME.pack(10, 0), "out of order"),
    (_frame(8, b"abcd"), "outside"),  # beyond the size
    (_frame(0, b"abcdef") + _frame(6, b"x"), "more data"),
    (FRAME.pack(0, 1 << 30), "a frame of"),
    (_frame(0, b"abcdef") + FRAME.pack(9, 0), "ends at 9"),
    (_frame(0, b"abcdef") + FRAME.pack(10, 0) + b"more", "after the end"),
])
def test_hostile_frames_are_refused(stream: bytes, why: str) -> None:
    dec = FrameDecoder(FileEntry("rootfs.ext4", 10, 6))
    with pytest.raises(TemplateTransferError, match=why):
        dec.feed(stream)
        dec.finish()


def test_a_stream_that_stops_short_is_refused() -> None:
    dec = FrameDecoder(FileEntry("rootfs.ext4", 10, 6))
    dec.feed(_frame(0, b"abc"))
    with pytest.raises(TemplateTransferError, match="stopped after 3 of 6"):
        dec.finish()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_frames_or_a_typed_refusal(stream: bytes) -> None:
    dec = FrameDecoder(FileEntry("rootfs.ext4", 1000, 100))
    try:
        for off, piece in dec.feed(stream):
            assert off >= 0 and off + len(piece) <= 1000
        dec.finish()
    except TemplateTransferError:
        pass


# --- who holds what ------------------------------------------------------------------------
def test_holders_from_the_directory_records() -> None:
    kv = {f"template/py/{A}".encode(): D1.encode(), f"template/py/{B}".encode(): D1.encode(),
          f"template/go/{C}".encode(): D2.encode(),
          b"template/py/": D1.encode(), b"template/BAD/x": D1.encode(),
          f"template/py/{C}".encode(): b"sha256:nothex", b"node/x": b"{}"}
    assert holders_from_kv(kv) == {"py": {A: D1, B: D1}, "go": {C: D2}}
    assert parse_holders({"py": {A: D1, "../x": D1, B: 3}, "Bad": {A: D1}, "go": []}) \
        == {"py": {A: D1}}
    assert parse_holders(None) == {}


def test_the_digest_to_fetch_is_the_one_most_nodes_hold() -> None:
    holders = {"py": {A: D1, B: D2, C: D2}}
    assert wanted_digest(holders, "py", A) == D2
    assert wanted_digest(holders, "py", B) == D2  # its own copy does not count
    assert wanted_digest({"py": {A: D1, B: D2}}, "py", C) == D2  # a tie: every node the same
    assert wanted_digest(holders, "go", A) is None
    assert wanted_digest({"py": {A: D1}}, "py", A) is None


def test_sources_are_live_holders_with_a_daemon() -> None:
    directory = Directory(nodes={A: NodeEntry(A, "10.0.0.1", True, "10.0.0.1:7707"),
                                 B: NodeEntry(B, "10.0.0.2", False, "10.0.0.2:7707"),
                                 C: NodeEntry(C, "10.0.0.3", True, None)})
    holders = {"py": {A: D1, B: D1, C: D1}}
    assert [n.node_id for n in sources(directory, holders, "py", D1, "me")] == [A]
    assert sources(directory, holders, "py", D2, "me") == []
    assert sources(directory, holders, "py", D1, A) == []


def test_a_placement_prefers_the_asker_then_a_live_holder() -> None:
    assert preferred_node(A, {A: D1, B: D1}, [A, B]) == A
    assert preferred_node(C, {A: D1, B: D1}, [A, B, C]) in (A, B)
    assert preferred_node(C, {A: D1}, [C]) == C  # its holder is dead: the asker fetches it
    assert preferred_node(C, {}, [A, B, C]) == C
    assert preferred_node(None, {B: D1}, [B]) == B


# --- the digest of an ext4 image -------------------------------------------------------------
def test_a_listing_parses_and_a_broken_one_is_refused() -> None:
    text = ("debugfs: ls -p <2>\n/2/040755/0/0/.//\n/2/040755/0/0/..//\n"
            "/12/100644/1000/1000/a b/3/\n/13/120777/0/0/l/7/\n\n"
            "debugfs: ls -p <12>\n")
    got = parse_listing(text)
    assert [(e.name, e.mode, e.uid) for e in got[2]] == [("a b", 0o100644, 1000),
                                                         ("l", 0o120777, 0)]
    assert got[12] == []
    with pytest.raises(TemplateDigestError):
        parse_listing("debugfs: ls -p <2>\n/2/040755/0/0/a\nb//\n")
    with pytest.raises(TemplateDigestError):  # a crafted name with "/": refused before rdump
        parse_listing("debugfs: ls -p <2>\n/12/100644/0/0/../../etc/passwd/3/\n")


def _tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"\x7fELF" + os.urandom(20_000))
    (root / "bin" / "tool").chmod(0o4755)
    os.symlink("tool", root / "bin" / "link")
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "home" / "u").mkdir(parents=True)
    (root / "home" / "u" / "f").write_text("hello")
    os.chown(root / "home" / "u" / "f", 1000, 1000)
    os.mkfifo(root / "home" / "fifo")
    (root / "empty").mkdir()
    return root


def _ext4(tree: Path, out: Path) -> Path:
    with open(out, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-d", str(tree), str(out)],
                   check=True, capture_output=True, timeout=60)
    return out


needs_e2fs = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("debugfs") or not shutil.which("mkfs.ext4"),
    reason="needs root (owners) and e2fsprogs")


@needs_e2fs
def test_the_digest_read_from_an_image_is_the_trees(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    img = _ext4(tree, tmp_path / "rootfs.ext4")
    work = tmp_path / "work"
    work.mkdir()
    assert image_digest(img, work) == tree_digest(tree)


@needs_e2fs
def test_an_altered_image_has_another_digest(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    img = _ext4(tree, tmp_path / "rootfs.ext4")
    _alter(img, "/home/u/f")
    work = tmp_path / "work"
    work.mkdir()
    assert image_digest(img, work) != tree_digest(tree)


def _alter(img: Path, inside: str) -> None:
    """Flip the first byte of the file ``inside`` the image, where it lies on disk."""
    out = subprocess.run(["debugfs", "-R", f"bmap {inside} 0", str(img)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    stats = subprocess.run(["debugfs", "-R", "stats", str(img)], check=True,
                           capture_output=True, text=True, timeout=60).stdout
    block_size = int(next(ln.split(":")[1] for ln in stats.splitlines()
                          if ln.startswith("Block size:")))
    with open(img, "r+b") as f:
        f.seek(int(out.strip()) * block_size)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


# --- a whole pull, from a real holder daemon on loopback ---------------------------------
@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Paths, str]]:
    """A daemon app (no lifespan) on 127.0.0.1 holding template ``t`` (an ext4 image made
    here), with a cluster secret; answers its paths and ``ip:port``."""
    import uvicorn

    from ember.cluster.record import save_secret
    from ember.daemon.app import create_app
    from ember.store import Store, TemplateRecord

    paths = Paths(home=tmp_path / "holder", cache=tmp_path / "hcache",
                  ram=tmp_path / "hram").ensure()
    save_secret(paths, "s3cret")
    tree = _tree(tmp_path / "htree")
    digest = tree_digest(tree)
    image = paths.images / digest.split(":")[1]
    image.mkdir(parents=True)
    _ext4(tree, image / "rootfs.ext4")
    (image / "meta.json").write_text(json.dumps({
        "digest": digest, "source": "dir:x", "image_path": str(image / "rootfs.ext4")}))
    store = Store(paths.db)
    store.put_template(TemplateRecord(name="t", source="dir:x", digest=digest,
                                      image_path=str(image / "rootfs.ext4"),
                                      size_bytes=32 << 20, created_at=time.time(),
                                      config={"oci": {}, "memory_mib": 300}))
    store.close()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(paths), lifespan="off",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield paths, f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _puller(tmp_path: Path) -> tuple[Paths, Any]:
    from ember.cluster.record import ClusterRecord, save_secret
    from ember.store import Store

    paths = Paths(home=tmp_path / "puller", cache=tmp_path / "pcache",
                  ram=tmp_path / "pram").ensure()
    save_secret(paths, "s3cret")
    rec = ClusterRecord(address="127.0.0.1:1", role="worker", node_ip="127.0.0.1",
                        node_id=A, daemon="127.0.0.1:9")
    return paths, (Store(paths.db), rec)


@needs_e2fs
def test_a_template_is_pulled_checked_and_registered(
        holder: tuple[Paths, str], tmp_path: Path) -> None:
    from ember.daemon import cluster_templates as ct
    from ember.store import Store

    hpaths, address = holder
    hstore = Store(hpaths.db)
    digest = hstore.get_template("t").digest
    hstore.close()
    paths, (store, rec) = _puller(tmp_path)
    node = NodeEntry(B, "127.0.0.1", True, address)
    said: list[str] = []
    got = ct._pull_from(paths, store, rec, node, "s3cret", "t", digest, False, said.append,
                        time.monotonic() + 120)
    assert got.digest == digest and got.config["memory_mib"] == 300
    assert got.config["pulled_from"] == B
    local = paths.images / digest.split(":")[1]
    assert store.get_template("t").image_path == str(local / "rootfs.ext4")
    assert json.loads((local / "meta.json").read_text())["image_path"] == \
        str(local / "rootfs.ext4")
    work = tmp_path / "w"
    work.mkdir()
    assert image_digest(local / "rootfs.ext4", work) == digest
    assert (local / "rootfs.ext4").stat().st_blocks * 512 < 32 << 20  # still sparse
    assert any("checking the image's digest" in s for s in said)
    assert not list(paths.cache_tmp.glob("pull-stage-*"))
    # A wrong vouch (another cluster's secret) is 401; a tenant's key cannot pull.
    import httpx

    r = httpx.get(f"http://{address}/v1/cluster/templates/t/manifest",
                  headers=ct._headers("other", "/v1/cluster/templates/t/manifest", rec))
    assert r.status_code == 401


@needs_e2fs
def test_a_corrupt_holder_is_refused_and_nothing_is_kept(
        holder: tuple[Paths, str], tmp_path: Path) -> None:
    from ember.daemon import cluster_templates as ct
    from ember.errors import TemplateNotFoundError
    from ember.store import Store

    hpaths, address = holder
    hstore = Store(hpaths.db)
    t = hstore.get_template("t")
    hstore.close()
    _alter(Path(t.image_path), "/bin/tool")  # after registration
    paths, (store, rec) = _puller(tmp_path)
    node = NodeEntry(B, "127.0.0.1", True, address)
    with pytest.raises(TemplateDigestError, match="refused, nothing kept"):
        ct._pull_from(paths, store, rec, node, "s3cret", "t", t.digest, False, None,
                      time.monotonic() + 120)
    with pytest.raises(TemplateNotFoundError):
        store.get_template("t")
    assert not (paths.images / t.digest.split(":")[1]).exists()
    assert not list(paths.cache_tmp.glob("pull-stage-*"))


def test_a_dead_pulls_staging_is_swept(tmp_path: Path) -> None:
    from ember.daemon import cluster_templates as ct
    from ember.locks import FileLock

    paths = Paths(home=tmp_path / "h", cache=tmp_path / "c", ram=tmp_path / "r").ensure()
    dead = paths.cache_tmp / "pull-stage-dead"
    (dead / "image").mkdir(parents=True)
    live = paths.cache_tmp / "pull-stage-live"
    live.mkdir()
    lock = FileLock(live / ".lock")
    assert lock.try_acquire()  # flocks are per open file: this one is "another pull"
    assert ct.sweep_stale(paths) == ["pull-stage-dead"]
    assert live.exists() and not dead.exists()
    lock.release()


@needs_e2fs
def test_concurrent_pulls_of_one_template_transfer_it_once(
        holder: tuple[Paths, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two creates that need the same template at once: one pulls, the other waits for it
    and uses what it registered (the directory read, Ray's part, is the faked edge)."""
    from concurrent.futures import ThreadPoolExecutor

    from ember.daemon import cluster_templates as ct
    from ember.store import Store

    hpaths, address = holder
    hstore = Store(hpaths.db)
    digest = hstore.get_template("t").digest
    hstore.close()
    paths, (store, rec) = _puller(tmp_path)
    store.close()
    directory = Directory(nodes={B: NodeEntry(B, "127.0.0.1", True, address)})
    monkeypatch.setattr(ct, "read_cluster", lambda address: (directory, {"t": {B: digest}}))
    monkeypatch.setattr(ct, "publish", lambda paths, store: None)
    fetched: list[str] = []
    real_fetch = ct._fetch

    def counting(*args: Any) -> None:
        fetched.append(args[5].name)
        real_fetch(*args)

    monkeypatch.setattr(ct, "_fetch", counting)

    def one(_: int) -> str:
        s = Store(paths.db)
        try:
            return ct.pull(paths, s, rec, "t").digest
        finally:
            s.close()

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(one, range(2))) == [digest, digest]
    assert sorted(fetched) == ["meta.json", "rootfs.ext4"]  # once each
