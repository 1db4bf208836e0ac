"""One backend per isolation tier, behind one interface (docs/isolation.md).

The lifecycle code (:mod:`ember.runtime.manager`) registers, reconciles and releases
sandboxes the same way for every tier; what differs is here: how a sandbox's process
starts (:meth:`Backend.plan`), how it is found again (:meth:`Backend.attach`), paused
and resumed, and what is left to release once it is gone. ``microvm`` is QEMU with its
own kernel; ``gvisor`` and ``container`` are an OCI runtime (runsc, crun) over the
template's image.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ember import proc
from ember.agent import INIT_PATH
from ember.engine import QemuEngine, SandboxHandle, VMHandle
from ember.engine.container import ContainerSpec, OciEngine, gvisor_platform
from ember.engine.container.compat import statx_compat
from ember.errors import BadRequestError, EmberError, SandboxNotFoundError
from ember.guest.inject import staged_agent_lib
from ember.host.cgroups import SandboxCgroup, home_key
from ember.host.jail import JAILER_NAME
from ember.net.addressing import GATEWAY_IP
from ember.runtime.overlays import make_overlay
from ember.runtime.spec import SandboxSpec
from ember.store import SandboxRecord, TemplateRecord

if TYPE_CHECKING:
    from ember.runtime.manager import SandboxDir, SandboxManager

log = logging.getLogger("ember.runtime")

Progress = Callable[[str], None] | None
Build = Callable[[SandboxRecord, "SandboxDir"], SandboxHandle]


@dataclass(frozen=True)
class Launch:
    """What :meth:`SandboxManager._launch` needs to start a sandbox of one tier: the row's
    facts, and the function that makes its process once the row and directory exist."""

    template: str
    disk_mib: int
    accel: str
    build: Build


class Backend(ABC):
    """How the sandboxes of one isolation tier start, are found, paused and released."""

    isolation: str
    #: Whether its sandboxes can be snapshotted (and so forked and restored).
    snapshots = False

    def __init__(self, mgr: SandboxManager) -> None:
        self.mgr = mgr

    @abstractmethod
    def plan(self, spec: SandboxSpec, template: TemplateRecord, progress: Progress) -> Launch:
        """Check that ``spec`` can start here (raising a typed error before anything is
        made) and say how."""

    @abstractmethod
    def attach(self, rec: SandboxRecord, d: SandboxDir) -> SandboxHandle:
        """The running process of ``rec`` (``rec.pid`` is set)."""

    def pause(self, rec: SandboxRecord, d: SandboxDir) -> None:
        self.attach(rec, d).stop()

    def resume(self, rec: SandboxRecord, d: SandboxDir) -> None:
        self.attach(rec, d).cont()

    @abstractmethod
    def kill(self, rec: SandboxRecord, d: SandboxDir) -> None:
        """Make sure no process of the sandbox runs any more (it may be gone already)."""

    @abstractmethod
    def teardown(self, rec: SandboxRecord, d: SandboxDir) -> None:
        """Release what outlives the processes (after their cgroup is gone): raise an
        :class:`EmberError` if something could not be, and the directory must stay."""


class MicroVM(Backend):
    """QEMU microvm: the guest's own kernel, a qcow2 overlay over the template's image,
    the jailed VMM in the sandbox's cgroup."""

    isolation = "microvm"
    snapshots = True

    def __init__(self, mgr: SandboxManager) -> None:
        super().__init__(mgr)
        self.engine = QemuEngine()

    def plan(self, spec: SandboxSpec, template: TemplateRecord, progress: Progress) -> Launch:
        mgr = self.mgr
        for program in ("qemu-system-x86_64", "qemu-img"):
            proc.require(program)
        kernel = mgr.kernel()
        base_mib = -(-template.size_bytes // (1 << 20))
        disk_mib = spec.disk_mib or base_mib
        if disk_mib < base_mib:
            raise BadRequestError(
                f"disk_mib={disk_mib} is smaller than template {template.name!r} ({base_mib} MiB)"
            )

        def build(rec: SandboxRecord, d: SandboxDir) -> SandboxHandle:
            if progress:
                progress(f"creating overlay over template {template.name}")
            make_overlay(mgr.paths, Path(template.image_path), "raw", disk_mib, d.overlay)
            if progress:
                progress(f"booting microVM ({mgr.accel.accel})")
            ram = mgr.ram_file(rec.id)
            jail = mgr.confinement.prepare(rec, d.root, writable=d.prepare_vm_files(),
                                           shared_ram=ram, log_path=d.qemu_log)
            if progress and spec.network is not None:
                progress("setting up the sandbox's network")
            with mgr.network.tap_for(rec.id, spec.network) as net_fd:
                return self.engine.start(mgr.vmspec(
                    rec, d, kernel.bzimage, cmdline=boot_cmdline(rec.id), memory_file=ram,
                    memory_shared=True, jail=jail, net_fd=net_fd))

        return Launch(template.name, disk_mib, mgr.accel.accel, build)

    def attach(self, rec: SandboxRecord, d: SandboxDir) -> VMHandle:
        # Attaching to a running VM does not need the kernel file (it may have been rebuilt).
        return self.engine.attach(_pid(rec), self.mgr.vmspec(rec, d, Path("/")))

    def kill(self, rec: SandboxRecord, d: SandboxDir) -> None:
        # The registry may not know every process of this sandbox: its creator may have died
        # while `qemu-img` or a daemonizing QEMU ran (whose child may appear after we look),
        # and a recorded pid may have been reused. Kill the QEMU programs that name this
        # sandbox's directory on their command line until none does.
        for _ in range(50):
            pids = _qemu_pids_mentioning(d.root)
            if not pids:
                return
            for pid in pids:
                self._kill_pid(rec, d, pid)
            time.sleep(0.02)

    def _kill_pid(self, rec: SandboxRecord, d: SandboxDir, pid: int) -> None:
        try:
            if str(d.qmp_socket).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                self.attach(replace(rec, pid=pid), d).kill()  # QEMU: engine-checked kill
            else:
                os.kill(pid, signal.SIGKILL)  # a helper such as qemu-img
        except (OSError, EmberError) as err:
            log.warning("sandbox %s: cannot kill process %s: %s", rec.id, pid, err)

    def teardown(self, rec: SandboxRecord, d: SandboxDir) -> None:
        (self.mgr.paths.ram / f"{rec.id}.ram").unlink(missing_ok=True)


class Oci(Backend):
    """An OCI runtime over the template's image under a per-sandbox overlay, in the
    sandbox's cgroup: runsc (``gvisor``) or crun (``container``)."""

    def __init__(self, mgr: SandboxManager, isolation: str) -> None:
        super().__init__(mgr)
        self.isolation = isolation
        platform = gvisor_platform()[0] if isolation == "gvisor" else "ptrace"
        state = Path("/run/ember/oci") / home_key(mgr.paths.home)
        self.engine = OciEngine(isolation, state, platform=platform)

    def plan(self, spec: SandboxSpec, template: TemplateRecord, progress: Progress) -> Launch:
        if template.config.get("snapshot"):
            raise BadRequestError(f"template {template.name!r} is pre-baked (a microVM "
                                  f"snapshot); isolation={self.isolation} needs a plain one")
        mgr, engine = self.mgr, self.engine
        base_mib = -(-template.size_bytes // (1 << 20))

        def build(rec: SandboxRecord, d: SandboxDir) -> SandboxHandle:
            if progress:
                progress(f"starting {self.isolation} sandbox ({engine.name}) over template "
                         f"{template.name}")
            d.console_log.touch(mode=0o600)
            netns = resolv = None
            if spec.network is not None:
                if progress:
                    progress("setting up the sandbox's network")
                netns = mgr.network.attach(rec.id, spec.network, tap=False).guest_ns
                resolv = d.root / "resolv.conf"  # its resolver, behind its gateway
                resolv.write_text(f"nameserver {GATEWAY_IP}\noptions timeout:2 attempts:2\n")
                resolv.chmod(0o644)
            if mgr.confinement.enabled:
                procs = mgr.confinement.prepare_cgroup(rec)
            else:
                procs = ()
                log.warning("sandbox %s runs without cgroup limits: %s", rec.id,
                            mgr.confinement.reason)
            return engine.start(ContainerSpec(
                name=rec.id, root=d.root, image=Path(template.image_path),
                agent_lib=staged_agent_lib(mgr.paths.home / "agent-lib"), run_dir=d.vm,
                console_log=d.console_log, pidfile=d.pidfile, cgroup_procs=procs,
                disk_mib=rec.disk_mib,
                compat_lib=statx_compat(mgr.paths.cache) if self.isolation == "gvisor"
                else None, netns=netns, resolv_conf=resolv))

        accel = engine.platform if self.isolation == "gvisor" else "none"
        return Launch(template.name, spec.disk_mib or base_mib, accel, build)

    def attach(self, rec: SandboxRecord, d: SandboxDir) -> SandboxHandle:
        return self.engine.attach(_pid(rec), rec.id, agent_socket=d.agent_socket,
                                  console_log=d.console_log, pidfile=d.pidfile)

    def kill(self, rec: SandboxRecord, d: SandboxDir) -> None:
        if rec.pid is None:
            return
        try:
            self.attach(rec, d).kill()
        except EmberError as err:
            log.warning("sandbox %s: cannot kill its container: %s", rec.id, err)

    def teardown(self, rec: SandboxRecord, d: SandboxDir) -> None:
        # after the cgroup's removal: no process of it can hold the mounts now
        self.engine.teardown(rec.id, d.root)


class Container(Oci):
    """crun: the host's kernel behind namespaces, seccomp and cgroups. crun has no
    cgroup of its own here, so pausing freezes the sandbox's cgroup."""

    def __init__(self, mgr: SandboxManager) -> None:
        super().__init__(mgr, "container")

    def pause(self, rec: SandboxRecord, d: SandboxDir) -> None:
        self._freezer(rec, "pause").freeze()

    def resume(self, rec: SandboxRecord, d: SandboxDir) -> None:
        self._freezer(rec, "resume").thaw()

    def _freezer(self, rec: SandboxRecord, verb: str) -> SandboxCgroup:
        conf = self.mgr.confinement
        cg = conf.cgroup(rec.id)
        if cg is None or not cg.can_freeze:
            why = conf.reason if not conf.enabled else conf.freezer_detail()
            raise BadRequestError(f"cannot {verb} sandbox {rec.id}: isolation=container "
                                  f"pauses with the cgroup freezer, which is unusable: {why}")
        return cg


def make_backend(mgr: SandboxManager, isolation: str) -> Backend:
    if isolation == "microvm":
        return MicroVM(mgr)
    if isolation == "container":
        return Container(mgr)
    if isolation == "gvisor":
        return Oci(mgr, "gvisor")
    raise BadRequestError(f"unknown isolation {isolation!r} (microvm, gvisor or container)")


def boot_cmdline(sandbox_id: str) -> str:
    return f"init={INIT_PATH} ember.hostname={sandbox_id} ember.id={sandbox_id}"


def _pid(rec: SandboxRecord) -> int:
    if rec.pid is None:
        raise SandboxNotFoundError(f"sandbox {rec.id} has no VM process")
    return rec.pid


_JAILER = JAILER_NAME.encode()


def _qemu_pids_mentioning(directory: Path) -> set[int]:
    """Live QEMU programs (qemu-system-*, qemu-img) and jailers starting one, whose command
    line names a file in ``directory``; never a user's shell or editor that names it."""
    needle = str(directory).encode() + b"/"
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes()
                prog = os.path.basename(argv.split(b"\0", 1)[0])
                if needle in argv and (prog.startswith(b"qemu-") or prog == _JAILER):
                    found.add(int(d.name))
            except OSError:
                continue
    return found
