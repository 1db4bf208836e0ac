"""The QEMU argv: the minimal microvm device model, nothing more."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ember.engine.accel import AccelDecision
from ember.engine.base import VMSpec
from ember.engine.qemu.argv import (
    SANDBOX_OPTS,
    SANDBOX_OPTS_DAEMONIZE,
    build_argv,
    kernel_cmdline,
    qemu_opt,
)
from ember.errors import BadRequestError
from tests.unit import engine_specs

TCG = engine_specs.TCG
KVM = engine_specs.KVM


def make_spec(**overrides: Any) -> VMSpec:
    return engine_specs.make_spec(
        **{"vcpus": 2, "memory_mib": 512, "cmdline": "init=/sbin/ember-init", **overrides})


def opt(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tcg_argv_exactly() -> None:
    argv = build_argv(make_spec())
    d = "/run/ember/sb1"
    # fmt: off
    assert argv == [
        "qemu-system-x86_64",
        "-name", "guest=sb1",
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,memory-backend=mem",
        "-accel", "tcg,tb-size=48", "-cpu", "max",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-m", "512",
        "-object", "memory-backend-ram,id=mem,size=512M",
        "-smp", "2",
        "-kernel", "/cache/bzImage",
        "-append", "console=ttyS0 reboot=t panic=-1 root=/dev/vda rootfstype=ext4 "
                   "rootflags=commit=600 rw quiet init=/sbin/ember-init",
        "-chardev", f"file,id=console,path={d}/console.log,append=on",
        "-serial", "chardev:console",
        "-drive", f"id=root,file={d}/root.qcow2,format=qcow2,if=none,cache=unsafe,readonly=off",
        "-device", "virtio-blk-device,drive=root",
        "-object", "rng-random,filename=/dev/urandom,id=rng0",
        "-device", "virtio-rng-device,rng=rng0",
        "-chardev", f"socket,id=qmp,path={d}/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={d}/agent.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=ember.agent",
        "-pidfile", f"{d}/qemu.pid",
        "-sandbox", SANDBOX_OPTS_DAEMONIZE,
        "-daemonize",
    ]
    # fmt: on


@pytest.mark.parametrize("accel", [TCG, KVM])
def test_no_pci_acpi_network_or_option_roms(accel: AccelDecision) -> None:
    argv = build_argv(make_spec(accel=accel))
    text = " ".join(argv)
    for banned in (
        "pci",
        "-netdev",
        "-net ",
        "-nic",
        "e1000",
        "vhost",
        "-cdrom",
        "-bios",
        "-usb",
        "-vga",
        "-monitor",
    ):
        assert banned not in text
    machine = opt(argv, "-M")[0].split(",")
    assert machine[0] == "microvm"
    assert {"x-option-roms=off", "acpi=off", "rtc=on", "isa-serial=on"} <= set(machine)
    assert "-nodefaults" in argv and "-no-user-config" in argv
    devices = opt(argv, "-device")
    assert all(
        dev.split(",")[0].endswith("-device") or dev.startswith("virtserialport") for dev in devices
    )


def test_tcg_keeps_pit_and_pic() -> None:
    argv = build_argv(make_spec())
    assert "pit=off" not in opt(argv, "-M")[0] and "pic=off" not in opt(argv, "-M")[0]
    assert opt(argv, "-accel") == ["tcg,tb-size=48"]
    # every feature TCG emulates: qemu64's 3DNow!-era AMD model sent OpenBLAS (numpy) down
    # code paths TCG cannot run
    assert opt(argv, "-cpu") == ["max"]


def test_kvm_uses_host_cpu_and_drops_legacy_timers() -> None:
    argv = build_argv(make_spec(accel=KVM))
    assert opt(argv, "-accel") == ["kvm"]
    assert opt(argv, "-cpu") == ["host"]
    assert opt(argv, "-M")[0].endswith(",pit=off,pic=off")


def test_readonly_disk() -> None:
    spec = make_spec(disk_readonly=True, disk_format="raw", disk=Path("/cache/base.ext4"))
    argv = build_argv(spec)
    assert opt(argv, "-drive") == [
        "id=root,file=/cache/base.ext4,format=raw,if=none,cache=unsafe,readonly=on"
    ]
    assert " ro quiet" in opt(argv, "-append")[0]
    assert " rw " not in opt(argv, "-append")[0]


def test_without_agent_socket_there_is_no_virtio_serial() -> None:
    argv = build_argv(make_spec(agent_socket=None))
    assert not any("virtio-serial" in a or "virtserialport" in a for a in argv)
    assert not any(a.startswith("socket,id=agent") for a in argv)


def test_daemonize_and_sandbox_switches() -> None:
    argv = build_argv(make_spec(), daemonize=False)
    assert "-daemonize" not in argv
    assert opt(argv, "-sandbox") == [SANDBOX_OPTS]
    assert "spawn=deny" in SANDBOX_OPTS and "elevateprivileges=deny" in SANDBOX_OPTS
    # QEMU filters itself before daemonizing: fork() and setsid() must stay allowed.
    assert "spawn=deny" not in SANDBOX_OPTS_DAEMONIZE
    assert "elevateprivileges=deny" not in SANDBOX_OPTS_DAEMONIZE
    assert "-sandbox" not in build_argv(make_spec(), sandbox=False)


def test_qemu_binary_is_configurable() -> None:
    assert (
        build_argv(make_spec(), qemu="/opt/qemu/bin/qemu-system-x86_64")[0]
        == "/opt/qemu/bin/qemu-system-x86_64"
    )


def test_commas_in_paths_are_escaped_for_qemu_options() -> None:
    d = Path("/tmp/a,b")
    spec = make_spec(
        disk=d / "root,1.img",
        console_log=d / "c.log",
        qmp_socket=d / "q.sock",
        agent_socket=d / "a.sock",
        pidfile=d / "p.pid",
        kernel=d / "k",
    )
    argv = build_argv(spec)
    assert opt(argv, "-drive")[0].startswith("id=root,file=/tmp/a,,b/root,,1.img,format=")
    assert "socket,id=qmp,path=/tmp/a,,b/q.sock,server=on,wait=off" in argv
    assert "file,id=console,path=/tmp/a,,b/c.log,append=on" in argv
    # Plain (non key=value) arguments are not escaped.
    assert opt(argv, "-kernel") == ["/tmp/a,b/k"]
    assert opt(argv, "-pidfile") == ["/tmp/a,b/p.pid"]
    assert qemu_opt("a,,b") == "a,,,,b"


def test_kernel_cmdline_appends_extra_args_last() -> None:
    assert kernel_cmdline(make_spec(cmdline="  ")).endswith("rw quiet")
    line = kernel_cmdline(make_spec(cmdline="init=/init ember.x=1"))
    assert line.startswith("console=ttyS0 reboot=t panic=-1 ")
    assert line.endswith(" quiet init=/init ember.x=1")


def test_tcg_guest_gets_the_host_tsc_frequency_when_known() -> None:
    accel = AccelDecision("tcg", "test", {"host_tsc_khz": "2596142"})
    line = kernel_cmdline(make_spec(accel=accel, cmdline="init=/init"))
    assert " quiet tsc_early_khz=2596142 tsc=reliable init=/init" in line
    kvm = AccelDecision("kvm", "test", {"host_tsc_khz": "2596142"})
    assert "tsc" not in kernel_cmdline(make_spec(accel=kvm))
    assert "tsc" not in kernel_cmdline(make_spec(accel=TCG))


def test_shared_memory_file_backs_guest_ram() -> None:
    argv = build_argv(make_spec(memory_file=Path("/dev/shm/e,x/sb1.ram"), memory_shared=True))
    assert "memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/e,,x/sb1.ram,share=on" in (
        opt(argv, "-object"))
    assert "-incoming" not in argv


def test_restore_maps_snapshot_memory_privately_and_waits_for_state() -> None:
    argv = build_argv(make_spec(memory_file=Path("/snap/ram"), incoming=True))
    assert "memory-backend-file,id=mem,size=512M,mem-path=/snap/ram,share=off" in (
        opt(argv, "-object"))
    assert opt(argv, "-incoming") == ["defer"]


def test_only_a_boot_gets_the_kernel() -> None:
    """A restored guest's kernel is in its RAM: QEMU is not given one to hold."""
    from ember.engine.qemu.vm import vm_binds

    boot = make_spec(disk_format="raw")
    restore = make_spec(disk_format="raw", memory_file=Path("/snap/ram"), incoming=True)
    assert opt(build_argv(boot), "-kernel") == [str(boot.kernel)]
    assert opt(build_argv(restore), "-kernel") == opt(build_argv(restore), "-append") == []
    assert opt(build_argv(restore, kernel=True), "-kernel") == [str(restore.kernel)]
    assert boot.kernel in [b.source for b in vm_binds(boot)]
    assert restore.kernel not in [b.source for b in vm_binds(restore)]


def test_a_restore_does_not_need_the_kernel_file(tmp_path: Path) -> None:
    from ember.engine.qemu.vm import _preflight
    from ember.errors import EngineError

    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"")
    files = {"kernel": tmp_path / "gone", "disk": disk, "console_log": tmp_path / "console",
             "qmp_socket": tmp_path / "qmp", "agent_socket": tmp_path / "agent",
             "pidfile": tmp_path / "pid"}
    _preflight(make_spec(**files, incoming=True))
    with pytest.raises(EngineError, match="kernel"):
        _preflight(make_spec(**files))


def test_the_device_model_digest_is_the_one_earlier_versions_recorded() -> None:
    """Snapshots made before restores stopped getting ``-kernel`` keep their digest and
    load. Changing this value makes every existing snapshot unloadable: do it on purpose."""
    from ember.engine.qemu.argv import device_model

    assert device_model(TCG, 1, 256) == (
        "d10fdea52000f8432bf34bb333e1fad9d14169330e9642ebd0589a83606bd4d0")


def test_shared_memory_needs_a_file() -> None:
    with pytest.raises(BadRequestError, match="memory_file"):
        make_spec(memory_shared=True)


def test_no_nic_unless_a_tap_is_handed_over() -> None:
    from ember.engine.qemu.argv import GUEST_MAC, NET_FD

    assert opt(build_argv(make_spec()), "-netdev") == []
    argv = build_argv(make_spec(net_fd=9))  # the caller's number: the VMM gets NET_FD
    assert opt(argv, "-netdev") == [f"tap,id=net0,fd={NET_FD},vhost=off"]
    assert f"virtio-net-device,netdev=net0,mac={GUEST_MAC}" in opt(argv, "-device")


def test_the_device_model_digest_sees_the_nic() -> None:
    from ember.engine.qemu.argv import device_model

    assert device_model(TCG, 1, 256) == device_model(TCG, 1, 256, network=False)
    assert device_model(TCG, 1, 256) != device_model(TCG, 1, 256, network=True)
