"""Sandbox lifecycle on the host: the one owner of each sandbox's resources.

A sandbox's resources are its registry row, its directory (overlay, sockets, console log,
pid file, client lock) and its QEMU process. ``create`` registers the row first (state
``creating``), then builds everything inside the directory; on any failure it releases what
it made. ``reconcile`` (run by ``ls`` and on connect) finds sandboxes whose QEMU died or
whose creator died mid-create, marks them failed and releases their resources, and destroys
sandboxes whose lifetime expired.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ember.engine import AccelDecision, SandboxHandle, VMSpec, detect_accel
from ember.engine.base import file_tail
from ember.engine.container import require_tier
from ember.engine.qemu.argv import device_model
from ember.errors import (
    BadRequestError,
    EmberError,
    EngineError,
    SandboxNotFoundError,
    SandboxStateError,
    SnapshotError,
)
from ember.guest.kernel import Kernel, kernel_by_key, require_kernel
from ember.host.jail import JailSpec
from ember.locks import FileLock
from ember.net.manager import NetworkManager
from ember.net.policy import NetworkPolicy
from ember.paths import Paths
from ember.runtime import snapshots, template_snapshots
from ember.runtime.backends import Backend, Build, MicroVM, boot_cmdline, make_backend
from ember.runtime.confinement import Confinement
from ember.runtime.leftovers import NEW_DIR_PREFIX, sweep_leftovers
from ember.runtime.overlays import make_overlay
from ember.runtime.spec import SandboxSpec, pool_key
from ember.runtime.states import LIVE_STATES, check_transition
from ember.runtime.supervisor import ensure as ensure_supervisor
from ember.store import SandboxRecord, SnapshotRecord, Store

log = logging.getLogger("ember.runtime")

KEEP_ON_FAILURE = ("console.log", "qemu.log")
#: What a reconcile that resumes a guest whose snapshot writer died notes in the snapshot
#: lock, and how long another reconcile waits for it (then reads the row it left).
RECOVERING = "recovering"
RECOVER_WAIT_S = 10.0
#: The note a sandbox paused by the end of its lifetime carries (until resumed).
EXPIRED_PAUSED = ("its lifetime ended and it was paused (on_timeout='pause'); resume() it "
                  "to go on for another lifetime")


class SandboxDir:
    """File names inside one sandbox's directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.overlay = root / "overlay.qcow2"
        #: The only directory the (jailed) VMM may write in: it creates its sockets there.
        self.vm = root / "vm"
        self.agent_socket = self.vm / "agent.sock"
        self.qmp_socket = self.vm / "qmp.sock"
        self.console_log = root / "console.log"
        self.qemu_log = root / "qemu.log"  # the VMM's own stderr
        self.pidfile = root / "qemu.pid"
        self.lock = root / "client.lock"

    def prepare_vm_files(self) -> list[Path]:
        """Make the files the VMM writes (owned by root until handed to the jail uid)."""
        self.vm.mkdir(mode=0o700, exist_ok=True)
        self.console_log.touch(mode=0o600)
        return [self.overlay, self.console_log, self.vm]


class SandboxManager:
    """Creates, finds and destroys sandboxes of one ember home."""

    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = (paths or Paths.from_env()).ensure()
        self.store = Store(self.paths.db)
        self.confinement = Confinement(self.paths)
        self._accel: AccelDecision | None = None
        self._kernel: Kernel | None = None
        self._backends: dict[str, Backend] = {}
        self.network = NetworkManager(self.paths.home)
        self.microvm = MicroVM(self)
        self.engine = self.microvm.engine  # snapshots and restores are the microVM's

    @property
    def accel(self) -> AccelDecision:
        if self._accel is None:
            self._accel = detect_accel()
        return self._accel

    def close(self) -> None:
        self.store.close()

    def backend(self, isolation: str) -> Backend:
        """The backend of an isolation tier (made on first use: the gVisor one probes
        its platform)."""
        if isolation == "microvm":
            return self.microvm
        if isolation not in self._backends:
            self._backends[isolation] = make_backend(self, isolation)
        return self._backends[isolation]

    def kernel(self) -> Kernel:
        """The guest kernel (looked up once per manager: the lookup asks dpkg)."""
        if self._kernel is None or not self._kernel.bzimage.is_file():
            self._kernel = require_kernel(self.paths)
        return self._kernel

    # --- create --------------------------------------------------------------------------
    def start(self, spec: SandboxSpec, lock_out: list[FileLock],
              progress: Callable[[str], None] | None = None) -> SandboxRecord:
        """Register and start a sandbox of ``spec.isolation``'s tier; return with its
        process running (state ``booting``).

        The caller receives the sandbox's client lock in ``lock_out`` (held) and must
        connect to the agent, then call :meth:`mark_running` or :meth:`destroy`.
        """
        if spec.isolation != "microvm":  # a tier this host cannot run: say so first
            require_tier(spec.isolation)
        template = self.store.get_template(spec.template)
        plan = self.backend(spec.isolation).plan(spec, template, progress)
        return self._launch(spec, lock_out, plan.build, template=plan.template,
                            disk_mib=plan.disk_mib, accel=plan.accel, what="creating sandbox")

    def _launch(self, spec: SandboxSpec, lock_out: list[FileLock],
                build: Build, *, template: str,
                disk_mib: int, accel: str, what: str, snap: SnapshotRecord | None = None,
                ) -> SandboxRecord:
        """Make the sandbox's locked directory, register it (``creating``), ``build`` its
        VM or container, and record it ``booting``; on any failure release everything it
        made, row included, and raise an :class:`EmberError` saying ``what`` failed."""
        sid, d, lock = self._new_sandbox_dir(lock_out)
        rec = SandboxRecord(
            id=sid, template=template, state="creating",
            vcpus=snap.vcpus if snap else spec.vcpus,
            memory_mib=snap.memory_mib if snap else spec.memory_mib, disk_mib=disk_mib,
            timeout_s=spec.timeout, created_at=time.time(),
            expires_at=None,  # set by mark_running: the lifetime starts when it is ready
            dir=str(d.root), pid=None, accel=accel,
            env={**snap.env, **spec.env} if snap else dict(spec.env),
            metadata=dict(spec.metadata), snapshot=snap.id if snap else None,
            on_timeout=spec.on_timeout,
            isolation="microvm" if snap else spec.isolation,  # snapshots are microVMs
            network=None if spec.network is None else spec.network.to_json(),
        )
        self.store.add_sandbox(rec)
        try:
            handle = build(rec, d)
            self.set_state(sid, "booting", pid=handle.pid)
            ensure_supervisor(self.paths)  # the daemon enforces the lifetime
        except BaseException as err:
            self._abandon(rec, lock, lock_out)
            if snap is not None and isinstance(err, EngineError):
                raise SnapshotError(f"restoring snapshot {snap.id[:12]} failed: {err}") from err
            if isinstance(err, EmberError | KeyboardInterrupt):
                raise
            raise EmberError(f"{what} failed: {err}") from err
        return self.store.get_sandbox(sid)

    def _abandon(self, rec: SandboxRecord, lock: FileLock, lock_out: list[FileLock]) -> None:
        """A create or restore failed: release everything it made, row included."""
        self._release(rec, error=None, keep_row=False)
        lock.release()
        lock_out.clear()

    def _new_sandbox_dir(self, lock_out: list[FileLock]) -> tuple[str, SandboxDir, FileLock]:
        """A new sandbox id and its directory, which appears already locked by us: it is
        made under a temporary name carrying our pid, locked, then renamed (the lock moves
        with it), so that a directory without a registry row and without a lock holder is
        always a leftover of a dead creator, and a temporary one is only ever swept once
        its creator is gone (:mod:`ember.runtime.leftovers`)."""
        sid = "sb-" + secrets.token_hex(6)
        d = SandboxDir(self.paths.sandboxes / sid)
        tmp = self.paths.sandboxes / f"{NEW_DIR_PREFIX}{os.getpid()}-{sid}"
        tmp.mkdir(mode=0o700)
        lock = FileLock(tmp / d.lock.name)
        if not lock.try_acquire():
            shutil.rmtree(tmp, ignore_errors=True)
            raise EmberError(f"cannot lock the new directory {tmp} of sandbox {sid}")
        tmp.rename(d.root)
        lock.path = d.lock
        lock_out.append(lock)
        return sid, d, lock

    def ram_file(self, sandbox_id: str) -> Path:
        """Where a booted sandbox's guest RAM lives (shared file on tmpfs)."""
        return self.paths.ensure_ram() / f"{sandbox_id}.ram"

    def vmspec(self, rec: SandboxRecord, d: SandboxDir, kernel: Path, *, cmdline: str = "",
                memory_file: Path | None = None, memory_shared: bool = False,
                incoming: bool = False, jail: JailSpec | None = None,
                net_fd: int | None = None) -> VMSpec:
        return VMSpec(
            name=rec.id, kernel=kernel, disk=d.overlay, disk_format="qcow2",
            disk_readonly=False, vcpus=rec.vcpus, memory_mib=rec.memory_mib,
            cmdline=cmdline, console_log=d.console_log, qmp_socket=d.qmp_socket,
            agent_socket=d.agent_socket, pidfile=d.pidfile, accel=self.accel,
            memory_file=memory_file, memory_shared=memory_shared, incoming=incoming,
            jail=jail, net_fd=net_fd,
        )

    # --- restore -------------------------------------------------------------------------
    def start_restore(self, snap: SnapshotRecord, spec: SandboxSpec, lock_out: list[FileLock],
                      progress: Callable[[str], None] | None = None,
                      *, template_name: str | None = None) -> SandboxRecord:
        """Register a sandbox and restore ``snap`` into it; return with its VM running
        (state ``booting``: the caller connects to the agent, as after :meth:`start`)."""
        tpl = self.store.get_template(snap.template)
        nic = snapshots.has_nic(self.paths, snap)
        if spec.network is not None and not nic:
            raise BadRequestError(f"snapshot {snap.id[:12]} was taken without a NIC: its "
                                  "restores cannot have a network")
        if nic and spec.network is None:  # a networked sandbox's clone: its policy
            inherited = snapshots.inherited_network(snap)
            spec = replace(spec, network=NetworkPolicy.from_json(
                inherited if inherited is not None else {"internet": False}))
        plan = snapshots.plan_restore(
            self.paths, self.store, snap, vmm_version=self.engine.version(),
            accel=self.accel.accel, template=tpl, progress=progress,
            device_model=device_model(self.accel, snap.vcpus, snap.memory_mib, network=nic))
        for key, want in (("vcpus", snap.vcpus), ("memory_mib", snap.memory_mib)):
            got = getattr(spec, key)
            if got != want:
                raise BadRequestError(f"{key}={got} differs from the snapshot's ({want}); a "
                                      "restored sandbox keeps the size it was saved with")
        if spec.disk_mib is not None and spec.disk_mib != snap.disk_mib:
            raise BadRequestError(f"disk_mib={spec.disk_mib} differs from the snapshot's "
                                  f"({snap.disk_mib} MiB)")

        def build(rec: SandboxRecord, d: SandboxDir) -> SandboxHandle:
            make_overlay(self.paths, plan.disk, "qcow2", snap.disk_mib, d.overlay)
            if progress:
                progress(f"restoring snapshot {snap.id[:12]} ({self.accel.accel})")
            jail = self.confinement.prepare(rec, d.root, writable=d.prepare_vm_files(),
                                            snapshot_ram=plan.ram, log_path=d.qemu_log)
            kind = ("template snapshot" if template_snapshots.is_template_snapshot(snap)
                    else "snapshot")
            with open(d.console_log, "a", encoding="utf-8") as f:  # QEMU appends after it
                f.write(f"ember: restored from {kind} {snap.id[:12]} of {snap.template}; "
                        "no boot: the console goes on from the snapshot\n")
            with self.network.tap_for(rec.id, spec.network) as net_fd:
                return self.engine.restore(self.vmspec(
                    rec, d, plan.kernel.bzimage, cmdline=plan.cmdline, memory_file=plan.ram,
                    incoming=True, jail=jail, net_fd=net_fd), plan.state, expect_cpu=plan.cpu)

        return self._launch(spec, lock_out, build, template=template_name or snap.template,
                            disk_mib=snap.disk_mib, accel=self.accel.accel,
                            what="restoring snapshot", snap=snap)

    def snapshot(self, sandbox_id: str, name: str | None = None, *,
                 resume: bool = True, hold: bool = False,
                 shared: dict[str, str] | None = None) -> snapshots.Taken:
        """Snapshot a running or paused sandbox (it is paused meanwhile, then resumed).
        ``hold``: the caller keeps the snapshot's hold lock; ``shared``: a template
        snapshot's metadata (see :func:`snapshots.take`)."""
        rec = self.get(sandbox_id)
        if not self.backend(rec.isolation).snapshots:
            raise BadRequestError(f"snapshot (and fork) is not supported on isolation="
                                  f"{rec.isolation} (sandbox {rec.id}); only on "
                                  "isolation=microvm")
        if rec.state not in ("running", "paused", "pooled"):
            raise SandboxStateError(f"sandbox {sandbox_id} is {rec.state}; only a running or "
                                    "paused sandbox can be snapshotted")
        d = SandboxDir(Path(rec.dir))
        kernel, cmdline = self._boot_identity(rec)
        # While the guest is stopped for the copy the registry says "snapshotting" and we
        # hold snapshot.lock: if this process dies meanwhile, reconcile resumes the guest.
        writer = FileLock(d.root / "snapshot.lock")
        if not writer.try_acquire():
            raise SandboxStateError(f"sandbox {sandbox_id} is being snapshotted already")
        resume = resume and rec.state == "running"
        if resume:
            self.set_state(sandbox_id, "snapshotting")
        tpl = self.store.get_template(rec.template)
        if tpl.config.get("snapshot"):  # a pre-baked template: its base template's image
            tpl = self.store.get_template(self.store.get_snapshot(
                str(tpl.config["snapshot"])).template)
        ram = self.paths.ram / f"{rec.id}.ram"
        try:
            return snapshots.take(
                self.paths, self.store, self.engine, self.microvm.attach(rec, d), rec,
                kernel=kernel,
                cmdline=cmdline, ram_file=ram if ram.is_file() else None, overlay=d.overlay,
                template=tpl, name=name, resume=resume, hold=hold, shared=shared,
                device_model=device_model(self.accel, rec.vcpus, rec.memory_mib,
                                          network=rec.network is not None))
        finally:
            if resume:
                self.set_state(sandbox_id, "running")
            writer.release()

    def _boot_identity(self, rec: SandboxRecord) -> tuple[Kernel, str]:
        """The kernel and kernel cmdline the sandbox's guest was booted with."""
        if rec.snapshot is None:
            kernel = self.kernel()
            return kernel, boot_cmdline(rec.id)
        snap = self.store.get_snapshot(rec.snapshot)
        found = kernel_by_key(self.paths, snap.kernel_key)
        if found is None:
            raise SnapshotError(f"sandbox {rec.id}'s kernel {snap.kernel_key[:12]} is gone")
        manifest = snapshots.read_manifest(snapshots.snapshot_dir(self.paths, snap.id), snap.id)
        return found, str(manifest["cmdline"])

    def _pause_expired(self, rec: SandboxRecord) -> SandboxRecord:
        """The lifetime of a sandbox created with ``on_timeout="pause"`` ended: stop its
        guest and keep it (no lifetime any more) until it is resumed or destroyed."""
        log.info("sandbox %s expired; pausing it (on_timeout=pause)", rec.id)
        try:
            if rec.state != "paused":
                self._stop(rec)
        except EmberError as err:
            log.warning("sandbox %s: cannot pause it at the end of its lifetime (%s); "
                        "destroying it", rec.id, err)
            self.destroy(rec.id)
            raise SandboxNotFoundError(f"sandbox {rec.id} expired (timeout) and was "
                                       "destroyed") from err
        self.set_state(rec.id, "paused", expires_at=None, error=EXPIRED_PAUSED)
        return self.store.get_sandbox(rec.id)

    def pause(self, sandbox_id: str) -> None:
        self._switch(sandbox_id, "running", "paused", "pause", self._stop)

    def resume(self, sandbox_id: str) -> None:
        self._switch(sandbox_id, "paused", "running", "resume", self._cont)

    def _stop(self, rec: SandboxRecord) -> None:
        """Pause the guest: QEMU stops its vCPUs, runsc its Sentry; a crun container's
        processes are frozen in their cgroup (crun itself has no cgroup here)."""
        self.backend(rec.isolation).pause(rec, SandboxDir(Path(rec.dir)))

    def _cont(self, rec: SandboxRecord) -> None:
        self.backend(rec.isolation).resume(rec, SandboxDir(Path(rec.dir)))

    def _switch(self, sandbox_id: str, src: str, dst: str, verb: str,
                action: Callable[[SandboxRecord], None]) -> None:
        """Move a sandbox from state ``src`` to ``dst`` by ``action`` (a no-op if it is in
        ``dst`` already)."""
        rec = self.get(sandbox_id)
        if rec.state == dst:
            return
        if rec.state != src:
            raise SandboxStateError(f"sandbox {sandbox_id} is {rec.state}; cannot {verb} it")
        action(rec)
        fields: dict[str, object] = {"error": None}
        if rec.error == EXPIRED_PAUSED and dst == "running" and rec.timeout_s is not None:
            fields["expires_at"] = time.time() + rec.timeout_s  # a new lifetime starts
        self.set_state(sandbox_id, dst, **fields)

    def remove_snapshot(self, ref: str) -> SnapshotRecord:
        snap = self.store.get_snapshot(ref)
        snapshots.remove(self.paths, self.store, snap, LIVE_STATES)
        return snap

    def collect_snapshot(self, snapshot_id: str | None) -> None:
        """Remove an unnamed snapshot (a fork's) once nothing uses it any more; a template
        snapshot only once it is no longer current."""
        if snapshot_id is None:
            return
        try:
            snap = self.store.get_snapshot(snapshot_id)
        except EmberError:
            return
        if template_snapshots.is_template_snapshot(snap):
            if not template_snapshots.is_current(self, snap):
                template_snapshots.collect(self, snap.template)
            return
        if snap.name is None and not snapshots.users(self.store, snap.id, LIVE_STATES):
            try:
                snapshots.remove(self.paths, self.store, snap, LIVE_STATES)
            except EmberError as err:
                log.warning("cannot remove unused snapshot %s: %s", snap.id[:12], err)

    def claim_pooled(self, spec: SandboxSpec) -> SandboxRecord | None:
        """A ready sandbox from the warm pool matching ``spec`` (now running, its lifetime
        started), or None if there is no such pool or it is empty. The pool refills in the
        background."""
        key = pool_key(spec.template, spec.vcpus, spec.memory_mib, spec.disk_mib)
        if self.store.get_pool(key) is None:
            return None
        rec = self.store.claim_pooled(key, timeout_s=spec.timeout, env=dict(spec.env),
                                      metadata=dict(spec.metadata), now=time.time(),
                                      on_timeout=spec.on_timeout)
        ensure_supervisor(self.paths)
        return rec

    def set_state(self, sandbox_id: str, state: str, **fields: Any) -> None:
        """Move a sandbox to ``state`` (and set ``fields``), as the transition table of
        :mod:`ember.runtime.states` allows; SandboxStateError otherwise."""
        current = self.store.get_sandbox(sandbox_id).state
        check_transition(sandbox_id, current, state)
        self.store.update_sandbox(sandbox_id, state=state, **fields)

    def mark_running(self, sandbox_id: str) -> None:
        """The agent answered: the sandbox is ready and its lifetime starts now."""
        rec = self.store.get_sandbox(sandbox_id)
        expires = time.time() + rec.timeout_s if rec.timeout_s is not None else None
        self.set_state(sandbox_id, "running", expires_at=expires)

    # --- find ----------------------------------------------------------------------------
    def get(self, sandbox_id: str) -> SandboxRecord:
        rec = self.store.get_sandbox(sandbox_id)
        return self._reconcile_one(rec)

    def list(self) -> list[SandboxRecord]:
        """Every sandbox, reconciled with reality; leftovers of killed processes (which
        have no row) are swept on the way."""
        out = []
        for r in self.store.list_sandboxes():
            try:
                out.append(self._reconcile_one(r))
            except SandboxNotFoundError:
                continue  # expired and destroyed just now
        try:
            sweep_leftovers(self, LIVE_STATES)
        except (EmberError, OSError) as err:
            log.warning("sweeping leftovers: %s", err)
        return out

    def handle(self, rec: SandboxRecord) -> SandboxHandle:
        """The running process of a sandbox, whatever its tier."""
        return self.backend(rec.isolation).attach(rec, SandboxDir(Path(rec.dir)))

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
        if rec.state == "pooled" and (rec.pool is None or self.store.get_pool(rec.pool) is None):
            # Its pool was removed while it was being started (pool rm racing a refill).
            log.info("sandbox %s waits in a pool that no longer exists; destroying it", rec.id)
            self.destroy(rec.id)
            raise SandboxNotFoundError(f"sandbox {rec.id} belonged to a removed pool")
        if rec.state == "snapshotting":
            writer = FileLock(Path(rec.dir) / "snapshot.lock")
            if not writer.try_acquire():
                if not writer.marked(RECOVERING):
                    return rec  # a snapshot is being written
                try:  # another reconcile resumes it: its outcome is the answer
                    writer.acquire(RECOVER_WAIT_S, f"sandbox {rec.id}'s snapshot lock")
                except SandboxStateError:
                    return rec
            try:  # its writer died with the guest stopped: resume it (unless done already)
                writer.mark(RECOVERING)
                rec = self.store.get_sandbox(rec.id)
                if rec.state == "snapshotting" and self._alive(rec):
                    log.warning("sandbox %s: snapshot writer died; resuming the guest", rec.id)
                    self.microvm.attach(rec, SandboxDir(Path(rec.dir))).resume_after_save()
                    self.set_state(rec.id, "running")
                    rec = self.store.get_sandbox(rec.id)
            except EmberError as err:
                log.warning("sandbox %s: cannot resume after a dead snapshot: %s", rec.id, err)
            finally:
                writer.release()
        if rec.expires_at is not None and time.time() >= rec.expires_at and rec.state != "pooled":
            if rec.on_timeout == "pause" and self._alive(rec):
                return self._pause_expired(rec)
            log.info("sandbox %s expired; destroying it", rec.id)
            self.destroy(rec.id)
            raise SandboxNotFoundError(f"sandbox {rec.id} expired (timeout) and was destroyed")
        if not self._alive(rec):
            self._release(rec, error="the VM process exited unexpectedly (crashed or killed)")
            return self.store.get_sandbox(rec.id)
        return rec

    # --- failure and destroy -------------------------------------------------------------
    def fail(self, sandbox_id: str, error: str) -> None:
        """Mark a sandbox failed (guest misbehaved or died) and release its resources.

        A paused sandbox's agent does not answer by design: a client's missed deadline
        then fails only that client, not the sandbox (unless its VM is gone).
        """
        try:
            rec = self.store.get_sandbox(sandbox_id)
        except SandboxNotFoundError:
            return
        if rec.state == "paused" and self._alive(rec):
            log.info("sandbox %s is paused; not failing it for: %s", sandbox_id, error)
            return
        if rec.state in LIVE_STATES and rec.state != "pooled" and rec.on_timeout == "destroy" \
                and rec.expires_at is not None and time.time() >= rec.expires_at:
            # Its lifetime ended: the reaper is destroying it (which broke the caller's
            # connection). Finish that instead of keeping a failed row behind.
            log.info("sandbox %s expired; destroying it (a client saw: %s)", sandbox_id, error)
            self._release(rec, error=None, keep_row=False)
            return
        for _ in range(10):  # a connection that broke because its VM died: say that
            if not self._alive(rec):
                error = f"the VM process exited unexpectedly (crashed or killed): {error}"
                break
            time.sleep(0.02)
        self._release(rec, error=error)

    def destroy(self, sandbox_id: str) -> None:
        rec = self.store.get_sandbox(sandbox_id)
        self._release(rec, error=None, keep_row=False)

    def _release(self, rec: SandboxRecord, *, error: str | None, keep_row: bool = True) -> None:
        d = SandboxDir(Path(rec.dir))
        backend = self.backend(rec.isolation)
        backend.kill(rec, d)
        if error is not None and self.confinement.oom_killed(rec.id):
            error = (f"out of memory: the sandbox used more host memory than its limit "
                     f"({rec.memory_mib} MiB plus any VMM overhead) and the kernel killed "
                     f"it ({error})")
        self.confinement.release(rec.id, d.root)
        if rec.network is not None:
            try:
                self.network.detach(rec.id)
            except EmberError as err:  # a later sweep retries (the lease names it)
                log.error("sandbox %s: cannot remove its network: %s", rec.id, err)
        try:
            backend.teardown(rec, d)
        except EmberError as err:  # never delete files under a still-mounted overlay
            log.error("sandbox %s: %s; leaving %s in place", rec.id, err, d.root)
            self.set_state(rec.id, "failed", pid=None, error=f"cannot release its mounts: {err}")
            return
        if keep_row:
            if d.root.is_dir():
                for child in d.root.iterdir():
                    if child.name not in KEEP_ON_FAILURE:
                        _remove(child)
            with contextlib.suppress(SandboxNotFoundError):  # destroyed meanwhile
                if not self.store.mark_failed(rec.id, error):
                    log.info("sandbox %s had failed already; its first cause stands (not: "
                             "%s)", rec.id, error)
        else:
            shutil.rmtree(d.root, ignore_errors=True)
            self.store.delete_sandbox(rec.id)
        self.collect_snapshot(rec.snapshot)

    def set_network(self, sandbox_id: str, policy: NetworkPolicy) -> SandboxRecord:
        """Replace a networked sandbox's egress policy, atomically, while it runs."""
        rec = self.get(sandbox_id)
        if rec.network is None:
            raise BadRequestError(f"sandbox {rec.id} was created without a network; a "
                                  "policy applies only to a sandbox created with one")
        if rec.state not in ("running", "paused", "booting"):
            raise SandboxStateError(f"sandbox {rec.id} is {rec.state}")
        self.network.update(rec.id, policy)
        self.store.update_sandbox(rec.id, network=policy.to_json())
        return self.store.get_sandbox(rec.id)

    def set_timeout(self, sandbox_id: str, timeout: float | None) -> None:
        if timeout is not None and not 0 < timeout <= 7 * 86400:
            raise BadRequestError(f"timeout must be between 0 and 7 days, got {timeout!r}")
        self.store.update_sandbox(
            sandbox_id, timeout_s=timeout,
            expires_at=time.time() + timeout if timeout is not None else None)


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
    return file_tail(Path(rec.dir) / "console.log", limit)
