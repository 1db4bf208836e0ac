"""exec: run a program in a new session, stream its output, enforce its timeout, report exit."""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from ember.protocol import (
    ErrorKind,
    Kind,
    Message,
    get_bool,
    get_opt_number,
    get_opt_str,
    get_str,
    get_str_list,
    get_str_map,
)

from . import DEFAULT_PATH
from .errors import OpError, os_error
from .reply import Reply
from .stdin_feed import StdinFeed
from .threads import start_thread
from .users import Account, lookup_account

OUTPUT_CHUNK = 64 * 1024
LINGER_IDLE = 0.1
"""After the program exits, output of processes it left behind (holding its pipes) is
still forwarded while it keeps coming at least this often ..."""
LINGER_MAX = 2.0
"""... but for no longer than this."""
PS_MAX_ARGS = 16
PS_MAX_ARG_CHARS = 128

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final


class ExecSpec:
    """What to run, as whom, and how (not a dataclass: the agent does not import
    ``dataclasses``, which costs a TCG-emulated guest tens of milliseconds at boot)."""

    __slots__ = ("account", "argv", "cwd", "env", "pty", "stdin", "switch_user", "timeout")

    def __init__(
        self,
        argv: tuple[str, ...],
        env: dict[str, str],
        cwd: str,
        account: Account,
        switch_user: bool,
        stdin: bool,
        timeout: float | None,
        pty: tuple[int, int] | None = None,
    ) -> None:
        self.argv: Final = argv
        self.env: Final = env
        self.cwd: Final = cwd
        self.account: Final = account
        self.switch_user: Final = switch_user
        self.stdin: Final = stdin
        self.timeout: Final = timeout
        self.pty: Final = pty  # (rows, cols): run on a new terminal, stdin always open

    def __repr__(self) -> str:
        return (
            f"ExecSpec(argv={self.argv!r}, env={self.env!r}, cwd={self.cwd!r}, "
            f"account={self.account!r}, switch_user={self.switch_user!r}, "
            f"stdin={self.stdin!r}, timeout={self.timeout!r}, pty={self.pty!r})"
        )


def build_env(account: Account, overrides: dict[str, str]) -> dict[str, str]:
    """A clean environment (nothing of the agent's own) with the request's on top."""
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": account.home,
        "USER": account.name,
        "LOGNAME": account.name,
        "LANG": "C.UTF-8",
    }
    env.update(overrides)
    return env


def exec_spec(msg: Message, *, passwd: str = "/etc/passwd", group: str = "/etc/group") -> ExecSpec:
    """The spec of a checked ``exec`` request; raises :class:`OpError` (unknown user)."""
    if "argv" in msg:
        argv = tuple(get_str_list(msg, "argv"))
    else:
        argv = ("/bin/sh", "-c", get_str(msg, "shell"))
    user = msg.get("user")
    if not (user is None or isinstance(user, str | int)) or isinstance(user, bool):
        raise OpError(ErrorKind.BAD_REQUEST, "exec: 'user' must be a name or a uid")
    account = lookup_account(user, passwd=passwd, group=group)
    cwd = get_opt_str(msg, "cwd")
    if cwd is None:
        cwd = account.home if os.path.isdir(account.home) else "/"
    size = msg.get("pty")
    pty = (int(size["rows"]), int(size["cols"])) if isinstance(size, dict) else None
    overrides = get_str_map(msg, "env")
    if pty is not None:
        overrides = {"TERM": "xterm-256color", **overrides}
    return ExecSpec(
        argv=argv,
        pty=pty,
        env=build_env(account, overrides),
        cwd=cwd,
        account=account,
        switch_user=user is not None and (os.geteuid() == 0 or account.uid != os.geteuid()),
        stdin=get_bool(msg, "stdin") or pty is not None,
        timeout=get_opt_number(msg, "timeout"),
    )


class ExecOp:
    """One running exec. :meth:`run` is the body of its thread."""

    def __init__(self, spec: ExecSpec, reply: Reply, on_final: Callable[[], None]) -> None:
        self.spec = spec
        self.reply = reply
        self.stdin = StdinFeed() if spec.stdin else None
        self._on_final = on_final
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._running = False
        self._master: int | None = None  # the terminal's master side, with a pty

    def describe(self) -> Message | None:
        """This exec's ``ps`` entry (argv shortened), or None before it started."""
        with self._lock:
            if self._pid is None:
                return None
            argv = [a[:PS_MAX_ARG_CHARS] for a in self.spec.argv[:PS_MAX_ARGS]]
            return {
                "stream": self.reply.stream,
                "pid": self._pid,
                "argv": argv,
                "running": self._running,
            }

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the exec's process group."""
        with self._lock:
            if self._pid is None or not self._running:
                raise OpError(
                    ErrorKind.NOT_FOUND, f"stream {self.reply.stream} has no running process"
                )
            try:
                os.killpg(self._pid, signum)
            except OSError as err:
                raise os_error(err, f"cannot signal process group {self._pid}") from None

    def resize(self, rows: int, cols: int) -> None:
        """A new terminal size; the kernel sends SIGWINCH to its foreground group."""
        with self._lock:
            if self._master is None or not self._running:
                raise OpError(
                    ErrorKind.BAD_REQUEST, f"stream {self.reply.stream} has no running terminal"
                )
            _set_size(self._master, rows, cols)

    def kill(self) -> None:
        """SIGKILL the process group if it still runs (the agent is going away)."""
        with contextlib.suppress(OpError):
            self.signal(signal.SIGKILL)

    def detach(self) -> None:
        """The session ended: the program keeps running, its stdin closes."""
        if self.stdin is not None:
            self.stdin.abandon()

    def run(self) -> None:
        try:
            proc = self._spawn()
        except OpError as err:
            if self.stdin is not None:
                self.stdin.abandon()
            self._on_final()
            self.reply.fail(err)
            return
        with self._lock:
            self._pid, self._running = proc.pid, True
        self.reply.msg({"op": "started", "pid": proc.pid})
        pipe = proc.stdin
        if self._master is not None:  # the terminal: input goes to its master side
            pipe = os.fdopen(os.dup(self._master), "wb", buffering=0)
        if self.stdin is not None and pipe is not None:
            feed, into = self.stdin, pipe
            start_thread(f"stdin-{self.reply.stream}", lambda: feed.pump(into))
        try:
            timed_out = self._pump(proc)
        finally:
            for output in (proc.stdout, proc.stderr):
                if output is not None:
                    output.close()
            with self._lock:
                master, self._master = self._master, None
            if master is not None:
                os.close(master)
            if proc.poll() is None:  # only if pumping failed: never leave it behind
                self.kill()
            code = proc.wait()
            with self._lock:
                self._running = False
        self._on_final()
        self.reply.msg(
            {
                "op": "exit",
                "code": None if code < 0 else code,
                "signal": -code if code < 0 else None,
                "timed_out": timed_out,
            }
        )

    def _spawn(self) -> subprocess.Popen[bytes]:
        spec = self.spec
        if not os.path.isdir(spec.cwd):
            if os.path.exists(spec.cwd):
                raise OpError(ErrorKind.NOT_A_DIRECTORY, f"not a directory: {spec.cwd}")
            raise OpError(ErrorKind.NOT_FOUND, f"no such directory: {spec.cwd}")
        account = spec.account
        switch = spec.switch_user
        slave: int | None = None
        if spec.pty is not None:
            master, slave = os.openpty()
            os.set_inheritable(master, False)
            _set_size(master, *spec.pty)
            self._master = master
        try:
            return subprocess.Popen(
                spec.argv,
                stdin=slave if slave is not None else
                subprocess.PIPE if spec.stdin else subprocess.DEVNULL,
                stdout=slave if slave is not None else subprocess.PIPE,
                stderr=slave if slave is not None else subprocess.PIPE,
                cwd=spec.cwd,
                env=spec.env,
                close_fds=True,
                start_new_session=True,
                # after setsid: the terminal becomes the new session's controlling one
                preexec_fn=_take_terminal if slave is not None else None,
                user=account.uid if switch else None,
                group=account.gid if switch else None,
                extra_groups=list(account.groups) if switch else None,
            )
        except (FileNotFoundError, NotADirectoryError) as err:
            if err.filename == spec.cwd:
                raise OpError(ErrorKind.NOT_FOUND, f"no such directory: {spec.cwd}") from None
            raise OpError(ErrorKind.NOT_FOUND, f"command not found: {spec.argv[0]}") from None
        except OSError as err:
            raise os_error(err, f"cannot run {spec.argv[0]}") from None
        except (ValueError, subprocess.SubprocessError) as err:
            raise OpError(ErrorKind.BAD_REQUEST, f"cannot run {spec.argv[0]}: {err}") from None
        finally:
            if slave is not None:
                os.close(slave)  # the child has it; EOF on the master once it is gone

    def _pump(self, proc: subprocess.Popen[bytes]) -> bool:
        """Forward output until the program exited and its pipes closed (or went quiet).

        Returns whether the timeout killed it.
        """
        if self._master is not None:
            kinds = {self._master: Kind.STDOUT}
        else:
            assert proc.stdout is not None and proc.stderr is not None
            kinds = {proc.stdout.fileno(): Kind.STDOUT, proc.stderr.fileno(): Kind.STDERR}
        poller = select.poll()
        for fd in kinds:
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)
        pidfd = _pidfd_open(proc.pid)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        deadline = None if self.spec.timeout is None else time.monotonic() + self.spec.timeout
        timed_out = False
        exited_at: float | None = None
        try:
            while True:
                now = time.monotonic()
                if exited_at is None and pidfd is None and proc.poll() is not None:
                    exited_at = now
                    with self._lock:
                        self._running = False
                lingering = exited_at is not None
                wait: float | None
                if exited_at is not None:
                    if not kinds or now >= exited_at + LINGER_MAX:
                        return timed_out
                    wait = LINGER_IDLE
                else:
                    wait = None if pidfd is not None else 0.05
                    if deadline is not None:
                        if now >= deadline:
                            self.kill()
                            timed_out, deadline = True, None
                            continue
                        wait = deadline - now if wait is None else min(wait, deadline - now)
                events = poller.poll(None if wait is None else math.ceil(wait * 1000))
                if lingering and not any(fd in kinds for fd, _ in events):
                    return timed_out
                for fd, _ in events:
                    if fd == pidfd:
                        poller.unregister(pidfd)
                        exited_at = time.monotonic()
                        with self._lock:
                            self._running = False
                    elif fd in kinds:
                        self._forward(poller, kinds, fd)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _forward(self, poller: select.poll, kinds: dict[int, Kind], fd: int) -> None:
        try:
            chunk = os.read(fd, OUTPUT_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self.reply.data(kinds[fd], chunk)  # dropped if the session ended
        else:
            poller.unregister(fd)
            del kinds[fd]


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None  # old kernel: poll the child instead


def _set_size(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_terminal() -> None:
    """In the child, after setsid: make stdin (the terminal) its controlling terminal."""
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
