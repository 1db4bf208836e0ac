"""Host attack surface: distinct syscalls the instance's host processes make.

:func:`parse_strace_summary` (pure) reads the table ``strace -c`` prints; :func:`trace`
attaches ``strace -f -c`` to running processes for the length of a workload.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ember.errors import HostError, MissingDependencyError

MAX_SUMMARY_BYTES = 1 << 20


def parse_strace_summary(text: str) -> dict[str, int]:
    """``syscall -> calls`` from the output of ``strace -c`` (other lines are ignored)."""
    counts: dict[str, int] = {}
    for line in text[:MAX_SUMMARY_BYTES].splitlines():
        words = line.split()
        if len(words) not in (5, 6) or words[-1] == "total":
            continue
        try:
            float(words[0])
            float(words[1])
            calls = int(words[3])
        except ValueError:
            continue
        name = words[-1]
        if name.replace("_", "").isalnum():
            counts[name] = counts.get(name, 0) + calls
    return counts


def attach_failures(stderr: str) -> int:
    """How many ``strace: attach: ...`` failures (for example a process already traced, as
    gVisor's ptrace-platform stubs are by the Sentry) strace reported. Pure."""
    return sum(1 for line in stderr.splitlines() if line.startswith("strace: attach:"))


def trace(pids: Sequence[int], workload: Callable[[], None], *,
          attach_wait_s: float = 1.0, warnings: list[str] | None = None) -> dict[str, int]:
    """Run ``workload`` while ``strace -f -c`` is attached to ``pids``; its syscall counts.

    Processes strace could not attach to are left out; ``warnings`` gets a line about them.
    """
    strace = shutil.which("strace")
    if strace is None:
        raise MissingDependencyError("strace is not installed (apt-get install strace)")
    if not pids:
        raise HostError("no host processes to trace")
    with tempfile.TemporaryDirectory(prefix="ember-bench-strace-") as tmp:
        out = Path(tmp) / "summary.txt"
        argv = [strace, "-f", "-c", "-o", str(out)]
        for pid in pids:
            argv += ["-p", str(pid)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            _wait_attached(proc, attach_wait_s)
            workload()
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        text = out.read_text(errors="replace") if out.exists() else ""
        failed = attach_failures(err.decode(errors="replace"))
        if failed and warnings is not None:
            warnings.append(f"strace could not attach to {failed} of {len(pids)} host "
                            "processes (left out)")
        counts = parse_strace_summary(text)
        if not counts:
            tail = err.decode(errors="replace").strip()[-400:]
            raise HostError(f"strace recorded no syscalls: {tail or 'no output'}")
        return counts


def _wait_attached(proc: subprocess.Popen[bytes], wait_s: float) -> None:
    """strace attaches asynchronously; give it ``wait_s`` and fail early if it exited."""
    try:
        _, err = proc.communicate(timeout=wait_s)
    except subprocess.TimeoutExpired:
        return
    raise HostError(f"strace exited at once: {err.decode(errors='replace').strip()[-400:]}")


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (by /proc/*/stat parent links), root first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo += parents.get(pid, [])
    return out if Path(f"/proc/{root}").exists() else []
