"""The guest CPU record of KVM snapshots: parsing QEMU's expansion, validating a manifest's
record (untrusted), and deciding whether a restore can run here."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.engine.qemu.cpu import GuestCpu, from_expansion, restore_problem
from ember.errors import SnapshotError


def expansion(vendor: str = "AuthenticAMD", **flags: object) -> dict[str, object]:
    props: dict[str, object] = {"vendor": vendor, "family": 25, "model": 1, "stepping": 1,
                                "model-id": "AMD EPYC", "sse4.2": True, "sse4_2": True,
                                "avx2": True, "avx512f": False, "tsc-frequency": 0,
                                "hv-vendor-id": ""}
    props.update(flags)
    return {"model": {"name": "host", "props": props}}


def test_expansion_keeps_true_booleans_only() -> None:
    cpu = from_expansion(expansion())
    assert cpu.vendor == "AuthenticAMD" and (cpu.family, cpu.model, cpu.stepping) == (25, 1, 1)
    assert cpu.features == {"sse4.2", "sse4_2", "avx2"}


@pytest.mark.parametrize("reply", [None, [], {"model": {}}, {"model": {"props": []}},
                                   {"model": {"props": {"vendor": 1, "family": 1,
                                                        "model": 1, "stepping": 1}}}])
def test_malformed_expansion_is_an_error(reply: object) -> None:
    with pytest.raises(SnapshotError):
        from_expansion(reply)


def test_record_roundtrip_and_validation() -> None:
    cpu = from_expansion(expansion())
    assert GuestCpu.from_json(cpu.to_json()) == cpu
    bad = [None, "x", {**cpu.to_json(), "features": "avx2"},
           {**cpu.to_json(), "family": True}, {**cpu.to_json(), "features": ["a" * 65]},
           {**cpu.to_json(), "features": ["x"] * 5000}, {**cpu.to_json(), "vendor": None}]
    for doc in bad:
        with pytest.raises(SnapshotError, match="CPU record"):
            GuestCpu.from_json(doc)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                        max_size=6)))
def test_hostile_records_never_crash(doc: object) -> None:
    with contextlib.suppress(SnapshotError):
        GuestCpu.from_json(doc)


def test_restore_needs_the_same_vendor_and_every_feature() -> None:
    saved = from_expansion(expansion())
    assert restore_problem(saved, saved) is None
    more = from_expansion(expansion(avx512f=True))
    assert restore_problem(saved, more) is None  # extra features here: fine
    fewer = from_expansion(expansion(avx2=False))
    problem = restore_problem(saved, fewer)
    assert problem is not None and "lacks" in problem and "avx2" in problem
    intel = from_expansion(expansion("GenuineIntel"))
    problem = restore_problem(saved, intel)
    assert problem is not None and "GenuineIntel" in problem
    other_model = from_expansion(expansion(model=17))
    assert restore_problem(saved, other_model) is None  # every feature there: fine
