"""The QEMU engine against real QEMU: boot a busybox guest, control it, kill it, fail cleanly.

Boot tests use ember's guest kernel (or EMBER_TEST_KERNEL, a bzImage). After every test
no QEMU process may mention the test's directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ember.engine import QemuEngine, VMSpec, detect_accel
from ember.engine.qemu import QemuVMHandle
from ember.errors import EngineError
from ember.paths import Paths
from ember.proc import run

pytestmark = pytest.mark.integration

MARKER = "EMBER-ENGINE-MARKER-7d1f"
INIT = f"""#!/bin/busybox sh
/bin/busybox echo {MARKER} > /dev/console
if [ "$ember_mode" = hold ]; then /bin/busybox sleep 3600; fi
/bin/busybox reboot -f
"""
BOOT_TIMEOUT = 120.0  # TCG on two shared cores; a boot takes a few seconds


def qemu_pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and "qemu" in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    """A short directory (Unix socket paths are limited to 107 bytes), checked for leaks."""
    d = Path(tempfile.mkdtemp(prefix="ember-eng-", dir="/tmp"))
    yield d
    leaked = qemu_pids_mentioning(str(d))
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(d, ignore_errors=True)
    assert not leaked, f"QEMU processes left behind: {leaked}"


@pytest.fixture(scope="session")
def kernel(ember_paths: Paths) -> Path:
    """EMBER_TEST_KERNEL if set, else ember's own kernel (built, or reused from the cache)."""
    value = os.environ.get("EMBER_TEST_KERNEL")
    if not value:
        from ember.guest.kernel import build_kernel

        return build_kernel(ember_paths).bzimage
    path = Path(value).absolute()
    if not path.is_file():
        pytest.skip(f"EMBER_TEST_KERNEL={value} is not a file")
    return path


@pytest.fixture(scope="session")
def busybox_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ext4 root: a static busybox and an /init that prints MARKER, then reboots."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file() or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs /bin/busybox (busybox-static) and mkfs.ext4 (e2fsprogs)")
    base = tmp_path_factory.mktemp("busybox-root")
    tree = base / "tree"
    for sub in ("bin", "dev", "proc", "sys", "tmp"):
        (tree / sub).mkdir(parents=True)
    shutil.copy2(busybox, tree / "bin/busybox")
    (tree / "init").write_text(INIT)
    (tree / "init").chmod(0o755)
    os.mknod(tree / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
    image = base / "root.ext4"
    run(
        ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "16M"],
        what="build the busybox test disk",
        timeout=60,
    )
    return image


def make_spec(vm_dir: Path, kernel: Path, disk: Path, **overrides: Any) -> VMSpec:
    fields: dict[str, Any] = dict(
        name="engine-test",
        kernel=kernel,
        disk=disk,
        disk_format="raw",
        disk_readonly=True,
        vcpus=1,
        memory_mib=128,
        cmdline="init=/init",
        console_log=vm_dir / "console.log",
        qmp_socket=vm_dir / "qmp.sock",
        agent_socket=vm_dir / "agent.sock",
        pidfile=vm_dir / "qemu.pid",
        accel=detect_accel(),
    )
    fields.update(overrides)
    return VMSpec(**fields)


def wait_for_marker(handle: QemuVMHandle, timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.console_log.exists() and MARKER in handle.console_log.read_text(errors="replace"):
            return
        if not handle.is_alive():
            break
        time.sleep(0.05)
    log = handle.console_log.read_text(errors="replace") if handle.console_log.exists() else ""
    raise AssertionError(f"no marker on the console; console log:\n{log[-3000:]}")


def assert_gone(handle: QemuVMHandle) -> None:
    assert not handle.is_alive()
    assert handle.status() == "exited"
    assert not handle.qmp_socket.exists()
    assert handle.agent_socket is None or not handle.agent_socket.exists()
    assert not handle.pidfile.exists()


@pytest.fixture
def held_vm(vm_dir: Path, kernel: Path, busybox_disk: Path) -> Iterator[QemuVMHandle]:
    """A booted guest whose init stays up (``ember_mode=hold``)."""
    spec = make_spec(vm_dir, kernel, busybox_disk, cmdline="init=/init ember_mode=hold")
    handle = QemuEngine().start(spec)
    try:
        wait_for_marker(handle)
        yield handle
    finally:
        handle.kill()


# --------------------------------------------------------------------------- boots


def test_boots_prints_marker_and_exits_by_itself(
    vm_dir: Path, kernel: Path, busybox_disk: Path
) -> None:
    handle = QemuEngine().start(make_spec(vm_dir, kernel, busybox_disk))
    assert handle.is_alive()
    assert handle.qmp_socket.exists() and handle.pidfile.exists()
    wait_for_marker(handle)
    assert handle.wait_exit(BOOT_TIMEOUT), "guest reboot did not end QEMU (-no-reboot)"
    assert_gone(handle)
    assert MARKER in handle.console_log.read_text()


def test_boots_from_a_writable_disk(vm_dir: Path, kernel: Path, busybox_disk: Path) -> None:
    disk = vm_dir / "rw.ext4"
    shutil.copyfile(busybox_disk, disk)
    handle = QemuEngine().start(make_spec(vm_dir, kernel, disk, disk_readonly=False))
    wait_for_marker(handle)
    assert handle.wait_exit(BOOT_TIMEOUT)


def test_qmp_status_pause_resume(held_vm: QemuVMHandle) -> None:
    assert held_vm.status() == "running"
    assert held_vm.qmp("query-status")["running"] is True
    held_vm.stop()
    assert held_vm.status() == "paused"
    held_vm.cont()
    assert held_vm.status() == "running"
    with pytest.raises(EngineError, match="no-such-command"):
        held_vm.qmp("no-such-command")


def test_qmp_from_inside_an_event_loop(held_vm: QemuVMHandle) -> None:
    async def both() -> tuple[Any, Any]:
        return await held_vm.aqmp("query-status"), held_vm.qmp("query-status")

    async_result, sync_result = asyncio.run(both())
    assert async_result["status"] == sync_result["status"] == "running"


def test_kill_leaves_no_process_and_no_sockets(held_vm: QemuVMHandle) -> None:
    pid = held_vm.pid
    held_vm.kill()
    assert_gone(held_vm)
    assert not qemu_pids_mentioning(str(held_vm.qmp_socket))
    assert (
        not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()
    )


def test_quit_ends_the_process(held_vm: QemuVMHandle) -> None:
    held_vm.quit(timeout=30)
    assert_gone(held_vm)


def test_attach_from_the_registry(
    held_vm: QemuVMHandle, vm_dir: Path, kernel: Path, busybox_disk: Path
) -> None:
    spec = make_spec(vm_dir, kernel, busybox_disk, cmdline="init=/init ember_mode=hold")
    other = QemuEngine().attach(held_vm.pid, spec)
    assert other.is_alive() and other.status() == "running"
    # The same pid with another VM's socket is not ours: never signalled.
    stranger = QemuEngine().attach(held_vm.pid, replace(spec, qmp_socket=vm_dir / "x.sock"))
    assert not stranger.is_alive()
    stranger.kill()
    assert held_vm.is_alive()
    assert held_vm.qmp_socket.exists() and held_vm.pidfile.exists()
    other.kill()
    assert_gone(held_vm)


def test_second_start_on_the_same_sockets_is_refused(
    held_vm: QemuVMHandle, vm_dir: Path, kernel: Path, busybox_disk: Path
) -> None:
    spec = make_spec(vm_dir, kernel, busybox_disk)
    with pytest.raises(EngineError, match="already running"):
        QemuEngine().start(spec)
    assert held_vm.status() == "running"


# --------------------------------------------------------------------------- failures


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def dummy_kernel(vm_dir: Path) -> Path:
    path = vm_dir / "dummy-bzImage"
    path.write_bytes(b"\0" * 4096)
    return path


def test_missing_kernel_names_the_cause(vm_dir: Path, dummy_kernel: Path) -> None:
    disk = vm_dir / "disk.raw"
    disk.write_bytes(b"\0" * 65536)
    before = listing(vm_dir)
    with pytest.raises(EngineError, match=r"kernel /\S+/nope does not exist"):
        QemuEngine().start(make_spec(vm_dir, vm_dir / "nope", disk))
    assert listing(vm_dir) == before


def test_missing_disk_names_the_cause(vm_dir: Path, dummy_kernel: Path) -> None:
    before = listing(vm_dir)
    with pytest.raises(EngineError, match=r"disk /\S+/missing.img does not exist"):
        QemuEngine().start(make_spec(vm_dir, dummy_kernel, vm_dir / "missing.img"))
    assert listing(vm_dir) == before


def test_qemu_refusal_carries_its_stderr_and_leaves_nothing(
    vm_dir: Path, dummy_kernel: Path
) -> None:
    disk = vm_dir / "not-qcow2.img"
    disk.write_bytes(b"\0" * 65536)
    before = listing(vm_dir)
    with pytest.raises(EngineError, match="Image is not in qcow2 format"):
        QemuEngine().start(make_spec(vm_dir, dummy_kernel, disk, disk_format="qcow2"))
    assert listing(vm_dir) == before


def test_unloadable_kernel_is_refused_by_qemu(vm_dir: Path) -> None:
    kernel = vm_dir / "empty-kernel"
    kernel.write_bytes(b"")
    disk = vm_dir / "disk.raw"
    disk.write_bytes(b"\0" * 65536)
    before = listing(vm_dir)
    with pytest.raises(EngineError, match="QEMU could not start VM engine-test"):
        QemuEngine().start(make_spec(vm_dir, kernel, disk))
    assert listing(vm_dir) == before
