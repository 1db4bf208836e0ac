"""Value types of a bench run: host details, one tier's raw samples, the whole result. Pure."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Tiers in report column order, with their column titles.
TIER_ORDER: tuple[str, ...] = ("container", "gvisor", "microvm", "microvm-cold",
                               "traditional-vm")
TIER_TITLES: dict[str, str] = {
    "container": "Container",
    "gvisor": "gVisor",
    "microvm": "microVM",
    "microvm-cold": "microVM, cold boot",
    "traditional-vm": "traditional VM",
}


@dataclass(frozen=True)
class HostInfo:
    cpu_model: str
    cores: int
    kernel: str
    accel: str  # "kvm" | "tcg"
    accel_reason: str
    memory_total_bytes: int
    qemu_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TierResult:
    """Everything measured for one tier. ``unavailable`` (a reason) when it could not run at
    all; each measurement may also have its own problem note in ``notes``."""

    name: str
    unavailable: str | None = None
    description: str = ""
    first_exec_s: list[float] = field(default_factory=list)
    idle_pss_bytes: list[int] = field(default_factory=list)
    density: int | None = None
    density_stop: str = ""
    density_pss_total_bytes: list[int] = field(default_factory=list)
    density_exec_s: list[float] = field(default_factory=list)
    parallel_n: int = 0
    parallel_wall_s: float | None = None
    parallel_failures: int = 0
    syscalls: dict[str, int] = field(default_factory=dict)
    syscall_pids: int = 0
    notes: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return TIER_TITLES.get(self.name, self.name)

    @property
    def throughput_per_s(self) -> float | None:
        if self.parallel_wall_s is None or self.parallel_wall_s <= 0:
            return None
        ok = self.parallel_n - self.parallel_failures
        return ok / self.parallel_wall_s if ok > 0 else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["title"] = self.title
        out["throughput_per_s"] = self.throughput_per_s
        out["distinct_syscalls"] = len(self.syscalls) if self.syscalls else None
        return out


@dataclass
class BenchResult:
    host: HostInfo
    started_at: float
    finished_at: float
    params: dict[str, Any]
    tiers: list[TierResult]

    def tier(self, name: str) -> TierResult | None:
        return next((t for t in self.tiers if t.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host.to_json(),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "params": self.params,
            "tiers": [t.to_json() for t in self.tiers],
        }
