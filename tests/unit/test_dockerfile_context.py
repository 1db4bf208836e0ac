"""A Dockerfile's build context: .dockerignore, COPY sources, symlinks, bounds, digest, tar."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from ember.errors import DockerfileError
from ember.guest.dockerfile_context import Context, ContextError, Ignore


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "m.py").write_text("x = 1\n")
    (root / "src" / "top.py").write_text("import pkg\n")
    (root / "a1.txt").write_text("a1")
    (root / "a2.txt").write_text("a2")
    (root / "b.txt").write_text("b")
    (root / "secret.env").write_text("TOKEN=1")
    (root / "build").mkdir()
    (root / "build" / "out.o").write_text("obj")
    (root / ".dockerignore").write_text("# comment\n*.env\nbuild\n**/*.pyc\n!keep.pyc\n")
    (root / "src" / "pkg" / "m.pyc").write_text("cached")
    (root / "keep.pyc").write_text("kept")
    os.symlink("a1.txt", root / "inside-link")
    return root


def test_dockerignore_rules() -> None:
    ig = Ignore(["*.env", "build", "**/*.pyc", "!keep.pyc", "docs/*.md", "!docs/README.md"])
    assert ig.ignored("x.env") and not ig.ignored("d/x.env")
    assert ig.ignored("build") and ig.ignored("build/deep/file")
    assert ig.ignored("a/b/c.pyc") and ig.ignored("c.pyc") and not ig.ignored("keep.pyc")
    assert ig.ignored("docs/x.md") and not ig.ignored("docs/README.md")


def test_sources_follow_dockers_rules(ctx: Path) -> None:
    c = Context(ctx)
    got = {e.dest: e.kind for e in c.resolve(["a*.txt"], "/app/")}
    assert got == {"/app/a1.txt": "file", "/app/a2.txt": "file"}
    got = {e.dest for e in c.resolve(["b.txt"], "/app/renamed")}
    assert got == {"/app/renamed"}
    got = {e.dest for e in c.resolve(["src"], "/app")}  # a directory's contents
    assert got == {"/app/pkg", "/app/pkg/m.py", "/app/top.py"}  # no .pyc


def test_ignored_files_are_not_sources(ctx: Path) -> None:
    c = Context(ctx)
    with pytest.raises(ContextError, match="matches nothing"):
        c.resolve(["secret.env"], "/x")
    with pytest.raises(ContextError, match="matches nothing"):
        c.resolve(["build/out.o"], "/x")
    assert [e.dest for e in c.resolve(["keep.pyc"], "/x/")] == ["/x/keep.pyc"]


@pytest.mark.parametrize("src", ["../x", "/etc/passwd", "a/../../x"])
def test_sources_outside_the_context_are_refused(ctx: Path, src: str) -> None:
    with pytest.raises(ContextError, match="outside the build context") as got:
        Context(ctx).resolve([src], "/x")
    assert isinstance(got.value, DockerfileError)


def test_symlinks_leaving_the_context_are_refused(ctx: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").write_text("host secret")
    os.symlink(str(tmp_path / "outside"), ctx / "abs-link")
    os.symlink("../outside", ctx / "rel-link")
    os.symlink("../..", ctx / "src" / "up")
    c = Context(ctx)
    for name in ("abs-link", "rel-link"):
        with pytest.raises(ContextError, match="leaves the build context"):
            c.resolve([name], "/x")
    with pytest.raises(ContextError, match="leaves the build context"):
        c.resolve(["."], "/x")  # the whole context holds them
    with pytest.raises(ContextError, match="leaves the build context"):
        c.resolve(["src"], "/x")  # a directory holding one
    with pytest.raises(ContextError, match="symlink that leaves"):
        c.resolve(["src/up/outside"], "/x")  # through a directory symlink
    inside = c.resolve(["inside-link"], "/x")
    assert inside[0].kind == "link" and inside[0].target == "a1.txt"


def test_a_link_to_an_absolute_path_inside_is_made_relative(ctx: Path) -> None:
    os.symlink(str(ctx / "b.txt"), ctx / "abs-inside")
    (e,) = Context(ctx).resolve(["abs-inside"], "/x/")
    assert e.target == "b.txt"


def test_the_context_is_bounded(ctx: Path) -> None:
    (ctx / "big").write_bytes(b"\0" * 5000)
    with pytest.raises(ContextError, match="larger than the bound"):
        Context(ctx, max_bytes=4096).check()
    with pytest.raises(ContextError, match="larger than the bound"):
        Context(ctx, max_entries=3).check()
    size, count = Context(ctx).check()
    assert size >= 5000 and count > 5


def test_a_missing_context_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ContextError, match="does not exist"):
        Context(tmp_path / "nope")


def test_digest_follows_content_not_mtime(ctx: Path) -> None:
    c = Context(ctx)
    d1 = c.digest(c.resolve(["src"], "/app"))
    os.utime(ctx / "src" / "top.py", (1, 1))
    assert c.digest(c.resolve(["src"], "/app")) == d1
    (ctx / "src" / "top.py").write_text("changed\n")
    assert c.digest(c.resolve(["src"], "/app")) != d1
    assert c.digest(c.resolve(["src"], "/other")) != c.digest(c.resolve(["src"], "/app"))
    (ctx / "src" / "top.py").chmod(0o700)
    assert c.digest(c.resolve(["src"], "/app")) != d1


def test_tar_holds_destinations_root_owned_with_chmod(ctx: Path, tmp_path: Path) -> None:
    c = Context(ctx)
    out = tmp_path / "x.tar"
    c.write_tar(c.resolve(["src", "inside-link"], "/app/"), out, 0o640)
    with tarfile.open(out) as t:
        members = {m.name: m for m in t.getmembers()}
    assert set(members) == {"app/pkg", "app/pkg/m.py", "app/top.py", "app/inside-link"}
    for m in members.values():
        assert m.uid == 0 and m.gid == 0
        if not m.issym():
            assert m.mode == 0o640


def test_archives_are_recognised_by_content(ctx: Path, tmp_path: Path) -> None:
    from ember.guest.dockerfile_context import is_archive

    for mode, name in (("w", "a.tar"), ("w:gz", "a.tgz"), ("w:xz", "a.bin")):
        with tarfile.open(tmp_path / name, mode) as t:
            t.add(ctx / "b.txt", arcname="b.txt")
        assert is_archive(tmp_path / name)
    assert not is_archive(ctx / "b.txt")
    assert not is_archive(tmp_path / "missing")


def _guest_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    import io

    with tarfile.open(path, "w") as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x",
            link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    info.mode = 0o644
    return info, data


def test_a_guest_tar_unpacks_inside_its_root(tmp_path: Path) -> None:
    from ember.guest.dockerfile_context import extract_guest_tar

    root = tmp_path / "root"
    root.mkdir()
    tar = _guest_tar(tmp_path / "ok.tar", [
        _member("out", tarfile.DIRTYPE), _member("out/.hidden", data=b"h"),
        _member("./out/file", data=b"f"), _member("out/link", tarfile.SYMTYPE,
                                                  link="/usr/lib/x")])
    extract_guest_tar(tar, root)
    assert (root / "out" / ".hidden").read_bytes() == b"h"
    assert (root / "out" / "file").read_bytes() == b"f"
    assert os.readlink(root / "out" / "link") == "/usr/lib/x"  # kept, never followed
    c = Context(root, guest_links=True)
    assert {e.dest: e.kind for e in c.resolve(["out"], "/dst/")}["/dst/link"] == "link"


@pytest.mark.parametrize(("members", "words"), [
    ([_member("/etc/passwd")], "leaves"),
    ([_member("../escape")], "leaves"),
    ([_member("a/../../escape")], "leaves"),
    ([_member("d", tarfile.SYMTYPE, link="/"), _member("d/etc/x")], "through a symlink"),
    ([_member("h", tarfile.LNKTYPE, link="/etc/shadow")], "not a file"),
    ([_member("dev", tarfile.CHRTYPE)], "not a file"),
    ([_member("f", data=b"y" * 5000)], "more than"),
])
def test_hostile_guest_tars_are_refused(tmp_path: Path, members: list[tuple[tarfile.TarInfo,
                                                                               bytes]],
                                        words: str) -> None:
    from ember.guest.dockerfile_context import extract_guest_tar

    root = tmp_path / "root"
    root.mkdir()
    tar = _guest_tar(tmp_path / "bad.tar", members)
    with pytest.raises(ContextError, match=words):
        extract_guest_tar(tar, root, max_bytes=4096)
    assert not (tmp_path / "escape").exists()


def test_a_truncated_guest_tar_is_a_context_error(tmp_path: Path) -> None:
    from ember.guest.dockerfile_context import extract_guest_tar

    tar = _guest_tar(tmp_path / "t.tar", [_member("f", data=b"z" * 10000)])
    tar.write_bytes(tar.read_bytes()[:3000])
    (tmp_path / "root").mkdir()
    with pytest.raises(ContextError):
        extract_guest_tar(tar, tmp_path / "root")
