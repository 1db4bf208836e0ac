"""What a new user gets: no service started by hand. ``Sandbox.create()`` and the CLI start
the home's daemon on first use and talk to it; a daemon killed under a client is started
again on its next call; an on-demand daemon stops by itself once nothing is left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.daemon import control
from ember.paths import Paths

pytestmark = pytest.mark.integration

IDLE_S = 4  # the on-demand daemon's idle exit, short for the test

SCRIPT = r"""
import json, os, signal, sys, time
from ember import Sandbox
from ember.daemon import control
from ember.paths import Paths

sb = Sandbox.create("debian-python", timeout=600)
first = control.status(Paths.from_env()).pid
out = {"id": sb.id, "hostname": sb.exec("hostname").stdout.strip(), "daemon": first}
os.kill(first, signal.SIGKILL)  # the daemon dies under a connected client
def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"
    except OSError:
        return False
def refused():  # the kernel drops a dead process's listening socket a moment after
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(Paths.from_env().daemon_socket))
        return False
    except OSError:
        return True
    finally:
        s.close()
# (a request racing with its death gets GuestError: "lost the daemon", and is not resent)
deadline = time.monotonic() + 10
while (alive(first) or not refused()) and time.monotonic() < deadline:
    time.sleep(0.01)
out["after_kill"] = sb.exec("echo again").stdout.strip()
out["daemon_after"] = control.status(Paths.from_env()).pid
print(json.dumps(out))
"""


@pytest.fixture
def home(ember_paths: Paths, debian_template: object, tmp_path_factory) -> Iterator[Paths]:  # type: ignore[no-untyped-def]
    """A home of its own, sharing the test cache (its template is the cached image)."""
    from ember.guest.image import build_image
    from ember.store import Store

    root = Path(tmp_path_factory.mktemp("dflt", numbered=True))
    paths = Paths(home=root / "h", cache=ember_paths.cache).ensure()
    store = Store(paths.db)
    try:
        build_image(paths, store, "debian-python")
    finally:
        store.close()
    try:
        yield paths
    finally:  # a failed test may leave its sandbox: destroy it in-process, then the daemon
        os.environ["EMBER_LOCAL"] = "1"
        try:
            from ember import Sandbox

            for i in Sandbox.list(paths=paths):
                Sandbox.kill(i.id, paths=paths)
        finally:
            os.environ.pop("EMBER_LOCAL", None)
            control.stop(paths)


def _env(paths: Paths) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_URL", "EMBER_LOCAL")}
    return {**env, "EMBER_HOME": str(paths.home), "EMBER_CACHE": str(paths.cache),
            "EMBER_DAEMON_IDLE_S": str(IDLE_S)}


def _ember(paths: Paths, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], env=_env(paths),
                          capture_output=True, text=True, timeout=300)


def test_sdk_and_cli_start_and_use_the_homes_daemon(home: Paths) -> None:
    assert not control.status(home).running
    cp = subprocess.run([sys.executable, "-c", SCRIPT], env=_env(home), capture_output=True,
                        text=True, timeout=600)
    assert cp.returncode == 0, cp.stderr[-3000:]
    got = json.loads(cp.stdout.strip().splitlines()[-1])
    sid = got["id"]
    assert got["hostname"] == sid and got["after_kill"] == "again"
    assert got["daemon_after"] not in (None, got["daemon"])  # started again by the client
    # the sandbox outlived both its creator and the first daemon; the CLI reaches it
    ls = json.loads(_ember(home, "ls", "--json").stdout)
    assert [i["id"] for i in ls] == [sid] and ls[0]["state"] == "running"
    info = json.loads(_ember(home, "inspect", sid, "--json").stdout)
    assert info["id"] == sid and info["template"] == "debian-python"
    top = _ember(home, "top", "--once", "--json", "-n", "0.5")
    assert top.returncode == 0, top.stderr
    row = next(r for r in json.loads(top.stdout) if r["id"] == sid)
    assert row["memory_bytes"] > 32 << 20 and row["cpu_seconds"] > 0
    assert _ember(home, "pause", sid).returncode == 0
    assert json.loads(_ember(home, "inspect", sid, "--json").stdout)["state"] == "paused"
    assert _ember(home, "resume", sid).returncode == 0
    assert "ember-agent: serving" in _ember(home, "logs", sid).stdout
    rm = _ember(home, "rm", sid)
    assert rm.returncode == 0 and f"removed {sid}" in rm.stdout
    missing = _ember(home, "inspect", sid)
    assert missing.returncode == 3 and "SandboxNotFoundError" in missing.stderr
    # nothing left to watch: the on-demand daemon goes away by itself
    deadline = time.monotonic() + IDLE_S + 30
    while control.status(home).running and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not control.status(home).running, "the on-demand daemon did not stop when idle"
    assert not home.daemon_socket.exists()


def test_a_busy_guest_shows_in_top(home: Paths) -> None:
    """CPU use is measured on the host: a guest spinning shows tens of percent."""
    from ember import Sandbox

    with Sandbox.create("debian-python", timeout=300, paths=home) as sb:
        sb.spawn("while :; do :; done", timeout=120)
        time.sleep(1.0)
        top = _ember(home, "top", "--once", "--json", "-n", "3")
        row = next(r for r in json.loads(top.stdout) if r["id"] == sb.id)
        assert row["cpu_percent"] > 20, row
        usage = {u.id: u for u in Sandbox.list_usage(paths=home)}
        assert usage[sb.id].vcpus == 1 and usage[sb.id].state == "running"


def test_a_home_removed_under_its_daemon(home: Paths) -> None:
    """Deleting a home (a wiped install, a test's temporary home) while sandboxes run: its
    daemon stops their processes and their RAM files, then itself."""
    from ember import Sandbox
    from tests.conftest import qemu_pids_under

    sb = Sandbox.create("debian-python", timeout=600, paths=home)
    assert qemu_pids_under(home.home) and list(home.ram.glob("*.ram"))
    pid = control.status(home).pid
    assert pid is not None
    sb.close()
    shutil.rmtree(home.home)
    deadline = time.monotonic() + 60
    while (qemu_pids_under(home.home) or Path(f"/proc/{pid}").exists()) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not qemu_pids_under(home.home), "its sandbox outlived the home"
    assert not Path(f"/proc/{pid}").exists(), "its daemon outlived the home"
    assert not home.ram.exists()



def test_an_on_demand_daemon_does_not_stop_during_a_build(home: Paths, tmp_path: Path) -> None:
    """A build (no VM: a directory made an image) outlasting the idle period completes:
    its request and job keep the on-demand daemon up; it stops once they are done."""
    src = tmp_path / "tree"
    (src / "data").mkdir(parents=True)
    for i in range(6):  # enough to hash, copy and write that it takes seconds here
        (src / "data" / f"blob{i}").write_bytes(os.urandom(24 << 20))
    env = {**_env(home), "EMBER_DAEMON_IDLE_S": "1"}
    started = time.monotonic()
    cp = subprocess.run([sys.executable, "-m", "ember.cli", "image", "build", "blobs",
                         "--from", f"dir:{src}"], env=env, capture_output=True, text=True,
                        timeout=300)
    took = time.monotonic() - started
    assert cp.returncode == 0, cp.stderr[-3000:]
    print(f"\nbuild took {took:.1f} s with an idle period of 1 s")
    assert took > 1.2  # longer than the idle period
    assert "blobs" in {t["name"] for t in json.loads(_ember(home, "image", "ls", "--json").stdout)}
    deadline = time.monotonic() + IDLE_S + 30
    while control.status(home).running and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not control.status(home).running, "the on-demand daemon did not stop after"
    # It began to stop only once the build's request had ended (before the fix it began
    # during the build; uvicorn's graceful shutdown then hid it for builds under 10 s).
    lines = (home.logs / "ember.log").read_text(errors="replace").splitlines()
    [answered] = [i for i, ln in enumerate(lines) if "POST /v1/templates 200" in ln]
    pid = lines[answered].split()[2]  # the daemon that built it
    stopping = [i for i, ln in enumerate(lines)
                if ln.split()[2:3] == [pid] and "nothing to watch for" in ln]
    assert stopping and stopping[0] > answered, "\n".join(lines[answered - 20:answered + 5])
