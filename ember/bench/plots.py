"""Plots for the report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from ember.bench.model import BenchResult
from ember.bench.report import ordered


def make_plots(result: BenchResult, out: Path) -> list[tuple[str, str]]:
    """Write the PNG plots into ``out``; (file name, caption) of each written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = [t for t in ordered(result.tiers) if t.unavailable is None]
    written: list[tuple[str, str]] = []
    if not tiers:
        return written
    names = [t.title for t in tiers]
    accel = result.host.accel

    def save(fig: object, name: str, caption: str) -> None:
        plt.tight_layout()
        plt.savefig(out / name, dpi=100)
        plt.close("all")
        written.append((name, caption))

    if any(t.first_exec_s for t in tiers):
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, t in enumerate(tiers):
            ax.scatter([i] * len(t.first_exec_s), [x * 1000 for x in t.first_exec_s],
                       alpha=0.7)
        ax.set_xticks(range(len(tiers)), names)
        ax.set_ylabel("ms (log scale)")
        ax.set_yscale("log")
        ax.set_title(f"Start to first exec, every sample ({accel})")
        save(fig, "first_exec.png", "Start to first exec: every sample per tier")

    if any(t.density_pss_total_bytes for t in tiers):
        fig, ax = plt.subplots(figsize=(7, 4))
        for t in tiers:
            ys = [b / 2**20 for b in t.density_pss_total_bytes]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=t.title)
        ax.set_xlabel("idle instances")
        ax.set_ylabel("total host PSS, MiB")
        ax.set_title("Host memory as idle instances are added")
        ax.legend()
        save(fig, "density_memory.png", "Density: total host memory (PSS) per idle instance count")

    bars = [(t.title, len(t.syscalls)) for t in tiers if t.syscalls]
    if bars:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([b[0] for b in bars], [b[1] for b in bars])
        ax.set_ylabel("distinct host syscalls")
        ax.set_title("Host attack surface during a fixed workload")
        save(fig, "syscalls.png", "Distinct host syscalls made by the instance's host processes")

    thr = [(t.title, t.throughput_per_s) for t in tiers if t.throughput_per_s is not None]
    if thr:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([b[0] for b in thr], [b[1] or 0.0 for b in thr])
        ax.set_ylabel("instances per second")
        ax.set_title("Parallel creation throughput")
        save(fig, "throughput.png", "Parallel creation throughput (started to first exec)")
    return written
