"""``ember bench --quick`` for real: every tier measured or reported unavailable with a
reason, and the report files written. Never asserts a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TIERS = {"container": "Container", "gvisor": "gVisor", "microvm": "microVM",
         "microvm-cold": "microVM, cold boot", "traditional-vm": "traditional VM"}


def test_bench_quick_reports_every_tier(debian_template, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "report"
    cp = subprocess.run([sys.executable, "-m", "ember.cli", "bench", "--quick", "--json",
                         "--out", str(out)], capture_output=True, text=True, timeout=600,
                        env=os.environ.copy())
    assert cp.returncode == 0, f"{cp.stdout}\n{cp.stderr}"
    summary = json.loads(cp.stdout)
    assert set(summary["tiers"]) == set(TIERS)
    for name, tier in summary["tiers"].items():
        if tier["status"] == "unavailable":
            assert tier["reason"].strip(), name
        else:
            assert tier["status"] == "measured", name
            assert tier["first_exec_n"] == 2 and tier["first_exec_p50_s"] > 0, name
            assert tier["density"] is not None and tier["parallel_n"] == 2, name
    assert summary["host"]["accel"] in ("kvm", "tcg")

    md = (out / "report.md").read_text()
    table = md[md.index("|"):md.index("## Host")]
    assert table.startswith(
        "|  | Container | gVisor | microVM | microVM, cold boot | traditional VM |")
    for name, tier in summary["tiers"].items():
        if tier["status"] == "unavailable":
            assert "unavailable: " in table, name
    assert "start to first exec, p50" in table and "distinct host syscalls" in table
    assert "## What the accelerator" in md
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    samples = json.loads((out / "samples.json").read_text())
    assert [t["name"] for t in samples["tiers"]] == list(TIERS)
    for png in summary["report"]["plots"]:
        assert (out / png).stat().st_size > 1000
    if any(t["status"] == "measured" for t in summary["tiers"].values()):
        assert summary["report"]["plots"], summary["report"]["plot_error"]
    assert not list((Path(os.environ["EMBER_HOME"]) / "bench").glob("vm-*"))


def test_a_tier_that_cannot_start_is_reported_with_its_reason(debian_template) -> None:  # type: ignore[no-untyped-def]
    from ember.bench.report import comparison_table
    from ember.bench.runner import BenchParams, run_bench
    from ember.bench.tiers import EmberTier

    tier = EmberTier("gvisor", "no-such-isolation", template="debian-python", memory_mib=256,
                     description="a tier the SDK refuses")
    res = run_bench([tier], BenchParams(reps=2, parallel=2, max_density=2, settle_s=0.0))
    (t,) = res.tiers
    assert t.unavailable and t.unavailable.split(":", 1)[1].strip()
    assert not t.first_exec_s and t.density is None
    status = comparison_table(res).rows[0]
    assert status[1] == f"unavailable: {t.unavailable}"
