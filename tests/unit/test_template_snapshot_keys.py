"""The template snapshot key: every input that makes a snapshot valid changes it (the host
lookups, kernel, QEMU and accelerator, are the only thing faked: their answers)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from ember.engine import AccelDecision
from ember.runtime import template_snapshots as ts
from ember.store import SnapshotRecord, TemplateRecord

TPL = TemplateRecord(name="py", source="debian:bookworm", digest="sha256:" + "a" * 64,
                     image_path="/nonexistent", size_bytes=1, created_at=1.0)


def host(kernel: str = "k1", vmm: str = "7.2.22", accel: str = "tcg") -> Any:
    return SimpleNamespace(kernel=lambda: SimpleNamespace(key=kernel),
                           engine=SimpleNamespace(version=lambda: vmm),
                           accel=AccelDecision(accel=accel, reason="test"))  # type: ignore[arg-type]


def key(mgr: Any = None, tpl: TemplateRecord = TPL, vcpus: int = 1, memory_mib: int = 256,
        disk: str = ts.DEFAULT_DISK) -> str:
    return ts.key_for(mgr or host(), tpl, vcpus, memory_mib, disk)


def test_the_key_is_stable_and_changes_with_every_input() -> None:
    base = key()
    assert base == key() and len(base) == 64
    variants = {
        "template digest": key(tpl=dataclasses.replace(TPL, digest="sha256:" + "b" * 64)),
        "template name": key(tpl=dataclasses.replace(TPL, name="other")),
        "kernel": key(host(kernel="k2")),
        "qemu": key(host(vmm="8.0.0")),
        "accelerator": key(host(accel="kvm")),
        "vcpus": key(vcpus=2),
        "memory": key(memory_mib=512),
        "disk": key(disk="2048"),
    }
    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants)


def test_the_device_model_digest_follows_the_devices_not_the_kernel_cmdline(
        monkeypatch: Any) -> None:
    import ember.engine.qemu.argv as argv

    accel = AccelDecision(accel="tcg", reason="test")
    before = argv.device_model(accel, 1, 256)
    assert argv.device_model(accel, 2, 256) != before
    tsc = AccelDecision(accel="tcg", reason="test", details={"host_tsc_khz": "2000000"})
    assert argv.device_model(tsc, 1, 256) == before  # only the kernel cmdline differs
    monkeypatch.setattr(argv, "TCG_TB_SIZE_MIB", argv.TCG_TB_SIZE_MIB * 2)
    assert argv.device_model(accel, 1, 256) != before
    key = ts.key_for(host(), TPL, 1, 256, ts.DEFAULT_DISK)
    monkeypatch.undo()
    assert ts.key_for(host(), TPL, 1, 256, ts.DEFAULT_DISK) != key


def test_template_snapshots_are_told_apart_by_their_metadata() -> None:
    snap = SnapshotRecord(id="1" * 64, name=None, template="py", template_digest=TPL.digest,
                          kernel_key="k1", vmm_version="7.2.22", accel="tcg", vcpus=1,
                          memory_mib=256, disk_mib=1024, ram_file=True, size_bytes=1,
                          created_at=1.0, source="sb-1", metadata=ts.metadata("k" * 64, "default"))
    assert ts.is_template_snapshot(snap)
    assert not ts.is_template_snapshot(dataclasses.replace(snap, metadata={}))
    assert ts.disk_label(None) == "default" and ts.disk_label(2048) == "2048"
