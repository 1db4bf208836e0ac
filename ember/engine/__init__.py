"""VMM drivers behind one small interface (:class:`Engine`, :class:`VMHandle`).

Lower layer: imports nothing from ``runtime``, ``sdk`` or ``cli``.
"""

from ember.engine.accel import AccelDecision, detect_accel
from ember.engine.base import Engine, SandboxHandle, VMHandle, VMSpec
from ember.engine.qemu import QemuEngine

__all__ = [
    "AccelDecision",
    "Engine",
    "QemuEngine",
    "SandboxHandle",
    "VMHandle",
    "VMSpec",
    "default_engine",
    "detect_accel",
]


def default_engine() -> Engine:
    """The engine ember uses (QEMU; others may be chosen here later)."""
    return QemuEngine()
