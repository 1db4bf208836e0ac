"""Write a bench result into its directory: samples.json, report.md, report.html, plots."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ember.bench.model import BenchResult
from ember.bench.report import render_html, render_markdown

SAMPLES = "samples.json"


@dataclass(frozen=True)
class Written:
    directory: Path
    markdown: Path
    html: Path
    samples: Path
    plots: list[str]
    plot_error: str | None = None


def default_out_dir(now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None else time.time()))
    return Path(f"ember-bench-{stamp}")


def write_all(result: BenchResult, out: Path) -> Written:
    out.mkdir(parents=True, exist_ok=True)
    samples = out / SAMPLES
    samples.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    plot_error = None
    try:
        from ember.bench.plots import make_plots

        plots = make_plots(result, out)
    except Exception as err:  # a report without plots beats no report
        plots, plot_error = [], f"{type(err).__name__}: {err}"
    md = out / "report.md"
    md.write_text(render_markdown(result, plots, SAMPLES))
    page = out / "report.html"
    page.write_text(render_html(result, plots, SAMPLES))
    return Written(out, md, page, samples, [p for p, _ in plots], plot_error)
