"""apply_layer: OCI layer semantics, metadata, and every way a layer might try to escape."""

from __future__ import annotations

import bz2
import contextlib
import errno
import hashlib
import io
import lzma
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.errors import BuildError, ImageSourceError, UnsafeLayerError
from ember.guest.oci import apply_layer
from ember.guest.oci.compression import ZSTD_MAGIC
from tests.oci_fixtures import (
    MTIME,
    Entry,
    chardev,
    directory,
    fifo,
    file,
    gz,
    hardlink,
    opaque,
    symlink,
    tar_bytes,
    whiteout,
)


@dataclass
class Box:
    """A root at tmp/a/b/rootfs next to tmp/outside/sentinel, which layers must not touch."""

    tmp: Path
    root: Path
    outside: Path
    count: int = 0

    def apply(self, entries: Sequence[Entry], *, compress: bool = True) -> None:
        self.count += 1
        path = self.tmp / "layers" / f"{self.count}.tar"
        raw = tar_bytes(entries)
        path.write_bytes(gz(raw) if compress else raw)
        apply_layer(path, self.root)

    def apply_bytes(self, data: bytes) -> None:
        self.count += 1
        path = self.tmp / "layers" / f"{self.count}.bin"
        path.write_bytes(data)
        apply_layer(path, self.root)

    def outside_snapshot(self) -> dict[str, tuple[int, int, str]]:
        """Everything under tmp except the root and the layer files: mode, links, content."""
        snap: dict[str, tuple[int, int, str]] = {}
        for dirpath, dirs, files in os.walk(self.tmp):
            here = Path(dirpath)
            if here in (self.root, self.tmp / "layers"):
                dirs[:] = []
                continue
            for name in (*dirs, *files):
                p = here / name
                if p in (self.root, self.tmp / "layers"):
                    snap[str(p)] = (0, 0, "skipped")
                    continue
                s = p.lstat()
                body = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
                snap[str(p)] = (s.st_mode, s.st_nlink, body)
        return snap


def make_box(tmp: Path) -> Box:
    root = tmp / "a" / "b" / "rootfs"
    root.mkdir(parents=True)
    (tmp / "layers").mkdir()
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("untouched")
    return Box(tmp, root, outside)


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return make_box(tmp_path)


def passwd_state() -> tuple[int, str]:
    p = Path("/etc/passwd")
    return p.stat().st_nlink, hashlib.sha256(p.read_bytes()).hexdigest()


# --- plain content ---------------------------------------------------------------------------
def test_files_dirs_modes_owners_and_mtimes(box: Box) -> None:
    box.apply(
        [
            directory("etc", mode=0o755),
            directory("home/user", mode=0o700, uid=1000, gid=1001, mtime=MTIME - 50),
            file("home/user/notes", b"hello", mode=0o640, uid=1000, gid=1001),
            file("usr/bin/su", b"\x7fELF", mode=0o4755),
            file("usr/bin/wall", b"\x7fELF", mode=0o2755, gid=5),
            directory("tmp", mode=0o1777),
            file("empty"),
        ]
    )
    r = box.root
    assert (r / "home/user/notes").read_bytes() == b"hello"
    s = (r / "home/user/notes").stat()
    assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime) == (0o640, 1000, 1001, MTIME)
    home = (r / "home/user").stat()
    assert (stat.S_IMODE(home.st_mode), home.st_uid, home.st_gid) == (0o700, 1000, 1001)
    assert home.st_mtime == MTIME - 50  # set after its children were written
    assert stat.S_IMODE((r / "usr/bin/su").stat().st_mode) == 0o4755
    wall = (r / "usr/bin/wall").stat()
    assert (stat.S_IMODE(wall.st_mode), wall.st_gid) == (0o2755, 5)
    assert stat.S_IMODE((r / "tmp").stat().st_mode) == 0o1777
    assert (r / "usr").is_dir()  # implicit parent
    assert (r / "empty").stat().st_size == 0
    assert (r / "empty").read_bytes() == b""


@pytest.mark.parametrize("codec", ["none", "gzip", "xz", "bzip2"])
def test_compression_is_detected_by_magic_not_name(box: Box, codec: str) -> None:
    raw = tar_bytes([file("hello", b"world")])
    data = {"none": raw, "gzip": gz(raw), "xz": lzma.compress(raw), "bzip2": bz2.compress(raw)}[
        codec
    ]
    misleading = box.tmp / "layers" / ("layer.tar.gz" if codec == "none" else "layer.tar")
    misleading.write_bytes(data)
    apply_layer(misleading, box.root)
    assert (box.root / "hello").read_bytes() == b"world"


def test_zstd_layer_without_a_decoder_is_a_clear_error(box: Box) -> None:
    try:
        import compression.zstd  # type: ignore[import-not-found]  # noqa: F401

        pytest.skip("this Python can decode zstd")
    except ImportError:
        pass
    with contextlib.suppress(ImportError):
        import zstandard  # type: ignore[import-not-found]  # noqa: F401

        pytest.skip("zstandard is installed")
    with pytest.raises(ImageSourceError, match="zstd"):
        box.apply_bytes(ZSTD_MAGIC + b"\x00" * 64)


def test_later_layers_replace_earlier_entries(box: Box) -> None:
    box.apply(
        [directory("d"), file("d/inner", b"1"), file("f", b"file"), symlink("link", "/nowhere")]
    )
    box.apply([file("d", b"now a file"), directory("f"), file("link", b"regular")])
    assert (box.root / "d").read_bytes() == b"now a file"
    assert (box.root / "f").is_dir()
    assert not (box.root / "link").is_symlink()
    assert (box.root / "link").read_bytes() == b"regular"


def test_existing_directory_is_kept_when_layer_has_it_again(box: Box) -> None:
    box.apply([directory("etc"), file("etc/a", b"a")])
    box.apply([directory("etc", mode=0o750), file("etc/b", b"b")])
    assert sorted(os.listdir(box.root / "etc")) == ["a", "b"]
    assert stat.S_IMODE((box.root / "etc").stat().st_mode) == 0o750


def test_fifo_is_allowed(box: Box) -> None:
    box.apply([fifo("run/pipe", mode=0o620)])
    s = (box.root / "run/pipe").lstat()
    assert stat.S_ISFIFO(s.st_mode)
    assert stat.S_IMODE(s.st_mode) == 0o620


def test_user_xattrs_are_kept(box: Box) -> None:
    probe = box.root / "probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError as err:
        pytest.skip(f"no user xattrs here: {err}")
    probe.unlink()
    box.apply(
        [file("f", b"x", pax={"SCHILY.xattr.user.note": "hi", "SCHILY.xattr.trusted.evil": "no"})]
    )
    assert os.getxattr(box.root / "f", "user.note") == b"hi"
    assert "trusted.evil" not in os.listxattr(box.root / "f")


# --- whiteouts ---------------------------------------------------------------------------------
def test_whiteout_deletes_lower_file_and_directory(box: Box) -> None:
    box.apply([file("etc/keep", b"k"), file("etc/gone", b"g"), file("var/cache/x/y", b"y")])
    box.apply([whiteout("etc/gone"), whiteout("var/cache/x"), whiteout("no/such/thing")])
    assert (box.root / "etc/keep").exists()
    assert not (box.root / "etc/gone").exists()
    assert not (box.root / "var/cache/x").exists()
    assert not (box.root / "no").exists()  # a whiteout creates nothing
    assert not any(n.startswith(".wh.") for _d, ds, fs in os.walk(box.root) for n in ds + fs)


def test_whiteout_spares_an_entry_of_the_same_layer(box: Box) -> None:
    box.apply([file("a", b"lower")])
    box.apply([file("a", b"same layer"), whiteout("a")])
    assert (box.root / "a").read_bytes() == b"same layer"


def test_whiteout_removes_a_symlink_not_its_target(box: Box) -> None:
    box.apply([file("target", b"t"), symlink("link", "target")])
    box.apply([whiteout("link")])
    assert not (box.root / "link").is_symlink()
    assert (box.root / "target").read_bytes() == b"t"


def test_opaque_directory_hides_lower_content_only(box: Box) -> None:
    box.apply([file("opt/dir/old", b"o"), file("opt/dir/sub/old", b"o"), file("opt/other", b"x")])
    box.apply(
        [
            file("opt/dir/early", b"same layer, before the marker"),
            file("opt/dir/sub/new", b"n"),
            directory("opt/dir"),
            opaque("opt/dir"),
            file("opt/dir/late", b"same layer, after the marker"),
        ]
    )
    d = box.root / "opt/dir"
    assert sorted(os.listdir(d)) == ["early", "late", "sub"]
    assert sorted(os.listdir(d / "sub")) == ["new"]
    assert (box.root / "opt/other").exists()


# --- links -------------------------------------------------------------------------------------
def test_hardlinks_share_the_inode(box: Box) -> None:
    box.apply(
        [
            file("bin/busybox", b"bb", mode=0o755),
            hardlink("bin/sh", "bin/busybox"),
            hardlink("bin/ls", "./bin/busybox"),
        ]
    )
    box.apply([hardlink("usr/bin/sh", "bin/busybox")])  # to a lower layer's file
    ino = (box.root / "bin/busybox").stat().st_ino
    for p in ("bin/sh", "bin/ls", "usr/bin/sh"):
        assert (box.root / p).stat().st_ino == ino
    assert (box.root / "bin/busybox").stat().st_nlink == 4


def test_symlink_targets_are_kept_as_text(box: Box) -> None:
    box.apply(
        [
            symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
            symlink("etc/up", "../../../../.."),
            symlink("dangling", "nowhere", uid=7),
        ]
    )
    assert os.readlink(box.root / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert os.readlink(box.root / "etc/up") == "../../../../.."
    assert (box.root / "dangling").lstat().st_uid == 7


def test_relative_symlink_inside_the_root_is_followed(box: Box) -> None:
    box.apply([directory("usr/bin"), symlink("bin", "usr/bin"), symlink("lib", "./usr/../usr")])
    box.apply([file("bin/tool", b"t"), file("lib/x", b"x")])
    assert (box.root / "usr/bin/tool").read_bytes() == b"t"
    assert (box.root / "usr/x").read_bytes() == b"x"
    assert os.readlink(box.root / "bin") == "usr/bin"


def test_writing_over_a_symlink_replaces_it(box: Box) -> None:
    box.apply([symlink("f", str(box.outside / "sentinel"))])
    box.apply([file("f", b"mine")])
    assert (box.root / "f").read_bytes() == b"mine"
    assert (box.outside / "sentinel").read_text() == "untouched"


# --- escapes -----------------------------------------------------------------------------------
def _escapes(box: Box) -> dict[str, list[list[Entry]]]:
    out_rel = str(box.outside).lstrip("/")  # "/" + this is the sentinel dir on the host
    return {
        "dotdot": [[file("../../../outside/pwned", b"x")]],
        "dotdot-inside": [[file("a/../../../../outside/pwned", b"x")]],
        "absolute": [[file(str(box.outside / "pwned"), b"x")]],
        "absolute-dir": [[directory(str(box.outside / "newdir"))]],
        "symlink-to-root-then-write": [[symlink("evil", "/"), file(f"evil/{out_rel}/pwned", b"x")]],
        "symlink-to-root-then-dir": [[symlink("evil", "/"), directory(f"evil/{out_rel}/newdir")]],
        "symlink-up-then-write": [[symlink("evil", "../../.."), file("evil/outside/pwned", b"x")]],
        "symlink-up-in-later-layer": [
            [symlink("evil", "../../../outside")],
            [file("evil/pwned", b"x")],
        ],
        "symlink-chain": [
            [symlink("s1", "s2"), symlink("s2", "d/../.."), directory("d"), file("s1/x", b"x")]
        ],
        "symlink-loop": [[symlink("l1", "l2"), symlink("l2", "l1"), file("l1/x", b"x")]],
        "absolute-symlink-to-sentinel-dir": [
            [symlink("evil", str(box.outside)), file("evil/pwned", b"x")]
        ],
        "whiteout-through-symlink": [[symlink("evil", "/"), whiteout(f"evil/{out_rel}/sentinel")]],
        "opaque-through-symlink": [[symlink("evil", "../../../outside"), opaque("evil")]],
        "hardlink-dotdot": [[hardlink("x", "../../../outside/sentinel")]],
        "hardlink-absolute": [[hardlink("passwd", "/etc/passwd")]],
        "hardlink-through-symlink": [
            [symlink("evil", "../../../outside"), hardlink("x", "evil/sentinel")]
        ],
        "hardlink-to-missing": [[hardlink("x", "not/yet/there")]],
        "hardlink-before-target": [[hardlink("x", "later"), file("later", b"l")]],
        "hardlink-to-directory": [[directory("d"), hardlink("x", "d")]],
    }


ESCAPES = sorted(_escapes(Box(Path("/t"), Path("/t/a/b/rootfs"), Path("/t/outside"))))


@pytest.mark.parametrize("case", ESCAPES)
def test_escape_attempts_raise_and_write_nothing_outside(box: Box, case: str) -> None:
    layers = _escapes(box)[case]
    before, pw = box.outside_snapshot(), passwd_state()
    with pytest.raises(UnsafeLayerError):
        for entries in layers:
            box.apply(entries)
    assert box.outside_snapshot() == before
    assert passwd_state() == pw
    assert (box.outside / "sentinel").read_text() == "untouched"


def test_unsafe_error_names_the_entry(box: Box) -> None:
    with pytest.raises(UnsafeLayerError, match=r"\.\./escape"):
        box.apply([file("ok", b""), file("../escape", b"x")])


@pytest.mark.parametrize("make", [chardev, lambda n: Entry(n, "blockdev", mode=0o660)])
def test_device_nodes_are_refused(box: Box, make: object) -> None:
    assert callable(make)
    with pytest.raises(UnsafeLayerError, match="device node in layer: dev/null"):
        box.apply([directory("dev"), make("dev/null")])
    assert not (box.root / "dev/null").exists()


# --- broken archives ---------------------------------------------------------------------------
def _big_tar() -> bytes:
    return tar_bytes([file("a", os.urandom(50_000)), file("b", b"b" * 10_000)])


def test_tar_truncated_inside_file_data(box: Box) -> None:
    with pytest.raises(ImageSourceError, match="corrupt or truncated layer"):
        box.apply_bytes(_big_tar()[:30_000])


def test_tar_truncated_at_a_header_boundary(box: Box) -> None:
    raw = tar_bytes([file("a", b"x" * 512)])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        end = tf.getmember("a").offset_data + 512
    body = raw[:end]  # headers and data, but no end-of-archive marker
    with pytest.raises(ImageSourceError, match="corrupt or truncated layer"):
        box.apply_bytes(body)


def test_tar_with_a_bad_header_in_the_middle(box: Box) -> None:
    raw = bytearray(tar_bytes([file("a", b"x" * 512), file("b", b"y")]))
    second = raw.index(b"b\0", 1024)  # name field of a later header
    raw[second + 148 : second + 156] = b"9999999\0"  # wrong checksum
    with pytest.raises(ImageSourceError, match="corrupt or truncated layer"):
        box.apply_bytes(bytes(raw))


def test_corrupt_gzip(box: Box) -> None:
    data = bytearray(gz(_big_tar()))
    for i in range(100, 200):
        data[i] ^= 0xFF
    with pytest.raises(ImageSourceError, match="corrupt or truncated layer"):
        box.apply_bytes(bytes(data))


def test_truncated_gzip(box: Box) -> None:
    with pytest.raises(ImageSourceError, match="corrupt or truncated layer"):
        box.apply_bytes(gz(_big_tar())[:-100])


@pytest.mark.parametrize("data", [b"", b"\0" * 10, b"not a tar at all" * 100])
def test_garbage_is_not_a_layer(box: Box, data: bytes) -> None:
    with pytest.raises(ImageSourceError, match="corrupt or truncated layer"):
        box.apply_bytes(data)


def test_empty_layer_is_fine(box: Box) -> None:
    box.apply([])
    assert os.listdir(box.root) == []


@contextlib.contextmanager
def tiny_tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_disk_full_is_a_build_error(box: Box) -> None:
    with tiny_tmpfs(box.tmp / "small") as small:
        (small / "root").mkdir()
        layer = box.tmp / "layers" / "big.tar"
        layer.write_bytes(gz(tar_bytes([file("big", os.urandom(1 << 20))])))
        with pytest.raises(BuildError, match="disk is full") as info:
            apply_layer(layer, small / "root")
        assert not isinstance(info.value, ImageSourceError)
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.ENOSPC


# --- property: whatever the names, nothing lands outside ------------------------------------
_COMPONENTS = ["a", "b", "evil", "..", ".", "", "x", ".wh.a", ".wh..wh..opq"]
_TARGETS = [
    "/",
    "..",
    "../..",
    "../../..",
    "a",
    "a/b",
    "evil/x",
    "/etc",
    "/etc/passwd",
    "../../../outside",
    "../../../outside/sentinel",
    "x",
]


@st.composite
def _entries(draw: st.DrawFn) -> list[Entry]:
    out: list[Entry] = []
    for _ in range(draw(st.integers(1, 8))):
        parts = draw(st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=4))
        name = ("/" if draw(st.booleans()) and draw(st.booleans()) else "") + "/".join(parts)
        kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo"]))
        out.append(
            Entry(name, kind, data=b"payload", target=draw(st.sampled_from(_TARGETS)), mode=0o755)
        )
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(_entries(), min_size=1, max_size=3))
def test_random_layers_never_write_outside_the_root(layers: list[list[Entry]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        b = make_box(Path(tmp))
        before, pw = b.outside_snapshot(), passwd_state()
        for entries in layers:
            # Refusing (UnsafeLayerError is an ImageSourceError) is fine; escaping is not.
            with contextlib.suppress(ImageSourceError):
                b.apply(entries, compress=False)
        assert b.outside_snapshot() == before
        assert passwd_state() == pw
        for dirpath, dirs, files in os.walk(b.root):
            for n in (*dirs, *files):
                real = os.path.realpath(os.path.join(dirpath, n))
                p = Path(dirpath, n)
                if not p.is_symlink():
                    assert real.startswith(str(b.root) + "/")
