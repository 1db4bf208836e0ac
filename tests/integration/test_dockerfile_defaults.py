"""A template's image metadata applied (docs/dockerfile.md, docs/images.md): commands in its
sandboxes run with its ENV, in its WORKDIR and as its USER unless the caller says
otherwise, on every path that runs one (SDK through the daemon, a terminal, a restored
snapshot, the CLI, the E2B envd API); ``ember run`` without a command runs ENTRYPOINT +
CMD; a Docker Hub short name in FROM is pulled from the default registry (a local one).

One home, one daemon (TCP, for the E2B SDK) and one template for the module."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ember import Sandbox
from ember.errors import DockerfileError, SnapshotNotFoundError
from ember.paths import Paths
from ember.store import Store
from tests.oci_fixtures import free_port

pytestmark = pytest.mark.integration

DOCKERFILE = """\
FROM debian-python
ENV APP_MODE=demo PATH=/opt/tools:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /srv/app
RUN mkdir -p /opt/tools && printf '#!/bin/sh\\necho tool ran\\n' > /opt/tools/tool \\
    && chmod 755 /opt/tools/tool && chown nobody /srv/app
USER nobody
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo \\"cmd as $(id -un) in $(pwd) mode $APP_MODE\\""]
EXPOSE 8080
"""
#: What ``pwd; id -un; echo $APP_MODE; tool`` prints with the template's defaults.
DEFAULTS_OUT = "/srv/app\nnobody\ndemo\ntool ran\n"
PROBE = "pwd; id -un; echo $APP_MODE; tool"


@dataclass(frozen=True)
class World:
    paths: Paths
    url: str  # the daemon on TCP
    e2b_key: str
    registry: str  # HOST:PORT of a local registry, EMBER_DEFAULT_REGISTRY of the daemon
    tmp: Path


@pytest.fixture(scope="module")
def world(ember_paths: Paths, debian_template: object,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from ember.daemon import control
    from ember.daemon.auth import new_key
    from ember.guest.image import build_image
    from ember.proc import require
    from tests.oci_fixtures import (
        busybox_layer,
        directory,
        gz,
        image_config,
        make_oci_layout,
        push_layout_to_registry,
        start_registry,
        tar_bytes,
    )


    require("docker-registry")
    tmp = tmp_path_factory.mktemp("dfdefaults")
    root = Path(tempfile.mkdtemp(prefix="edd-", dir="/tmp"))
    paths = Paths(home=root, cache=ember_paths.cache,
                  ram=Path(f"/dev/shm/ember-test-{root.name}")).ensure()
    images_before = set(paths.images.iterdir())
    store = Store(paths.db)
    build_image(paths, store, "debian-python", force=True)
    _, key = new_key(store, "alice")
    store.close()
    url = f"http://127.0.0.1:{free_port()}"
    with start_registry(tmp / "registry") as reg, pytest.MonkeyPatch.context() as mp:
        # an image with run metadata, as a registry serves it: library/busy:1.0 on the
        # default registry is what "FROM busy:1.0" names
        layers = [gz(busybox_layer()), gz(tar_bytes([directory("work", mode=0o777)]))]
        config = image_config(layers, env=["PATH=/bin", "FROM_IMAGE=yes"], cmd=["/bin/sh"],
                              working_dir="/work")
        layout = make_oci_layout(tmp / "busy", layers, config)
        push_layout_to_registry(layout, reg.url, "library/busy", "1.0")
        mp.setenv("EMBER_DEFAULT_REGISTRY", reg.host)  # the daemon's environment
        mp.setenv("EMBER_HOME", str(paths.home))
        mp.setenv("EMBER_RAM_DIR", str(paths.ram))
        control.stop(paths)
        control.start(paths, listen=url.removeprefix("http://"))
        try:
            yield World(paths, url, key, reg.host, tmp)
        finally:
            for info in Sandbox.list(paths=paths):
                Sandbox.kill(info.id, paths=paths)
            control.stop(paths)
            for d in set(paths.images.iterdir()) - images_before:  # the cache is shared
                meta = d / "meta.json"
                source = json.loads(meta.read_text())["source"] if meta.is_file() else ""
                if source.startswith(("dockerfile:", "registry:")):
                    shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(paths.ram, ignore_errors=True)


@pytest.fixture(scope="module")
def template(world: World) -> str:
    ctx = world.tmp / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    info = Sandbox.build_template("defaults", f"dockerfile:{ctx}", paths=world.paths)
    oci = info.config["oci"]
    assert oci["working_dir"] == "/srv/app" and oci["user"] == "nobody"
    assert oci["exposed_ports"] == ["8080/tcp"]
    return "defaults"


def test_commands_get_the_images_env_workdir_and_user_unless_given(world: World,
                                                                   template: str) -> None:
    with Sandbox.create(template, paths=world.paths, timeout=600) as sb:
        assert sb.exec(PROBE).check().stdout == DEFAULTS_OUT  # through the daemon
        over = sb.exec("pwd; id -un; echo $APP_MODE", cwd="/tmp", user="root",
                       env={"APP_MODE": "mine"}).check().stdout
        assert over == "/tmp\nroot\nmine\n"
        p = sb.spawn(["sh", "-c", "pwd; id -un"])  # a background process too
        assert p.wait().stdout == "/srv/app\nnobody\n"
        term = sb.pty(rows=24, cols=100)  # a login shell on a terminal
        term.write("echo \"[$(pwd)|$(id -un)|$APP_MODE]\"; exit\r")
        seen = b"".join(term.output())
        assert b"[/srv/app|nobody|demo]" in seen, seen[-500:]
        # a user snapshot restored: the same template, the same defaults
        snap = sb.snapshot()
    try:
        with Sandbox.restore(snap, paths=world.paths, timeout=300,
                             env={"APP_MODE": "sandbox"}) as again:
            assert again.exec(PROBE).check().stdout == DEFAULTS_OUT.replace("demo", "sandbox")
    finally:
        with contextlib.suppress(SnapshotNotFoundError):  # gone with its last sandbox
            Sandbox.delete_snapshot(snap.id, paths=world.paths)


def test_a_pool_member_and_a_baked_template_get_them_too(world: World, template: str) -> None:
    from ember.sdk.bake import bake_template_sync

    pool = Sandbox.set_pool(template, 1, paths=world.paths)
    try:
        deadline = time.monotonic() + 300
        while not [p for p in Sandbox.list_pools(paths=world.paths)
                   if p.key == pool.key and p.ready >= 1]:
            assert time.monotonic() < deadline, "the pool did not fill in 300 s"
            time.sleep(0.5)
        pooled = {i.id for i in Sandbox.list(paths=world.paths) if i.state == "pooled"}
        with Sandbox.create(template, paths=world.paths, timeout=300) as sb:
            assert sb.id in pooled  # handed out from the pool
            assert sb.exec(PROBE).check().stdout == DEFAULTS_OUT
    finally:
        Sandbox.remove_pool(pool.key, paths=world.paths)
    # the setup runs like any command (as nobody, in /srv/app); the baked template keeps
    # the image's metadata
    rec = bake_template_sync("defaults-baked", template, "touch baked", paths=world.paths)
    assert rec.config["oci"]["user"] == "nobody"
    with Sandbox.create("defaults-baked", paths=world.paths, timeout=300) as sb:
        assert sb.info().snapshot == rec.config["snapshot"]
        out = sb.exec(f"stat -c %U baked; {PROBE}").check().stdout
    assert out == "nobody\n" + DEFAULTS_OUT
    Sandbox.delete_template("defaults-baked", paths=world.paths)


def test_the_cli_runs_entrypoint_and_cmd_without_a_command(world: World, template: str) -> None:
    env = {**os.environ, "EMBER_HOME": str(world.paths.home),
           "EMBER_RAM_DIR": str(world.paths.ram)}
    cli = [sys.executable, "-m", "ember.cli"]
    got = subprocess.run([*cli, "run", "-t", template], env=env, capture_output=True,
                         text=True, timeout=600)
    assert got.returncode == 0, got.stderr
    assert got.stdout == "cmd as nobody in /srv/app mode demo\n"
    got = subprocess.run([*cli, "run", "-t", template, "--", "sh", "-c", PROBE], env=env,
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0 and got.stdout == DEFAULTS_OUT, got.stderr
    # a template without a command: refused before any sandbox is made
    got = subprocess.run([*cli, "run", "-t", "debian-python"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert got.returncode != 0 and "has no CMD or ENTRYPOINT" in got.stderr
    assert Sandbox.list(paths=world.paths) == []


def test_the_e2b_process_api_applies_them_too(world: World, template: str) -> None:
    e2b = pytest.importorskip("e2b")
    opts: dict[str, Any] = {"api_key": world.e2b_key, "api_url": world.url,
                            "sandbox_url": world.url}
    box = e2b.Sandbox.create(template, timeout=300, **opts)
    try:
        # E2B runs commands in a login shell (bash -l): Debian's /etc/profile sets PATH
        assert box.commands.run("pwd; id -un; echo $APP_MODE").stdout == (
            "/srv/app\nnobody\ndemo\n")
        assert box.commands.run("pwd; id -un", user="root", cwd="/").stdout == "/\nroot\n"
    finally:
        box.kill()


def test_from_a_docker_hub_short_name_pulls_from_the_default_registry(world: World) -> None:
    """``FROM busy:1.0`` is library/busy:1.0 on the default registry (here a local
    docker-registry, EMBER_DEFAULT_REGISTRY): built as a template first, whose OCI
    metadata applies to its sandboxes and is inherited by the Dockerfile's stage."""
    from ember.sdk.dockerfile_build import base_template_name

    ctx = world.tmp / "short"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM busy:1.0\nENV MORE=1\nRUN pwd > here\n")
    lines: list[str] = []
    info = Sandbox.build_template("short", f"dockerfile:{ctx}", paths=world.paths,
                                  on_progress=lines.append)
    source = f"registry:{world.registry}/library/busy:1.0"
    base = base_template_name(source)
    assert any(f"building it as template {base} ({source})" in ln for ln in lines), lines
    assert info.config["oci"]["env"] == ["PATH=/bin", "FROM_IMAGE=yes", "MORE=1"]
    assert info.config["oci"]["working_dir"] == "/work"
    with Sandbox.create("short", paths=world.paths, timeout=300) as sb:
        out = sb.exec("cat /work/here; pwd; echo $FROM_IMAGE $MORE").check().stdout
    assert out == "/work\n/work\nyes 1\n"  # the RUN and the sandbox ran in the image's WORKDIR
    with Sandbox.create(base, paths=world.paths, timeout=300) as sb:  # an OCI-image template
        assert sb.exec("pwd; echo $FROM_IMAGE").check().stdout == "/work\nyes\n"
    # a name that is neither a template nor on the registry: the FROM line, the registry's
    # answer; nothing registered
    (ctx / "Dockerfile").write_text("# missing\nFROM no-such-image:1\nRUN true\n")
    with pytest.raises(DockerfileError, match=r"line 2.*no-such-image.*cannot be pulled"):
        Sandbox.build_template("short2", f"dockerfile:{ctx}", paths=world.paths)
    assert "short2" not in [t.name for t in Sandbox.list_templates(paths=world.paths)]
