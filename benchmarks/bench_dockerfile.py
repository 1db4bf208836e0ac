"""Issue 16 figures: templates from a Dockerfile (docs/dockerfile.md).

* a three-step Dockerfile (COPY, RUN, RUN) over ``debian-python``, built **cold** (an ARG
  nonce the first RUN uses changes every key: every step runs, the image is flattened and
  its template snapshot made by a boot) and with the **cache warm** (the same Dockerfile
  again under the same name: every step cached, the image and template snapshot reused);
  each build's time split from its progress lines (steps, flattening, template snapshot);
* the **cost per RUN step**: the same Dockerfile with 1 and 6 trivial RUN steps, cold;
  (t6 - t1) / 5, next to the median time of one step read from the progress lines.

Builds run in this process (``EMBER_LOCAL=1``) in a scratch home that shares the image
cache; the images made are removed at the end.

Run: .venv/bin/python benchmarks/bench_dockerfile.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

THREE_STEPS = """\
FROM debian-python
ARG NONCE
COPY app.py /app/
RUN echo "$NONCE" > /app/nonce && python3 -m compileall -q /app
RUN python3 /app/app.py > /app/out
"""


def many_runs(n: int) -> str:
    return "FROM debian-python\nARG NONCE\nRUN echo \"$NONCE\" > /nonce\n" + "".join(
        f"RUN echo {i} >> /steps\n" for i in range(1, n))


class Timed:
    """A progress callback that timestamps the build's phases."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.marks: list[tuple[float, str]] = []

    def __call__(self, msg: str) -> None:
        if msg.startswith("step ") or msg.startswith("writing the template's image") or (
                "making its template snapshot" in msg):
            self.marks.append((time.monotonic() - self.t0, msg))

    def split(self, total: float) -> dict[str, float]:
        """Seconds in steps (first step line to the flattening), flattening, template
        snapshot (to the end), and each step's duration."""
        steps = [t for t, m in self.marks if m.startswith("step ")]
        flat = next((t for t, m in self.marks if m.startswith("writing")), None)
        snap = next((t for t, m in self.marks if "making its template" in m), total)
        end_steps = flat if flat is not None else snap
        per = [b - a for a, b in zip(steps, [*steps[1:], end_steps], strict=True)]
        return {"before": steps[0] if steps else 0.0,
                "steps": end_steps - (steps[0] if steps else end_steps),
                "flatten": (snap - flat) if flat is not None else 0.0,
                "snapshot": total - snap, "per_step": statistics.median(per) if per else 0.0}


MADE: set[str] = set()  # digests of the images built (removed at the end)


def build(name: str, ctx: Path, nonce: str, paths: object) -> tuple[float, dict[str, float]]:
    from ember import Sandbox

    timed = Timed()
    t0 = time.monotonic()
    info = Sandbox.build_template(name, f"dockerfile:{ctx}", force=True, paths=paths,  # type: ignore[arg-type]
                                  build_args={"NONCE": nonce}, on_progress=timed)
    total = time.monotonic() - t0
    MADE.add(info.digest)
    return total, timed.split(total)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    os.environ["EMBER_LOCAL"] = "1"
    root = Path(tempfile.mkdtemp(prefix="ebdf-", dir="/tmp"))
    cache = Path(os.environ.get("EMBER_CACHE") or "/var/lib/ember/cache")
    os.environ.update(EMBER_HOME=str(root), EMBER_CACHE=str(cache))
    from ember.guest.image import build_image
    from ember.paths import Paths
    from ember.store import Store

    paths = Paths(home=root, cache=cache, ram=Path(f"/dev/shm/ember-bench-{root.name}")).ensure()
    store = Store(paths.db)
    build_image(paths, store, "debian-python", force=True)
    store.close()
    work = root / "ctx"
    (work / "three").mkdir(parents=True)
    (work / "three" / "app.py").write_text("print(sum(range(1000)))\n")
    (work / "three" / "Dockerfile").write_text(THREE_STEPS)
    for n in (1, 6):
        (work / f"runs{n}").mkdir()
        (work / f"runs{n}" / "Dockerfile").write_text(many_runs(n))
    # warm-up: the base's template snapshot, the runtime, the page cache
    build("warmup", work / "three", "warmup", paths)
    cold: list[float] = []
    warm: list[float] = []
    parts_cold: list[dict[str, float]] = []
    parts_warm: list[dict[str, float]] = []
    one: list[float] = []
    six: list[float] = []
    per_step: list[float] = []
    try:
        for _ in range(a.reps):
            nonce = secrets.token_hex(8)
            t, parts = build("three", work / "three", nonce, paths)
            cold.append(t)
            parts_cold.append(parts)
            t, parts = build("three", work / "three", nonce, paths)
            warm.append(t)
            parts_warm.append(parts)
            t, _ = build("runs1", work / "runs1", secrets.token_hex(8), paths)
            one.append(t)
            t, parts = build("runs6", work / "runs6", secrets.token_hex(8), paths)
            six.append(t)
            per_step.append(parts["per_step"])
    finally:
        from ember.daemon.control import stop as stop_daemon

        stop_daemon(paths)
        for digest in MADE:
            shutil.rmtree(paths.images / digest.split(":", 1)[1], ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(paths.ram, ignore_errors=True)

    def show(label: str, xs: list[float], parts: list[dict[str, float]]) -> None:
        keys = ("before", "steps", "flatten", "snapshot")
        split = ", ".join(f"{k} {med([p[k] for p in parts]):.2f}" for k in keys)
        print(f"{label:<34} median {med(xs):6.2f} s  (runs: "
              f"{', '.join(f'{x:.2f}' for x in xs)}; {split})")

    print(f"three-step Dockerfile over debian-python, {a.reps} reps, in-process")
    show("cold (every step runs)", cold, parts_cold)
    show("cache warm (every step cached)", warm, parts_warm)
    print(f"{'cold / warm':<34} {med(cold) / med(warm):6.1f}x")
    print(f"{'1 RUN step, cold':<34} median {med(one):6.2f} s")
    print(f"{'6 RUN steps, cold':<34} median {med(six):6.2f} s")
    print(f"{'cost per RUN step (6-1)/5':<34} median {(med(six) - med(one)) / 5:6.2f} s "
          f"(one step read from progress: {med(per_step):.2f} s)")


if __name__ == "__main__":
    main()
