"""What a sandbox costs the host right now: CPU time used and memory held.

From its cgroup where ember confines it (everything of the sandbox: VMM, helpers, container
processes), else from its VMM's process. ``ember top`` samples this twice and shows the
difference as CPU use.
"""

from __future__ import annotations

import os
from pathlib import Path

from ember.host.cgroups import SandboxCgroup
from ember.store import SandboxRecord

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _proc_rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def usage(rec: SandboxRecord, cgroup: SandboxCgroup | None) -> tuple[float, int]:
    """One sample of ``rec``'s use: host CPU seconds used since it started and host memory
    bytes held now (zeros for a sandbox with no process)."""
    cpu = cgroup.cpu_seconds() if cgroup is not None else None
    mem = cgroup.memory_usage() if cgroup is not None else None
    pids = cgroup.pids() if cgroup is not None and (cpu is None or mem is None) else []
    if not pids and rec.pid is not None:
        pids = [rec.pid]
    if cpu is None:
        cpu = sum(_proc_cpu_seconds(p) for p in pids)
    if mem is None:
        mem = sum(_proc_rss_bytes(p) for p in pids)
    return cpu, mem
