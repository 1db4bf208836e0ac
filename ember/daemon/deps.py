"""What routes take from the application: the live table, the metrics, the caller (its
tenant), and sandbox ids that the caller owns."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Path, Request
from starlette.requests import HTTPConnection

from ember.cluster.record import load_secret
from ember.cluster.vouch import VOUCH_HEADER, verify
from ember.daemon.auth import ADMIN, Principal, Quotas, own_sandbox, principal_of
from ember.daemon.live import LiveSandboxes
from ember.daemon.metrics import Metrics
from ember.daemon.port_proxy import PortProxy

ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


def _live(request: Request) -> LiveSandboxes:
    live: LiveSandboxes = request.app.state.live
    return live


def _metrics(request: Request) -> Metrics:
    m: Metrics = request.app.state.metrics
    return m


def _quotas(request: Request) -> Quotas:
    q: Quotas = request.app.state.quotas
    return q


def _proxy(request: Request) -> PortProxy:
    p: PortProxy = request.app.state.proxy
    return p


def caller(live: LiveSandboxes, conn: HTTPConnection, method: str) -> Principal:
    """Who asks: another node's vouch (it forwards for its caller), else the request's own
    credentials (``method``: the request's, ``WS`` for a WebSocket)."""
    vouch = conn.headers.get(VOUCH_HEADER)
    if vouch is not None:
        tenant = verify(load_secret(live.paths), vouch, method, conn.url.path)
        return Principal(tenant, tenant == ADMIN)
    return principal_of(live.mgr.store, conn.scope.get("client"),
                        conn.headers.get("authorization"))


def _principal(request: Request) -> Principal:
    return caller(request.app.state.live, request, request.method)


Live = Annotated[LiveSandboxes, Depends(_live)]
Meter = Annotated[Metrics, Depends(_metrics)]
Quota = Annotated[Quotas, Depends(_quotas)]
Who = Annotated[Principal, Depends(_principal)]
Proxy = Annotated[PortProxy, Depends(_proxy)]


async def _owned(live: Live, who: Who,
                 sandbox_id: str = Path(pattern=ID_PATTERN, description="a sandbox id")) -> str:
    """The path's sandbox id, once it is known to be the caller's (else 404)."""
    if not who.admin:
        own_sandbox(who, await asyncio.to_thread(live.mgr.get, sandbox_id))
    return sandbox_id


OwnedId = Annotated[str, Depends(_owned)]
