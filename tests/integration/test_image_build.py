"""Templates end to end: build from every kind of source, boot them, list and remove them.

Bad input must give a clear error and leave nothing in the cache staging area or the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember import BadRequestError, Sandbox, TemplateNotFoundError
from ember.errors import ImageSourceError, UnsafeLayerError
from ember.guest.check import check_image
from ember.guest.image import build_image, remove_image
from ember.paths import Paths
from ember.store import Store
from tests import oci_fixtures as F

pytestmark = pytest.mark.integration


def staging_empty(paths: Paths) -> bool:
    return [p for p in paths.cache_tmp.iterdir() if p.name.startswith("image-")] == []


def test_default_template_boots_and_reports_its_digest(ember_paths: Paths, store: Store,
                                                       debian_template, kernel) -> None:  # type: ignore[no-untyped-def]
    res = check_image(ember_paths, store, "debian-python")
    assert res.ok, (res.digest, res.expected_digest)
    assert res.kernel_release == kernel.release
    assert res.accel in ("tcg", "kvm") and res.accel_reason


def test_busybox_oci_image_has_no_python_yet_runs_the_agent(ember_paths: Paths, store: Store,
                                                            busybox_template) -> None:  # type: ignore[no-untyped-def]
    assert check_image(ember_paths, store, "busybox").ok
    assert busybox_template.config["oci"]["cmd"]  # image config kept as template metadata
    with Sandbox.create("busybox", paths=ember_paths) as sb:
        assert sb.exec("ls /usr/bin/python3 2>&1 || echo none").stdout.strip().endswith("none")
        assert sb.exec(["busybox", "echo", "hi"]).stdout == "hi\n"
        sb.files.write("/tmp/x", "y")
        assert sb.exec("cat /tmp/x").stdout == "y"


def test_docker_archive_and_directory_sources(ember_paths: Paths, store: Store, kernel,
                                             tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    archive = F.make_busybox_docker_archive(tmp_path / "bb.tar")
    rec = build_image(ember_paths, store, "bb-archive", f"docker-archive:{archive}",
                      free_mib=16)
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    os.symlink("busybox", root / "bin" / "sh")
    rec2 = build_image(ember_paths, store, "bb-dir", f"dir:{root}", free_mib=16)
    for name in ("bb-archive", "bb-dir"):
        assert check_image(ember_paths, store, name).ok
    assert rec.digest != rec2.digest
    for name in ("bb-archive", "bb-dir"):
        remove_image(ember_paths, store, name)
    assert {t.name for t in store.list_templates()}.isdisjoint({"bb-archive", "bb-dir"})


def test_registry_source(ember_paths: Paths, store: Store, kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    layout = F.make_busybox_oci_layout(tmp_path / "layout")
    with F.start_registry(tmp_path / "reg") as reg:
        F.push_layout_to_registry(layout, reg.url, "lib/busybox", "1.0")
        rec = build_image(ember_paths, store, "bb-reg", f"registry:{reg.host}/lib/busybox:1.0",
                          free_mib=16)
        with pytest.raises(ImageSourceError, match="nope"):
            build_image(ember_paths, store, "bb-missing", f"registry:{reg.host}/lib/busybox:nope")
    assert rec.config["source_digest"].startswith("sha256:")
    assert check_image(ember_paths, store, "bb-reg").ok
    remove_image(ember_paths, store, "bb-reg")
    assert staging_empty(ember_paths)


def test_bad_sources_leave_nothing(ember_paths: Paths, store: Store, kernel,
                                   tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    before = {t.name for t in store.list_templates()}
    with pytest.raises(ImageSourceError, match="unknown Debian release 'nosuchrelease'"):
        build_image(ember_paths, store, "x1", "debian:nosuchrelease")
    with pytest.raises(ImageSourceError, match="no-such-package-xyz"):
        build_image(ember_paths, store, "x2", "debian:bookworm",
                    packages=["no-such-package-xyz"])
    with pytest.raises(ImageSourceError):
        build_image(ember_paths, store, "x3", "oci-layout:/nonexistent/layout")
    truncated = tmp_path / "trunc.tar"
    full = F.make_busybox_docker_archive(tmp_path / "full.tar").read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageSourceError):
        build_image(ember_paths, store, "x4", f"docker-archive:{truncated}")
    evil = F.write_layer(tmp_path / "evil.tar", [F.symlink("esc", "/"), F.file("esc/pwned", b"x")])
    layer = evil.read_bytes()
    layout = F.make_oci_layout(tmp_path / "evil-layout", [layer], F.image_config([layer]))
    with pytest.raises(UnsafeLayerError):
        build_image(ember_paths, store, "x5", f"oci-layout:{layout}")
    with pytest.raises(BadRequestError, match="invalid template name"):
        build_image(ember_paths, store, "Bad Name", "debian:bookworm")
    with pytest.raises(BadRequestError, match="already exists"):
        build_image(ember_paths, store, "debian-python")
    with pytest.raises(TemplateNotFoundError):
        remove_image(ember_paths, store, "never-built")
    assert {t.name for t in store.list_templates()} == before
    assert staging_empty(ember_paths)
    assert not Path("/pwned").exists()


def test_interrupted_build_leaves_nothing(ember_paths: Paths, kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 the builder in the middle; the cache and store hold nothing of it."""
    layout = F.make_busybox_oci_layout(tmp_path / "layout")
    flag = str(tmp_path / "flag")
    code = (
        "import time, ember.guest.image as I\n"
        "def slow(*a, **k):\n"
        f"    open({flag!r}, 'w').close(); time.sleep(60)\n"
        "I._make_ext4 = slow\n"
        "from ember.paths import Paths\nfrom ember.store import Store\n"
        "p = Paths.from_env()\n"
        f"I.build_image(p, Store(p.db), 'killed', {f'oci-layout:{layout}'!r})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy())
    try:
        for _ in range(600):
            if (tmp_path / "flag").exists():
                break
            assert child.poll() is None
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()
    store = Store(ember_paths.db)
    assert "killed" not in {t.name for t in store.list_templates()}
    # the staging dir of a killed build is swept by the next build
    build_image(ember_paths, store, "after-kill", f"oci-layout:{layout}", free_mib=8)
    assert staging_empty(ember_paths)
    remove_image(ember_paths, store, "after-kill")


def test_cli_image_commands(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    def ember(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True,
                              text=True, timeout=600, env=os.environ.copy())

    listed = json.loads(ember("image", "ls", "--json").stdout)
    assert "debian-python" in [t["name"] for t in listed]
    check = json.loads(ember("image", "check", "debian-python", "--json").stdout)
    assert check["ok"] and check["kernel"] and check["digest"] == debian_template.digest
    cp = ember("image", "rm", "no-such")
    assert cp.returncode == 3 and "no-such" in cp.stderr
    cp = ember("image", "build", "x", "--from", "debian:nosuchrelease")
    assert cp.returncode == 1 and "unknown Debian release" in cp.stderr


def test_template_build_through_the_daemon_streams_progress(
        ember_paths: Paths, kernel, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`ember image build` is a client of the daemon: the build runs there, its status lines
    come back as they happen, and errors are the same types as in-process."""
    layout = F.make_busybox_oci_layout(tmp_path / "bb")
    seen: list[str] = []
    info = Sandbox.build_template("via-daemon", f"oci-layout:{layout}", free_mib=8,
                                  on_progress=seen.append, paths=ember_paths)
    try:
        assert info.name == "via-daemon" and info.digest.startswith("sha256:")
        assert info.source == f"oci-layout:{layout}" and seen, seen
        assert "via-daemon" in [t.name for t in Sandbox.list_templates(paths=ember_paths)]
        with pytest.raises(BadRequestError, match="exists already"):
            Sandbox.build_template("via-daemon", f"oci-layout:{layout}", paths=ember_paths)
        with pytest.raises(ImageSourceError):
            Sandbox.build_template("bad-src", f"oci-layout:{tmp_path / 'nothing'}",
                                   paths=ember_paths)
        assert "bad-src" not in [t.name for t in Sandbox.list_templates(paths=ember_paths)]
    finally:
        Sandbox.delete_template("via-daemon", paths=ember_paths)
    with pytest.raises(TemplateNotFoundError):
        Sandbox.delete_template("via-daemon", paths=ember_paths)
    assert staging_empty(ember_paths)
