"""What the caller's sandboxes cost the host now: ``GET /v1/usage`` (``ember top``)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from ember.daemon.deps import Live, Who
from ember.sdk.usage import usage_of
from ember.sdk.wire import to_json

router = APIRouter(tags=["sandboxes"])


@router.get("/usage")
async def usage(live: Live, who: Who) -> list[dict[str, Any]]:
    """One sample per live sandbox of the caller: host CPU seconds used since it started
    and host memory held now. CPU use is the difference of two samples."""
    got = await asyncio.to_thread(usage_of, live.mgr)
    return [to_json(u) for u, meta in got if who.owns(meta)]


__all__ = ["router"]
