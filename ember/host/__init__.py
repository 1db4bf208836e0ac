"""Host-side isolation of sandboxes (cgroups now; uids, namespaces and network later).

Lower layer: imports nothing from ``runtime``, ``sdk`` or ``cli``.
"""

from ember.host.cgroup_detect import CgroupSupport, ControllerStatus, detect_cgroups
from ember.host.cgroupfs import CgroupFS
from ember.host.cgroups import (
    CgroupError,
    CgroupLimits,
    CgroupStats,
    SandboxCgroup,
    enter_argv,
    home_key,
    prune,
    sandbox_ids,
    sweep,
)

__all__ = [
    "CgroupError",
    "CgroupFS",
    "CgroupLimits",
    "CgroupStats",
    "CgroupSupport",
    "ControllerStatus",
    "SandboxCgroup",
    "detect_cgroups",
    "enter_argv",
    "home_key",
    "prune",
    "sandbox_ids",
    "sweep",
]
