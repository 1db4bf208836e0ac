"""Check what the host offers ember's engine, and say how to fix what is missing.

Returns data only (the CLI renders it). Every probe is cheap: no guest is booted.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ember.engine.accel import detect_accel
from ember.engine.qemu.caps import machine_types, qemu_version, seccomp_supported
from ember.errors import EmberError
from ember.paths import Paths
from ember.proc import APT_PACKAGE_FOR

QEMU = "qemu-system-x86_64"
MIN_FREE_GIB = 2.0
LINUX_SOURCE = "usr/src/linux-source-6.1.tar.xz"
KERNEL_BUILD_APT = "apt-get install -y linux-source-6.1 bc bison flex libelf-dev libssl-dev"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None


def _apt(program: str) -> str:
    return f"apt-get install -y {APT_PACKAGE_FOR.get(program, program)}"


def _program(program: str, purpose: str) -> Check:
    path = shutil.which(program)
    if path is None:
        return Check(program, False, f"not found ({purpose})", _apt(program))
    return Check(program, True, f"{path} ({purpose})")


def _qemu() -> list[Check]:
    qemu = shutil.which(QEMU)
    if qemu is None:
        return [Check(QEMU, False, "not found: ember boots guests with it", _apt(QEMU))]
    try:
        version = qemu_version(qemu)
        machines = machine_types(qemu)
        seccomp = seccomp_supported(qemu)
    except EmberError as err:
        return [Check(QEMU, False, f"{qemu} does not run: {err}", _apt(QEMU))]
    checks = [Check(QEMU, True, f"{qemu}: {version}")]
    if "microvm" in machines:
        checks.append(Check("microvm machine", True, "QEMU offers the microvm machine type"))
    else:
        checks.append(
            Check(
                "microvm machine",
                False,
                "this QEMU has no microvm machine type (QEMU 4.2 or newer needed)",
                "apt-get install -y qemu-system-x86 (from Debian 11 or newer)",
            )
        )
    checks.append(
        Check(
            "qemu seccomp",
            seccomp,
            "QEMU confines itself with -sandbox"
            if seccomp
            else "this QEMU cannot use -sandbox (built without seccomp?); guests run "
            "without QEMU's syscall filter",
            None if seccomp else "apt-get install -y qemu-system-x86",
        )
    )
    return checks


def _accel(root: Path) -> list[Check]:
    try:
        decision = detect_accel(probe=True, root=root)
    except EmberError as err:
        return [Check("accelerator", False, str(err), "unset EMBER_ACCEL or set it to kvm|tcg")]
    checks = [Check("accelerator", True, f"{decision.accel}: {decision.reason}")]
    dev = decision.details.get("dev_kvm", "unknown")
    flags = decision.details.get("cpu_virt_flags", "none")
    fix = decision.fix
    if dev == "missing" and flags in ("vmx", "svm"):
        module = "kvm_intel" if flags == "vmx" else "kvm_amd"
        fix = f"modprobe {module} (hardware virtualization is there but /dev/kvm is not)"
    elif dev.startswith("present, not"):
        fix = "run ember as root or add this user to the kvm group: adduser $USER kvm"
    ok = decision.accel == "kvm" or fix is None
    pvm = decision.details.get("kvm_pvm") == "loaded"
    detail = f"/dev/kvm {dev}; CPU virtualization flags: {flags}" + (
        "; kvm_pvm loaded (not usable for standard guests)" if pvm else ""
    )
    if "jail_kvm" in decision.details:
        detail += f"; for the jail: {decision.details['jail_kvm']}"
    checks.append(Check("/dev/kvm", ok, detail, fix))
    return checks


def _vsock(root: Path) -> Check:
    if (root / "dev/vhost-vsock").exists():
        return Check("vhost-vsock", True, "/dev/vhost-vsock present")
    return Check(
        "vhost-vsock",
        True,
        "/dev/vhost-vsock absent: the agent channel uses a "
        "virtio-serial port instead (no action needed)",
    )


def _cgroups(root: Path) -> Check:
    fs = root / "sys/fs/cgroup"
    if (fs / "cgroup.controllers").exists():
        return Check("cgroups", True, "cgroup v2 (unified)")
    if (fs / "unified/cgroup.controllers").exists():
        return Check(
            "cgroups", True, "cgroup v1 with a v2 mount at /sys/fs/cgroup/unified (hybrid)"
        )
    if fs.is_dir():
        return Check("cgroups", True, "cgroup v1 only")
    return Check(
        "cgroups",
        False,
        "no cgroup filesystem at /sys/fs/cgroup",
        "mount cgroup2 on /sys/fs/cgroup (mount -t cgroup2 none /sys/fs/cgroup)",
    )


def _jail() -> list[Check]:
    from ember.host.cgroup_detect import detect_cgroups
    from ember.host.jail import jail_wanted

    on, why = jail_wanted()
    out = [Check("jail", on, why, None if on else "run ember as root (and EMBER_JAIL unset)")]
    try:
        support = detect_cgroups()
    except EmberError as err:
        return [*out, Check("cgroup limits", False, str(err))]
    bad = [c for c in support.controllers if not c.usable]
    out.append(Check("cgroup limits", not bad, support.summary(),
                     None if not bad else "mount the missing controllers (see docs/cgroups.md)"))
    return out


def _disk(home: Path) -> Check:
    existing = home
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free / 2**30
    except OSError as err:
        return Check("free disk", False, f"cannot stat {existing}: {err}", None)
    ok = free >= MIN_FREE_GIB
    return Check(
        "free disk",
        ok,
        f"{free:.1f} GiB free for EMBER_HOME {home}",
        None
        if ok
        else f"free space on that filesystem (at least {MIN_FREE_GIB:g} "
        "GiB) or point EMBER_HOME at a larger one",
    )


def _linux_source(root: Path) -> Check:
    tarball = root / LINUX_SOURCE
    if tarball.is_file():
        return Check("linux-source-6.1", True, f"/{LINUX_SOURCE} (guest kernel source)")
    return Check("linux-source-6.1", False, "guest kernel source not installed", KERNEL_BUILD_APT)


def _tiers(root: Path) -> list[Check]:
    from ember.engine.container.tiers import tier_status

    out = []
    for isolation in ("gvisor", "container"):
        st = tier_status(isolation, root=root)
        out.append(Check(f"isolation={isolation}", st.ok, st.detail, st.fix))
    return out


def diagnose(*, root: Path = Path("/"), home: Path | None = None) -> list[Check]:
    """Every check, in an order a user reads top-down. ``root`` fakes the host in tests."""
    checks = _qemu()
    checks.append(_program("qemu-img", "creates per-sandbox overlay disks"))
    checks += _accel(root)
    checks.append(_vsock(root))
    checks.append(_cgroups(root))
    if root == Path("/"):
        checks += _jail()
    checks.append(_disk(home or Paths.from_env().home))
    checks.append(_program("patchelf", "bundles host runtimes into guest images"))
    checks.append(_program("debootstrap", "builds Debian templates"))
    checks.append(_program("mkfs.ext4", "builds template disk images"))
    checks.append(_linux_source(root))
    checks += _tiers(root)
    return checks
