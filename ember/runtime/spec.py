"""What a caller asks for when creating a sandbox, validated once where it enters."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ember.engine.base import host_memory_mib
from ember.engine.container.tiers import DEFAULT_ISOLATION
from ember.errors import BadRequestError
from ember.kinds import ISOLATIONS, ON_TIMEOUT, Isolation, OnTimeout
from ember.net.policy import NetworkPolicy

DEFAULT_TEMPLATE = "debian-python"
DEFAULT_TIMEOUT_S = 300.0
MAX_VCPUS = 64
MIN_MEMORY_MIB = 64
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
_META_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")


@dataclass(frozen=True)
class SandboxSpec:
    template: str = DEFAULT_TEMPLATE
    vcpus: int = 1
    memory_mib: int = 256
    disk_mib: int | None = None  # None: the template image's size
    timeout: float | None = DEFAULT_TIMEOUT_S  # lifetime in seconds; None = until destroyed
    env: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: When the lifetime ends: "destroy" the sandbox, or "pause" it (resume() goes on).
    on_timeout: OnTimeout = "destroy"
    #: "microvm" (own kernel; the default), "gvisor" (gVisor's user-space kernel) or
    #: "container" (the host's kernel, namespaces, seccomp, cgroups). See docs/isolation.md.
    isolation: Isolation = DEFAULT_ISOLATION
    #: None: no NIC at all (the default). A policy (or its JSON form): a NIC whose
    #: egress it decides (docs/networking.md).
    network: NetworkPolicy | None = None

    def __post_init__(self) -> None:
        if self.network is not None:
            object.__setattr__(self, "network", NetworkPolicy.from_json(self.network))
        if not isinstance(self.template, str) or not self.template:
            raise BadRequestError("template must be a non-empty string")
        _int_in("vcpus", self.vcpus, 1, min(MAX_VCPUS, os.cpu_count() or 1),
                "the host has {hi} CPU(s)")
        host_mem = host_memory_mib()
        _int_in("memory_mib", self.memory_mib, MIN_MEMORY_MIB, host_mem,
                "the host has {hi} MiB of memory")
        if self.disk_mib is not None:
            _int_in("disk_mib", self.disk_mib, 64, 1 << 24, "")
        if self.timeout is not None and (
            not isinstance(self.timeout, int | float) or not 0 < self.timeout <= 7 * 86400
        ):
            raise BadRequestError(f"timeout must be between 0 and 7 days, got {self.timeout!r}")
        if self.on_timeout not in ON_TIMEOUT:
            raise BadRequestError(f"on_timeout must be one of {', '.join(ON_TIMEOUT)}, "
                                  f"not {self.on_timeout!r}")
        if self.isolation not in ISOLATIONS:
            raise BadRequestError(f"isolation must be one of {', '.join(ISOLATIONS)}, "
                                  f"not {self.isolation!r}")
        for k, v in self.env.items():
            if not _ENV_KEY.fullmatch(k) or not isinstance(v, str) or "\0" in v:
                raise BadRequestError(f"invalid environment variable {k!r}")
        for k, v in self.metadata.items():
            if not _META_KEY.fullmatch(k) or not isinstance(v, str) or len(v) > 4096:
                raise BadRequestError(f"invalid metadata entry {k!r}")


def _int_in(name: str, value: object, lo: int, hi: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequestError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        reason = f" ({why.format(hi=hi)})" if why else ""
        raise BadRequestError(f"{name}={value} is impossible: allowed {lo}..{hi}{reason}")


def pool_key(template: str, vcpus: int, memory_mib: int, disk_mib: int | None) -> str:
    """The warm pool that serves sandboxes of this template and size."""
    return f"{template}/{vcpus}cpu/{memory_mib}mib/{disk_mib or 'default'}"
