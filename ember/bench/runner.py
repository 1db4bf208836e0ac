"""Run a bench: every tier side by side, repetitions interleaved, every failure recorded.

Phases: start to first exec (interleaved repetitions), parallel creation (one round per
tier, interleaved), then per tier density with the idle memory and host-syscall measures
taken on the density instances while they are up. No instance outlives :func:`run_bench`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from ember.bench import syscalls
from ember.bench.hostinfo import collect
from ember.bench.model import BenchResult, TierResult
from ember.bench.stats import interleave
from ember.bench.tiers import Instance, Tier
from ember.runtime.pools import pss_bytes

log = logging.getLogger("ember.bench")

WORKLOAD = ["sh", "-c", "echo hello >/tmp/ember-bench && cat /tmp/ember-bench >/dev/null "
            "&& uname -a >/dev/null && rm /tmp/ember-bench"]
WORKLOAD_RUNS = 5

#: (description, steps done, steps in all)
OnStep = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BenchParams:
    template: str = "debian-python"
    memory_mib: int = 256
    reps: int = 5
    parallel: int = 4
    max_density: int = 8
    memory_budget_bytes: int = 4 << 30
    latency_bound_ms: float = 2000.0
    settle_s: float = 2.0
    syscalls: bool = True

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "workload": " ".join(WORKLOAD[2:]),
                "workload_runs": WORKLOAD_RUNS}


def describe(err: BaseException) -> str:
    """One line saying what went wrong (the first line of the message, bounded)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__


def tree_pss(inst: Instance) -> int:
    """Host PSS of the instance's processes (0 when they cannot be found)."""
    try:
        pids = inst.host_pids()
    except Exception:
        return 0
    return sum(pss_bytes(pid) for pid in pids)


class _Run:
    def __init__(self, tiers: Sequence[Tier], params: BenchParams, on_step: OnStep) -> None:
        self.tiers = {t.name: t for t in tiers}
        self.results = {t.name: TierResult(t.name, description=t.description) for t in tiers}
        self.params = params
        self.on_step = on_step
        n = len(tiers)
        self.total = n * params.reps + n * (3 if params.syscalls else 2) + n
        self.done = 0

    def step(self, text: str) -> None:
        self.done += 1
        self.on_step(text, min(self.done, self.total), self.total)

    def available(self, name: str) -> bool:
        return self.results[name].unavailable is None

    def failed(self, name: str, err: BaseException, what: str) -> None:
        """A start failed: before any success the tier is unavailable, after it an error."""
        res = self.results[name]
        log.warning("bench %s: %s failed: %s", name, what, err)  # all of it (console tails)
        if not res.first_exec_s and not res.idle_pss_bytes and res.parallel_wall_s is None:
            res.unavailable = describe(err)
        else:
            res.errors.append(f"{what}: {describe(err)}")

    def prepare(self) -> None:
        for name, tier in self.tiers.items():
            self.on_step(f"{name}: preparing", self.done, self.total)
            try:
                tier.prepare()
                self.results[name].description = tier.description
            except Exception as err:
                self.results[name].unavailable = describe(err)
            self.step(f"{name}: prepared")

    def first_exec(self) -> None:
        for rep, name in interleave(list(self.tiers), self.params.reps):
            if self.available(name):
                self.on_step(f"{name}: start to first exec {rep + 1}/{self.params.reps}",
                             self.done, self.total)
                t0 = time.monotonic()
                try:
                    inst = self.tiers[name].start()
                except Exception as err:
                    self.failed(name, err, "start")
                else:
                    self.results[name].first_exec_s.append(time.monotonic() - t0)
                    try:
                        inst.close()
                    except Exception as err:
                        self.results[name].errors.append(f"destroy: {describe(err)}")
            self.step(f"{name}: first exec {rep + 1}")

    def parallel(self) -> None:
        n = self.params.parallel
        for name, tier in self.tiers.items():
            res = self.results[name]
            if self.available(name) and n > 0:
                self.on_step(f"{name}: {n} created in parallel", self.done, self.total)
                insts: list[Instance] = []
                errors: list[BaseException] = []

                def one(t: Tier = tier) -> Instance:
                    return t.start()

                t0 = time.monotonic()
                pool = ThreadPoolExecutor(max_workers=n)
                futures = [pool.submit(one) for _ in range(n)]
                try:
                    for fut in futures:
                        try:
                            insts.append(fut.result())
                        except Exception as err:
                            errors.append(err)
                    res.parallel_wall_s = time.monotonic() - t0
                finally:  # interrupted or not, every instance that came up is destroyed
                    pool.shutdown(wait=True)
                    for fut in futures:
                        if fut.exception() is None and fut.result() not in insts:
                            insts.append(fut.result())
                    for inst in insts:
                        with contextlib.suppress(Exception):
                            inst.close()
                res.parallel_n = n
                res.parallel_failures = len(errors)
                if errors:
                    res.errors += [f"parallel start: {describe(e)}" for e in errors[:3]]
                    if not insts:
                        res.notes["parallel"] = describe(errors[0])
            self.step(f"{name}: parallel")

    def density(self, name: str) -> None:
        """Start idle instances until a bound; measure idle PSS and host syscalls on them."""
        p = self.params
        res = self.results[name]
        tier = self.tiers[name]
        insts: list[Instance] = []
        fitted = 0  # instances started, answering, and within the bounds with all before
        try:
            stop = f"max {p.max_density}"
            while len(insts) < p.max_density:
                self.on_step(f"{name}: density, starting instance {len(insts) + 1}",
                             self.done, self.total)
                try:
                    insts.append(tier.start())
                except Exception as err:
                    stop = "start failed"
                    log.warning("bench %s: density start %d failed: %s", name, len(insts) + 1,
                                err)
                    res.errors.append(f"density start {len(insts) + 1}: {describe(err)}")
                    break
                time.sleep(p.settle_s)
                t0 = time.monotonic()
                try:
                    insts[-1].run(["true"])
                except Exception as err:
                    stop = "exec failed"
                    log.warning("bench %s: density exec failed: %s", name, err)
                    res.errors.append(f"density exec: {describe(err)}")
                    break
                lat = time.monotonic() - t0
                total = sum(tree_pss(i) for i in insts)
                res.density_exec_s.append(lat)
                res.density_pss_total_bytes.append(total)
                if total > p.memory_budget_bytes:
                    stop = "memory budget"
                    break
                if lat * 1000 > p.latency_bound_ms:
                    stop = "latency bound"
                    break
                fitted += 1
            # the instance that crossed a bound (or did not answer) is not counted
            res.density = fitted
            res.density_stop = stop
            if not insts:
                res.notes["density"] = stop
            res.idle_pss_bytes = [v for v in (tree_pss(i) for i in insts) if v > 0]
            if insts and not res.idle_pss_bytes:
                res.notes["memory"] = "no host process found for the instance"
            self.step(f"{name}: density {fitted}")
            if p.syscalls:
                self.on_step(f"{name}: host syscalls (strace)", self.done, self.total)
                if insts:
                    self.trace(res, insts[0])
                else:
                    res.notes["syscalls"] = "no instance"
                self.step(f"{name}: syscalls")
        finally:
            for inst in insts:
                with contextlib.suppress(Exception):
                    inst.close()

    def trace(self, res: TierResult, inst: Instance) -> None:
        try:
            pids = inst.host_pids()
        except Exception as err:
            res.notes["syscalls"] = describe(err)
            return
        res.syscall_pids = len(pids)

        def workload() -> None:
            try:
                for _ in range(WORKLOAD_RUNS):
                    inst.run(list(WORKLOAD))
            except Exception as err:  # what the host processes did is still worth counting
                res.notes["syscall workload"] = describe(err)

        warnings: list[str] = []
        try:
            res.syscalls = syscalls.trace(pids, workload, warnings=warnings)
        except Exception as err:
            res.notes["syscalls"] = describe(err)
        if warnings:
            res.notes["strace"] = "; ".join(warnings)


def run_bench(tiers: Sequence[Tier], params: BenchParams,
              on_step: OnStep = lambda *_: None) -> BenchResult:
    started = time.time()
    host = collect()
    run = _Run(tiers, params, on_step)
    run.prepare()
    run.first_exec()
    run.parallel()
    for name in run.tiers:
        if run.available(name):
            try:
                run.density(name)
            except Exception as err:  # reported, never a crash (its instances are gone)
                run.results[name].notes["density"] = describe(err)
                run.results[name].errors.append(f"density: {describe(err)}")
        else:
            run.step(f"{name}: unavailable")
            if params.syscalls:
                run.step(f"{name}: unavailable")
    on_step("done", run.total, run.total)
    return BenchResult(host=host, started_at=started, finished_at=time.time(),
                       params=params.to_json(), tiers=[run.results[n] for n in run.tiers])
