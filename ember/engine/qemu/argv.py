"""Build the QEMU command line for a :class:`VMSpec`. Pure: no I/O, no host probing.

The device model is the smallest that boots a sandbox: a ``microvm`` machine with no PCI,
no ACPI, no option ROMs and no network; one ISA serial port (the console log), one
virtio-blk root disk, an optional virtio-serial port for the agent and a virtio-rng, all
on virtio-mmio. QMP listens on a Unix socket.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ember.engine.accel import AccelDecision
from ember.engine.base import VMSpec
from ember.engine.qemu.cpu import KVM_CPU_MODEL

#: Translation-block cache for TCG. QEMU's default is 1 GiB on 64-bit hosts. It is
#: allocated lazily, but QEMU fills it in order, starts over from its beginning when it is
#: full and never gives pages back: once a guest has run a while, all of it is resident.
#: Measured on the 2-core TCG hosts (issue 12, docs/snapshots.md "Memory"): 48 MiB costs
#: 18.6 MiB less than 64 per long-lived VM (16 of buffer, 2.6 of QEMU's bookkeeping) with
#: the same boot and exec times; at 32 a guest's Python starts 1.6x slower, at 16 3x.
TCG_TB_SIZE_MIB = 48
#: The CPU a TCG guest sees: every feature TCG emulates. QEMU's default (qemu64) claims an
#: AMD CPU without SSSE3, for which OpenBLAS (numpy) picks code using 3DNow! instructions
#: that TCG does not emulate: a matrix product died with SIGILL.
TCG_CPU_MODEL = "max"

#: seccomp filter QEMU installs on itself: no obsolete syscalls, no setuid/setgid/setsid,
#: no fork/exec, no scheduler/affinity changes.
SANDBOX_OPTS = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: QEMU installs its filter *before* ``-daemonize`` forks and calls setsid(), so with
#: ``spawn=deny`` it dies of SIGSYS and with ``elevateprivileges=deny`` the daemon child
#: dies silently (measured on QEMU 7.2). A daemonizing QEMU gets the filter without those.
SANDBOX_OPTS_DAEMONIZE = "on,obsolete=deny,resourcecontrol=deny"

#: The root filesystem's journal commits every 600 s instead of ext4's 5. A sandbox disk
#: is a throwaway overlay written with ``cache=unsafe`` (see :func:`build_argv`), so the
#: interval buys no durability, while an idle guest's commit of its few changed blocks is
#: block I/O for QEMU to serve and, under TCG, kernel code each restored clone translates
#: anew: measured, 1.4 MiB less per idle clone (docs/snapshots.md "Memory"). ``sync`` and
#: ``fsync()`` still commit at once, and a full journal sooner.
ROOT_FLAGS = "rootflags=commit=600"
#: Kernel arguments every guest gets. ``reboot=t panic=-1`` plus ``-no-reboot`` make a
#: guest reboot or panic end the QEMU process (without ACPI, poweroff only halts).
BASE_CMDLINE = f"console=ttyS0 reboot=t panic=-1 root=/dev/vda rootfstype=ext4 {ROOT_FLAGS}"

MICROVM_OPTS = "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off"

#: The descriptor number a networked VMM finds its tap device at (the jailer puts it
#: there; a constant, so that the device model's digest does not depend on it).
NET_FD = 64
#: Every guest's NIC has the same address: each sits alone on its own link.
GUEST_MAC = "52:54:00:e0:00:02"


def qemu_opt(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (a comma is doubled)."""
    return value.replace(",", ",,")


def kernel_cmdline(spec: VMSpec) -> str:
    parts = [BASE_CMDLINE, "ro" if spec.disk_readonly else "rw", "quiet"]
    tsc_khz = spec.accel.details.get("host_tsc_khz", "")
    if spec.accel.accel == "tcg" and tsc_khz.isdigit():
        # A TCG guest's TSC is the host's. Calibrating it against the emulated PIT failed
        # in about half of the boots measured (the guest then keeps time with jiffies), and
        # the clocksource watchdog, comparing against jittery emulated timers, would mark
        # a good TSC unstable: hand over the known frequency and trust it.
        parts.append(f"tsc_early_khz={tsc_khz} tsc=reliable")
    if spec.cmdline.strip():
        parts.append(spec.cmdline.strip())
    return " ".join(parts)


def loads_kernel(spec: VMSpec) -> bool:
    """Whether QEMU is given the guest kernel: only to boot. A restored guest's kernel is
    in its RAM already, and QEMU keeps a ``-kernel`` image it was given (read whole, for
    the firmware to load) in its own memory for the VM's whole life: 2.7 MiB of every
    restored sandbox here (issue 12, docs/snapshots.md "Memory")."""
    return not spec.incoming


def build_argv(
    spec: VMSpec,
    *,
    qemu: str = "qemu-system-x86_64",
    daemonize: bool = True,
    sandbox: bool = True,
    pidfile: bool = True,
    kernel: bool | None = None,
) -> list[str]:
    """The full argv that boots ``spec``.

    ``sandbox`` adds QEMU's seccomp filter (``-sandbox``; weaker with ``daemonize``, see
    :data:`SANDBOX_OPTS_DAEMONIZE`); pass False only for a QEMU built without seccomp
    support (the engine detects that once). ``pidfile=False`` leaves out ``-pidfile``.
    ``kernel``: put ``-kernel`` and ``-append`` on it; by default (None) when the VM boots,
    not when it restores (see :func:`loads_kernel`).
    """
    if kernel is None:
        kernel = loads_kernel(spec)
    # Guest RAM is always a named backend ("mem") so that a saved state loads into either
    # kind: file-backed (shared or private) or anonymous.
    machine = f"{MICROVM_OPTS},memory-backend=mem"
    if spec.memory_file is not None:
        share = "on" if spec.memory_shared else "off"
        memory = (f"memory-backend-file,id=mem,size={spec.memory_mib}M,"
                  f"mem-path={qemu_opt(str(spec.memory_file))},share={share}")
    else:
        memory = f"memory-backend-ram,id=mem,size={spec.memory_mib}M"
    if spec.accel.accel == "kvm":
        # kvm-clock makes the PIT and the PIC unnecessary under KVM.
        machine = f"{machine},pit=off,pic=off"
        accel = ["-accel", "kvm", "-cpu", KVM_CPU_MODEL]
    else:
        # Under TCG the guest needs the PIT and PIC to calibrate its TSC (host notes).
        accel = ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MIB}", "-cpu", TCG_CPU_MODEL]

    # cache=unsafe: writes go to the host page cache and guest flushes are ignored. A
    # sandbox disk is a throwaway overlay (or a read-only template image) that does not
    # survive its sandbox, so durability across a host crash buys nothing, while guest
    # fsync()s (package installs, databases) would otherwise wait for the host disk.
    # Other host processes still see every write QEMU has made (same page cache).
    drive = ",".join(
        [
            "id=root",
            f"file={qemu_opt(str(spec.disk))}",
            f"format={spec.disk_format}",
            "if=none",
            "cache=unsafe",
            f"readonly={'on' if spec.disk_readonly else 'off'}",
        ]
    )
    # fmt: off
    argv = [
        qemu,
        "-name", f"guest={spec.name}",
        "-M", machine,
        *accel,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-m", str(spec.memory_mib),
        "-object", memory,
        "-smp", str(spec.vcpus),
        *(["-kernel", str(spec.kernel), "-append", kernel_cmdline(spec)] if kernel else []),
        # append: the host may write a line first (a restore says what it restored)
        "-chardev", f"file,id=console,path={qemu_opt(str(spec.console_log))},append=on",
        "-serial", "chardev:console",
        "-drive", drive,
        "-device", "virtio-blk-device,drive=root",
        "-object", "rng-random,filename=/dev/urandom,id=rng0",
        "-device", "virtio-rng-device,rng=rng0",
        "-chardev",
        f"socket,id=qmp,path={qemu_opt(str(spec.qmp_socket))},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    if spec.agent_socket is not None:
        argv += [
            "-device", "virtio-serial-device",
            "-chardev",
            f"socket,id=agent,path={qemu_opt(str(spec.agent_socket))},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=ember.agent",
        ]
    if spec.net_fd is not None:  # vhost=off: no vhost-net here, and it needs /dev/vhost-net
        argv += [
            "-netdev", f"tap,id=net0,fd={NET_FD},vhost=off",
            "-device", f"virtio-net-device,netdev=net0,mac={GUEST_MAC}",
        ]
    # fmt: on
    if spec.incoming:
        argv += ["-incoming", "defer"]
    if pidfile:  # a jailed QEMU is pid 1 of its namespace: the jailer records its pid
        argv += ["-pidfile", str(spec.pidfile)]
    if sandbox:
        argv += ["-sandbox", SANDBOX_OPTS_DAEMONIZE if daemonize else SANDBOX_OPTS]
    if daemonize:
        argv.append("-daemonize")
    return argv


def device_model(accel: AccelDecision, vcpus: int, memory_mib: int, *,
                 network: bool = False) -> str:
    """The digest of the device model a restore of this shape runs: the QEMU command line
    with placeholder paths and without the kernel command line (a restored guest keeps the
    one it booted with). A change in ember's devices or their options changes it, so a
    saved state that QEMU would no longer load is refused by name before QEMU sees it."""
    p = Path("/ember-device-model")
    spec = VMSpec(name="model", kernel=p / "kernel", disk=p / "disk", disk_format="qcow2",
                  disk_readonly=False, vcpus=vcpus, memory_mib=memory_mib, cmdline="",
                  console_log=p / "console", qmp_socket=p / "qmp", agent_socket=p / "agent",
                  pidfile=p / "pid", accel=accel, memory_file=p / "ram", incoming=True,
                  net_fd=NET_FD if network else None)
    # With ``-kernel`` (which a restore no longer gets): the digest of the snapshots that
    # earlier versions made stays what it was, and they still load.
    argv = build_argv(spec, kernel=True)
    i = argv.index("-append")
    del argv[i:i + 2]
    return hashlib.sha256("\0".join(argv).encode()).hexdigest()
