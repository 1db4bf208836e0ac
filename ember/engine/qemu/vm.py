"""Start QEMU microVMs and control them over QMP."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ember.engine.base import (
    SavedState,
    VMHandle,
    VMSpec,
    file_tail,
    process_runs,
    remove_stale_socket,
)
from ember.engine.qemu.argv import NET_FD, build_argv, loads_kernel
from ember.engine.qemu.caps import seccomp_supported
from ember.engine.qemu.cpu import KVM_CPU_MODEL, GuestCpu, from_expansion, restore_problem
from ember.engine.qemu.migration import load_state, save_state
from ember.engine.qemu.qcow2 import backing_chain
from ember.engine.qemu.qmp import DEFAULT_TIMEOUT, qmp_execute, qmp_execute_sync, run_sync
from ember.errors import (
    EmberTimeoutError,
    EngineError,
    HostCommandError,
    HostError,
    SnapshotError,
)
from ember.host.jail import Bind, JailError, launch
from ember.host.kvm_access import kvm_access
from ember.proc import require, run

log = logging.getLogger("ember.engine.qemu")

QEMU = "qemu-system-x86_64"
#: QEMU -daemonize returns once the machine is set up (before the guest runs).
START_TIMEOUT = 30.0
QMP_READY_TIMEOUT = 5.0


class QemuVMHandle(VMHandle):
    """A QEMU process started with :func:`build_argv`; control goes over QMP."""

    def __init__(self, spec: VMSpec, pid: int) -> None:
        super().__init__(
            name=spec.name,
            pid=pid,
            qmp_socket=spec.qmp_socket,
            agent_socket=spec.agent_socket,
            console_log=spec.console_log,
            pidfile=spec.pidfile,
        )

    def qmp(self, cmd: str, **args: Any) -> Any:
        return qmp_execute_sync(self.qmp_socket, cmd, args, who=f"VM {self.name}")

    async def aqmp(self, cmd: str, **args: Any) -> Any:
        """:meth:`qmp` for asyncio callers."""
        return await qmp_execute(self.qmp_socket, cmd, args, who=f"VM {self.name}")

    def stop(self) -> None:
        self.qmp("stop")

    def cont(self) -> None:
        self.qmp("cont")

    def status(self) -> str:
        if not self.is_alive():
            return "exited"
        try:
            return str(self.qmp("query-status")["status"])
        except EngineError:
            if not self.is_alive():  # exited while we asked
                return "exited"
            raise

    def quit(self, timeout: float = 10.0) -> None:
        if self.is_alive():
            # QEMU may drop the socket as it exits; a hung one is killed below.
            with contextlib.suppress(EngineError, EmberTimeoutError):
                self.qmp("quit")
        if not self.wait_exit(timeout):
            log.warning(
                "VM %s (pid %d) ignored quit for %.1f s; killing it", self.name, self.pid, timeout
            )
            self.kill()


class QemuEngine:
    """The QEMU ``microvm`` engine (TCG or KVM, as the spec's accel decision says)."""

    name = "qemu"

    def __init__(self, qemu: str = QEMU) -> None:
        self.qemu = qemu

    def attach(self, pid: int, spec: VMSpec) -> QemuVMHandle:
        return QemuVMHandle(spec, pid)

    def version(self) -> str:
        return qemu_version(self.qemu)

    def save(self, handle: VMHandle, dest: Path, *, timeout: float = 60.0) -> SavedState:
        t0 = time.monotonic()
        try:
            info, version = run_sync(save_state(handle.qmp_socket, dest,
                                                who=f"VM {handle.name}", timeout=timeout))
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        ram = info.get("ram", {})
        return SavedState(path=dest, size_bytes=dest.stat().st_size,
                          ram_in_stream=int(ram.get("normal", 0)) > 64, vmm_version=version,
                          seconds=time.monotonic() - t0)

    def guest_cpu(self, handle: VMHandle) -> GuestCpu:
        """The CPU a KVM guest of this QEMU sees (see :mod:`ember.engine.qemu.cpu`)."""
        reply = qmp_execute_sync(handle.qmp_socket, "query-cpu-model-expansion",
                                 {"type": "full", "model": {"name": KVM_CPU_MODEL}},
                                 who=f"VM {handle.name}")
        return from_expansion(reply)

    def restore(self, spec: VMSpec, state: Path, *, timeout: float = 60.0,
                expect_cpu: GuestCpu | None = None) -> QemuVMHandle:
        """Start ``spec`` (incoming) and load ``state``. ``expect_cpu``: the guest CPU the
        state was saved on (KVM); a restoring CPU that cannot run it is refused before any
        state is loaded (SnapshotError)."""
        if not spec.incoming:
            raise EngineError(f"cannot restore VM {spec.name}: its spec is not incoming")
        if not state.is_file():
            raise EngineError(f"cannot restore VM {spec.name}: no saved state at {state}")
        handle = self.start(spec)
        try:
            if expect_cpu is not None:
                problem = restore_problem(expect_cpu, self.guest_cpu(handle))
                if problem:
                    raise SnapshotError(f"cannot restore into VM {spec.name}: {problem}")
            run_sync(load_state(handle.qmp_socket, state, who=f"VM {spec.name}",
                                timeout=timeout, alive=handle.is_alive))
        except BaseException:
            handle.kill()
            raise
        return handle

    def start(self, spec: VMSpec) -> QemuVMHandle:
        qemu = require(self.qemu)
        _preflight(spec)
        kvm_groups = _jail_kvm_groups(spec)
        created = _Leftovers(spec)
        try:
            if spec.jail is not None:
                handle = self._start_jailed(spec, qemu, kvm_groups)
            elif spec.net_fd is not None:
                raise EngineError(f"VM {spec.name}: a network needs the jail (ember as root; "
                                  "EMBER_JAIL not 0)")
            else:
                argv = build_argv(spec, qemu=qemu, daemonize=True,
                                  sandbox=seccomp_supported(qemu))
                run(argv, what=f"start VM {spec.name}", timeout=START_TIMEOUT)
                handle = QemuVMHandle(spec, _read_pid(spec))
            _wait_qmp(handle, spec.jail.log if spec.jail else None)
        except HostCommandError as err:
            created.remove()
            raise EngineError(f"QEMU could not start VM {spec.name}: {_failure(err)}") from err
        except JailError as err:
            created.remove()
            raise EngineError(f"QEMU could not start VM {spec.name}: {err}") from err
        except EmberTimeoutError as err:
            created.remove()
            raise EmberTimeoutError(f"VM {spec.name} did not come up: {err}") from err
        except BaseException:  # including KeyboardInterrupt: never leave a VM behind
            created.remove()
            raise
        log.info("VM %s started: pid %d, %s%s", spec.name, handle.pid, spec.accel.accel,
                 f", jailed as uid {spec.jail.uid}" if spec.jail else "")
        return handle

    def _start_jailed(self, spec: VMSpec, qemu: str, groups: tuple[int, ...]) -> QemuVMHandle:
        """QEMU in its jail, not daemonized (the jailer detaches it), so that its seccomp
        filter can deny spawning and privilege changes too."""
        assert spec.jail is not None
        argv = build_argv(spec, qemu=qemu, daemonize=False, sandbox=seccomp_supported(qemu),
                          pidfile=False)
        jail = spec.jail.with_binds(*vm_binds(spec)).with_groups(*groups)
        if spec.net_fd is not None:
            jail = replace(jail, pass_fds=((spec.net_fd, NET_FD),))
        if spec.accel.accel == "tcg":
            # QEMU asks for huge pages on its TCG code cache, which then grows 2 MiB at a
            # time. Measured here (issue 12, docs/snapshots.md "Memory"): without them an
            # idle clone holds 1.4 MiB less of it, and its first command and a Python start
            # are faster (huge pages are zeroed whole), with the same speed after.
            jail = replace(jail, no_thp=True)
        pid = launch(jail, argv, timeout=START_TIMEOUT)
        tmp = spec.pidfile.with_name(f".{spec.pidfile.name}.tmp")
        tmp.write_text(f"{pid}\n")
        tmp.rename(spec.pidfile)
        return QemuVMHandle(spec, pid)


def vm_binds(spec: VMSpec) -> list[Bind]:
    """What a jailed QEMU must see of the host for ``spec``, each at its own path."""
    chain = backing_chain(spec.disk) if spec.disk_format == "qcow2" else [spec.disk]
    binds = [*([Bind(spec.kernel)] if loads_kernel(spec) else []),
             Bind(chain[0], writable=not spec.disk_readonly),
             *(Bind(p) for p in chain[1:]), Bind(spec.console_log, writable=True),
             Bind(spec.qmp_socket.parent, writable=True),
             Bind(Path("/dev/null"), writable=True, device=True),
             Bind(Path("/dev/urandom"), device=True)]
    if spec.agent_socket is not None:
        binds.append(Bind(spec.agent_socket.parent, writable=True))
    if spec.memory_file is not None:
        # QEMU 7.2 opens a RAM file read-write even when it maps it privately.
        binds.append(Bind(spec.memory_file, writable=True))
    if spec.accel.accel == "kvm":
        binds.append(Bind(Path("/dev/kvm"), writable=True, device=True))
    return binds


def _jail_kvm_groups(spec: VMSpec) -> tuple[int, ...]:
    """The supplementary groups a jailed QEMU needs to open ``/dev/kvm`` (see
    :mod:`ember.host.kvm_access`); none under TCG or unjailed.

    Detection already chose TCG where the jail cannot open the device; this refuses, with
    the fix, what is left: ``EMBER_ACCEL=kvm`` forcing KVM, or a device changed since."""
    if spec.jail is None or spec.accel.accel != "kvm":
        return ()
    access = kvm_access()
    if not access.ok:
        raise HostError(f"VM {spec.name} needs KVM, but /dev/kvm is {access.detail}"
                        + (f"; fix: {access.fix}" if access.fix else ""))
    return access.groups


@functools.cache
def qemu_version(qemu: str = QEMU) -> str:
    """``qemu-system-x86_64 --version``'s first line (the same text QMP query-version
    gives, as major.minor.micro and package)."""
    out = run([require(qemu), "--version"], what="ask QEMU its version", timeout=30).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)\s*(?:\((.*?)\))?", out)
    if not m:
        raise EngineError(f"cannot parse QEMU's version from {out[:200]!r}")
    return " ".join(f"{m[1]}.{m[2]}.{m[3]} {m[4] or ''}".split())


def _failure(err: HostCommandError) -> str:
    """QEMU's own words, or how it died when it said nothing."""
    if err.stderr_tail:
        return err.stderr_tail
    code = err.returncode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"QEMU was killed by {signal.Signals(-code).name} (no message)"
    return f"QEMU exited with status {code} (no message)"


def _preflight(spec: VMSpec) -> None:
    """Refuse early, with the cause named, what QEMU would refuse obscurely (or worse)."""
    needed = [("kernel", spec.kernel)] if loads_kernel(spec) else []
    for label, path in (*needed, ("disk", spec.disk)):
        if not path.is_file():
            raise EngineError(
                f"cannot start VM {spec.name}: {label} {path} does not exist "
                "or is not a regular file"
            )
    outputs: list[tuple[str, Path | None]] = [
        ("console log", spec.console_log),
        ("QMP socket", spec.qmp_socket),
        ("agent socket", spec.agent_socket),
        ("pidfile", spec.pidfile),
    ]
    for label, out in outputs:
        if out is not None and not out.parent.is_dir():
            raise EngineError(
                f"cannot start VM {spec.name}: directory {out.parent} for the "
                f"{label} does not exist"
            )
    # QEMU unlinks an existing socket path before listening: never steal a live VM's.
    if process_runs(_pid_in(spec.pidfile) or 0, str(spec.qmp_socket)):
        raise EngineError(
            f"cannot start VM {spec.name}: a VM with QMP socket "
            f"{spec.qmp_socket} is already running"
        )
    for sock in (spec.qmp_socket, spec.agent_socket):
        if sock is not None:
            remove_stale_socket(sock)
            if sock.exists():
                raise EngineError(f"cannot start VM {spec.name}: socket {sock} is in use")
    spec.pidfile.unlink(missing_ok=True)


class _Leftovers:
    """What a failed start must remove: the VMM process, if any, and the files it made."""

    def __init__(self, spec: VMSpec) -> None:
        self.spec = spec
        self.console_existed = spec.console_log.exists()

    def remove(self) -> None:
        spec = self.spec
        pid = _pid_in(spec.pidfile)
        if pid is not None:  # started, then failed (QMP never answered, timeout)
            QemuVMHandle(spec, pid).kill()
        for sock in (spec.qmp_socket, spec.agent_socket):
            if sock is not None:
                remove_stale_socket(sock)
        spec.pidfile.unlink(missing_ok=True)
        log_ = spec.console_log
        if not self.console_existed and log_.exists() and log_.stat().st_size == 0:
            log_.unlink()


def _pid_in(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _read_pid(spec: VMSpec) -> int:
    # QEMU writes the pidfile before the daemonizing parent exits.
    pid = _pid_in(spec.pidfile)
    if pid is None:
        raise EngineError(f"QEMU started VM {spec.name} but wrote no pid to {spec.pidfile}")
    return pid


def _log_tail(path: Path | None, limit: int = 1500) -> str:
    """What a jailed QEMU wrote on stderr."""
    return "" if path is None else file_tail(path, limit).strip()


def _wait_qmp(handle: QemuVMHandle, stderr_log: Path | None = None) -> None:
    deadline = time.monotonic() + QMP_READY_TIMEOUT
    while True:
        try:
            qmp_execute_sync(
                handle.qmp_socket, "query-status", timeout=DEFAULT_TIMEOUT, who=f"VM {handle.name}"
            )
            return
        except EngineError as err:
            if not handle.is_alive():
                said = _log_tail(stderr_log)
                raise EngineError(
                    f"VM {handle.name} (QEMU pid {handle.pid}) exited right after starting"
                    + (f": {said}" if said else f"; see {handle.console_log}")
                ) from err
            if time.monotonic() > deadline:
                raise EngineError(
                    f"VM {handle.name} does not answer QMP on {handle.qmp_socket}: {err}"
                ) from err
        time.sleep(0.02)
