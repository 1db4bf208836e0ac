"""Exposed ports: ``POST``/``GET /v1/sandboxes/{id}/ports``, ``DELETE .../ports/{port}``
(docs/networking.md). The daemon listens for each exposed guest port and carries its
connections into the sandbox's network namespace (:mod:`ember.net.forward`)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import Field

from ember.daemon.deps import Live, OwnedId
from ember.daemon.models import Strict
from ember.net.addressing import GUEST_IP
from ember.net.forward import Exposed
from ember.sdk.results import ExposedPort
from ember.sdk.wire import to_json

router = APIRouter(tags=["networking"])
GuestPort = Annotated[int, Path(ge=1, le=65535, description="a TCP port in the guest")]


class PortRequest(Strict):
    port: Annotated[int, Field(ge=1, le=65535)]
    #: Scale to zero: pause the sandbox after this many seconds without traffic on any of
    #: its exposed ports; the next connection resumes it (null: leave it as it is).
    pause_after_idle_s: Annotated[float, Field(ge=1, le=7 * 86400)] | None = None


def _json(e: Exposed) -> dict[str, Any]:
    return to_json(ExposedPort(port=e.port, host=e.host, host_port=e.host_port))


@router.post("/sandboxes/{sandbox_id}/ports", status_code=201)
async def expose(body: PortRequest, live: Live, sandbox_id: OwnedId) -> dict[str, Any]:
    """Make a guest TCP port reachable at an address of this host (the answer's ``host``
    and ``host_port``). The sandbox needs a network (its NIC), not outbound access."""
    rec = await asyncio.to_thread(live.mgr.get, sandbox_id)  # 404 for an unknown sandbox
    target = GUEST_IP if rec.isolation == "microvm" else "127.0.0.1"  # a container's own
    exposed = await live.ports.expose(sandbox_id, body.port, target=target)
    if body.pause_after_idle_s is not None:
        live.ports.set_idle_pause(sandbox_id, body.pause_after_idle_s)
    return _json(exposed)


@router.get("/sandboxes/{sandbox_id}/ports")
async def ports(live: Live, sandbox_id: OwnedId) -> list[dict[str, Any]]:
    return [_json(e) for e in live.ports.exposed(sandbox_id)]


@router.delete("/sandboxes/{sandbox_id}/ports/{port}", status_code=204)
async def unexpose(live: Live, sandbox_id: OwnedId, port: GuestPort) -> Response:
    await live.ports.close(sandbox_id, port)
    return Response(status_code=204)


__all__ = ["router"]
