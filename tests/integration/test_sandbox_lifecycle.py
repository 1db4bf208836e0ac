"""Create, connect, fail and destroy real sandboxes; nothing may leak on any path."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember import (
    BadRequestError,
    EmberTimeoutError,
    GuestError,
    Sandbox,
    SandboxNotFoundError,
    TemplateNotFoundError,
)
from ember.paths import Paths
from ember.sdk.async_sandbox import manager
from tests.conftest import qemu_pids_under

pytestmark = pytest.mark.integration


def assert_no_leaks(paths: Paths, allow_failed_rows: bool = False) -> None:
    rows = manager(paths).store.list_sandboxes()
    live = [r for r in rows if r.state != "failed" or not allow_failed_rows]
    assert live == [], f"registry rows left: {[(r.id, r.state) for r in live]}"
    leaked = qemu_pids_under(paths.home)
    assert leaked == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:300] for p in leaked]
    for r in rows:  # failed sandboxes keep only their console log and the VMM's stderr
        assert {p.name for p in Path(r.dir).iterdir()} <= {"console.log", "qemu.log"}
    if not rows:
        assert list(paths.sandboxes.iterdir()) == []


def test_create_exec_destroy_leaves_nothing(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    with Sandbox.create("debian-python", paths=ember_paths) as sb:
        assert sb.exec("hostname").stdout.strip() == sb.id
        info = sb.info()
        assert (info.state, info.template, info.vcpus, info.memory_mib) == (
            "running", "debian-python", 1, 256)
        assert sb.id in [i.id for i in Sandbox.list(paths=ember_paths)]
        # the guest sees its own limits
        mem_kib = int(sb.exec("grep MemTotal /proc/meminfo").stdout.split()[1])
        assert 150_000 < mem_kib <= 256 * 1024
        assert sb.exec("nproc").stdout.strip() == "1"
    assert_no_leaks(ember_paths)


def test_connect_from_another_process(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    sb = Sandbox.create("debian-python", paths=ember_paths, env={"GREETING": "hi"})
    try:
        sb.files.write("/tmp/note", "from the creator")
        sb.close()  # the sandbox outlives this connection
        code = (
            "import ember, sys\n"
            f"sb = ember.Sandbox.connect({sb.id!r})\n"
            "r = sb.exec('cat /tmp/note; echo \" $GREETING\"')\n"
            "print(r.stdout.strip()); sb.close()\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        assert out.strip() == "from the creator hi"
        again = Sandbox.connect(sb.id, paths=ember_paths)
        assert again.exec("echo back").stdout == "back\n"
        again.kill()
    finally:
        sb.kill()
    assert_no_leaks(ember_paths)


def test_bad_requests_create_nothing(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TemplateNotFoundError, match="no-such-template"):
        Sandbox.create("no-such-template", paths=ember_paths)
    with pytest.raises(BadRequestError, match="vcpus=0"):
        Sandbox.create("debian-python", vcpus=0, paths=ember_paths)
    with pytest.raises(BadRequestError, match="memory_mib"):
        Sandbox.create("debian-python", memory_mib=10**8, paths=ember_paths)
    with pytest.raises(BadRequestError, match="disk_mib"):
        Sandbox.create("debian-python", disk_mib=64, paths=ember_paths)
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect("sb-000000000000", paths=ember_paths)
    assert_no_leaks(ember_paths)


def test_guest_that_never_answers_times_out_cleanly(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EmberTimeoutError, match="did not answer"):
        Sandbox.create("debian-python", boot_timeout=0.3, paths=ember_paths, boot="cold")
    assert_no_leaks(ember_paths)


def test_vm_killed_mid_command_fails_the_sandbox(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    sb = Sandbox.create("debian-python", paths=ember_paths)
    pid = manager(ember_paths).store.get_sandbox(sb.id).pid
    assert pid is not None
    p = sb.spawn("sleep 60", timeout=None)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(GuestError, match=r"its console ends: .*ember-agent"):
        p.wait()  # the error carries the guest's last console lines
    rec = manager(ember_paths).get(sb.id)
    assert rec.state == "failed" and rec.error
    with pytest.raises(GuestError):
        sb.exec("true")
    assert_no_leaks(ember_paths, allow_failed_rows=True)
    sb.kill()  # removing a failed sandbox removes its row and log
    assert_no_leaks(ember_paths)


def test_guest_that_stops_answering_is_failed(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    sb = Sandbox.create("debian-python", paths=ember_paths)
    pid = manager(ember_paths).store.get_sandbox(sb.id).pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the VM freezes: no answer, no hang on our side
    try:
        with pytest.raises(EmberTimeoutError, match="stopped answering"):
            sb.ping(timeout=2.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    rec = manager(ember_paths).store.get_sandbox(sb.id)
    assert rec.state == "failed" and "stopped answering" in (rec.error or "")
    assert_no_leaks(ember_paths, allow_failed_rows=True)
    with pytest.raises(GuestError):
        sb.exec("true")
    sb.kill()
    assert_no_leaks(ember_paths)


def _create_and_get_killed(ember_paths: Paths, env: dict[str, str]) -> None:
    code = "import ember; ember.Sandbox.create('debian-python'); import time; time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 60
        while not qemu_pids_under(ember_paths.home):  # wait until QEMU is booting
            assert time.monotonic() < deadline, "QEMU never started"
            assert child.poll() is None, "creator exited early"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()


def test_creator_killed_mid_create_is_reconciled(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    """A process running the runtime itself (EMBER_LOCAL=1, as the daemon does) dies while
    its sandbox boots: the next reconcile marks it failed and releases everything."""
    _create_and_get_killed(ember_paths, {**os.environ, "EMBER_LOCAL": "1"})
    recs = manager(ember_paths).list()  # `ember ls` reconciles
    assert len(recs) == 1 and recs[0].state == "failed", recs
    assert "died" in (recs[0].error or "")
    assert_no_leaks(ember_paths, allow_failed_rows=True)
    manager(ember_paths).destroy(recs[0].id)
    assert_no_leaks(ember_paths)


def test_client_killed_mid_create_through_the_daemon(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    """Through the daemon, the create is the daemon's: its client dying changes nothing,
    and the sandbox comes up, usable by anyone (and ends with its lifetime)."""
    _create_and_get_killed(ember_paths, os.environ.copy())
    deadline = time.monotonic() + 180
    while True:
        infos = Sandbox.list(paths=ember_paths)
        if infos and infos[0].state == "running":
            break
        assert time.monotonic() < deadline, f"the create did not finish: {infos}"
        time.sleep(0.2)
    assert len(infos) == 1
    sb = Sandbox.connect(infos[0].id, paths=ember_paths)
    assert sb.exec("hostname").stdout.strip() == sb.id
    sb.kill()
    assert_no_leaks(ember_paths)


def test_lifetime_timeout_destroys_the_sandbox(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    sb = Sandbox.create("debian-python", timeout=600, paths=ember_paths)
    sb.set_timeout(1)
    sb.close()
    time.sleep(1.5)
    assert sb.id not in [i.id for i in Sandbox.list(paths=ember_paths)]
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect(sb.id, paths=ember_paths)
    assert_no_leaks(ember_paths)


def test_missing_kernel_or_qemu_is_a_clear_error(ember_paths: Paths, debian_template,
                                                  tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ember.errors import MissingDependencyError
    from ember.store import Store

    # an ember home whose cache has no kernel, with the template registered
    isolated = Paths(home=tmp_path / "h", cache=tmp_path / "c").ensure()
    Store(isolated.db).put_template(debian_template)
    try:
        with pytest.raises(MissingDependencyError, match="ember kernel build"):
            Sandbox.create("debian-python", paths=isolated)  # its daemon says so
    finally:
        from ember.daemon.control import stop

        stop(isolated)
    assert manager(isolated).store.list_sandboxes() == []
    assert list(isolated.sandboxes.iterdir()) == []
    # no QEMU on PATH (of the process that runs the runtime)
    code = "import ember; ember.Sandbox.create('debian-python')"
    env = {**os.environ, "PATH": "/nonexistent", "EMBER_LOCAL": "1"}
    cp = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120)
    assert cp.returncode != 0 and "MissingDependencyError" in cp.stderr
    assert "apt-get install" in cp.stderr
    assert_no_leaks(ember_paths)


def test_disk_size_is_what_was_asked(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    base_mib = debian_template.size_bytes >> 20
    with Sandbox.create("debian-python", disk_mib=base_mib + 1024, paths=ember_paths) as sb:
        size_mib = int(sb.exec(["df", "-m", "--output=size", "/"]).stdout.split()[-1])
        assert size_mib > base_mib + 900  # the guest grew its filesystem to the disk
        sb.exec("head -c 50000000 /dev/zero > /big && sync").check()
    assert_no_leaks(ember_paths)


def test_lifetime_is_enforced_after_its_creator_is_gone(ember_paths: Paths,
                                                       debian_template) -> None:  # type: ignore[no-untyped-def]
    code = "import ember; sb = ember.Sandbox.create('debian-python', timeout=2); sb.close()"
    cp = subprocess.run([sys.executable, "-c", code], timeout=120, env=os.environ.copy(),
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    assert qemu_pids_under(ember_paths.home)  # the sandbox outlives its creator...
    deadline = time.monotonic() + 30
    # ...until the home's daemon ends it, nobody asking. It kills QEMU first and deletes
    # the row after: wait for both (checking the row as soon as QEMU is gone races it).
    while qemu_pids_under(ember_paths.home) or manager(ember_paths).store.list_sandboxes():
        assert time.monotonic() < deadline, "the expired sandbox was not destroyed"
        time.sleep(0.2)
    assert manager(ember_paths).store.list_sandboxes() == []
    assert_no_leaks(ember_paths)


def test_in_process_a_second_client_gets_a_clear_busy_error(
        ember_paths: Paths, debian_template, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from ember import SandboxStateError

    monkeypatch.setenv("EMBER_LOCAL", "1")
    with Sandbox.create("debian-python", paths=ember_paths) as sb:
        with pytest.raises(SandboxStateError, match="busy"):
            Sandbox.connect(sb.id, wait=0.5, paths=ember_paths)
        assert sb.exec("echo still mine").stdout == "still mine\n"
    assert_no_leaks(ember_paths)


def test_through_the_daemon_clients_share_a_sandbox(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    with Sandbox.create("debian-python", paths=ember_paths) as sb:
        other = Sandbox.connect(sb.id, wait=0.5, paths=ember_paths)
        p = sb.spawn("sleep 2; echo slow", timeout=30)
        assert other.exec("echo meanwhile").stdout == "meanwhile\n"
        assert p.wait().stdout == "slow\n"
        other.close()
        assert sb.exec("echo still mine").stdout == "still mine\n"
    assert_no_leaks(ember_paths)
