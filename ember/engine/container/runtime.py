"""Container sandboxes through an OCI runtime: crun (``isolation="container"``) or runsc,
gVisor (``isolation="gvisor"``), behind the engine interface's handle.

One bundle per sandbox (``config.json`` from :mod:`.bundle`, the root filesystem from
:mod:`.rootfs`). The runtime starts detached, inside the sandbox's cgroup (the runtime's
processes inherit it: crun runs with its cgroup manager disabled, runsc with
``--ignore-cgroups``), and :meth:`OciEngine.start` returns once the agent listens on
``vm/agent.sock``. Host quirks handled here:

- crun refuses hybrid cgroup hosts (v1 controllers plus a cgroup2 mount at
  ``/sys/fs/cgroup/unified``): it is started in a private mount namespace where that
  mount is detached;
- rlimits in the bundle never exceed the host's hard limits (raising them needs
  CAP_SYS_RESOURCE, which some hosts' root lacks);
- runsc applies the bundle's seccomp filter only with ``--oci-seccomp`` (given);
- runsc (2022 build) gets an identity-mapped user namespace (its gofer cannot start
  otherwise) and the platform :func:`ember.engine.container.tiers.gvisor_platform` chose
  (``kvm`` only after a probe container ran on it, see ``platform.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ember.engine.base import (
    SandboxHandle,
    file_tail,
    process_runs,
    remove_stale_socket,
    unix_socket_live,
)
from ember.engine.container import compat
from ember.engine.container.bundle import oci_config
from ember.engine.container.rootfs import RootfsDirs, mount, unmount
from ember.errors import BadRequestError, EmberTimeoutError, EngineError, HostCommandError
from ember.host.cgroups import enter_argv
from ember.net.addressing import guest_netns_name
from ember.proc import tail

log = logging.getLogger("ember.engine.container")

RUNTIMES = {"container": "crun", "gvisor": "runsc"}
START_TIMEOUT = 60.0
#: How long the agent may take to listen after the runtime started the container.
AGENT_TIMEOUT = 30.0
UNIFIED = Path("/sys/fs/cgroup/unified")
_DETACH_UNIFIED = 'umount -l "$0" 2>/dev/null; exec "$@"'


@dataclass(frozen=True)
class ContainerSpec:
    """Everything :meth:`OciEngine.start` needs for one sandbox."""

    name: str  # the sandbox id: container id, hostname, identity in /proc
    root: Path  # the sandbox directory
    image: Path  # the template's ext4 image
    agent_lib: Path  # a staged /.ember/lib (ember.guest.inject.staged_agent_lib)
    run_dir: Path  # the host directory bound at /.ember/run (the agent socket)
    console_log: Path
    pidfile: Path
    cgroup_procs: tuple[Path, ...] = ()
    nproc: int = 256
    disk_mib: int | None = None  # the writable layer's size (None: unbounded)
    compat_lib: Path | None = None  # runsc only: the statx shim (engine.container.compat)
    #: The sandbox's network namespace (ember.net) and its resolv.conf; None: no network.
    netns: Path | None = None
    resolv_conf: Path | None = None

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / "agent.sock"


class OciHandle(SandboxHandle):
    """A container's main process (crun: the container's init; runsc: the sandbox
    process). Its argv carries the sandbox id, which :meth:`is_alive` checks. It has no
    VMM control socket: pausing goes through the OCI runtime."""

    def __init__(self, engine: OciEngine, name: str, pid: int, *, agent_socket: Path,
                 console_log: Path, pidfile: Path) -> None:
        super().__init__(name=name, pid=pid, agent_socket=agent_socket,
                         console_log=console_log, pidfile=pidfile)
        self.engine = engine

    @property
    def _identity(self) -> str:
        return self.name

    def stop(self) -> None:
        """Pause every task of the sandbox (gVisor only: its Sentry stops them itself)."""
        self.engine.control("pause", self.name)

    def cont(self) -> None:
        self.engine.control("resume", self.name)

    def status(self) -> str:
        return "running" if self.is_alive() else "exited"

    def quit(self, timeout: float = 10.0) -> None:
        self.kill(timeout)

    def _cleanup(self) -> None:
        super()._cleanup()
        self.engine.delete(self.name)


class OciEngine:
    """One OCI runtime (crun or runsc) for the sandboxes of one ember home."""

    def __init__(self, isolation: str, state_root: Path, *, platform: str = "ptrace") -> None:
        if isolation not in RUNTIMES:
            raise BadRequestError(f"no OCI runtime for isolation={isolation!r}")
        self.isolation = isolation
        self.name = RUNTIMES[isolation]
        self.state_dir = state_root / self.name
        self.platform = platform

    def _base(self, network: bool = False) -> list[str]:
        argv = [self.name, "--root", str(self.state_dir)]
        if self.name == "crun":
            return [*argv, "--cgroup-manager=disabled"]
        # A network: runsc's netstack would need --network=sandbox, which this runsc refuses
        # here; it runs inside the sandbox's network namespace and uses it (host notes).
        return [*argv, f"--platform={self.platform}",
                "--network=host" if network else "--network=none", "--ignore-cgroups",
                "--host-uds=create", "--oci-seccomp"]

    def _for(self, name: str, *args: str) -> list[str]:
        """The runtime's argv for one command on container ``name``. A networked runsc
        sandbox answers on an abstract socket of its own network namespace (the guest's,
        behind the sandbox's): every runsc command about it runs there too."""
        netns = Path("/run/netns") / guest_netns_name(name)
        if self.name == "runsc" and netns.exists():
            return ["nsenter", f"--net={netns}", "--", *self._base(True), *args, name]
        return [*self._base(), *args, name]

    def attach(self, pid: int, name: str, *, agent_socket: Path, console_log: Path,
               pidfile: Path) -> OciHandle:
        return OciHandle(self, name, pid, agent_socket=agent_socket, console_log=console_log,
                         pidfile=pidfile)

    def start(self, spec: ContainerSpec) -> OciHandle:
        """Mount the root filesystem, write the bundle, start the container detached and
        wait for its agent; on any failure nothing is left (process, state, mounts)."""
        dirs = RootfsDirs(spec.root)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        spec.run_dir.mkdir(mode=0o700, exist_ok=True)
        remove_stale_socket(spec.agent_socket)
        handle: OciHandle | None = None
        try:
            mount(spec.image, dirs, spec.disk_mib)
            if self.name == "runsc" and spec.compat_lib is not None:
                compat.install(dirs.rootfs, spec.compat_lib)
            nofile = _capped(resource.RLIMIT_NOFILE, 4096)
            nproc = _capped(resource.RLIMIT_NPROC, spec.nproc)
            config = oci_config(sandbox_id=spec.name, rootfs=dirs.rootfs, run_dir=spec.run_dir,
                                agent_lib=spec.agent_lib, nofile=nofile, nproc=nproc,
                                gvisor=self.name == "runsc", netns=spec.netns,
                                resolv_conf=spec.resolv_conf)
            (spec.root / "config.json").write_text(json.dumps(config, indent=1))
            argv = self._for(spec.name, "run", "--detach", "--bundle", str(spec.root))
            if self.name == "crun" and _hybrid_cgroups():
                argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                        _DETACH_UNIFIED, str(UNIFIED), *argv]
            if spec.cgroup_procs:
                argv = enter_argv(spec.cgroup_procs, argv)
            self._run_detached(argv, spec)
            try:
                pid = self.state_pid(spec.name)
            except EngineError as err:  # it started, then died at once: say what it said
                said = file_tail(spec.console_log, 1500).strip()
                raise EngineError(f"{err} (it exited right after starting"
                                  + (f"; its output ends: {said}" if said else "") + ")") from err
            spec.pidfile.write_text(f"{pid}\n")
            handle = self.attach(pid, spec.name, agent_socket=spec.agent_socket,
                                 console_log=spec.console_log, pidfile=spec.pidfile)
            _wait_agent(handle, spec.console_log)
        except BaseException:
            if handle is not None:
                with contextlib.suppress(EngineError):
                    handle.kill()
            self.delete(spec.name)
            unmount(dirs)
            raise
        log.info("%s sandbox %s started: pid %d", self.isolation, spec.name, handle.pid)
        return handle

    def _run_detached(self, argv: list[str], spec: ContainerSpec) -> None:
        """Run the runtime's ``run --detach``: the container inherits its stdout and stderr
        (the console log), so they go to a file, never to a pipe we would wait on."""
        log.debug("run (start %s sandbox %s): %s", self.isolation, spec.name, " ".join(argv))
        with open(spec.console_log, "ab") as out:
            before = out.tell()
            try:
                cp = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    timeout=START_TIMEOUT, close_fds=True, check=False)
            except subprocess.TimeoutExpired as err:
                raise EmberTimeoutError(f"{self.name} did not start sandbox {spec.name} "
                                        f"within {START_TIMEOUT} s") from err
            except OSError as err:
                raise EngineError(f"cannot run {self.name}: {err}") from err
        if cp.returncode != 0:
            said = _read_from(spec.console_log, before)
            raise EngineError(f"{self.name} could not start sandbox {spec.name} (exit "
                              f"{cp.returncode}): {tail(said) or 'no message'}")

    def state_pid(self, name: str) -> int:
        try:
            out = subprocess.run(self._for(name, "state"), capture_output=True,
                                 timeout=30, check=True).stdout
            pid = json.loads(out)["pid"]
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as err:
            raise EngineError(f"{self.name} does not know container {name}: {err}") from err
        if not isinstance(pid, int) or pid <= 0:
            raise EngineError(f"{self.name} reports no process for container {name}")
        return pid

    @property
    def can_pause(self) -> bool:
        return self.name == "runsc"

    def control(self, verb: str, name: str) -> None:
        """``pause`` or ``resume`` a container (runsc: its Sentry stops and restarts every
        task). A crun container is paused by ember's manager with the freezer of the
        sandbox's cgroup instead (crun runs here without a cgroup manager)."""
        if not self.can_pause:
            raise BadRequestError(f"{verb} is not supported on isolation={self.isolation}")
        try:
            subprocess.run(self._for(name, verb), capture_output=True, timeout=30,
                           check=True)
        except subprocess.CalledProcessError as err:
            said = err.stderr.decode("utf-8", "replace") if err.stderr else ""
            raise EngineError(f"{self.name} {verb} {name} failed: {tail(said)}") from err
        except (OSError, subprocess.SubprocessError) as err:
            raise EngineError(f"{self.name} {verb} {name} failed: {err}") from err

    def delete(self, name: str) -> None:
        """Forget the container (killing what is left of it); a no-op if unknown."""
        if not (self.state_dir / name).exists():
            return
        try:
            subprocess.run(self._for(name, "delete", "--force"), capture_output=True,
                           timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as err:
            log.warning("%s delete %s: %s", self.name, name, err)

    def teardown(self, name: str, root: Path) -> None:
        """Release a container sandbox's runtime state and mounts (its processes must be
        gone or be killed by its cgroup's removal first)."""
        self.delete(name)
        try:
            unmount(RootfsDirs(root))
        except HostCommandError as err:
            raise EngineError(f"cannot unmount sandbox {name}'s root filesystem: {err}") from err


def _capped(which: int, want: int) -> int:
    hard = resource.getrlimit(which)[1]
    return want if hard == resource.RLIM_INFINITY else min(want, hard)


def _hybrid_cgroups() -> bool:
    """cgroup v1 controllers plus a cgroup2 mount at /sys/fs/cgroup/unified."""
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8",
                                             errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 8 and fields[4] == str(UNIFIED):
                return " - cgroup2 " in line
    return False


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(8192).decode("utf-8", "replace")
    except OSError:
        return ""


def _wait_agent(handle: OciHandle, console_log: Path) -> None:
    assert handle.agent_socket is not None
    deadline = time.monotonic() + AGENT_TIMEOUT
    # Listening, not just existing: under gVisor the socket file appears before listen().
    while not (handle.agent_socket.exists() and unix_socket_live(handle.agent_socket)):
        if not process_runs(handle.pid, handle.name):
            said = tail(_read_from(console_log, 0))
            raise EngineError(f"sandbox {handle.name}'s container exited right after "
                              f"starting: {said or 'no message'}")
        if time.monotonic() > deadline:
            raise EmberTimeoutError(f"sandbox {handle.name}'s agent did not listen within "
                                    f"{AGENT_TIMEOUT} s")
        time.sleep(0.01)

