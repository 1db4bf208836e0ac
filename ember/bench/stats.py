"""Order statistics over samples. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks; None if empty.

    With few samples p99 is close to the maximum: the report says how many samples there were.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], not {q!r}")
    xs = sorted(x for x in samples if not math.isnan(x))
    if not xs:
        return None
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(samples: Sequence[float]) -> float | None:
    return percentile(samples, 0.5)


def summary(samples: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p99, min, max of ``samples``."""
    xs = [x for x in samples if not math.isnan(x)]
    return {
        "n": len(xs),
        "p50": percentile(xs, 0.5),
        "p99": percentile(xs, 0.99),
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
    }


def interleave(names: Sequence[str], reps: int) -> list[tuple[int, str]]:
    """The order of (repetition, tier) runs: every repetition runs every tier, and the order
    rotates by one each repetition so no tier always goes first (or after the same one)."""
    order: list[tuple[int, str]] = []
    n = len(names)
    for r in range(reps):
        order += [(r, names[(r + i) % n]) for i in range(n)] if n else []
    return order
