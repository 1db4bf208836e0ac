"""Templates from Dockerfiles, their RUN steps run in real microVMs (docs/dockerfile.md).

Each test uses a fresh home with the default template; builds go through the home's
daemon (the SDK's default) unless a test sets ``EMBER_LOCAL=1``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import Sandbox
from ember.errors import BuildStepError, DockerfileError
from ember.paths import Paths
from ember.sdk.dockerfile_build import STEP_META
from ember.store import SnapshotRecord, Store
from tests.integration.leaks import assert_no_leaks_anywhere

pytestmark = pytest.mark.integration

EVERYTHING = """\
# syntax is Docker's; every instruction ember supports
ARG BASE=debian-python
FROM ${BASE} AS app
ARG GREETING=hello
ENV APP_HOME=/app NAME="ember user"
LABEL org.example.name="demo app"
WORKDIR $APP_HOME
COPY --chmod=640 *.txt ./
COPY --chown=nobody:nogroup src/ ./src/
ADD data.csv /data/
SHELL ["/bin/bash", "-c"]
RUN echo "$GREETING, $NAME from $(pwd) in ${BASH_VERSION:+bash}" > greeting \\
    && id -un >> greeting && echo greeted
RUN ["python3", "-c", "open('/app/exec-form', 'w').write('exec form')"]
USER nobody
RUN id -un > /var/tmp/who
EXPOSE 8000
ENTRYPOINT ["python3"]
CMD ["-m", "http.server"]
"""


@pytest.fixture
def home(ember_paths: Paths, debian_template, tmp_path: Path) -> Iterator[Paths]:  # type: ignore[no-untyped-def]
    from ember.guest.image import build_image

    root = Path(tempfile.mkdtemp(prefix="edf-", dir="/tmp"))
    paths = Paths(home=root, cache=ember_paths.cache,
                  ram=Path(f"/dev/shm/ember-test-{root.name}")).ensure()
    store = Store(paths.db)
    build_image(paths, store, "debian-python", force=True)
    store.close()
    images_before = set(paths.images.iterdir())
    yield paths
    from ember.daemon.control import stop as stop_daemon

    try:
        for info in Sandbox.list(paths=paths):
            Sandbox.kill(info.id, paths=paths)
        stop_daemon(paths)
        for d in set(paths.images.iterdir()) - images_before:  # the cache is shared
            meta = d / "meta.json"
            source = json.loads(meta.read_text())["source"] if meta.is_file() else ""
            if source.startswith("dockerfile:") or str(tmp_path) in source:  # ours
                shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(paths.ram, ignore_errors=True)


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "src").mkdir(parents=True)
    (ctx / "a.txt").write_text("a\n")
    (ctx / "b.txt").write_text("b\n")
    (ctx / "src" / "main.py").write_text("print('main')\n")
    (ctx / "data.csv").write_text("x,y\n1,2\n")
    (ctx / "secret.txt.env").write_text("TOKEN=1\n")
    (ctx / ".dockerignore").write_text("*.env\n")
    (ctx / "Dockerfile").write_text(EVERYTHING)
    return ctx


def entries(paths: Paths) -> list[SnapshotRecord]:
    store = Store(paths.db)
    try:
        return [s for s in store.list_snapshots() if STEP_META in s.metadata]
    finally:
        store.close()


def build(paths: Paths, ctx: Path, name: str = "app", **kw: object) -> tuple[object, list[str]]:
    lines: list[str] = []
    info = Sandbox.build_template(name, f"dockerfile:{ctx}", paths=paths,
                                  on_progress=lines.append, **kw)  # type: ignore[arg-type]
    return info, lines


def test_every_instruction_then_a_sandbox_of_it(home: Paths, context: Path) -> None:
    info, lines = build(home, context, build_args={"GREETING": "hi"})
    assert any("step 1/" in ln for ln in lines), lines  # progress streamed by the daemon
    assert "  | greeted" in lines, lines  # the RUN steps' output
    cfg = info.config  # type: ignore[attr-defined]
    assert cfg["oci"]["env"] == ["APP_HOME=/app", "NAME=ember user"]
    assert cfg["oci"]["working_dir"] == "/app" and cfg["oci"]["user"] == "nobody"
    assert cfg["oci"]["entrypoint"] == ["python3"]
    assert cfg["oci"]["cmd"] == ["-m", "http.server"]
    assert cfg["oci"]["exposed_ports"] == ["8000/tcp"]
    assert cfg["oci"]["labels"] == {"org.example.name": "demo app"}
    assert cfg["dockerfile"]["from"] == "debian-python" and len(cfg["dockerfile"]["keys"]) == 7
    (tpl,) = [t for t in Sandbox.list_templates(paths=home) if t.name == "app"]
    assert tpl.digest != next(t for t in Sandbox.list_templates(paths=home)
                              if t.name == "debian-python").digest  # an image of its own
    assert [s for s in tpl.snapshots if s.current]  # its template snapshot, made already
    from ember.guest.check import check_image

    store = Store(home.db)
    try:
        checked = check_image(home, store, "app", timeout=180)
    finally:
        store.close()
    assert checked.ok and checked.digest == tpl.digest  # /.ember/image.json rewritten
    with Sandbox.create("app", paths=home, timeout=300) as sb:
        out = sb.exec("pwd; id -un; cat /app/greeting /app/exec-form /var/tmp/who; echo; "
                      "stat -c '%a %U %n' /app/a.txt /app/b.txt /app/src/main.py "
                      "/data/data.csv; ls /app").check().stdout
    assert out.startswith("/app\nnobody\n")  # its WORKDIR and USER (docs/images.md)
    assert "hi, ember user from /app in bash\nroot\n" in out
    assert "exec form" in out and "nobody\n" in out
    assert "640 root /app/a.txt" in out and "640 root /app/b.txt" in out
    assert "nobody /app/src/main.py" in out and "/data/data.csv" in out
    assert "secret" not in out
    # cache entries are not user snapshots
    assert not [s for s in Sandbox.list_snapshots(paths=home) if s.name
                and s.name.startswith("build-")]


def test_a_rebuild_is_cached_and_a_changed_file_rebuilds_from_its_copy(
        home: Paths, context: Path) -> None:
    build(home, context)
    n = len(entries(home))
    t0 = time.monotonic()
    _, lines = build(home, context, name="app2")
    cached = [ln for ln in lines if ln.endswith(": cached")]
    assert len(cached) == 7, lines  # WORKDIR, 3 copies, 3 RUNs
    assert len(entries(home)) == n
    cached_s = time.monotonic() - t0
    (context / "src" / "main.py").write_text("print('changed')\n")
    _, lines = build(home, context, name="app3")
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.endswith(": cached") for ln in steps] == [True, True, False, False, False,
                                                          False, False], steps
    _, lines = build(home, context, name="app4", no_cache=True)
    assert not [ln for ln in lines if ln.endswith(": cached")]
    print(f"cached rebuild: {cached_s:.2f} s")
    before = {s.id for s in entries(home)}
    pruned = Sandbox.prune_build_cache(paths=home)
    # kept: the newest entry of every step the four templates were made of (app4's
    # --no-cache superseded app's and app2's for the same keys)
    assert len(before) == 7 + 5 + 7 and len(pruned.removed) == 7, pruned
    _, lines = build(home, context, name="app5")
    assert len([ln for ln in lines if ln.endswith(": cached")]) == 7
    for name in ("app", "app2", "app3", "app4", "app5"):
        Sandbox.delete_template(name, paths=home)
    pruned = Sandbox.prune_build_cache(paths=home)
    assert pruned.removed and pruned.freed_bytes > 0
    assert entries(home) == []
    assert_no_leaks_anywhere(home, keep_snapshots=())


def test_multi_stage_copy_from_and_target(home: Paths, tmp_path: Path) -> None:
    ctx = tmp_path / "ms"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM debian-python AS build\n"
        "RUN mkdir -p /out && echo built > /out/artifact && echo other > /out/other\n"
        "FROM debian-python\n"
        "COPY --from=build /out/artifact /opt/\n"
        "COPY --from=0 /out /opt/all/\n")
    build(home, ctx, name="ms")
    with Sandbox.create("ms", paths=home, timeout=300) as sb:
        out = sb.exec("cat /opt/artifact; ls /opt/all; test -e /out || echo no-out").stdout
    assert out == "built\nartifact\nother\nno-out\n"
    build(home, ctx, name="ms-build", target="build")
    with Sandbox.create("ms-build", paths=home, timeout=300) as sb:
        assert sb.exec("cat /out/artifact").check().stdout == "built\n"


def _nothing_registered(paths: Paths, name: str) -> None:
    assert name not in [t.name for t in Sandbox.list_templates(paths=paths)]
    assert Sandbox.list(paths=paths) == []


def test_bad_dockerfiles_are_refused_before_any_vm(home: Paths, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.oci_fixtures import free_port

    # a FROM that is no template is an image reference; its registry (Docker Hub's stand-in)
    # is a loopback port where nothing listens: no lookup leaves this machine
    monkeypatch.setenv("EMBER_DEFAULT_REGISTRY", f"127.0.0.1:{free_port()}")
    ctx = tmp_path / "bad"
    ctx.mkdir()
    cases = {
        "FROM debian-python\nRUN true\nFROBNICATE x\n": (3, "unknown instruction"),
        "FROM no-such-template\nRUN true\n": (1, "no template of that name"),
        "FROM debian-python\nCOPY ../etc /x\n": (2, "leaves the build context"),
        "FROM debian-python\nCOPY /etc/passwd /x\n": (2, "absolute"),
        "FROM debian-python\nCOPY link /x\n": (2, "leaves the build context"),
        "FROM debian-python\nRUN echo \\": (2, "ends inside an instruction"),
    }
    os.symlink("/etc/passwd", ctx / "link")
    for text, (line, words) in cases.items():
        (ctx / "Dockerfile").write_text(text)
        with pytest.raises(DockerfileError) as got:
            build(home, ctx, name="bad")
        assert f"line {line}" in str(got.value) and words in str(got.value), text
    (ctx / "link").unlink()
    (ctx / "big").write_bytes(os.urandom(3 << 20))
    (ctx / "Dockerfile").write_text("FROM debian-python\nRUN true\n")
    monkeypatch.setenv("EMBER_LOCAL", "1")  # in this process, which has the bound set
    monkeypatch.setenv("EMBER_BUILD_CONTEXT_MAX_MIB", "2")
    with pytest.raises(DockerfileError, match="larger than the bound of 2 MiB"):
        build(home, ctx, name="bad")
    _nothing_registered(home, "bad")
    assert entries(home) == []
    assert_no_leaks_anywhere(home, keep_snapshots=())


def test_a_failing_run_names_its_line_exit_code_and_output(home: Paths,
                                                            tmp_path: Path) -> None:
    ctx = tmp_path / "fail"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM debian-python\n"
        "RUN echo first > /first\n"
        "RUN echo 'about to fail' && echo 'on stderr' >&2 && exit 7\n"
        "RUN echo never\n")
    with pytest.raises(BuildStepError) as got:
        build(home, ctx, name="fails")
    msg = str(got.value)
    assert msg.startswith("Dockerfile line 3:") and "exit" in msg and "code 7" in msg
    assert "about to fail" in msg and "on stderr" in msg
    _nothing_registered(home, "fails")
    kept = entries(home)
    assert len(kept) == 1  # the step before it: a valid cache entry
    assert_no_leaks_anywhere(home, keep_snapshots=[s.id for s in kept])
    # exec form of a program that does not exist
    (ctx / "Dockerfile").write_text("FROM debian-python\nRUN [\"/no/such/program\"]\n")
    with pytest.raises(BuildStepError, match=r"line 2.*code 127"):
        build(home, ctx, name="fails")
    _nothing_registered(home, "fails")


BUILDER = """\
import sys
from ember import Sandbox
Sandbox.build_template("killed", "dockerfile:" + sys.argv[1],
                       on_progress=lambda m: print(m, flush=True))
"""


@pytest.mark.parametrize(("dockerfile", "marker", "orphans"), [
    ("FROM debian-python\nRUN echo one > /one\nRUN echo sleeping && sleep 300\n"
     "RUN echo never\n", "| sleeping", 1),  # in a RUN: its sandbox outlives the builder
    ("FROM debian-python\nRUN echo one > /one\n", "writing the template's image", 0),
], ids=["in-a-run", "while-flattening"])
def test_a_build_killed_midway_leaves_nothing_half_made(home: Paths, tmp_path: Path,
                                                        dockerfile: str, marker: str,
                                                        orphans: int) -> None:
    ctx = tmp_path / "kill"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    env = {**os.environ, "EMBER_LOCAL": "1", "EMBER_HOME": str(home.home),
           "EMBER_RAM_DIR": str(home.ram)}
    p = subprocess.Popen([sys.executable, "-c", BUILDER, str(ctx)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            seen.append(line)
            if marker in line:
                break
        else:
            pytest.fail(f"the build ended before {marker!r}: " + "".join(seen))
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "killed" not in [t.name for t in Sandbox.list_templates(paths=home)]
    (done,) = entries(home)  # RUN echo one: complete, a valid cache entry
    # a build sandbox outlives its builder; the next build (or prune) ends it
    pruned = Sandbox.prune_build_cache(paths=home)
    assert len(pruned.sandboxes) == orphans, pruned
    assert pruned.removed == [done.id]  # no template uses it
    assert_no_leaks_anywhere(home, keep_snapshots=(), settle=10)


def test_the_cli_builds_prunes_and_reports_json(home: Paths, context: Path) -> None:
    env = {**os.environ, "EMBER_HOME": str(home.home), "EMBER_RAM_DIR": str(home.ram)}
    cmd = [sys.executable, "-m", "ember.cli", "image", "build", "cli-app", "--from",
           f"dockerfile:{context}", "--build-arg", "GREETING=cli", "--json"]
    got = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert doc["name"] == "cli-app" and doc["config"]["oci"]["user"] == "nobody"
    bad = subprocess.run([sys.executable, "-m", "ember.cli", "image", "build", "x",
                          "--build-arg", "A=1"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "dockerfile:PATH" in bad.stderr
    subprocess.run([sys.executable, "-m", "ember.cli", "image", "rm", "cli-app"], env=env,
                   check=True, capture_output=True, timeout=120)
    pruned = subprocess.run([sys.executable, "-m", "ember.cli", "image", "prune", "--json"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert pruned.returncode == 0, pruned.stderr
    assert len(json.loads(pruned.stdout)["removed"]) == 7


def _wheel(path: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel (PEP 427) holding ``files``."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name.replace('-', '_')}-{version}"
    out = path / f"{dist}-py3-none-any.whl"
    entries = {**files,
               f"{dist}.dist-info/METADATA":
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
               f"{dist}.dist-info/WHEEL":
                   "Wheel-Version: 1.0\nGenerator: ember-tests\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n"}
    record = []
    for n, text in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
        record.append(f"{n},sha256={digest.decode().rstrip('=')},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    with zipfile.ZipFile(out, "w") as z:
        for n, text in entries.items():
            z.writestr(n, text)
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return out


def _serve_index(world: object, root: Path, port: int) -> object:
    """A PEP 503 simple index of ``root`` on the fake internet (a thread of this process
    whose socket was opened inside its namespace: no name lookups)."""
    import functools
    import socket
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from ember.net.nsutil import in_netns, netns_path

    sock = in_netns(netns_path(world.inet),  # type: ignore[attr-defined]
                    lambda: socket.create_server(("0.0.0.0", port)))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("0.0.0.0", port), handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.slow
def test_a_python_app_from_a_local_index_with_the_builds_network_only(
        home: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip installs from a package index on the fake internet (a namespace this test
    makes; nothing leaves the machine) during the build; the template's sandboxes have
    no network, and a build without --network has none either."""
    from ember import NetworkPolicy
    from tests.integration.networld import INET_IP, fake_world

    pip_whl = sorted(Path("/usr/share/python-wheels").glob("pip-*.whl"))
    if not pip_whl:
        pytest.skip("Debian's python3-pip-whl (pip's wheel) is not installed")
    index = tmp_path / "index"
    (index / "simple" / "demo-app").mkdir(parents=True)
    (index / "packages").mkdir()
    whl = _wheel(index / "packages", "demo-app", "1.0",
                 {"demo_app/__init__.py": "VALUE = 'from the local index'\n"})
    (index / "simple" / "demo-app" / "index.html").write_text(
        f'<html><body><a href="../../packages/{whl.name}">{whl.name}</a></body></html>\n')
    ctx = tmp_path / "app"
    (ctx / "wheels").mkdir(parents=True)
    shutil.copy(pip_whl[-1], ctx / "wheels")
    (ctx / "main.py").write_text("import demo_app\nprint(demo_app.VALUE)\n")
    port = 8090
    (ctx / "Dockerfile").write_text(
        "FROM debian-python\n"
        "ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \\\n"
        "    PIP_RETRIES=0\n"
        "COPY wheels/ /opt/wheels/\n"
        f"RUN python3 /opt/wheels/{pip_whl[-1].name}/pip install --no-index "
        f"/opt/wheels/{pip_whl[-1].name} && rm -r /opt/wheels\n"
        "WORKDIR /app\n"
        "COPY main.py .\n"
        f"RUN pip install --index-url http://{INET_IP}:{port}/simple/ "
        f"--trusted-host {INET_IP} demo-app\n"
        'CMD ["python3", "/app/main.py"]\n')
    monkeypatch.setenv("EMBER_LOCAL", "1")  # in this process, with the fake host below
    with fake_world() as world:
        monkeypatch.setenv("EMBER_NET_HOST_NS", world.host)
        server = _serve_index(world, index, port)
        try:
            with pytest.raises(BuildStepError, match="line 8") as got:  # no --network
                build(home, ctx, name="pyapp")
            assert "No matching distribution found for demo-app" in str(got.value)
            _, lines = build(home, ctx, name="pyapp", build_network=NetworkPolicy(
                internet=False, allow=(f"{INET_IP}/32",)))
        finally:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
    assert any("Successfully installed demo-app-1.0" in ln for ln in lines), lines
    with Sandbox.create("pyapp", paths=home, timeout=300) as sb:
        assert sb.exec("python3 /app/main.py").check().stdout == "from the local index\n"
        assert sb.info().network is None
    assert_no_leaks_anywhere(home, keep_snapshots=[s.id for s in entries(home)])


def test_from_an_image_source_builds_it_first(home: Paths, tmp_path: Path) -> None:
    """FROM an OCI layout of busybox (no Debian, no Python of its own): the source is built
    as template from-<hash> first, and reused by the next build."""
    from ember.sdk.dockerfile_build import base_template_name
    from tests.oci_fixtures import make_busybox_oci_layout

    layout = make_busybox_oci_layout(tmp_path / "busybox-oci")
    ctx = tmp_path / "bb"
    ctx.mkdir()
    (ctx / "hello.txt").write_text("hello busybox\n")
    (ctx / "Dockerfile").write_text(
        "ARG SRC\n"
        "FROM oci-layout:$SRC\n"
        "COPY --chmod=600 hello.txt /srv/\n"
        "RUN cp /srv/hello.txt /srv/copy && busybox --help >/dev/null\n")
    _, lines = build(home, ctx, name="bb", build_args={"SRC": str(layout)})
    base = base_template_name(f"oci-layout:{layout}")
    assert any(f"building it as template {base}" in ln for ln in lines), lines
    assert base in [t.name for t in Sandbox.list_templates(paths=home)]
    with Sandbox.create("bb", paths=home, timeout=300) as sb:
        assert sb.exec("cat /srv/copy; stat -c %a /srv/hello.txt").check().stdout == (
            "hello busybox\n600\n")
    _, lines = build(home, ctx, name="bb2", build_args={"SRC": str(layout)})
    assert any(f"template {base}" in ln and "building" not in ln for ln in lines), lines


def test_add_unpacks_a_local_archive(home: Paths, tmp_path: Path) -> None:
    import tarfile

    ctx = tmp_path / "add"
    (ctx / "src" / "pkg").mkdir(parents=True)
    (ctx / "src" / "pkg" / "x.txt").write_text("inside the archive\n")
    with tarfile.open(ctx / "app.tar.gz", "w:gz") as t:
        t.add(ctx / "src" / "pkg", arcname="pkg")
    shutil.rmtree(ctx / "src")
    (ctx / "plain.txt").write_text("plain\n")
    (ctx / "Dockerfile").write_text("FROM debian-python\nADD app.tar.gz /opt/app/\n"
                                    "ADD plain.txt /opt/\nRUN grep MemTotal /proc/meminfo\n")
    _, lines = build(home, ctx, name="added", build_memory_mib=384)  # the build VM's size
    (mem,) = [ln for ln in lines if ln.startswith("  | MemTotal")]
    assert 300_000 < int(mem.split()[-2]) <= 384 * 1024, mem
    with Sandbox.create("added", paths=home, timeout=300) as sb:
        out = sb.exec("cat /opt/app/pkg/x.txt /opt/plain.txt; ls /opt/app").check().stdout
    assert out == "inside the archive\nplain\npkg\n"


def test_a_damaged_cache_entry_is_dropped_and_the_stage_rebuilt(home: Paths,
                                                               tmp_path: Path) -> None:
    from ember.runtime.snapshots import STATE, snapshot_dir

    ctx = tmp_path / "dmg"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM debian-python\nRUN echo a > /a\nRUN echo b > /b\n")
    build(home, ctx, name="dmg")
    first = min(entries(home), key=lambda s: s.created_at)  # RUN echo a
    state = snapshot_dir(home, first.id) / STATE
    with open(state, "r+b") as f:
        f.truncate(state.stat().st_size // 2)
    (ctx / "Dockerfile").write_text("FROM debian-python\nRUN echo a > /a\nRUN echo c > /c\n")
    _, lines = build(home, ctx, name="dmg2")
    assert any("cannot be restored" in ln for ln in lines), lines
    with Sandbox.create("dmg2", paths=home, timeout=300) as sb:
        assert sb.exec("cat /a /c").check().stdout == "a\nc\n"
    assert first.id not in {s.id for s in entries(home)}
    assert_no_leaks_anywhere(home, keep_snapshots=[s.id for s in entries(home)])
