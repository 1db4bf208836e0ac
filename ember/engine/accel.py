"""Choose the accelerator for guests: hardware KVM when it really is there, else TCG.

``/dev/kvm`` alone proves nothing: on kvm-pvm hosts it answers the KVM API but cannot run
a standard guest kernel (see docs/host-notes). KVM is chosen only when ``/dev/kvm`` is
usable, the CPU advertises ``vmx`` or ``svm`` and the ``kvm_pvm`` module is not loaded.
"Usable" is judged as the VMM will run: when VMMs are jailed (root), as an unprivileged
uid with the device's group (:mod:`ember.host.kvm_access`), not as the calling root.
Every file read goes through ``root`` so tests can fake ``/proc`` and ``/sys``.
"""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ember.errors import BadRequestError
from ember.host.jail import jail_wanted
from ember.host.kvm_access import KvmAccess, kvm_access

Accel = Literal["kvm", "tcg"]

#: ``_IO(KVMIO, 0x00)``: KVM_GET_API_VERSION; every real KVM answers 12.
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12

ENV_VAR = "EMBER_ACCEL"


@dataclass(frozen=True)
class AccelDecision:
    accel: Accel
    reason: str
    details: dict[str, str] = field(default_factory=dict)
    #: How to make KVM usable, when the host has hardware virtualization that ember
    #: cannot use as things stand (shown by ``ember doctor``).
    fix: str | None = None


def _cpu_virt_flags(root: Path) -> tuple[set[str], str]:
    """Return the virtualization flags of the first CPU and a description for details."""
    try:
        text = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError as err:
        return set(), f"unreadable ({err.strerror})"
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            found = set(value.split()) & {"vmx", "svm"}
            return found, " ".join(sorted(found)) or "none"
    return set(), "no flags line"


def host_tsc_khz(root: Path = Path("/")) -> int | None:
    """The host TSC frequency in kHz when /proc/cpuinfo states it exactly, else None.

    Under TCG the guest's TSC is the host's, but a TCG guest often fails to calibrate it
    against the emulated PIT (timer jitter) and falls back to jiffies. Handing it the
    host's value fixes that. ``cpu MHz`` is the TSC frequency only when the TSC is
    invariant and of known frequency and nothing else (cpufreq, APERF/MPERF sampling)
    feeds that line; otherwise the guest calibrates for itself.
    """
    if (root / "sys/devices/system/cpu/cpu0/cpufreq").exists():
        return None
    try:
        text = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first CPU is enough
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    if not {"constant_tsc", "nonstop_tsc", "tsc_known_freq"} <= flags or "aperfmperf" in flags:
        return None
    try:
        khz = round(float(fields.get("cpu MHz", "")) * 1000)
    except ValueError:
        return None
    return khz if 100_000 <= khz <= 10_000_000 else None


def _dev_kvm_state(root: Path) -> tuple[bool, str]:
    dev = root / "dev/kvm"
    if not dev.exists():
        return False, "missing"
    if not os.access(dev, os.R_OK | os.W_OK):
        return False, "present, not read-writable by this user"
    return True, "present, read-writable"


def _probe_api_version(root: Path) -> tuple[bool, str]:
    try:
        fd = os.open(root / "dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return False, f"open failed: {err.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as err:
        return False, f"KVM_GET_API_VERSION failed: {err.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, f"unexpected KVM API version {version}"
    return True, f"KVM API version {version}"


def _auto(root: Path, probe: bool, details: dict[str, str], jailed: bool) -> AccelDecision:
    dev_ok, details["dev_kvm"] = _dev_kvm_state(root)
    flags, details["cpu_virt_flags"] = _cpu_virt_flags(root)
    pvm = (root / "sys/module/kvm_pvm").exists()
    details["kvm_pvm"] = "loaded" if pvm else "absent"
    tcg = "using TCG software emulation"
    if not dev_ok:
        why = "does not exist" if details["dev_kvm"] == "missing" else "is not read-writable"
        return AccelDecision("tcg", f"/dev/kvm {why}: {tcg}", details)
    if pvm:
        flag_note = "no vmx/svm CPU flag, " if not flags else ""
        return AccelDecision(
            "tcg",
            f"/dev/kvm is kvm-pvm ({flag_note}/sys/module/kvm_pvm present): "
            f"it cannot run standard guest kernels, {tcg}",
            details,
        )
    if not flags:
        return AccelDecision(
            "tcg",
            f"/dev/kvm exists but the CPU has no vmx/svm flag (no hardware virtualization): {tcg}",
            details,
        )
    if probe:
        ok, details["probe"] = _probe_api_version(root)
        if not ok:
            return AccelDecision(
                "tcg", f"/dev/kvm probe failed ({details['probe']}): {tcg}", details
            )
    usable = "/dev/kvm usable"
    if jailed:
        access = _jail_access(root / "dev/kvm", probe)
        details["jail_kvm"] = access.detail
        if not access.ok:
            return AccelDecision("tcg", f"/dev/kvm is {access.detail}: {tcg}", details,
                                 fix=access.fix)
        usable = "/dev/kvm usable by the jailed VMM"
    flag = sorted(flags)[0]
    return AccelDecision(
        "kvm", f"hardware virtualization available ({flag}, {usable})", details
    )


def _jail_access(dev: Path, probe: bool) -> KvmAccess:
    """:func:`kvm_access`, probed once per device state and process (a child process)."""
    if not probe:
        return kvm_access(dev)
    try:
        st = dev.stat()
    except OSError:
        return kvm_access(dev)
    return _probed(dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid)


@functools.lru_cache(maxsize=8)
def _probed(dev: Path, ino: int, mode: int, uid: int, gid: int) -> KvmAccess:
    return kvm_access(dev, probe=True)


def detect_accel(
    *,
    probe: bool = False,
    root: Path = Path("/"),
    env: Mapping[str, str] | None = None,
    jail: bool | None = None,
) -> AccelDecision:
    """Decide between KVM and TCG and say why.

    ``jail`` (default: whether VMMs are jailed here) judges ``/dev/kvm`` as a jailed VMM
    will open it; with ``probe`` that is also tried for real, once per process.

    ``EMBER_ACCEL=kvm|tcg`` forces the choice; the detected facts are still reported in
    ``details`` (``details["detected"]`` is what detection alone would have chosen).
    With ``probe=True`` a KVM choice is confirmed with a KVM_GET_API_VERSION ioctl.
    """
    environ = os.environ if env is None else env
    forced = environ.get(ENV_VAR, "").strip().lower()
    if forced not in ("", "kvm", "tcg"):
        raise BadRequestError(f"{ENV_VAR} must be 'kvm' or 'tcg', not {forced!r}")
    if jail is None:
        jail = jail_wanted()[0]
    decision = _auto(root, probe and not forced, {}, jail)
    tsc_khz = host_tsc_khz(root)
    if tsc_khz is not None:
        decision.details["host_tsc_khz"] = str(tsc_khz)
    if forced:
        accel: Accel = "kvm" if forced == "kvm" else "tcg"
        details = {
            **decision.details,
            "detected": decision.accel,
            "detected_reason": decision.reason,
        }
        return AccelDecision(accel, f"forced by {ENV_VAR}", details, fix=decision.fix)
    return decision
