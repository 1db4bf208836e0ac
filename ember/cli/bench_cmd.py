"""``ember bench``: every isolation tier and a traditional VM measured side by side."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ember.cli.common import err_console, handle_errors, out_console, print_json

TIER_NAMES = ("container", "gvisor", "microvm", "microvm-cold", "traditional-vm")


@click.command("bench")
@click.option("--quick", is_flag=True, help="CI size: 2 repetitions, N=2, density up to 2.")
@click.option("--reps", type=click.IntRange(1, 1000), default=None,
              help="Start-to-first-exec repetitions per tier (default 5; quick 2).")
@click.option("--parallel", "parallel", type=click.IntRange(0, 64), default=None,
              help="N for parallel creation throughput (default 4; quick 2; 0 skips).")
@click.option("--max-density", type=click.IntRange(1, 256), default=None,
              help="Cap on idle instances in the density test (default 8; quick 2).")
@click.option("--memory-budget-mib", type=click.IntRange(64), default=None,
              help="Density stops when the instances' total PSS exceeds this "
                   "(default: half of MemAvailable).")
@click.option("--latency-bound-ms", type=click.FloatRange(1), default=2000.0, show_default=True,
              help="Density stops when an exec of `true` takes longer than this.")
@click.option("--template", default="debian-python", show_default=True)
@click.option("--memory", "memory_mib", type=click.IntRange(64), default=256, show_default=True,
              help="Guest memory (MiB) of VM tiers and limit of the others.")
@click.option("--tiers", default=",".join(TIER_NAMES), show_default=True,
              help="Comma-separated tiers to run.")
@click.option("--no-syscalls", is_flag=True, help="Skip the strace host-syscall measure.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Report directory (default ./ember-bench-<timestamp>).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def bench(quick: bool, reps: int | None, parallel: int | None, max_density: int | None,
          memory_budget_mib: int | None, latency_bound_ms: float, template: str,
          memory_mib: int, tiers: str, no_syscalls: bool, out_dir: Path | None,
          as_json: bool) -> None:
    """Measure container, gVisor, microVM and a traditional VM side by side on this host.

    Start to first exec (p50/p99), host memory per idle instance (PSS), density, parallel
    creation throughput and distinct host syscalls; writes report.md, report.html, plots
    and samples.json. A tier that cannot run here is reported unavailable with the reason.
    """
    from ember.bench.hostinfo import read_meminfo
    from ember.bench.output import default_out_dir, write_all
    from ember.bench.report import comparison_table, summary_json
    from ember.bench.runner import BenchParams, run_bench
    from ember.bench.tiers import default_tiers
    from ember.engine import detect_accel
    from ember.errors import BadRequestError
    from ember.paths import Paths
    from ember.sdk.async_sandbox import manager

    chosen = [t.strip() for t in tiers.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TIER_NAMES]
    if unknown or not chosen:
        raise BadRequestError(f"unknown tier(s) {unknown}; choose from {', '.join(TIER_NAMES)}")
    budget = (memory_budget_mib << 20 if memory_budget_mib is not None
              else max(256 << 20, read_meminfo("MemAvailable") // 2))
    params = BenchParams(
        template=template, memory_mib=memory_mib,
        reps=reps if reps is not None else (2 if quick else 5),
        parallel=parallel if parallel is not None else (2 if quick else 4),
        max_density=max_density if max_density is not None else (2 if quick else 8),
        memory_budget_bytes=budget, latency_bound_ms=latency_bound_ms,
        settle_s=0.5 if quick else 2.0, syscalls=not no_syscalls)
    out = out_dir or default_out_dir()
    accel = detect_accel().accel
    paths = Paths.from_env()
    manager(paths).store.get_template(template)  # a typo is an error, not 4 unavailable tiers
    all_tiers = default_tiers(template=template, memory_mib=memory_mib, cache=paths.cache,
                              home=paths.home, accel=accel)
    selected = [t for t in all_tiers if t.name in chosen]

    with Progress(TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.description}"),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def on_step(text: str, done: int, total: int) -> None:
            bar.update(task, description=text, completed=done, total=total)
            if not err_console.is_terminal:
                err_console.print(f"[{done}/{total}] {text}", highlight=False)

        result = run_bench(selected, params, on_step)
    written = write_all(result, out)

    if as_json:
        print_json({**summary_json(result), "report": {
            "markdown": str(written.markdown), "html": str(written.html),
            "samples": str(written.samples), "plots": written.plots,
            "plot_error": written.plot_error}})
        return
    table = comparison_table(result)
    t = Table(*table.header, title=f"ember bench ({result.host.accel}, "
                                   f"{result.host.cores} cores)", show_lines=True)
    for row in table.rows:
        t.add_row(*row)
    out_console.print(t)
    if written.plot_error:
        err_console.print(f"[yellow]plots not drawn:[/] {written.plot_error}")
    out_console.print(f"report: {written.markdown}  {written.html}  samples: {written.samples}")
