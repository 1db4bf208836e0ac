"""PID 1 of an ember guest: mount the basics, then run a check or supervise the agent.

PID 1 must never raise (the kernel would panic), so :func:`main` catches everything,
reports it on the console and powers off. Powering off is ``reboot(RB_AUTOBOOT)``: the VM
has no ACPI, and QEMU runs with ``-no-reboot`` (kernel: ``reboot=t panic=-1``), so a
reboot ends the QEMU process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from collections.abc import Callable

from . import CONTAINER_SOCKET, DEFAULT_PATH, SHUTDOWN_EXIT_CODE
from .bootconfig import BootConfig, boot_config, check_line, parse_cmdline, read_image_digest
from .identity import write_identity
from .libc import (
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REMOUNT,
    mount,
    reboot,
    sethostname,
)

# Boot time: the guest may run under TCG (software emulation), where every module imported
# costs milliseconds. Init imports only what it needs before it forks the agent (which
# imports the rest); nothing here imports ``socket``, ``dataclasses`` or ``typing``, and
# ``traceback`` is imported only to report a failure.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

MAX_AGENT_RESTARTS = 3
RESTART_DELAY = 0.5
KILL_GRACE = 1.0
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}


class Mount:
    __slots__ = ("data", "flags", "fstype", "source", "target")

    def __init__(
        self, source: str, target: str, fstype: str, flags: int = 0, data: str = ""
    ) -> None:
        self.source: Final = source
        self.target: Final = target
        self.fstype: Final = fstype
        self.flags: Final = flags
        self.data: Final = data

    def __repr__(self) -> str:
        return (
            f"Mount(source={self.source!r}, target={self.target!r}, fstype={self.fstype!r}, "
            f"flags={self.flags!r}, data={self.data!r})"
        )


_NOSUID_NODEV = MS_NOSUID | MS_NODEV
ESSENTIAL_MOUNTS = (
    Mount("sysfs", "/sys", "sysfs", _NOSUID_NODEV | MS_NOEXEC),
    Mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
)
AGENT_MOUNTS = (
    Mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666"),
    Mount("tmpfs", "/dev/shm", "tmpfs", _NOSUID_NODEV, "mode=1777"),
    Mount("tmpfs", "/tmp", "tmpfs", _NOSUID_NODEV, "mode=1777"),
    Mount("tmpfs", "/run", "tmpfs", _NOSUID_NODEV, "mode=0755"),
)
DEV_LINKS = (
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
    ("/dev/ptmx", "pts/ptmx"),
)


def log(message: str) -> None:
    """Write one line to init's stderr (the console); never raises."""
    with contextlib.suppress(OSError):
        os.write(2, f"ember-init: {message}\n".encode(errors="replace"))


def main() -> None:
    """Entry point of ``/.ember/init``. Returns only when not run as PID 1."""
    if os.getpid() != 1:
        log("refusing to run: ember's init must be PID 1")
        return
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        _boot()
    except BaseException as exc:  # PID 1 must not die with an exception
        log(f"fatal: {exc!r}")
        _log_traceback()
    _power_off()


def container_main() -> None:
    """Entry point of a container sandbox (``isolation="container"`` or ``"gvisor"``): PID 1
    of the container's pid namespace. The OCI runtime has mounted ``/proc``, ``/dev``,
    ``/tmp`` and friends and set the hostname; this supervises the agent, which serves on
    :data:`~ember.agent.CONTAINER_SOCKET`, reaps orphans, and ends the container (every
    process, then itself) when the host asks to shut down."""
    if os.getpid() != 1:
        log("refusing to run: ember's container init must be PID 1")
        return
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        os.umask(0o022)
        os.environ["PATH"] = DEFAULT_PATH
        _ensure_stdio()
        _link_dev()
        hostname = os.uname().nodename
        try:
            write_identity(hostname)
        except OSError as err:
            log(f"cannot write /etc/hostname or /etc/hosts: {err}")
        from .server import main_unix

        _supervise(lambda: main_unix(CONTAINER_SOCKET))
    except BaseException as exc:
        log(f"fatal: {exc!r}")
        _log_traceback()
    _try("stop processes", _kill_everything)
    os._exit(0)


def _boot() -> None:
    os.umask(0o022)
    os.environ["PATH"] = DEFAULT_PATH
    _ensure_stdio()
    _mount_all((Mount("proc", "/proc", "proc", _NOSUID_NODEV | MS_NOEXEC),))
    config = _read_config()
    _mount_all(ESSENTIAL_MOUNTS)
    _ensure_stdio()
    for problem in config.problems:
        log(problem)
    if config.mode == "check":
        _write_check_line(check_line(os.uname().release, read_image_digest()) + "\n")
        return
    _mount_all(AGENT_MOUNTS)
    _link_dev()
    try:
        sethostname(config.hostname)
    except OSError as err:
        log(f"cannot set the hostname {config.hostname}: {err}")
    try:
        write_identity(config.hostname)
    except OSError as err:
        log(f"cannot write /etc/hostname or /etc/hosts: {err}")
    _loopback_up()
    if os.path.exists("/sys/class/net/eth0"):  # a NIC: the host gave it a network
        _configure_network()
    _grow_root()
    _supervise()


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def _loopback_up() -> None:
    """Loopback up in every guest, networked or not: programs serve and talk on 127.0.0.1,
    and the agent carries the host's connections to guest ports there. With the bare C
    socket module (``socket`` itself costs a TCG-emulated guest tens of ms to import)."""
    import _socket
    import fcntl
    import struct

    try:
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        try:
            got = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack("16s24x", b"lo"))
            flags = struct.unpack_from("H", got, 16)[0]
            fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS,
                        struct.pack("16sH22x", b"lo", flags | IFF_UP))
        finally:
            sock.close()
    except OSError as err:
        log(f"cannot bring up lo: {err}")


def _configure_network() -> None:
    """Never fatal: without its network the sandbox still runs (and says why)."""
    try:
        from .netconf import configure  # imports socket: only networked guests pay for it

        problem = configure()
    except Exception as err:
        problem = f"cannot configure the network: {err!r}"
    if problem:
        log(problem)


EXT4_IOC_RESIZE_FS = 0x40086610  # _IOW('f', 16, __u64)


def _grow_root(device: str = "vda") -> None:
    """Grow the root ext4 filesystem online to the size of its disk (a sandbox asked for
    more disk than its template has); a no-op when it already fills the disk."""
    import fcntl
    import struct

    try:
        with open(f"/sys/block/{device}/size", encoding="ascii") as f:
            disk_bytes = int(f.read(64)) * 512
        block = os.statvfs("/").f_bsize
        with open(f"/dev/{device}", "rb") as dev:  # the superblock's block count
            dev.seek(1024)
            sb = dev.read(0x154)
        lo, hi = struct.unpack_from("<I", sb, 0x4)[0], struct.unpack_from("<I", sb, 0x150)[0]
        if disk_bytes // block <= (hi << 32 | lo):
            return
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, struct.pack("Q", disk_bytes // block))
        finally:
            os.close(fd)
    except (OSError, ValueError) as err:
        log(f"cannot grow the root filesystem to its disk: {err}")


def _read_config() -> BootConfig:
    try:
        with open("/proc/cmdline", encoding="utf-8", errors="replace") as file:
            return boot_config(parse_cmdline(file.read(65536)))
    except OSError as err:
        log(f"cannot read /proc/cmdline ({err}); using defaults")
        return BootConfig()


def _mount_all(entries: tuple[Mount, ...]) -> None:
    """Mount each filesystem unless already mounted; failures are logged, never fatal.

    The mount table is read once per call: the targets of one call are distinct and none
    lies inside another.
    """
    mounted = _mount_points()
    for entry in entries:
        if entry.target in mounted:
            continue
        try:
            if not os.path.isdir(entry.target):
                os.makedirs(entry.target, 0o755)
            mount(entry.source, entry.target, entry.fstype, entry.flags, entry.data)
        except OSError as err:
            log(f"skipping {entry.fstype} on {entry.target}: {err}")


def _mount_points() -> set[str]:
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as file:
            lines = file.read().splitlines()
    except OSError:
        return set()
    points = set()
    for line in lines:
        fields = line.split()
        if len(fields) > 1:
            points.add(_unescape(fields[1]))
    return points


def _unescape(field: str) -> str:
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def _ensure_stdio() -> None:
    """Give init fds 0-2 (the kernel leaves them closed without a /dev/console)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        for path in ("/dev/console", "/dev/null"):
            try:
                opened = os.open(path, os.O_RDWR | os.O_NOCTTY)
            except OSError:
                continue
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
            break


def _link_dev() -> None:
    for link, target in DEV_LINKS:
        if os.path.lexists(link):
            continue
        try:
            os.symlink(target, link)
        except OSError as err:
            log(f"cannot create {link}: {err}")


def _write_check_line(line: str) -> None:
    """Write the line once to /dev/console, and to stdout unless stdout is the console."""
    data = line.encode()
    console: int | None = None
    try:
        fd = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY)
        try:
            os.write(fd, data)
            console = os.fstat(fd).st_rdev
        finally:
            os.close(fd)
    except OSError as err:
        log(f"cannot write to /dev/console: {err}")
    try:
        out = os.fstat(1)
        if console is None or not (stat.S_ISCHR(out.st_mode) and out.st_rdev == console):
            os.write(1, data)
    except OSError:
        pass


def _supervise(agent_main: Callable[[], int] | None = None) -> None:
    """Run the agent, restart it after a crash, return when it asks to power off."""
    restarts = 0
    agent = _spawn_agent(agent_main)
    while True:
        for pid, status in _reap():
            if pid != agent:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code == SHUTDOWN_EXIT_CODE:
                log("shutdown requested by the host")
                return
            restarts += 1
            if restarts > MAX_AGENT_RESTARTS:
                log(f"agent exited ({_describe(code)}) {restarts} times; powering off")
                return
            log(f"agent exited ({_describe(code)}); restart {restarts}/{MAX_AGENT_RESTARTS}")
            time.sleep(RESTART_DELAY)
            agent = _spawn_agent(agent_main)
        info = signal.sigtimedwait(_SIGNALS, 1.0)
        # gVisor may wake us with si_signo 0 after a pause/resume: not a request to stop.
        if info is not None and info.si_signo in _SIGNALS and info.si_signo != signal.SIGCHLD:
            log(f"{signal.Signals(info.si_signo).name} received; powering off")
            return


def _describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"code {code}"


def _spawn_agent(agent_main: Callable[[], int] | None = None) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        os.setsid()
        if agent_main is None:
            from .server import main as serve_port

            code = serve_port()
        else:
            code = agent_main()
    except BaseException as exc:
        log(f"agent crashed: {exc!r}")
        _log_traceback()
    finally:
        os._exit(code)


def _log_traceback() -> None:
    """Log the traceback of the exception being handled; never raises."""
    try:
        import traceback  # only after a failure: the import is slow on a TCG guest

        log(traceback.format_exc().rstrip())
    except Exception as exc:
        log(f"cannot format the traceback: {exc!r}")


def _reap() -> list[tuple[int, int]]:
    """Collect every exited child: (pid, wait status)."""
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, status))


def _has_children() -> bool:
    _reap()
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _power_off() -> None:
    """Stop every process, flush and remount the root read-only, then reboot (ends QEMU)."""
    _try("stop processes", _kill_everything)
    _try("sync", os.sync)
    _try("remount / read-only", lambda: mount("", "/", "", MS_REMOUNT | MS_RDONLY))
    _try("sync", os.sync)
    _try("reboot", reboot)
    os._exit(1)  # the kernel panics, and panic=-1 reboots: QEMU still ends


def _kill_everything() -> None:
    for signum, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
        try:
            os.kill(-1, signum)
        except ProcessLookupError:
            return
        # Every process descends from init, so no children left means none at all.
        deadline = time.monotonic() + grace
        while _has_children() and time.monotonic() < deadline:
            time.sleep(0.02)


def _try(what: str, action: Callable[[], object]) -> None:
    try:
        action()
    except BaseException as exc:
        log(f"{what} failed: {exc!r}")
