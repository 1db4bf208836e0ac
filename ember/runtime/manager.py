"""Sandbox lifecycle on the host: the one owner of each sandbox's resources.

A sandbox's resources are its registry row, its directory (overlay, sockets, console log,
pid file, client lock) and its QEMU process. ``create`` registers the row first (state
``creating``), then builds everything inside the directory; on any failure it releases what
it made. ``reconcile`` (run by ``ls`` and on connect) finds sandboxes whose QEMU died or
whose creator died mid-create, marks them failed and releases their resources, and destroys
sandboxes whose lifetime expired.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ember import proc
from ember.agent import INIT_PATH
from ember.engine import AccelDecision, QemuEngine, VMHandle, VMSpec, detect_accel
from ember.errors import BadRequestError, EmberError, SandboxNotFoundError
from ember.guest.kernel import Kernel, require_kernel
from ember.locks import FileLock
from ember.paths import Paths
from ember.runtime.reaper import ensure_reaper
from ember.runtime.spec import SandboxSpec
from ember.store import SandboxRecord, Store

log = logging.getLogger("ember.runtime")

LIVE_STATES = ("creating", "booting", "running")
KEEP_ON_FAILURE = ("console.log",)


class SandboxDir:
    """File names inside one sandbox's directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.overlay = root / "overlay.qcow2"
        self.agent_socket = root / "agent.sock"
        self.qmp_socket = root / "qmp.sock"
        self.console_log = root / "console.log"
        self.pidfile = root / "qemu.pid"
        self.lock = root / "client.lock"


class SandboxManager:
    """Creates, finds and destroys sandboxes of one ember home."""

    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = (paths or Paths.from_env()).ensure()
        self.store = Store(self.paths.db)
        self.engine = QemuEngine()
        self._accel: AccelDecision | None = None
        self._kernel: Kernel | None = None

    @property
    def accel(self) -> AccelDecision:
        if self._accel is None:
            self._accel = detect_accel()
        return self._accel

    def close(self) -> None:
        self.store.close()

    def kernel(self) -> Kernel:
        """The guest kernel (looked up once per manager: the lookup asks dpkg)."""
        if self._kernel is None or not self._kernel.bzimage.is_file():
            self._kernel = require_kernel(self.paths)
        return self._kernel

    # --- create --------------------------------------------------------------------------
    def start(self, spec: SandboxSpec, lock_out: list[FileLock],
              progress: Callable[[str], None] | None = None) -> SandboxRecord:
        """Register and boot a sandbox; return with QEMU running (state ``booting``).

        The caller receives the sandbox's client lock in ``lock_out`` (held) and must
        connect to the agent, then call :meth:`mark_running` or :meth:`destroy`.
        """
        template = self.store.get_template(spec.template)
        for program in ("qemu-system-x86_64", "qemu-img"):
            proc.require(program)
        kernel = self.kernel()
        base_mib = -(-template.size_bytes // (1 << 20))
        disk_mib = spec.disk_mib or base_mib
        if disk_mib < base_mib:
            raise BadRequestError(
                f"disk_mib={disk_mib} is smaller than template {template.name!r} ({base_mib} MiB)"
            )
        sid = "sb-" + secrets.token_hex(6)
        d = SandboxDir(self.paths.sandboxes / sid)
        d.root.mkdir(mode=0o700)
        lock = FileLock(d.lock)
        lock.try_acquire()
        lock_out.append(lock)
        now = time.time()
        rec = SandboxRecord(
            id=sid, template=template.name, state="creating", vcpus=spec.vcpus,
            memory_mib=spec.memory_mib, disk_mib=disk_mib, timeout_s=spec.timeout,
            created_at=now, expires_at=None,  # set by mark_running: lifetime starts when ready
            dir=str(d.root), pid=None, accel=self.accel.accel, env=dict(spec.env),
            metadata=dict(spec.metadata),
        )
        self.store.add_sandbox(rec)
        try:
            if progress:
                progress(f"creating overlay over template {template.name}")
            proc.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                      template.image_path, str(d.overlay), f"{disk_mib}M"],
                     what="create the sandbox disk overlay", timeout=60)
            if progress:
                progress(f"booting microVM ({self.accel.accel})")
            handle = self.engine.start(self._vmspec(rec, d, kernel.bzimage))
            self.store.update_sandbox(sid, state="booting", pid=handle.pid)
            ensure_reaper(self.paths)  # enforces the lifetime after this process is gone
        except BaseException as err:
            self._release(rec, error=None, keep_row=False)
            lock.release()
            lock_out.clear()
            if isinstance(err, EmberError | KeyboardInterrupt):
                raise
            raise EmberError(f"creating sandbox failed: {err}") from err
        return self.store.get_sandbox(sid)

    def _vmspec(self, rec: SandboxRecord, d: SandboxDir, kernel: Path) -> VMSpec:
        return VMSpec(
            name=rec.id, kernel=kernel, disk=d.overlay, disk_format="qcow2",
            disk_readonly=False, vcpus=rec.vcpus, memory_mib=rec.memory_mib,
            cmdline=f"init={INIT_PATH} ember.hostname={rec.id} ember.id={rec.id}",
            console_log=d.console_log, qmp_socket=d.qmp_socket, agent_socket=d.agent_socket,
            pidfile=d.pidfile, accel=self.accel,
        )

    def mark_running(self, sandbox_id: str) -> None:
        """The agent answered: the sandbox is ready and its lifetime starts now."""
        rec = self.store.get_sandbox(sandbox_id)
        expires = time.time() + rec.timeout_s if rec.timeout_s is not None else None
        self.store.update_sandbox(sandbox_id, state="running", expires_at=expires)

    # --- find ----------------------------------------------------------------------------
    def get(self, sandbox_id: str) -> SandboxRecord:
        rec = self.store.get_sandbox(sandbox_id)
        return self._reconcile_one(rec)

    def list(self) -> list[SandboxRecord]:
        out = []
        for r in self.store.list_sandboxes():
            try:
                out.append(self._reconcile_one(r))
            except SandboxNotFoundError:
                continue  # expired and destroyed just now
        return out

    def handle(self, rec: SandboxRecord) -> VMHandle:
        d = SandboxDir(Path(rec.dir))
        if rec.pid is None:
            raise SandboxNotFoundError(f"sandbox {rec.id} has no VM process")
        # Attaching to a running VM does not need the kernel file (it may have been rebuilt).
        return self.engine.attach(rec.pid, self._vmspec(rec, d, Path("/")))

    def _alive(self, rec: SandboxRecord) -> bool:
        if rec.pid is None:
            return False
        try:
            return self.handle(rec).is_alive()
        except EmberError:
            return False

    def _reconcile_one(self, rec: SandboxRecord) -> SandboxRecord:
        if rec.state not in LIVE_STATES:
            return rec
        if rec.state in ("creating", "booting"):
            lock = FileLock(SandboxDir(Path(rec.dir)).lock)
            if lock.try_acquire():  # its creator died before finishing
                lock.release()
                self._release(rec, error="the process creating this sandbox died before it "
                              "was ready")
                return self.store.get_sandbox(rec.id)
            return rec  # being created: its creator enforces the boot timeout
        if rec.expires_at is not None and time.time() >= rec.expires_at:
            log.info("sandbox %s expired; destroying it", rec.id)
            self.destroy(rec.id)
            raise SandboxNotFoundError(f"sandbox {rec.id} expired (timeout) and was destroyed")
        if not self._alive(rec):
            self._release(rec, error="the VM process exited unexpectedly (crashed or killed)")
            return self.store.get_sandbox(rec.id)
        return rec

    # --- failure and destroy -------------------------------------------------------------
    def fail(self, sandbox_id: str, error: str) -> None:
        """Mark a sandbox failed (guest misbehaved or died) and release its resources."""
        try:
            rec = self.store.get_sandbox(sandbox_id)
        except SandboxNotFoundError:
            return
        self._release(rec, error=error)

    def destroy(self, sandbox_id: str) -> None:
        rec = self.store.get_sandbox(sandbox_id)
        self._release(rec, error=None, keep_row=False)

    def _release(self, rec: SandboxRecord, *, error: str | None, keep_row: bool = True) -> None:
        # The registry may not know every process of this sandbox: its creator may have died
        # while `qemu-img` or a daemonizing QEMU ran (whose child may appear after we look),
        # and a recorded pid may have been reused. Kill the QEMU programs that name this
        # sandbox's directory on their command line until none does.
        d = SandboxDir(Path(rec.dir))
        for _ in range(50):
            pids = _qemu_pids_mentioning(d.root)
            if not pids:
                break
            for pid in pids:
                self._kill_pid(rec, d, pid)
            time.sleep(0.02)
        root = Path(rec.dir)
        if keep_row:
            if root.is_dir():
                for child in root.iterdir():
                    if child.name not in KEEP_ON_FAILURE:
                        _remove(child)
            self.store.update_sandbox(rec.id, state="failed", error=error, pid=None)
        else:
            shutil.rmtree(root, ignore_errors=True)
            self.store.delete_sandbox(rec.id)

    def _kill_pid(self, rec: SandboxRecord, d: SandboxDir, pid: int) -> None:
        try:
            if str(d.qmp_socket).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                self.handle(replace(rec, pid=pid)).kill()  # QEMU: engine-checked kill
            else:
                os.kill(pid, signal.SIGKILL)  # a helper such as qemu-img
        except (OSError, EmberError) as err:
            log.warning("sandbox %s: cannot kill process %s: %s", rec.id, pid, err)

    def set_timeout(self, sandbox_id: str, timeout: float | None) -> None:
        if timeout is not None and not 0 < timeout <= 7 * 86400:
            raise BadRequestError(f"timeout must be between 0 and 7 days, got {timeout!r}")
        self.store.update_sandbox(
            sandbox_id, timeout_s=timeout,
            expires_at=time.time() + timeout if timeout is not None else None)


def _qemu_pids_mentioning(directory: Path) -> set[int]:
    """Live QEMU programs (qemu-system-*, qemu-img) whose command line names a file in
    ``directory``; never a user's shell or editor that happens to name it."""
    needle = str(directory).encode() + b"/"
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes()
                if needle in argv and os.path.basename(argv.split(b"\0", 1)[0]).startswith(
                        b"qemu-"):
                    found.add(int(d.name))
            except OSError:
                continue
    return found


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("cannot remove %s: %s", p, err)


def console_tail(rec: SandboxRecord, limit: int = 3000) -> str:
    f = Path(rec.dir) / "console.log"
    try:
        with open(f, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
