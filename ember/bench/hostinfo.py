"""The host's details for the report: CPU, cores, kernel, memory, accelerator, QEMU."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

from ember.bench.model import HostInfo
from ember.errors import EmberError


def cpu_model(cpuinfo: str) -> str:
    """The first ``model name`` in /proc/cpuinfo text. Pure."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return " ".join(value.split())
    return "unknown"


def meminfo_bytes(meminfo: str, key: str) -> int:
    """A ``kB`` field of /proc/meminfo text in bytes (0 if absent). Pure."""
    for line in meminfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            words = value.split()
            if words and words[0].isdigit():
                return int(words[0]) * 1024
    return 0


def read_meminfo(key: str) -> int:
    try:
        return meminfo_bytes(Path("/proc/meminfo").read_text(), key)
    except OSError:
        return 0


def collect() -> HostInfo:
    from ember.engine import default_engine, detect_accel

    try:
        cpu = cpu_model(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        cpu = "unknown"
    decision = detect_accel()
    qemu = ""
    with contextlib.suppress(EmberError, OSError):
        qemu = default_engine().version()
    return HostInfo(cpu_model=cpu, cores=os.cpu_count() or 0,
                    kernel=f"{platform.system()} {platform.release()} {platform.version()}",
                    accel=decision.accel, accel_reason=decision.reason,
                    memory_total_bytes=read_meminfo("MemTotal"), qemu_version=qemu)
