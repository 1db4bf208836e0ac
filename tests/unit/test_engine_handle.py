"""Process-level handle operations against real (non-VM) processes: no VM needed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.engine import base
from ember.engine.base import VMHandle, proc_cmdline, process_runs, remove_stale_socket


class ProcessHandle(VMHandle):
    """A VMHandle whose VMM control does nothing: only the shared process logic is tested."""

    def qmp(self, cmd: str, **args: Any) -> Any:
        raise NotImplementedError

    def stop(self) -> None: ...
    def cont(self) -> None: ...
    def status(self) -> str:
        return "running" if self.is_alive() else "exited"

    def quit(self, timeout: float = 10.0) -> None:
        self.kill()


@pytest.fixture
def vm_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def fake_vmm(vm_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping process whose argv carries the QMP socket path, like QEMU's does."""
    qmp = vm_dir / "qmp.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", f"path={qmp},server=on"]
    )
    deadline = time.monotonic() + 10
    while not process_runs(proc.pid, str(qmp)):  # /proc/<pid>/cmdline is empty mid-exec
        assert time.monotonic() < deadline
        time.sleep(0.005)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def handle_for(vm_dir: Path, pid: int) -> ProcessHandle:
    return ProcessHandle(
        name="t",
        pid=pid,
        qmp_socket=vm_dir / "qmp.sock",
        agent_socket=vm_dir / "agent.sock",
        console_log=vm_dir / "console.log",
        pidfile=vm_dir / "qemu.pid",
    )


def listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


def dead_socket(path: Path) -> None:
    listening_socket(path).close()  # the file stays, nobody listens
    assert path.exists()


def test_kill_leaves_no_process_no_zombie_and_no_files(
    vm_dir: Path, fake_vmm: subprocess.Popen[bytes]
) -> None:
    h = handle_for(vm_dir, fake_vmm.pid)
    dead_socket(h.qmp_socket)
    dead_socket(vm_dir / "agent.sock")
    h.pidfile.write_text(f"{fake_vmm.pid}\n")
    assert h.is_alive()
    h.kill()
    assert not h.is_alive()
    # It was our child, so kill() reaped it: no zombie left.
    assert not Path(f"/proc/{fake_vmm.pid}").exists()
    assert not h.qmp_socket.exists() and not (vm_dir / "agent.sock").exists()
    assert not h.pidfile.exists()
    h.kill()  # idempotent


def test_wait_exit_times_out_then_sees_exit(
    vm_dir: Path, fake_vmm: subprocess.Popen[bytes]
) -> None:
    h = handle_for(vm_dir, fake_vmm.pid)
    assert h.wait_exit(0.05) is False
    fake_vmm.terminate()
    assert h.wait_exit(5) is True
    assert not h.is_alive()


def test_reused_pid_is_never_signalled(vm_dir: Path) -> None:
    # Our own pid stands in for a pid that the registry remembers but another program owns.
    h = handle_for(vm_dir, os.getpid())
    assert not h.is_alive()
    h.kill()  # must not kill the test runner
    assert h.wait_exit(0) is True
    assert h.status() == "exited"


def test_gone_pid_is_dead(vm_dir: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    h = handle_for(vm_dir, proc.pid)
    assert not h.is_alive()
    h.kill()
    assert h.wait_exit(0)


def test_cleanup_keeps_a_live_socket_and_a_foreign_pidfile(
    vm_dir: Path, fake_vmm: subprocess.Popen[bytes]
) -> None:
    h = handle_for(vm_dir, fake_vmm.pid)
    with listening_socket(h.qmp_socket):  # a newer VM already reuses the path
        h.pidfile.write_text("999999\n")
        h.kill()
        assert h.qmp_socket.exists()
        assert h.pidfile.read_text() == "999999\n"


def test_remove_stale_socket(vm_dir: Path) -> None:
    path = vm_dir / "s.sock"
    remove_stale_socket(path)  # missing: fine
    dead_socket(path)
    remove_stale_socket(path)
    assert not path.exists()


def test_process_runs_matches_argv(fake_vmm: subprocess.Popen[bytes], vm_dir: Path) -> None:
    assert process_runs(fake_vmm.pid, str(vm_dir / "qmp.sock"))
    assert not process_runs(fake_vmm.pid, str(vm_dir / "other.sock"))


def test_pid_must_be_positive(vm_dir: Path) -> None:
    from ember.errors import BadRequestError

    with pytest.raises(BadRequestError):
        handle_for(vm_dir, 0)


#: An exec chain: each stage execs the next (``$1`` counts down, the token stays in
#: ``$0``); the last one waits for its stdin to close.
EXEC_CHAIN = 'if [ "$1" -gt 0 ]; then exec sh -c "$CHAIN" "$0" $(($1 - 1)); fi; read -r _'


def test_a_process_exec_ing_is_never_taken_for_gone() -> None:
    """A process's cmdline reads empty while it execs (its new program's arguments are
    not set up yet): a container's init did that as ember waited for its agent, which
    took it for dead (the CI failure: "container exited right after starting")."""
    proc = subprocess.Popen(["sh", "-c", EXEC_CHAIN, "ember-exec-chain", "300"],
                            stdin=subprocess.PIPE, env={**os.environ, "CHAIN": EXEC_CHAIN})
    try:
        deadline = time.monotonic() + 10
        while not process_runs(proc.pid, "ember-exec-chain"):  # before its first exec
            assert time.monotonic() < deadline
        seen = set()
        while (argv := proc_cmdline(proc.pid)) is None or argv[-1] != "0":
            assert argv is not None, f"taken for gone after {len(seen)} execs"
            seen.add(argv[-1])
        assert len(seen) > 10  # the poll saw the chain go by, not only its end
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()


def fake_proc(root: Path, pid: int, *, cmdline: bytes, state: str = "R",
              flags: int = 0x400100, comm: str = "python3") -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cmdline").write_bytes(cmdline)
    (d / "stat").write_text(f"{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 {flags} 55 0 1 0\n")


def test_process_runs_waits_out_an_exec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured: a container's init read empty 10 ms before showing its argv (state R,
    the new program's name already, no exit flag)."""
    monkeypatch.setattr(base, "PROC", tmp_path)
    fake_proc(tmp_path, 42, cmdline=b"", comm="odd) R 1 (name")
    later = threading.Timer(0.05, fake_proc, (tmp_path, 42),
                            {"cmdline": b"python3\0-c\0...\0sb-1\0"})
    later.start()
    try:
        assert process_runs(42, "sb-1")
    finally:
        later.cancel()


@pytest.mark.parametrize(("state", "flags"), [
    ("Z", 0x400100),  # a zombie
    ("R", 0x400104),  # exiting: its memory is gone, it is not a zombie yet
    ("S", 0x208040),  # a kernel thread (a reused pid)
])
def test_process_runs_does_not_wait_for_the_dead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 state: str, flags: int) -> None:
    monkeypatch.setattr(base, "PROC", tmp_path)
    fake_proc(tmp_path, 42, cmdline=b"", state=state, flags=flags)
    # An argv showing up later would make a waiting read answer True.
    later = threading.Timer(0.2, fake_proc, (tmp_path, 42), {"cmdline": b"x\0sb-1\0"})
    later.start()
    try:
        assert not process_runs(42, "sb-1")
    finally:
        later.cancel()


def test_an_empty_cmdline_is_waited_for_only_so_long(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "PROC", tmp_path)
    monkeypatch.setattr(base, "EXEC_SETTLE_S", 0.05)
    fake_proc(tmp_path, 42, cmdline=b"")
    assert proc_cmdline(42) is None
    (tmp_path / "43").mkdir()  # gone between its directory and its files
    assert proc_cmdline(43) is None
