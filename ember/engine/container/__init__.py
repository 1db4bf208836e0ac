"""Container isolation tiers: crun (``container``) and gVisor's runsc (``gvisor``)."""

from ember.engine.container.runtime import ContainerSpec, OciEngine, OciHandle
from ember.engine.container.tiers import (
    DEFAULT_ISOLATION,
    TierStatus,
    gvisor_platform,
    require_tier,
    tier_status,
)
from ember.kinds import ISOLATIONS

__all__ = [
    "DEFAULT_ISOLATION",
    "ISOLATIONS",
    "ContainerSpec",
    "OciEngine",
    "OciHandle",
    "TierStatus",
    "gvisor_platform",
    "require_tier",
    "tier_status",
]
