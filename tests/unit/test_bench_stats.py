"""ember.bench.stats: percentiles and the interleaved run order."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.bench.stats import interleave, median, percentile, summary


def test_percentile_interpolates_between_ranks() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0.0) == 1.0
    assert percentile(xs, 1.0) == 4.0
    assert percentile(xs, 0.5) == 2.5
    assert median([5.0]) == 5.0


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 0.5) is None
    assert percentile([math.nan], 0.99) is None


def test_percentile_rejects_a_bad_quantile() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


@given(st.lists(st.floats(-1e9, 1e9), min_size=1), st.floats(0, 1))
def test_percentile_lies_within_the_samples(xs: list[float], q: float) -> None:
    p = percentile(xs, q)
    assert p is not None
    assert min(xs) - 1e-6 <= p <= max(xs) + 1e-6


def test_summary() -> None:
    s = summary([1.0, 2.0, 3.0])
    assert s == {"n": 3, "p50": 2.0, "p99": pytest.approx(2.98), "min": 1.0, "max": 3.0}
    assert summary([])["p50"] is None


def test_interleave_runs_every_tier_every_rep_and_rotates() -> None:
    order = interleave(["a", "b", "c"], 3)
    assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"),
                     (2, "c"), (2, "a"), (2, "b")]
    assert interleave([], 3) == []
    assert interleave(["a"], 0) == []
