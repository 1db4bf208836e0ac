"""The QEMU ``microvm`` engine: argv building, QMP control, capability probes."""

from ember.engine.qemu.argv import build_argv
from ember.engine.qemu.vm import QemuEngine, QemuVMHandle

__all__ = ["QemuEngine", "QemuVMHandle", "build_argv"]
