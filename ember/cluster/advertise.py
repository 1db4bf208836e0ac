"""What a node offers sandboxes, as Ray resources.

Quantities are Ray resources sandboxes consume (``ember:vcpus``, ``ember:memory_mib``);
capabilities are resources of 1 that a placement asks a sliver of (``ember:tier:microvm``,
``ember:accel:tcg``, ``ember:template:debian-python``), so that Ray's scheduler alone
decides where a sandbox fits. Everything here is data: detection reads the host and the
home; building and parsing resource maps does no I/O.

Resources are fixed when a node starts, so the templates are advertised for information
only: placement demands none (any node can fetch a template) and asks the cluster's
directory who holds what (:mod:`ember.cluster.templates`), which every build updates.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import BadRequestError, EmberError
from ember.kinds import ISOLATIONS
from ember.paths import Paths

PREFIX = "ember:"
VCPUS = f"{PREFIX}vcpus"
MEMORY_MIB = f"{PREFIX}memory_mib"
TIER = f"{PREFIX}tier:"
ACCEL = f"{PREFIX}accel:"
TEMPLATE = f"{PREFIX}template:"
#: Memory kept for the host (its daemon, Ray, page cache) when none is given.
HOST_RESERVE_MIB = 1024
#: What a resource name may hold after its prefix (template names included).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Advertisement:
    vcpus: int
    memory_mib: int
    tiers: tuple[str, ...]
    accel: str
    templates: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.vcpus < 1 or self.memory_mib < 1:
            raise BadRequestError("a node advertises at least 1 vCPU and 1 MiB")
        for name in (*self.tiers, self.accel, *self.templates):
            if not _NAME.match(name):
                raise BadRequestError(f"cannot advertise {name!r} as a Ray resource")

    def resources(self) -> dict[str, float]:
        """The ``--resources`` map for ``ray start``."""
        out: dict[str, float] = {VCPUS: float(self.vcpus), MEMORY_MIB: float(self.memory_mib),
                                 f"{ACCEL}{self.accel}": 1.0}
        out.update({f"{TIER}{t}": 1.0 for t in self.tiers})
        out.update({f"{TEMPLATE}{t}": 1.0 for t in self.templates})
        return out

    @classmethod
    def from_resources(cls, resources: dict[str, float]) -> Advertisement | None:
        """Read an advertisement back from a node's Ray resources (totals); None for a node
        that is no ember node (it advertises no vCPUs)."""
        if VCPUS not in resources or MEMORY_MIB not in resources:
            return None
        accels = sorted(k[len(ACCEL):] for k in resources if k.startswith(ACCEL))
        try:
            return cls(vcpus=int(resources[VCPUS]), memory_mib=int(resources[MEMORY_MIB]),
                       tiers=tuple(sorted(k[len(TIER):] for k in resources
                                          if k.startswith(TIER))),
                       accel=accels[0] if accels else "unknown",
                       templates=tuple(sorted(k[len(TEMPLATE):] for k in resources
                                              if k.startswith(TEMPLATE))))
        except BadRequestError:
            return None

    def to_json(self) -> dict[str, object]:
        return {"vcpus": self.vcpus, "memory_mib": self.memory_mib, "tiers": list(self.tiers),
                "accel": self.accel, "templates": list(self.templates)}


def host_memory_mib(root: Path = Path("/")) -> int:
    """MemTotal of ``/proc/meminfo`` in MiB."""
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def available_tiers() -> tuple[str, ...]:
    """The isolation tiers this host can run (the checks ``ember doctor`` shows)."""
    from ember.engine.container.tiers import tier_status

    out: list[str] = []
    for isolation in ISOLATIONS:
        if isolation == "microvm":
            if shutil.which("qemu-system-x86_64"):
                out.append(isolation)
            continue
        try:
            if tier_status(isolation).ok:
                out.append(isolation)
        except EmberError:
            continue
    return tuple(out)


def home_templates(paths: Paths) -> tuple[str, ...]:
    """The templates this home holds (none when it has no registry yet)."""
    if not paths.db.exists():
        return ()
    from ember.store import Store

    store = Store(paths.db)
    try:
        return tuple(sorted(t.name for t in store.list_templates() if _NAME.match(t.name)))
    finally:
        store.close()


def detect_advertisement(paths: Paths, *, vcpus: int | None = None,
                         memory_mib: int | None = None) -> Advertisement:
    """What this host's daemon may give sandboxes: all CPUs and the memory less
    :data:`HOST_RESERVE_MIB` unless told otherwise, the tiers it can run, KVM or TCG (the
    same decision a create makes), and the home's templates."""
    from ember.engine.accel import detect_accel

    if vcpus is None:
        vcpus = os.cpu_count() or 1
    if memory_mib is None:
        memory_mib = max(host_memory_mib() - HOST_RESERVE_MIB, 256)
    return Advertisement(vcpus=vcpus, memory_mib=memory_mib, tiers=available_tiers(),
                         accel=detect_accel().accel, templates=home_templates(paths))
