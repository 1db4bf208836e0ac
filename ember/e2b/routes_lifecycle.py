"""E2B's REST API (``E2B_API_URL``): create, list, info, kill, timeout, pause, connect,
metrics; each route translates into the same runtime calls as ember's own routes.

The caller is told apart as everywhere else (:func:`ember.daemon.auth.principal_of`): the
``X-API-KEY`` header carries an ember API key (``ek_...``), and so may ``Authorization:
Bearer``; on the Unix socket the peer's uid decides. Errors are E2B's: the HTTP status and
``{"code": <status>, "message": "..."}``, which the SDK turns into its own exceptions.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from ember.cluster.placement import PLACEMENT_HEADER
from ember.daemon import cluster_create, routes_sandboxes
from ember.daemon.auth import Principal, own_sandbox, principal_of
from ember.daemon.cluster_peers import ask_peers
from ember.daemon.deps import ID_PATTERN, Live, Meter, Quota, caller
from ember.daemon.errors import headers_for, status_for
from ember.daemon.models import CreateRequest, Env, Meta, NetworkRequest
from ember.e2b import mapping as M
from ember.e2b.state import E2bState, e2b_state
from ember.errors import BadRequestError, EmberError, ProtocolError, SandboxStateError
from ember.sdk.async_sandbox import info_of
from ember.sdk.results import SandboxInfo
from ember.sdk.wire import sandbox_info

log = logging.getLogger("ember.daemon")


def error_response(status: int, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status,
                        headers=headers)


class E2bRoute(APIRoute):
    """A route whose errors are E2B's JSON, not ember's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except EmberError as err:
                return error_response(status_for(err), str(err), headers_for(err))
            except RequestValidationError as err:
                first = err.errors()[0] if err.errors() else {}
                where = ".".join(str(x) for x in first.get("loc", ()))
                return error_response(400, f"invalid request: {where}: "
                                      f"{first.get('msg', 'invalid')}")

        return answer


#: Sandboxes one many-metrics request may name.
MAX_METRICS_IDS = 100
router = APIRouter(tags=["e2b"], route_class=E2bRoute)


def _who(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> Principal:
    live = request.app.state.live
    if not x_api_key:  # a key in Authorization, another node's vouch, or the socket's uid
        return caller(live, request, request.method)
    return principal_of(live.mgr.store, request.scope.get("client"), f"Bearer {x_api_key}")


Who = Annotated[Principal, Depends(_who)]
State = Annotated[E2bState, Depends(e2b_state)]
SandboxId = Annotated[str, Path(pattern=ID_PATTERN, description="a sandbox id")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NewSandbox(_Body):
    """``NewSandbox`` / ``NewSandboxV2``: what ember has no counterpart for (MCP, IAM,
    volumes, per-host network rules) is refused, never silently dropped."""

    templateID: Annotated[str, Field(min_length=1, max_length=128)]
    timeout: Annotated[int, Field(ge=1, le=86400 * 30)] = 300
    metadata: Meta = Field(default_factory=dict, max_length=64)
    envVars: Env = Field(default_factory=dict, max_length=256)
    autoPause: bool = False
    autoPauseMemory: bool | None = None
    autoResume: dict[str, Any] | None = None
    allow_internet_access: bool | None = None
    secure: bool | None = None
    network: dict[str, Any] | None = None
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None
    volumeMounts: list[dict[str, Any]] | None = None


class TimeoutBody(_Body):
    timeout: Annotated[int, Field(ge=0, le=86400 * 30)]


class ConnectBody(_Body):
    timeout: Annotated[int, Field(ge=0, le=86400 * 30)] | None = None
    memory: bool | None = None
    autoPause: bool | None = None


class PauseBody(_Body):
    memory: bool | None = None
    requireHealthyGuest: bool | None = None


def _unsupported(body: NewSandbox) -> str | None:
    for name in ("mcp", "iam", "volumeMounts", "autoResume"):
        if getattr(body, name):
            return name
    extra = sorted(set(body.network or {}) - {"allowPublicTraffic"})
    return f"network.{extra[0]}" if extra else None


def _ports_mode(body: NewSandbox) -> str:
    """Whether the sandbox's ports answer anyone who reaches the daemon (E2B's default)
    or only requests with its traffic token (``allowPublicTraffic: false``)."""
    public = (body.network or {}).get("allowPublicTraffic")
    if public is not None and not isinstance(public, bool):
        raise BadRequestError("network.allowPublicTraffic must be true or false")
    return M.PORTS_PRIVATE if public is False else M.PORTS_PUBLIC


async def _owned_info(live: Live, who: Principal, sandbox_id: str) -> SandboxInfo:
    rec = await asyncio.to_thread(live.mgr.get, sandbox_id)
    return info_of(own_sandbox(who, rec))


async def _create(body: NewSandbox, live: Live, meter: Meter, who: Who, quotas: Quota,
                  state: State, http: Request) -> JSONResponse:
    bad = _unsupported(body)
    if bad is not None:
        raise BadRequestError(f"{bad} is not supported by ember's E2B API (docs/e2b.md)")
    request = CreateRequest(
        template=M.ember_template(body.templateID), timeout=float(body.timeout),
        env=body.envVars, metadata=body.metadata,
        on_timeout="pause" if body.autoPause else "destroy",
        network=NetworkRequest() if body.allow_internet_access else None)
    # On a cluster, placed by Ray as /v1 creates are; the chosen node's E2B route answers.
    placed = await cluster_create.decide_e2b(
        http, request, body.model_dump(mode="json", exclude_unset=True), live, who)
    if placed.info is not None:
        return JSONResponse(placed.info, status_code=201)
    who = placed.who
    made = await routes_sandboxes.create_sandbox(request, live, meter, who, quotas,
                                         reserved={M.PORTS_KEY: _ports_mode(body)})
    placed_here = getattr(http.app.state, "placed", None)
    if placed_here is not None and http.headers.get(PLACEMENT_HEADER) is not None:
        placed_here.note(json.dumps({"id": made["id"]}).encode())  # fencing: cluster_watch
    return JSONResponse(M.created(str(made["id"]), template_id=body.templateID,
                                  secret=state.secret,
                                  domain=state.domain), status_code=201)


@router.post("/sandboxes", status_code=201)
async def e2b_create(body: NewSandbox, live: Live, meter: Meter, who: Who, quotas: Quota,
                    state: State, http: Request) -> JSONResponse:
    """E2B: create a sandbox (older SDKs)."""
    return await _create(body, live, meter, who, quotas, state, http)


@router.post("/v2/sandboxes", status_code=201)
async def e2b_create_v2(body: NewSandbox, live: Live, meter: Meter, who: Who, quotas: Quota,
                    state: State, http: Request) -> JSONResponse:
    """E2B: create a sandbox from a template (``base``: ember's default template)."""
    return await _create(body, live, meter, who, quotas, state, http)


async def _mine(live: Live, who: Principal,
                http: Request | None = None) -> list[SandboxInfo]:
    """The caller's sandboxes here, and (given ``http``, on a node of a cluster) on every
    other live node that answers in time (ember.daemon.cluster_peers)."""
    mine = [i for i in await live.local.list() if who.sees(i.tenant)]
    if http is None:
        return mine
    seen = {i.id for i in mine}
    for part in await ask_peers(http, who, "/v1/sandboxes"):
        for raw in part.doc if isinstance(part.doc, list) else []:
            try:
                info = sandbox_info(raw)
            except ProtocolError as err:
                log.warning("node %s listed a malformed sandbox: %s", part.node.node_id[:12],
                            err)
                continue
            if info.id not in seen and who.sees(info.tenant):
                seen.add(info.id)
                mine.append(info)
    return mine


@router.get("/v2/sandboxes")
async def e2b_list_v2(live: Live, who: Who, response: Response, http: Request,
                  metadata: Annotated[str | None, Query(max_length=8192)] = None,
                  state: Annotated[str | None, Query(max_length=64)] = None,
                  template: Annotated[str | None, Query(max_length=128)] = None,
                  startedAfter: Annotated[datetime | None, Query()] = None,
                  order: Annotated[str, Query(pattern="^(asc|desc)$")] = "asc",
                  nextToken: Annotated[str | None, Query(max_length=512)] = None,
                  limit: Annotated[int, Query(ge=1, le=100)] = 100) -> list[dict[str, Any]]:
    """E2B: the caller's running and paused sandboxes, filtered by metadata and state, a
    page at a time (the next page's token in ``x-next-token``); on a cluster, every live
    node's."""
    infos, token = M.page(
        await _mine(live, who, http), metadata=M.metadata_filter(metadata),
        states=M.states_filter(state), template=template,
        started_after=None if startedAfter is None else startedAfter.timestamp(),
        desc=order == "desc", limit=limit, next_token=nextToken)
    if token is not None:
        response.headers["x-next-token"] = token
    return [M.listed(i) for i in infos]


@router.get("/sandboxes")
async def e2b_list(live: Live, who: Who, http: Request,
                  metadata: Annotated[str | None, Query(max_length=8192)] = None
                  ) -> list[dict[str, Any]]:
    """E2B: the caller's running sandboxes (older SDKs; no paging); on a cluster, every
    live node's."""
    infos, _ = M.page(await _mine(live, who, http), metadata=M.metadata_filter(metadata),
                      states={"running"}, template=None, started_after=None, desc=False,
                      limit=10_000, next_token=None)
    return [M.listed(i) for i in infos]


@router.get("/sandboxes/metrics")
async def e2b_metrics_many(live: Live, who: Who, http: Request,
                           sandbox_ids: Annotated[str, Query(max_length=8192)]
                           ) -> dict[str, Any]:
    """E2B: the latest metrics of several of the caller's sandboxes
    (``sandbox_ids=a,b,...``, at most 100); ids that are not the caller's are left out.
    On a cluster, those another live node holds are asked of it."""
    wanted = [s for s in dict.fromkeys(sandbox_ids.split(",")) if s]
    if len(wanted) > MAX_METRICS_IDS:
        raise BadRequestError(f"at most {MAX_METRICS_IDS} sandbox ids at once")
    mine = {i.id: i for i in await _mine(live, who) if i.id in wanted}
    usage = {u.id: u for u in await live.local.list_usage() if u.id in mine}
    out = {sid: M.metric(mine[sid], usage[sid]) for sid in wanted if sid in usage}
    elsewhere = [s for s in wanted if s not in out]
    if elsewhere:
        query = urlencode({"sandbox_ids": ",".join(elsewhere)})
        for part in await ask_peers(http, who, "/sandboxes/metrics", query):
            got = part.doc.get("sandboxes") if isinstance(part.doc, dict) else None
            for sid, metric in (got.items() if isinstance(got, dict) else ()):
                if sid in elsewhere and sid not in out and isinstance(metric, dict):
                    out[sid] = metric
    return {"sandboxes": {sid: out[sid] for sid in wanted if sid in out}}


@router.get("/sandboxes/{sandbox_id}")
async def e2b_get_info(sandbox_id: SandboxId, live: Live, who: Who,
                   state: State) -> dict[str, Any]:
    """E2B: one sandbox (``SandboxDetail``)."""
    info = await _owned_info(live, who, sandbox_id)
    return M.detail(info, secret=state.secret, domain=state.domain)


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
async def e2b_kill(sandbox_id: SandboxId, live: Live, meter: Meter, who: Who) -> Response:
    """E2B: destroy a sandbox (404 when there is none)."""
    await _owned_info(live, who, sandbox_id)
    return await routes_sandboxes.kill(live, meter, sandbox_id)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
async def e2b_set_timeout(sandbox_id: SandboxId, body: TimeoutBody, live: Live,
                      who: Who) -> Response:
    """E2B: the sandbox ends ``timeout`` seconds from now."""
    await _owned_info(live, who, sandbox_id)
    await live.local.set_timeout(sandbox_id, float(body.timeout) or None)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204)
async def e2b_pause(sandbox_id: SandboxId, live: Live, who: Who,
                body: PauseBody | None = None) -> Response:
    """E2B: pause (ember stops the vCPUs and keeps memory; 409 when already paused)."""
    if body is not None and body.memory is False:
        raise BadRequestError("ember's pause always keeps the sandbox's memory")
    info = await _owned_info(live, who, sandbox_id)
    if info.state == "paused":
        raise SandboxStateError(f"sandbox {sandbox_id} is already paused")
    await live.pause(sandbox_id)
    return Response(status_code=204)


async def _connect(sandbox_id: str, body: ConnectBody | None, live: Live, who: Principal,
                   state: E2bState) -> JSONResponse:
    if body is not None and body.memory is False:
        raise BadRequestError("ember resumes a paused sandbox with its memory; a reboot "
                              "(on_resume='reboot') is not supported")
    info = await _owned_info(live, who, sandbox_id)
    resumed = info.state == "paused"
    if resumed:
        await live.resume(sandbox_id)
    if body is not None and body.timeout:
        await live.local.set_timeout(sandbox_id, float(body.timeout))
    info = await _owned_info(live, who, sandbox_id)
    return JSONResponse(M.created(info.id, template_id=info.template, secret=state.secret,
                                  domain=state.domain), status_code=201 if resumed else 200)


@router.post("/v2/sandboxes/{sandbox_id}/connect")
async def e2b_connect_v2(sandbox_id: SandboxId, live: Live, who: Who, state: State,
                     body: ConnectBody | None = None) -> JSONResponse:
    """E2B: connect to a sandbox, resuming it if paused (201 resumed, 200 running)."""
    return await _connect(sandbox_id, body, live, who, state)


@router.post("/sandboxes/{sandbox_id}/connect")
async def e2b_connect(sandbox_id: SandboxId, live: Live, who: Who, state: State,
                     body: ConnectBody | None = None) -> JSONResponse:
    """E2B: connect (older SDKs)."""
    return await _connect(sandbox_id, body, live, who, state)


@router.post("/sandboxes/{sandbox_id}/resume", status_code=201)
async def e2b_resume(sandbox_id: SandboxId, live: Live, who: Who, state: State,
                 body: ConnectBody | None = None) -> JSONResponse:
    """E2B: resume a paused sandbox (older SDKs; 409 when it is not paused)."""
    info = await _owned_info(live, who, sandbox_id)
    if info.state != "paused":
        raise SandboxStateError(f"sandbox {sandbox_id} is not paused")
    return await _connect(sandbox_id, body, live, who, state)


@router.get("/sandboxes/{sandbox_id}/metrics")
async def e2b_metrics(sandbox_id: SandboxId, live: Live, who: Who) -> list[dict[str, Any]]:
    """E2B: the sandbox's resource use, one sample taken now (docs/e2b.md says what each
    figure means on ember)."""
    info = await _owned_info(live, who, sandbox_id)
    usage = next((u for u in await live.local.list_usage() if u.id == sandbox_id), None)
    return [] if usage is None else [M.metric(info, usage)]


__all__ = ["router"]
