"""ember.bench.report: the comparison table and both renderings, from hand-made results."""

from __future__ import annotations

import json

from ember.bench.model import BenchResult, HostInfo, TierResult
from ember.bench.report import (
    ROW_LABELS,
    comparison_table,
    render_html,
    render_markdown,
    summary_json,
)


def host(accel: str = "tcg") -> HostInfo:
    return HostInfo(cpu_model="AMD EPYC", cores=2, kernel="Linux 6.1", accel=accel,
                    accel_reason="kvm-pvm: no vmx/svm", memory_total_bytes=24 << 30)


def result(accel: str = "tcg") -> BenchResult:
    micro = TierResult("microvm", description="QEMU microvm", first_exec_s=[2.0, 2.2, 2.4],
                       idle_pss_bytes=[140 << 20, 150 << 20], density=2, density_stop="max 2",
                       density_pss_total_bytes=[140 << 20, 290 << 20], parallel_n=2,
                       parallel_wall_s=4.0, syscalls={"ppoll": 10, "read": 5})
    cont = TierResult("container", first_exec_s=[0.144], idle_pss_bytes=[12 << 20], density=2,
                      parallel_n=2, parallel_wall_s=0.5, parallel_failures=1,
                      notes={"syscalls": "strace: " + "x" * 200})
    gvisor = TierResult("gvisor", unavailable="runsc is not installed | (apt-get install runsc)")
    trad = TierResult("traditional-vm", first_exec_s=[4.0, 4.5], density=0,
                      notes={"density": "start failed"})
    return BenchResult(host=host(accel), started_at=0.0, finished_at=60.0,
                       params={"template": "debian-python", "reps": 3, "parallel": 2},
                       tiers=[micro, trad, gvisor, cont])


def test_columns_in_the_classic_order_and_rows_per_measure() -> None:
    t = comparison_table(result())
    assert t.header == ["", "Container", "gVisor", "microVM", "traditional VM"]
    assert [r[0] for r in t.rows] == list(ROW_LABELS)
    assert all(len(r) == 5 for r in t.rows)


def test_measured_cells() -> None:
    rows = {r[0]: r[1:] for r in comparison_table(result()).rows}
    assert rows["status"][2] == "measured"
    assert rows["start to first exec, p50"][2] == "2200 ms (n=3)"
    assert rows["host memory per idle instance (PSS)"][2] == "145 MiB"
    assert rows["density (idle instances within the bounds)"][2] == "2 (max 2)"
    assert rows["parallel creation throughput"][2] == "0.50/s (N=2)"
    assert rows["parallel creation throughput"][0] == "2.00/s (N=2, 1 failed)"
    assert rows["distinct host syscalls (fixed workload)"][2].startswith("2 ")
    assert rows["host memory per idle instance (PSS)"][3] == "n/a"


def test_an_unavailable_tier_says_so_with_its_reason_in_every_row() -> None:
    rows = {r[0]: r[1:] for r in comparison_table(result()).rows}
    assert rows["status"][1] == "unavailable: runsc is not installed | (apt-get install runsc)"
    assert all(r[1].startswith("unavailable") for r in rows.values())


def test_problem_notes_are_bounded_in_cells() -> None:
    rows = {r[0]: r[1:] for r in comparison_table(result()).rows}
    cell = rows["distinct host syscalls (fixed workload)"][0]
    assert cell.startswith("not measured: strace: ") and len(cell) < 120


def test_markdown_opens_with_the_table_then_host_and_accel_note() -> None:
    md = render_markdown(result(), [("first_exec.png", "Start to first exec")])
    lines = md.splitlines()
    assert lines[0].startswith("# ")
    first_table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert lines[first_table].startswith("|  | Container | gVisor | microVM | traditional VM |")
    assert md.index("| status") < md.index("## Host") < md.index("TCG")
    assert "runsc is not installed \\| (apt-get install runsc)" in md  # pipe escaped
    assert "![Start to first exec](first_exec.png)" in md
    assert "AMD EPYC, 2 cores" in md


def test_kvm_note_differs() -> None:
    assert "TCG" not in render_markdown(result("kvm"))
    assert "KVM" in render_markdown(result("kvm"))


def test_html_escapes_and_holds_the_same_table() -> None:
    r = result()
    r.tiers[0].description = "<script>alert(1)</script>"
    page = render_html(r, [("a.png", "A & B")])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<th>Container</th>" in page and "src=\"a.png\"" in page and "A &amp; B" in page


def test_summary_json_is_serialisable() -> None:
    s = summary_json(result())
    tiers = s["tiers"]
    assert isinstance(tiers, dict)
    assert tiers["gvisor"] == {"status": "unavailable",
                               "reason": "runsc is not installed | (apt-get install runsc)"}
    assert tiers["microvm"]["distinct_syscalls"] == 2
    json.dumps(s)
    json.dumps(result().to_json())
