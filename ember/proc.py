"""The one helper through which ember runs external commands.

It logs the argv, captures stderr (and stdout unless told to stream it), enforces a
timeout and turns every failure into a typed :mod:`ember.errors` exception naming the
step that failed and the tail of stderr. Never ``shell=True``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ember.errors import EmberTimeoutError, HostCommandError, MissingDependencyError

log = logging.getLogger("ember.proc")

#: Which Debian package provides a program ember runs, for "how to fix it" messages.
APT_PACKAGE_FOR = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "patchelf": "patchelf",
    "make": "make",
    "gcc": "gcc",
    "tar": "tar",
    "xz": "xz-utils",
    "docker-registry": "docker-registry",
    "ldd": "libc-bin",
    "nft": "nftables",
    "dnsmasq": "dnsmasq-base",
}

STDERR_TAIL_CHARS = 2000


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def require(program: str) -> str:
    """Return the absolute path of ``program`` or raise MissingDependencyError with a fix."""
    path = shutil.which(program)
    if path is None:
        pkg = APT_PACKAGE_FOR.get(program)
        fix = f" Install it with: apt-get install -y {pkg}" if pkg else ""
        raise MissingDependencyError(f"required program {program!r} is not installed.{fix}")
    return path


def _kill(child: subprocess.Popen[bytes], group: bool) -> None:
    """Kill a child that overran its timeout (or was interrupted), and its process group
    when it has one of its own; reap it."""
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
    child.kill()
    child.wait()


def tail(text: str, limit: int = STDERR_TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def run(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float | None = None,
    input: bytes | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    capture_stdout: bool = True,
    user: int | None = None,
    group: int | None = None,
    extra_groups: Sequence[int] | None = None,
    new_session: bool = False,
) -> Result:
    """Run ``argv`` to completion. ``what`` says, for error messages, which step this is.

    With ``capture_stdout=False`` the child's stdout goes to ours (for long builds whose
    progress the user should see); stderr is always captured for the error message.
    ``user``, ``group`` and ``extra_groups`` run the child with those ids (root only).
    ``new_session`` starts it in a session of its own whose whole process group is killed
    when the timeout expires (for programs that leave helpers behind, such as runsc).
    """
    args = [str(a) for a in argv]
    if not args:
        raise ValueError("empty argv")
    exe = require(args[0]) if os.sep not in args[0] else args[0]
    log.debug("run (%s): %s", what, " ".join(args))
    try:
        with subprocess.Popen(
            [exe, *args[1:]],
            stdin=subprocess.PIPE if input is not None else None,
            stdout=subprocess.PIPE if capture_stdout else None,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            close_fds=True,
            user=user,
            group=group,
            extra_groups=list(extra_groups) if extra_groups is not None else None,
            start_new_session=new_session,
        ) as child:
            try:
                stdout, stderr = child.communicate(input, timeout=timeout)
            except BaseException:
                _kill(child, new_session)
                raise
            cp = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    except subprocess.TimeoutExpired as err:
        raise EmberTimeoutError(f"{what}: {args[0]} did not finish within {timeout} s") from err
    except FileNotFoundError as err:
        raise MissingDependencyError(f"{what}: cannot run {args[0]!r}: {err}") from err
    except OSError as err:
        raise HostCommandError(f"{what}: cannot run {args[0]!r}: {err}", argv=args) from err
    out = cp.stdout.decode("utf-8", "replace") if cp.stdout is not None else ""
    errtxt = cp.stderr.decode("utf-8", "replace") if cp.stderr is not None else ""
    if check and cp.returncode != 0:
        t = tail(errtxt) or tail(out)
        raise HostCommandError(
            f"{what} failed ({args[0]} exited with {cp.returncode}): {t}",
            argv=args,
            returncode=cp.returncode,
            stderr_tail=t,
        )
    return Result(tuple(args), cp.returncode, out, errtxt)
