"""The container isolation tiers (``isolation="container"``: crun; ``"gvisor"``: runsc) on
real containers: the same exec and files API, limits and lifetimes as a microVM, no
network, and a destroy that leaves nothing behind (process, mount, loop device, cgroup,
overlay directory, runtime state, registry row)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember import Sandbox
from ember.engine.container import tier_status
from ember.errors import (
    BadRequestError,
    EmberError,
    EmberTimeoutError,
    GuestError,
    SandboxStateError,
)
from ember.host import home_key
from ember.paths import Paths
from ember.sdk.async_sandbox import manager
from ember.store import Store

TIERS = ["container", "gvisor"]


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    st = tier_status(request.param)
    if not st.ok:
        pytest.skip(f"isolation={request.param} unavailable here: {st.detail} ({st.fix})")
    return str(request.param)


def _loops_backed_by(image: Path) -> set[str]:
    found = set()
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        if f.read_text().strip() == str(image):
            found.add(f.parent.parent.name)
    return found


def _processes_naming(token: str) -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in argv:
                shown = argv.replace(b"\0", b" ")[:120]
                out.append(f"{d.name}: {shown!r}")
    return out


def assert_nothing_left(paths: Paths, sid: str, sdir: Path, image: Path,
                        loops_before: set[str], isolation: str) -> None:
    deadline = time.monotonic() + 10
    while _processes_naming(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_naming(sid), "a process of the sandbox is left"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(sdir) not in mounts, "a mount of the sandbox is left"
    assert _loops_backed_by(image) <= loops_before, "a loop device is left"
    assert not sdir.exists(), "the sandbox directory (overlay upper dir) is left"
    cgroups = [p for p in Path("/sys/fs/cgroup").glob(f"*/ember/{home_key(paths.home)}/{sid}")]
    assert not cgroups, f"cgroups left: {cgroups}"
    runtime = {"container": "crun", "gvisor": "runsc"}[isolation]
    state = Path("/run/ember/oci") / home_key(paths.home) / runtime / sid
    assert not state.exists(), "the OCI runtime's state is left"
    assert sid not in [r.id for r in Store(paths.db).list_sandboxes()], "registry row left"


def _image(paths: Paths) -> Path:
    return Path(Store(paths.db).get_template("debian-python").image_path)


@pytest.fixture
def sandbox(ember_paths: Paths, debian_template, tier: str) -> Iterator[Sandbox]:  # type: ignore[no-untyped-def]
    sb = Sandbox.create("debian-python", isolation=tier, timeout=600, paths=ember_paths)
    try:
        yield sb
    finally:
        sb.kill()


def test_exec_streams_files_and_destroy_leaves_nothing(ember_paths: Paths, debian_template,  # type: ignore[no-untyped-def]
                                                       tier: str) -> None:
    image = _image(ember_paths)
    loops = _loops_backed_by(image)
    sb = Sandbox.create("debian-python", isolation=tier, timeout=600, paths=ember_paths)
    sid = sb.id
    sdir = Path(manager(ember_paths).get(sid).dir)
    try:
        assert sb.info().isolation == tier
        chunks: list[str] = []
        r = sb.exec("for i in 1 2 3; do echo line$i; sleep 0.2; done; echo err >&2",
                    on_stdout=chunks.append)
        assert r.exit_code == 0 and r.stdout == "line1\nline2\nline3\n" and r.stderr == "err\n"
        assert "".join(chunks) == r.stdout and len(chunks) >= 2  # streamed, not at the end
        assert sb.exec("hostname").stdout.strip() == sid
        assert sb.exec(["python3", "-c", "print(6*7)"]).stdout == "42\n"
        sb.files.write("/root/data.bin", bytes(range(256)) * 1000)
        assert sb.files.read("/root/data.bin") == bytes(range(256)) * 1000
        sb.files.write("/tmp/hello.txt", "hi")
        assert sb.files.read_text("/tmp/hello.txt") == "hi"
        assert "hello.txt" in [e.name for e in sb.files.list("/tmp")]
        assert sb.exec("cat /root/data.bin | wc -c").stdout.strip() == "256000"
    finally:
        sb.kill()
    assert_nothing_left(ember_paths, sid, sdir, image, loops, tier)


def test_sandboxes_do_not_share_writes(ember_paths: Paths, debian_template, tier: str) -> None:  # type: ignore[no-untyped-def]
    with Sandbox.create("debian-python", isolation=tier, timeout=600, paths=ember_paths) as a, \
            Sandbox.create("debian-python", isolation=tier, timeout=600,
                           paths=ember_paths) as b:
        a.exec("echo a > /etc/mine")
        assert b.exec("cat /etc/mine").exit_code != 0


def test_no_network(sandbox: Sandbox) -> None:
    ifaces = sandbox.exec("tail -n +3 /proc/net/dev | cut -d: -f1").stdout.split()
    assert ifaces == ["lo"]
    r = sandbox.exec(["python3", "-c", "import socket; s = socket.socket(); s.settimeout(3); "
                      "s.connect(('1.1.1.1', 53))"])
    assert r.exit_code != 0 and ("unreachable" in r.stderr or "Errno" in r.stderr)


def test_command_timeout_is_a_clear_error_and_the_sandbox_lives_on(sandbox: Sandbox) -> None:
    t0 = time.monotonic()
    with pytest.raises(EmberTimeoutError):
        sandbox.exec("sleep 60", timeout=1)
    assert time.monotonic() - t0 < 15
    assert sandbox.exec("echo ok").stdout == "ok\n"


def test_lifetime_end_destroys(ember_paths: Paths, debian_template, tier: str) -> None:  # type: ignore[no-untyped-def]
    image = _image(ember_paths)
    loops = _loops_backed_by(image)
    sb = Sandbox.create("debian-python", isolation=tier, timeout=600, paths=ember_paths)
    sid, sdir = sb.id, Path(manager(ember_paths).get(sb.id).dir)
    sb.set_timeout(2)
    with pytest.raises(EmberError, match="end of its lifetime"):
        sb.exec("sleep 120")
    sb.kill()
    assert_nothing_left(ember_paths, sid, sdir, image, loops, tier)


def test_a_paused_sandbox_is_destroyed_from_another_process(ember_paths: Paths,  # type: ignore[no-untyped-def]
                                                            debian_template, tier: str) -> None:
    """`ember rm` of a paused sandbox (a frozen cgroup on `container`, whose tasks act on
    no SIGKILL until thawed on cgroup v1) leaves nothing behind."""
    image = _image(ember_paths)
    loops = _loops_backed_by(image)
    sb = Sandbox.create("debian-python", isolation=tier, timeout=600, paths=ember_paths)
    sid, sdir = sb.id, Path(manager(ember_paths).get(sb.id).dir)
    try:
        sb.spawn("sleep 300")
        sb.pause()
        rm = _ember("rm", sid)
        assert rm.returncode == 0, rm.stderr
        assert_nothing_left(ember_paths, sid, sdir, image, loops, tier)
    finally:  # idempotent on a destroyed sandbox; after a failure above, nothing outlives it
        sb.kill()


def test_disk_limit_is_enforced(sandbox: Sandbox, tier: str) -> None:
    """The writable layer is a filesystem of the sandbox's disk size: what the sandbox
    writes cannot grow past it on the host."""
    size_mib = sandbox.info().disk_mib
    r = sandbox.exec(f"head -c 8M /dev/zero > /root/small && fallocate -l {size_mib + 64}M "
                     "/root/huge; echo rc=$?; df -m /root | tail -1")
    assert "rc=0" not in r.stdout, (r.stdout, r.stderr)
    assert "No space left" in r.stderr or "space" in r.stderr.lower(), r.stderr
    assert sandbox.exec("stat -c %s /root/small").stdout.strip() == str(8 << 20) or \
        sandbox.files.read("/root/small") == bytes(8 << 20)
    sandbox.exec("rm -f /root/small /root/huge")


def test_memory_limit_is_enforced(ember_paths: Paths, debian_template, tier: str) -> None:  # type: ignore[no-untyped-def]
    with Sandbox.create("debian-python", isolation=tier, memory_mib=128, timeout=600,
                        paths=ember_paths) as sb:
        hog = "b = bytearray(600 << 20); b[::4096] = b'x' * len(b[::4096]); print('survived')"
        try:
            r = sb.exec(["python3", "-c", hog], timeout=120)
        except GuestError as err:  # gVisor: the Sentry itself is the cgroup's biggest task
            assert "out of memory" in str(err) or "lost" in str(err) or "died" in str(err)
            rec = manager(ember_paths).get(sb.id)
            assert rec.state == "failed" and "out of memory" in (rec.error or "")
        else:
            assert r.exit_code != 0 and "survived" not in r.stdout


def test_microvm_only_operations_are_refused(sandbox: Sandbox, tier: str) -> None:
    refused = [sandbox.snapshot, lambda: sandbox.fork(1)]
    for op in refused:
        with pytest.raises(BadRequestError, match=f"not supported on isolation={tier}"):
            op()
    assert sandbox.exec("echo still").stdout == "still\n"


@pytest.mark.parametrize("isolation", ["gvisor", "container"])
def test_pause_stops_the_workload_and_resume_continues_it(
        ember_paths: Paths, debian_template, isolation: str) -> None:  # type: ignore[no-untyped-def]
    """runsc pauses its Sentry; a crun container is frozen in its cgroup. Either way a
    loop running in the sandbox sees the pause as one long gap between two of its ticks."""
    if not tier_status(isolation).ok:
        pytest.skip(f"isolation={isolation} unavailable here")
    with Sandbox.create("debian-python", isolation=isolation, timeout=600,
                        paths=ember_paths) as sb:
        sb.exec("echo kept > /root/kept")
        sb.spawn(["python3", "-c", _GAP_LOOP])
        _wait_for(lambda: sb.exec("cat /root/gap").exit_code == 0)
        sb.pause()
        assert manager(ember_paths).get(sb.id).state == "paused"
        time.sleep(2.0)
        assert manager(ember_paths).get(sb.id).state == "paused"  # alive while paused
        sb.resume()
        assert manager(ember_paths).get(sb.id).state == "running"
        assert sb.exec("cat /root/kept").stdout == "kept\n"
        _wait_for(lambda: _gap(sb)[0] >= 1.8)
        ticks = _gap(sb)[1]
        _wait_for(lambda: _gap(sb)[1] > ticks)  # it runs again


#: Ticks every 50 ms and records the longest gap between two ticks, and the tick count.
_GAP_LOOP = """
import os, time
last, gap, ticks = time.monotonic(), 0.0, 0
while True:
    time.sleep(0.05)
    now = time.monotonic()
    gap, last, ticks = max(gap, now - last) if ticks else 0.0, now, ticks + 1
    with open("/root/gap.new", "w") as f:
        f.write(f"{gap:.3f} {ticks}")
    os.replace("/root/gap.new", "/root/gap")
"""


def _gap(sb: Sandbox) -> tuple[float, int]:
    gap, ticks = sb.exec("cat /root/gap").stdout.split()
    return float(gap), int(ticks)


def _wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _ember(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True,
                          text=True, timeout=300, env=os.environ.copy())


def test_cli_run_create_and_ls_show_the_tier(ember_paths: Paths, debian_template,  # type: ignore[no-untyped-def]
                                             tier: str) -> None:
    cp = _ember("run", "--isolation", tier, "--", "sh -c 'echo hi; exit 3'")
    assert (cp.returncode, cp.stdout) == (3, "hi\n"), cp.stderr
    cp = _ember("create", "--isolation", tier, "--json")
    assert cp.returncode == 0, cp.stderr
    sid = json.loads(cp.stdout)["id"]
    try:
        rows = {r["id"]: r for r in json.loads(_ember("ls", "--json").stdout)}
        assert rows[sid]["isolation"] == tier
        assert tier in _ember("ls").stdout
        assert _ember("exec", sid, "--", "echo", "from-cli").stdout == "from-cli\n"
    finally:
        assert _ember("rm", sid).returncode == 0


def test_a_dead_container_is_found_failed_and_released(ember_paths: Paths, debian_template,  # type: ignore[no-untyped-def]
                                                       tier: str) -> None:
    """The container's main process dies (crash, OOM, kill -9 by someone): the next look at
    the registry marks the sandbox failed and releases its mounts, cgroup and runtime
    state; its console log stays for `ember logs` until it is removed."""
    image = _image(ember_paths)
    loops = _loops_backed_by(image)
    sb = Sandbox.create("debian-python", isolation=tier, timeout=600, paths=ember_paths)
    sid = sb.id
    mgr = manager(ember_paths)
    rec = mgr.get(sid)
    sdir = Path(rec.dir)
    sb.close()
    assert rec.pid is not None
    os.kill(rec.pid, 9)
    deadline = time.monotonic() + 20
    while mgr.get(sid).state != "failed":
        assert time.monotonic() < deadline, "the dead container was not noticed"
        time.sleep(0.2)
    rec = mgr.get(sid)
    assert "exited unexpectedly" in (rec.error or "")
    assert str(sdir) not in Path("/proc/self/mountinfo").read_text()
    assert sorted(p.name for p in sdir.iterdir()) == ["console.log"]
    assert "serving on /.ember/run/agent.sock" in _ember("logs", sid).stdout
    assert _ember("rm", sid).returncode == 0
    assert_nothing_left(ember_paths, sid, sdir, image, loops, tier)


def test_seccomp_and_capabilities_confine_the_workload(sandbox: Sandbox) -> None:
    status = dict(line.split(":", 1) for line in
                  sandbox.exec("cat /proc/self/status").stdout.splitlines() if ":" in line)
    assert status["Seccomp"].strip() == "2"  # a filter is installed (gVisor: --oci-seccomp)
    cap_eff = int(status["CapEff"].strip(), 16)
    assert not cap_eff & (1 << 21), "CAP_SYS_ADMIN"
    assert not cap_eff & (1 << 12), "CAP_NET_ADMIN"
    r = sandbox.exec("unshare -U true")
    assert r.exit_code != 0 and "not permitted" in r.stderr
    assert sandbox.exec("mount -t tmpfs x /tmp").exit_code != 0


def test_creator_killed_before_the_agent_answered_leaves_nothing(  # type: ignore[no-untyped-def]
        ember_paths: Paths, debian_template, tier: str) -> None:
    """The process that runs the runtime (EMBER_LOCAL=1, as the daemon does) dies with the
    container running but not yet ready: the next look at the registry releases the
    container, its mounts and cgroup."""
    image = _image(ember_paths)
    loops = _loops_backed_by(image)
    code = ("import os, signal\nfrom ember import Sandbox\n"
            "def die(msg):\n    if 'waiting for the guest agent' in msg:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"Sandbox.create(isolation={tier!r}, on_progress=die)\n")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "EMBER_LOCAL": "1"})  # it runs them
    assert cp.returncode == -9, cp.stderr
    rows = Store(ember_paths.db).list_sandboxes()
    orphans = [r for r in rows if r.isolation == tier and r.state == "booting"]
    assert len(orphans) == 1
    orphan = orphans[0]
    assert orphan.pid is not None and _processes_naming(orphan.id)
    assert manager(ember_paths).get(orphan.id).state == "failed"
    assert _ember("rm", orphan.id).returncode == 0
    assert_nothing_left(ember_paths, orphan.id, Path(orphan.dir), image, loops, tier)


def test_commands_see_the_same_environment_as_in_a_microvm(sandbox: Sandbox) -> None:
    # coreutils' stat: under runsc 2022 it works only through ember's statx shim
    # (ember.engine.container.compat), which clears the AT_NO_AUTOMOUNT flag runsc rejects.
    r = sandbox.exec("umask; touch /tmp/f; stat -c %a /tmp/f; echo $PATH; pwd; "
                     "stat -c %a /tmp")
    assert len(r.stdout.split()) == 5, (r.stdout, r.stderr)
    umask, mode, path, cwd, tmp = r.stdout.split()
    assert (umask, mode, cwd, tmp) == ("0022", "644", "/root", "1777")
    assert "/usr/bin" in path
    r = sandbox.exec("ls -l /etc/hostname")
    assert r.exit_code == 0 and r.stdout.startswith("-"), (r.stdout, r.stderr)


@pytest.mark.parametrize("isolation", ["gvisor", "container"])
def test_lifetime_end_pauses_when_asked(ember_paths: Paths, debian_template,  # type: ignore[no-untyped-def]
                                        isolation: str) -> None:
    if not tier_status(isolation).ok:
        pytest.skip(f"isolation={isolation} unavailable here")
    sb = Sandbox.create("debian-python", isolation=isolation, timeout=600, on_timeout="pause",
                        paths=ember_paths)
    try:
        sb.set_timeout(2)
        with pytest.raises(SandboxStateError, match="lifetime ended and it was paused"):
            sb.exec("sleep 120")
        assert manager(ember_paths).get(sb.id).state == "paused"
        sb.resume()  # a new lifetime of timeout_s (2 s here): lengthen it before using it
        sb.set_timeout(600)
        assert sb.exec("echo back").stdout == "back\n"
    finally:
        sb.kill()
