"""The daemon's HTTP application: routes that translate requests into runtime calls.

Every answer that is not a success is JSON ``{"error": {"code", "message"}}`` with the
stable code of an :class:`~ember.errors.EmberError` class, which the SDK raises again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

import ember
from ember.cluster.record import summary as cluster_summary
from ember.daemon import (
    API_VERSION,
    cluster_templates,
    routes_cluster_templates,
    routes_exec,
    routes_files,
    routes_ports,
    routes_pty,
    routes_sandboxes,
    routes_templates,
    routes_usage,
)
from ember.daemon.auth import Principal, Quotas, use_cluster_view
from ember.daemon.cluster_forward import ClusterForward, DirectoryCache
from ember.daemon.cluster_keys import ClusterKeys
from ember.daemon.cluster_watch import ClusterWatch, PlacedHere
from ember.daemon.deps import Who
from ember.daemon.errors import headers_for, status_for
from ember.daemon.live import LiveSandboxes
from ember.daemon.metrics import Metrics
from ember.daemon.middleware import EdgeMiddleware
from ember.daemon.models import PoolRequest
from ember.daemon.port_proxy import HostRouting, PortProxy, check_domain, domain_from_env
from ember.e2b import install as install_e2b
from ember.engine.doctor import diagnose
from ember.errors import BadRequestError, EmberError, NotFoundError
from ember.paths import Paths
from ember.runtime import reaper
from ember.sdk.wire import error_body, to_json

log = logging.getLogger("ember.daemon")


def create_app(paths: Paths, *, idle_exit: float | None = None,
               ports_domain: str | None = None) -> FastAPI:
    """The API of the daemon serving ``paths``' home (``idle_exit``: stop after that many
    seconds with no sandbox and no pool; see :func:`ember.runtime.reaper.supervise`;
    ``ports_domain``: exposed ports answer HTTP for ``<port>-<id>.<domain>``, default
    ``EMBER_PORTS_DOMAIN`` or localhost)."""
    live = LiveSandboxes(paths)
    metrics = Metrics(live.mgr)
    proxy = PortProxy(check_domain(ports_domain) if ports_domain else domain_from_env())
    placed, directory = PlacedHere(), DirectoryCache()
    watch = ClusterWatch(paths, live, placed, directory)  # fencing, lost records

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cluster_templates.on_start(paths, live.mgr.store)  # the directory: what is here
        stop = threading.Event()  # lifetimes and pool refills: the reaper's work, done here
        supervisor = threading.Thread(
            target=reaper.supervise, args=(paths, stop, _stop_this_process),
            kwargs={"idle_exit": idle_exit, "busy": live.activity.busy},
            name="ember-supervisor", daemon=True)
        supervisor.start()
        try:
            await live.restore_ports()
        except Exception:  # the API serves anyway; the ports can be exposed again
            log.exception("exposed ports of the previous daemon could not be restored")
        watching = asyncio.ensure_future(watch.run())
        try:
            yield
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watching
            stop.set()
            await live.close()
            await proxy.aclose()
            await app.state.e2b_ports.aclose()
            await asyncio.to_thread(supervisor.join, 30)

    app = FastAPI(title="ember daemon API", version=ember.__version__, lifespan=lifespan,
                  description="Sandboxes of one ember home: lifecycle, commands (output "
                  "streamed as NDJSON), files (streamed), snapshots. Errors are "
                  '{"error": {"code", "message"}} with a stable code.')
    app.state.live = live
    app.state.metrics = metrics
    app.state.quotas = Quotas(live.mgr.store)
    use_cluster_view(live.mgr.store, ClusterKeys(paths))  # the cluster's keys and limits
    app.state.proxy = proxy
    app.state.placed = placed
    app.state.directory = directory  # the cluster's, for lists across nodes (cluster_peers)
    app.add_middleware(ClusterForward, paths=paths,  # another node's sandboxes: there
                       directory=directory)
    app.add_middleware(EdgeMiddleware, activity=live.activity)
    app.add_middleware(HostRouting, domain=proxy.domain)  # before the edge
    install_e2b(app, paths, live, proxy.domain)  # E2B's API; envd's requests outermost

    @app.exception_handler(EmberError)
    async def ember_error(request: Request, err: EmberError) -> JSONResponse:
        metrics.errors.labels(err.code).inc()
        if status_for(err) >= 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, err)
        return JSONResponse(error_body(err), status_code=status_for(err),
                            headers=headers_for(err))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors()[:5]:
            loc = [str(x) for x in e.get("loc", ())]
            where = ".".join(loc[1:] if len(loc) > 1 and loc[0] == "body" else loc)
            given = e.get("input")
            shown = f"={given!r}"[:60] if isinstance(given, int | float | str | bool) else ""
            parts.append(f"{where}{shown}: {e.get('msg', 'invalid')}")
        bad = BadRequestError("invalid request: " + "; ".join(parts))
        metrics.errors.labels(bad.code).inc()
        return JSONResponse(error_body(bad), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        cls = NotFoundError if err.status_code in (404, 405) else BadRequestError
        e = cls(f"{request.method} {request.url.path}: {err.detail}")
        return JSONResponse(error_body(e), status_code=err.status_code)

    @app.get(f"/{API_VERSION}/health", tags=["daemon"])
    async def health(who: Who) -> dict[str, Any]:
        """The daemon answers: its version, pid and home, and who the caller is to it."""
        return {"ok": True, "tenant": who.tenant, "admin": who.admin,
                "version": ember.__version__, "api": API_VERSION, "pid": os.getpid(),
                "home": str(paths.home), "open": len(live.ids()),
                "cluster": cluster_summary(paths), "fence": watch.status()}

    @app.get("/metrics", tags=["daemon"], response_class=PlainTextResponse)
    async def prometheus(who: Who) -> Response:
        """Prometheus metrics (the administrator's)."""
        _admin(who, "metrics")
        data = await asyncio.to_thread(generate_latest, metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    @app.get(f"/{API_VERSION}/pools", tags=["pools"])
    async def pool_status(who: Who) -> list[dict[str, object]]:
        """Warm pools: size asked, members ready and starting, their memory."""
        _admin(who, "pools")
        return [to_json(p) for p in await live.local.list_pools()]

    @app.put(f"/{API_VERSION}/pools", tags=["pools"])
    async def pool_set(body: PoolRequest, who: Who) -> dict[str, object]:
        """Create or resize the warm pool of a template and shape (size 0 removes it);
        the daemon fills it in the background."""
        _admin(who, "pools")
        return to_json(await live.local.set_pool(body.template, body.size, vcpus=body.vcpus,
                                                 memory_mib=body.memory_mib,
                                                 disk_mib=body.disk_mib))

    @app.delete(f"/{API_VERSION}/pools/{{key:path}}", tags=["pools"], status_code=204)
    async def pool_remove(key: str, who: Who) -> Response:
        """Remove a pool (its key as listed) and destroy its ready members."""
        _admin(who, "pools")
        await live.local.remove_pool(key)
        return Response(status_code=204)

    @app.get(f"/{API_VERSION}/doctor", tags=["daemon"])
    async def doctor(who: Who) -> list[dict[str, Any]]:
        """What this host supports (KVM or TCG and why, tiers, cgroups, jail)."""
        _admin(who, "doctor")
        checks = await asyncio.to_thread(diagnose, home=paths.home)
        return [{"name": c.name, "ok": c.ok, "detail": c.detail, "fix": c.fix}
                for c in checks]

    app.include_router(routes_sandboxes.router, prefix=f"/{API_VERSION}")
    app.include_router(routes_exec.router, prefix=f"/{API_VERSION}")
    app.include_router(routes_files.router, prefix=f"/{API_VERSION}")
    app.include_router(routes_pty.router, prefix=f"/{API_VERSION}")
    app.include_router(routes_usage.router, prefix=f"/{API_VERSION}")
    app.include_router(routes_ports.router, prefix=f"/{API_VERSION}")
    app.include_router(routes_templates.router, prefix=f"/{API_VERSION}")
    app.include_router(routes_cluster_templates.router, prefix=f"/{API_VERSION}")
    return app


def _admin(who: Principal, what: str) -> None:
    if not who.admin:
        raise NotFoundError(f"{what} is for the administrator")


def _stop_this_process() -> None:
    """The daemon's home was removed, or it idled out: nothing is left to serve."""
    os.kill(os.getpid(), signal.SIGTERM)
