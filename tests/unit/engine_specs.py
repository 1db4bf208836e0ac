"""A VMSpec builder shared by the engine's unit tests (no files are touched)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ember.engine.accel import AccelDecision
from ember.engine.base import VMSpec

TCG = AccelDecision("tcg", "test", {})
KVM = AccelDecision("kvm", "test", {})


def make_spec(**overrides: Any) -> VMSpec:
    d = Path("/run/ember/sb1")
    fields: dict[str, Any] = dict(
        name="sb1",
        kernel=Path("/cache/bzImage"),
        disk=d / "root.qcow2",
        disk_format="qcow2",
        disk_readonly=False,
        vcpus=1,
        memory_mib=256,
        cmdline="",
        console_log=d / "console.log",
        qmp_socket=d / "qmp.sock",
        agent_socket=d / "agent.sock",
        pidfile=d / "qemu.pid",
        accel=TCG,
    )
    fields.update(overrides)
    return VMSpec(**fields)
