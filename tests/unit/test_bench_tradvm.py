"""ember.bench.tradvm: the traditional VM's command line and initramfs script (pure parts)."""

from __future__ import annotations

from pathlib import Path

from ember.bench.tradvm import MODULES, build_argv, initramfs_script


def argv(accel: str) -> list[str]:
    return build_argv(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd.gz"),
                      overlay=Path("/w/disk.qcow2"), workdir=Path("/w"), memory_mib=256,
                      accel=accel, name="trad-1")


def test_a_full_pc_with_pci_devices_and_the_agent_port() -> None:
    a = argv("tcg")
    assert a[a.index("-M") + 1] == "q35"
    assert "microvm" not in " ".join(a)
    assert "-bios" not in a  # QEMU's default firmware for q35 is SeaBIOS
    for dev in ("virtio-blk-pci,drive=root", "virtio-serial-pci",
                "virtserialport,chardev=agent,name=ember.agent"):
        assert dev in a
    assert a[a.index("-accel") + 1].startswith("tcg")
    assert "init=/.ember/init" in a[a.index("-append") + 1]
    assert "file=/w/disk.qcow2,format=qcow2" in a[a.index("-drive") + 1]


def test_kvm_when_the_host_has_it() -> None:
    a = argv("kvm")
    assert a[a.index("-accel") + 1] == "kvm"


def test_initramfs_loads_modules_after_their_dependencies() -> None:
    names = [n for n, _ in MODULES]
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_pci")
    assert names.index("virtio_pci") < names.index("virtio_blk")
    assert names.index("virtio_pci") < names.index("virtio_console")
    script = initramfs_script()
    assert script.startswith("#!/bin/busybox sh\n")
    assert " ".join(names) in script
    assert "switch_root /newroot" in script
