"""The engine interface the layers above use: a VM spec, a handle, an engine.

An engine (QEMU today; Firecracker or Cloud Hypervisor later) turns a :class:`VMSpec`
into a running VMM process and returns a :class:`VMHandle`. The handle's process-level
operations (liveness, SIGKILL, waiting for exit, removing leftover sockets) are the same
for every VMM and live here; VMM control (pause, resume, status, quit) is per engine.

The VMM process is not our child (it daemonizes so it outlives whoever started it), and
its pid may come from the registry long after the fact. So every signal goes through a
pidfd, and only after ``/proc/<pid>/cmdline`` shows the VM's control socket path: a pid
reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from ember.engine.accel import AccelDecision
from ember.errors import BadRequestError, EngineError
from ember.host.jail import JailSpec

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_VCPUS = 64
MIN_MEMORY_MIB = 64
#: sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
#: x86 COMMAND_LINE_SIZE is 2048; keep room for the engine's own arguments.
MAX_EXTRA_CMDLINE = 1024
#: Where process information is read (tests point it at a fake).
PROC = Path("/proc")
#: ``/proc/<pid>/stat`` flags (include/linux/sched.h): exiting, kernel thread.
PF_EXITING = 0x4
PF_KTHREAD = 0x200000
#: How long reading a process's argv waits for an exec in progress to set it up.
EXEC_SETTLE_S = 2.0


def host_memory_mib() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)


@dataclass(frozen=True)
class VMSpec:
    """Everything an engine needs to boot one guest. Validated on construction."""

    name: str
    kernel: Path
    disk: Path
    disk_format: Literal["raw", "qcow2"]
    disk_readonly: bool
    vcpus: int
    memory_mib: int
    cmdline: str  # extra kernel arguments, appended after the engine's own
    console_log: Path
    qmp_socket: Path
    agent_socket: Path | None
    pidfile: Path
    accel: AccelDecision
    #: Guest RAM backed by this file: ``memory_shared`` maps it shared (the guest writes
    #: into the file: a snapshot copies it), otherwise privately (copy-on-write: clones of
    #: one snapshot share its unmodified pages). None: anonymous memory.
    memory_file: Path | None = None
    memory_shared: bool = False
    #: Start paused, waiting for a saved state to be loaded (:meth:`Engine.restore`).
    incoming: bool = False
    #: Run the VMM inside this jail (uid, namespaces, new root, cgroups, rlimits); the
    #: engine adds the bind mounts its VMM needs. None: run it as the caller (unjailed).
    jail: JailSpec | None = None
    #: An open tap device (the sandbox's network, :mod:`ember.net`): the guest gets a
    #: virtio-net NIC on it. The VMM receives it as :data:`NET_FD`; the caller keeps and
    #: closes its own copy. None: no NIC at all.
    net_fd: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise BadRequestError(
                f"VM name {self.name!r} must be 1-64 characters of letters, digits, "
                "'_', '.' or '-', starting with a letter or digit"
            )
        if self.disk_format not in ("raw", "qcow2"):
            raise BadRequestError(f"disk_format must be 'raw' or 'qcow2', not {self.disk_format!r}")
        _check_int("vcpus", self.vcpus, 1, MAX_VCPUS)
        _check_int("memory_mib", self.memory_mib, MIN_MEMORY_MIB, host_memory_mib())
        for label in ("kernel", "disk", "console_log", "qmp_socket", "agent_socket", "pidfile",
                      "memory_file"):
            value = getattr(self, label)
            if value is not None:
                _check_path(label, value)
        for label in ("qmp_socket", "agent_socket"):
            value = getattr(self, label)
            if value is not None and len(os.fsencode(value)) > MAX_SOCKET_PATH_BYTES:
                raise BadRequestError(
                    f"{label} path {str(value)!r} is longer than {MAX_SOCKET_PATH_BYTES} "
                    "bytes, the limit for a Unix socket path; use a shorter EMBER_HOME"
                )
        if len(self.cmdline) > MAX_EXTRA_CMDLINE:
            raise BadRequestError(
                f"extra kernel cmdline is longer than {MAX_EXTRA_CMDLINE} characters"
            )
        if any(not ch.isprintable() for ch in self.cmdline):
            raise BadRequestError("extra kernel cmdline contains control characters")
        if self.memory_shared and self.memory_file is None:
            raise BadRequestError("memory_shared needs a memory_file")


def _check_int(label: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequestError(f"{label} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise BadRequestError(f"{label} must be between {low} and {high}, not {value}")


def _check_path(label: str, value: object) -> None:
    if not isinstance(value, Path):
        raise BadRequestError(f"{label} must be a pathlib.Path, not {type(value).__name__}")
    if not value.is_absolute():
        raise BadRequestError(f"{label} path {str(value)!r} must be absolute")
    if any(ch in str(value) for ch in "\0\n\r"):
        raise BadRequestError(f"{label} path {str(value)!r} contains a NUL or newline")


# --------------------------------------------------------------------------- processes


def proc_cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid`` from /proc, or None if it is gone, a zombie, exiting or a kernel
    thread (each reads as an empty cmdline).

    A process in the middle of an execve() reads empty too, from the switch to its new
    program's memory until the kernel has set up its arguments there (a container's init
    exec'ing its program, a jailer exec'ing QEMU): milliseconds, more on a loaded host.
    That is waited out (up to :data:`EXEC_SETTLE_S`), never taken for a process that
    exited."""
    deadline = time.monotonic() + EXEC_SETTLE_S
    while True:
        try:
            raw = (PROC / str(pid) / "cmdline").read_bytes()
        except OSError:
            return None
        if raw:
            return [os.fsdecode(a) for a in raw.rstrip(b"\0").split(b"\0")]
        if not _in_exec(pid) or time.monotonic() >= deadline:
            return None
        time.sleep(0.002)


def _in_exec(pid: int) -> bool:
    """Whether an empty cmdline of ``pid`` can only mean an exec in progress: the process
    is neither gone, a zombie, exiting (its memory is released before it turns zombie) nor
    a kernel thread (which has no cmdline at all)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text(errors="replace")
        # The command name, in parentheses, may hold anything: fields follow the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        state, flags = fields[0], int(fields[6])
    except (OSError, IndexError, ValueError):
        return False
    return state not in ("Z", "X", "x") and not flags & (PF_EXITING | PF_KTHREAD)


def process_runs(pid: int, token: str) -> bool:
    """True if ``pid`` is alive (not a zombie) and one of its arguments contains ``token``."""
    argv = proc_cmdline(pid)
    return argv is not None and any(token in arg for arg in argv)


def file_tail(path: Path, limit: int) -> str:
    """The last ``limit`` bytes of a log file, decoded leniently ("" if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def unix_socket_live(path: Path) -> bool:
    """True if something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return False
    return True


def remove_stale_socket(path: Path) -> None:
    """Unlink ``path`` unless a live server listens on it (a newer VM may own it)."""
    if (path.exists() or path.is_symlink()) and not unix_socket_live(path):
        path.unlink(missing_ok=True)


class SandboxHandle(ABC):
    """The running process of one sandbox, whatever its tier (a VMM, a container's init
    or gVisor's sandbox process) and the sockets it serves.

    ``is_alive``, ``kill`` and ``wait_exit`` are implemented here, from the process and
    its identity; subclasses implement pausing and stopping. ``kill``, ``quit`` and a
    successful ``wait_exit`` leave no process and remove its sockets and pidfile.
    """

    def __init__(self, *, name: str, pid: int, agent_socket: Path | None, console_log: Path,
                 pidfile: Path) -> None:
        if pid <= 0:
            raise BadRequestError(f"pid must be positive, not {pid}")
        self.name = name
        self.pid = pid
        self.agent_socket = agent_socket
        self.console_log = console_log
        self.pidfile = pidfile

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid}>"

    @property
    @abstractmethod
    def _identity(self) -> str:
        """A string that appears in this process's argv and in no unrelated process's."""

    @abstractmethod
    def stop(self) -> None:
        """Pause the guest."""

    @abstractmethod
    def cont(self) -> None:
        """Resume a paused guest."""

    @abstractmethod
    def status(self) -> str:
        """The run state (``running``, ``paused``, ...) or ``exited``."""

    @abstractmethod
    def quit(self, timeout: float = 10.0) -> None:
        """Ask the process to exit; SIGKILL it if it has not within ``timeout`` seconds."""

    # -- process level (shared)
    def is_alive(self) -> bool:
        return process_runs(self.pid, self._identity)

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the process to exit; True (and cleaned up) if it has."""
        fd = self._open_pidfd()
        if fd is None:
            self._cleanup()
            return True
        try:
            exited = _poll_exit(fd, timeout)
            if exited:
                _reap(fd)
        finally:
            os.close(fd)
        if exited:
            self._cleanup()
        return exited

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the VMM, wait for it to be gone and remove its sockets and pidfile."""
        fd = self._open_pidfd()
        if fd is not None:
            try:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                if not _poll_exit(fd, timeout):
                    raise EngineError(
                        f"VM {self.name} (pid {self.pid}) did not die within {timeout} s of SIGKILL"
                    )
                _reap(fd)
            finally:
                os.close(fd)
        self._cleanup()

    def _open_pidfd(self) -> int | None:
        """A pidfd for our VMM, or None if it is gone or the pid now belongs to another process."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return None
        except OSError as err:
            raise EngineError(
                f"cannot open pidfd for VM {self.name} (pid {self.pid}): {err.strerror}"
            ) from err
        # Checked after opening: if the pid was ours now, the fd refers to our process.
        if not process_runs(self.pid, self._identity):
            os.close(fd)
            return None
        return fd

    def _cleanup(self) -> None:
        if self.agent_socket is not None:
            remove_stale_socket(self.agent_socket)
        try:
            text = self.pidfile.read_text().strip()
            # Only our pid (or none), and never while a live process names this pidfile.
            if text in ("", str(self.pid)) and not (
                text and process_runs(self.pid, os.fspath(self.pidfile))
            ):
                self.pidfile.unlink()
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise EngineError(f"cannot remove pidfile {self.pidfile}: {err}") from err


#: query-migrate states of a migration that has not ended.
MIGRATING = frozenset({"setup", "active", "pre-switchover", "device", "cancelling",
                       "wait-unplug", "postcopy-active", "postcopy-paused",
                       "postcopy-recover"})


class VMHandle(SandboxHandle):
    """A running (or once running) VMM process: its control socket (QMP) besides."""

    def __init__(self, *, name: str, pid: int, qmp_socket: Path, agent_socket: Path | None,
                 console_log: Path, pidfile: Path) -> None:
        super().__init__(name=name, pid=pid, agent_socket=agent_socket,
                         console_log=console_log, pidfile=pidfile)
        self.qmp_socket = qmp_socket

    @property
    def _identity(self) -> str:
        return os.fspath(self.qmp_socket)

    @abstractmethod
    def qmp(self, cmd: str, **args: Any) -> Any:
        """Run one control command and return its result; EngineError on failure."""

    def resume_after_save(self, timeout: float = 30.0) -> None:
        """Run the guest again after its snapshot writer died: a migration to the state
        file may still be in flight (then ``cont`` would run the guest only until the
        migration completes and stops it again), so cancel it and wait until it has
        settled; then ``cont`` and check that the guest runs (EngineError otherwise)."""
        deadline = time.monotonic() + timeout
        if str(self.qmp("query-migrate").get("status", "none")) in MIGRATING:
            with contextlib.suppress(EngineError):  # it may just have ended
                self.qmp("migrate_cancel")
        while (st := str(self.qmp("query-migrate").get("status", "none"))) in MIGRATING:
            if time.monotonic() > deadline:
                raise EngineError(f"VM {self.name}: its migration stays {st!r}")
            time.sleep(0.02)
        self.cont()
        if (now := self.status()) != "running":
            raise EngineError(f"VM {self.name} is {now!r} after cont, not running")

    def _cleanup(self) -> None:
        remove_stale_socket(self.qmp_socket)
        super()._cleanup()


def _reap(pidfd: int) -> None:
    """Collect the exit status if the VMM happens to be our child (so it is no zombie)."""
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)


def _poll_exit(pidfd: int, timeout: float) -> bool:
    """True once the process behind ``pidfd`` has exited (pidfds poll readable then)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + max(timeout, 0.0)
    while True:
        remaining = deadline - time.monotonic()
        if poller.poll(max(int(remaining * 1000), 0)):
            return True
        if remaining <= 0:
            return False


@dataclass(frozen=True)
class SavedState:
    """What :meth:`Engine.save` wrote."""

    path: Path
    size_bytes: int
    ram_in_stream: bool  # False: guest RAM was file-backed and shared, not in the stream
    vmm_version: str  # a restore needs the same VMM build
    seconds: float


class Engine(Protocol):
    """A VMM driver."""

    name: str

    def version(self) -> str:
        """The VMM's version (snapshots record it; a restore needs the same)."""
        ...

    def save(self, handle: VMHandle, dest: Path, *, timeout: float = 60.0) -> SavedState:
        """Pause the guest and write its device state (and RAM, unless it is file-backed
        and shared) to ``dest``. The guest stays paused; its disk is flushed."""
        ...

    def restore(self, spec: VMSpec, state: Path, *, timeout: float = 60.0) -> VMHandle:
        """Start a VMM for ``spec`` (``incoming`` set), load ``state`` into it and resume it.
        Nothing is left running if the state is rejected."""
        ...

    def start(self, spec: VMSpec) -> VMHandle:
        """Boot ``spec``; return once the VMM answers its control socket."""
        ...

    def attach(self, pid: int, spec: VMSpec) -> VMHandle:
        """A handle for a VM another process started (pid from the registry).

        Never fails because the VM is gone: the handle then answers ``is_alive() False``.
        """
        ...
