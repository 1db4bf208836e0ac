"""ember.bench.runner over in-process tiers (real implementations of the Tier interface,
no VMs): a failing tier is reported, never a crash, and nothing is left running."""

from __future__ import annotations

import os
from typing import ClassVar

from ember.bench.runner import BenchParams, run_bench
from ember.bench.tiers import Instance
from ember.errors import EmberError, TierUnavailableError


class LocalInstance:
    """An 'instance' that runs nothing and whose host process is this test process."""

    live: ClassVar[set[int]] = set()

    def __init__(self, n: int) -> None:
        self.n = n
        LocalInstance.live.add(n)

    def run(self, argv: list[str]) -> None:
        if not argv:
            raise EmberError("empty argv")

    def host_pids(self) -> list[int]:
        return [os.getpid()]

    def close(self) -> None:
        LocalInstance.live.discard(self.n)


class LocalTier:
    def __init__(self, name: str, *, prepare_error: Exception | None = None,
                 fail_after: int | None = None) -> None:
        self.name = name
        self.description = f"in-process {name}"
        self.prepare_error = prepare_error
        self.fail_after = fail_after
        self.started = 0

    def prepare(self) -> None:
        if self.prepare_error is not None:
            raise self.prepare_error

    def start(self) -> Instance:
        self.started += 1
        if self.fail_after is not None and self.started > self.fail_after:
            raise EmberError(f"start {self.started} refused\nsecond line")
        return LocalInstance(id(self) + self.started)


PARAMS = BenchParams(reps=3, parallel=2, max_density=3, memory_budget_bytes=1 << 50,
                     latency_bound_ms=60_000, settle_s=0.0, syscalls=False)


def test_every_tier_measured_or_unavailable_with_a_reason() -> None:
    tiers = [LocalTier("container"),
             LocalTier("gvisor", prepare_error=TierUnavailableError("runsc missing")),
             LocalTier("microvm", fail_after=0),
             LocalTier("traditional-vm", fail_after=4)]
    steps: list[tuple[str, int, int]] = []
    res = run_bench(tiers, PARAMS, lambda text, done, total: steps.append((text, done, total)))
    by = {t.name: t for t in res.tiers}
    assert by["container"].unavailable is None
    assert len(by["container"].first_exec_s) == 3
    assert by["container"].density == 3 and by["container"].density_stop == "max 3"
    assert by["container"].idle_pss_bytes and by["container"].parallel_n == 2
    assert by["gvisor"].unavailable == "TierUnavailableError: runsc missing"
    assert by["microvm"].unavailable == "EmberError: start 1 refused"
    trad = by["traditional-vm"]
    assert trad.unavailable is None and len(trad.first_exec_s) == 3
    assert trad.parallel_failures == 1 and trad.density == 0 and trad.errors
    assert steps[-1][1] == steps[-1][2]  # the progress reaches its total
    assert not LocalInstance.live


def test_density_stops_at_the_memory_budget() -> None:
    params = BenchParams(reps=1, parallel=0, max_density=5, memory_budget_bytes=1,
                         settle_s=0.0, syscalls=False)
    res = run_bench([LocalTier("container")], params)
    # the one instance started is already over the budget: none fits
    assert res.tiers[0].density == 0 and res.tiers[0].density_stop == "memory budget"
    assert len(res.tiers[0].density_pss_total_bytes) == 1
    assert not LocalInstance.live


class LostInstance(LocalInstance):
    """An instance whose host processes cannot be found (its record vanished)."""

    def host_pids(self) -> list[int]:
        raise EmberError("sandbox record gone")


class LostTier(LocalTier):
    def start(self) -> Instance:
        self.started += 1
        return LostInstance(id(self) + self.started)


def test_an_instance_without_host_processes_is_noted_not_fatal() -> None:
    params = BenchParams(reps=1, parallel=1, max_density=2, memory_budget_bytes=1 << 50,
                         settle_s=0.0, syscalls=True)
    res = run_bench([LostTier("microvm")], params)
    (t,) = res.tiers
    assert t.unavailable is None and t.density == 2
    assert t.notes["memory"] == "no host process found for the instance"
    assert t.notes["syscalls"] == "EmberError: sandbox record gone"
    assert not LocalInstance.live
