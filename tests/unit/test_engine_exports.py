"""The engine's public surface, pinned."""

from __future__ import annotations

import ember.engine
import ember.engine.qemu


def test_engine_exports() -> None:
    assert sorted(ember.engine.__all__) == [
        "AccelDecision",
        "Engine",
        "QemuEngine",
        "SandboxHandle",
        "VMHandle",
        "VMSpec",
        "default_engine",
        "detect_accel",
    ]
    for name in ember.engine.__all__:
        assert hasattr(ember.engine, name)


def test_qemu_exports() -> None:
    assert sorted(ember.engine.qemu.__all__) == ["QemuEngine", "QemuVMHandle", "build_argv"]


def test_default_engine_is_qemu() -> None:
    engine = ember.engine.default_engine()
    assert engine.name == "qemu"
    assert isinstance(engine, ember.engine.QemuEngine)
