"""Exposed ports: ``POST``/``GET /v1/sandboxes/{id}/ports``, ``DELETE .../ports/{port}``
(docs/networking.md). The daemon listens for each exposed guest port and carries its
connections into the sandbox's network namespace (:mod:`ember.net.forward`); HTTP also
reaches it through the daemon itself, at ``.../ports/{port}/http/...`` or by ``Host``
(:mod:`ember.daemon.port_proxy`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import Field

from ember.daemon.deps import Live, OwnedId, Proxy
from ember.daemon.models import Strict
from ember.daemon.port_proxy import METHODS, PortProxy, host_name, http_path
from ember.errors import NotFoundError
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


def _json(e: Exposed, proxy: PortProxy) -> dict[str, Any]:
    return to_json(ExposedPort(port=e.port, host=e.host, host_port=e.host_port,
                               http_host=host_name(e.sandbox_id, e.port, proxy.domain),
                               http_path=http_path(e.sandbox_id, e.port)))


@router.post("/sandboxes/{sandbox_id}/ports", status_code=201)
async def expose(body: PortRequest, live: Live, proxy: Proxy,
                 sandbox_id: OwnedId) -> dict[str, Any]:
    """Make a guest TCP port reachable at an address of this host (the answer's ``host``
    and ``host_port``), and for HTTP through this API (``http_host``, ``http_path``). The
    sandbox needs a network (its NIC), not outbound access. Kept across daemon restarts."""
    exposed = await live.expose(sandbox_id, body.port, pause_after_idle=body.pause_after_idle_s)
    return _json(exposed, proxy)


@router.get("/sandboxes/{sandbox_id}/ports")
async def ports(live: Live, proxy: Proxy, sandbox_id: OwnedId) -> list[dict[str, Any]]:
    return [_json(e, proxy) for e in live.ports.exposed(sandbox_id)]


@router.delete("/sandboxes/{sandbox_id}/ports/{port}", status_code=204)
async def unexpose(live: Live, sandbox_id: OwnedId, port: GuestPort) -> Response:
    await live.unexpose(sandbox_id, port)
    return Response(status_code=204)


async def http(request: Request, live: Live, proxy: Proxy, sandbox_id: OwnedId,
               port: GuestPort, rest: str) -> Response:
    """HTTP to an exposed port: this request, its path after ``/http`` and its body, is
    carried to the guest and its answer streamed back (also reached with ``Host:
    <port>-<id>.<ports domain>`` and any path). 404 for a port not exposed; 502 when
    nothing answers there, 504 when it answers too late."""
    exposed = live.ports.find(sandbox_id, port)
    if exposed is None or (rest and not rest.startswith("/")):
        raise NotFoundError(f"port {port} of sandbox {sandbox_id} is not exposed "
                            f"(ember port {sandbox_id} {port})")
    return await proxy.forward(request, exposed)


for _method in METHODS:  # one route per method: each its own operation in the OpenAPI
    router.add_api_route("/sandboxes/{sandbox_id}/ports/{port}/http{rest:path}", http,
                         methods=[_method], name=f"http_{_method.lower()}")


__all__ = ["router"]
