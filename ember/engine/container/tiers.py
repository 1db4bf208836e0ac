"""Which isolation tiers this host can run, and why not (for the SDK error and doctor).

Cheap checks only (no container is started): the runtime binary, root, the loop device
and overlayfs the root filesystem needs, and for gVisor the platform (``kvm`` only with
hardware virtualization and a passing probe, else ``systrap`` or ``ptrace``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ember.engine.accel import detect_accel
from ember.engine.container.platform import choose_platform
from ember.errors import BadRequestError, EmberError, TierUnavailableError
from ember.kinds import ISOLATIONS, Isolation

DEFAULT_ISOLATION: Isolation = "microvm"
INSTALL = {"container": "apt-get install -y crun", "gvisor": "apt-get install -y runsc"}
PROGRAM = {"container": "crun", "gvisor": "runsc"}


@dataclass(frozen=True)
class TierStatus:
    isolation: str
    ok: bool
    detail: str
    fix: str | None = None


def gvisor_platform() -> tuple[str, str]:
    """runsc's platform and why: ``kvm`` only where the host has usable hardware
    virtualization and a probe container ran on it; else ``systrap`` or ``ptrace`` (see
    :mod:`ember.engine.container.platform`)."""
    try:
        decision = detect_accel()
    except EmberError as err:
        return "ptrace", f"ptrace (accelerator detection failed: {err})"
    choice = choose_platform(shutil.which("runsc"), decision.accel == "kvm", decision.reason)
    return choice.platform, choice.reason


def tier_status(isolation: str, *, root: Path = Path("/")) -> TierStatus:
    """Whether ``isolation`` can run here; for ``microvm`` see ``ember doctor``'s QEMU
    checks (always reported available here)."""
    if isolation == "microvm":
        return TierStatus(isolation, True, "QEMU microvm (see the QEMU and accelerator checks)")
    if isolation not in PROGRAM:
        raise BadRequestError(f"isolation must be one of {', '.join(ISOLATIONS)}, "
                              f"not {isolation!r}")
    program = PROGRAM[isolation]
    path = shutil.which(program)
    if path is None:
        return TierStatus(isolation, False, f"{program} is not installed", INSTALL[isolation])
    if os.geteuid() != 0:
        return TierStatus(isolation, False, f"{program} found, but ember runs container "
                          "sandboxes only as root (loop mounts, namespaces, cgroups)",
                          "run ember as root")
    if not (root / "dev/loop-control").exists():
        return TierStatus(isolation, False, "no /dev/loop-control: cannot mount the "
                          "template image", "modprobe loop")
    try:
        filesystems = (root / "proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    if "overlay" not in filesystems:
        return TierStatus(isolation, False, "the kernel has no overlay filesystem",
                          "modprobe overlay")
    detail = f"{path}"
    if isolation == "gvisor":
        detail += f"; platform {gvisor_platform()[1]}"
    else:
        detail += "; namespaces, seccomp and ember's cgroups (crun)"
    return TierStatus(isolation, True, detail)


def require_tier(isolation: str) -> TierStatus:
    """The tier's status, or :class:`TierUnavailableError` naming the cause and the fix."""
    status = tier_status(isolation)
    if not status.ok:
        fix = f"; fix: {status.fix}" if status.fix else ""
        raise TierUnavailableError(
            f"isolation={isolation!r} cannot run on this host: {status.detail}{fix}")
    return status
