"""Samples of what a home's live sandboxes cost the host, as the SDK returns them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from ember.kinds import SandboxState
from ember.runtime.states import LIVE_STATES
from ember.runtime.usage import usage
from ember.sdk.results import SandboxUsage

if TYPE_CHECKING:
    from ember.runtime.manager import SandboxManager


def usage_of(mgr: SandboxManager) -> list[tuple[SandboxUsage, dict[str, str]]]:
    """One sample per live sandbox, with its metadata (which names its tenant)."""
    out = []
    for rec in mgr.list():
        if rec.state not in LIVE_STATES or rec.state == "pooled":
            continue
        cpu, mem = usage(rec, mgr.confinement.cgroup(rec.id))
        out.append((SandboxUsage(id=rec.id, state=cast(SandboxState, rec.state),
                                 vcpus=rec.vcpus, memory_mib=rec.memory_mib,
                                 cpu_seconds=cpu, memory_bytes=mem, sampled_at=time.time()),
                    dict(rec.metadata)))
    return out
