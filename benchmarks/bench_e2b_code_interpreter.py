"""Issue 14 (part 4) figures: E2B's official ``e2b-code-interpreter`` SDK against ember's
daemon (TCP listener, API key), template ``code-interpreter-v1``: the first ``run_code`` of
a sandbox (its default context's Jupyter kernel starts), then ``run_code`` of a small cell,
a cell that prints 1,000 lines, and a matplotlib plot (one PNG result), interleaved with
what the same guest costs without a kernel: ember's ``exec(["python3", "-c", "1 + 1"])``
in the same sandbox's image (a cold interpreter per call).

Run (as root, in a scratch home so that the daemon is this script's own):
  EMBER_HOME=$(mktemp -d) EMBER_CACHE=/var/lib/ember/cache \\
      .venv/bin/python benchmarks/bench_e2b_code_interpreter.py [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2b_code_interpreter import Sandbox as CodeSandbox

from benchmarks._common import daemon_on_tcp
from ember import Sandbox
from ember.daemon import control
from ember.errors import TemplateNotFoundError
from ember.guest.image import build_image
from ember.paths import Paths
from ember.store import Store

TEMPLATE = "code-interpreter-v1"
PLOT = ("import matplotlib.pyplot as plt\nplt.figure()\nplt.plot([1, 2, 3], [1, 4, 9])\n"
        "plt.show()")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def line(name: str, xs: list[float]) -> str:
    ms = [x * 1000 for x in xs]
    return (f"  {name:<48} median {statistics.median(ms):8.1f} ms  "
            f"(min {min(ms):.1f}, max {max(ms):.1f}, n={len(ms)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    paths = Paths.from_env().ensure()
    store = Store(paths.db)
    try:
        store.get_template(TEMPLATE)
    except TemplateNotFoundError:
        build_image(paths, store, TEMPLATE)
    url, key = daemon_on_tcp(paths, store)
    opts = {"api_key": key, "api_url": url, "sandbox_url": url}
    first: list[float] = []
    small: list[float] = []
    prints: list[float] = []
    plots: list[float] = []
    cold: list[float] = []
    try:
        for _ in range(3):  # the kernel's start, on fresh sandboxes
            box = CodeSandbox.create(**opts)  # type: ignore[arg-type]
            try:
                first.append(timed(lambda b=box: b.run_code("1 + 1")))  # type: ignore[misc]
            finally:
                box.kill()
        box = CodeSandbox.create(**opts)  # type: ignore[arg-type]
        plain = Sandbox.create(TEMPLATE, url=url, api_key=key)
        try:
            box.run_code(PLOT)  # warm-up: matplotlib's import and font cache
            plain.exec(["python3", "-c", "1 + 1"]).check()
            for _ in range(args.reps):
                small.append(timed(lambda: box.run_code("1 + 1")))
                prints.append(timed(lambda: box.run_code("for i in range(1000): print(i)")))
                plots.append(timed(lambda: box.run_code(PLOT)))
                cold.append(timed(lambda: plain.exec(["python3", "-c", "1 + 1"]).check()))
        finally:
            box.kill()
            plain.kill()
    finally:
        control.stop(paths)
    print(f"e2b-code-interpreter {version('e2b-code-interpreter')} (e2b {version('e2b')}) "
          f"against ember's daemon, template {TEMPLATE}, {args.reps} interleaved reps")
    print(line("first run_code of a sandbox (kernel start)", first))
    print(line("run_code('1 + 1')", small))
    print(line("run_code: 1,000 printed lines", prints))
    print(line("run_code: a matplotlib plot (PNG result)", plots))
    print(line("ember exec python3 -c '1 + 1' (no kernel)", cold))


if __name__ == "__main__":
    main()
