"""Templates: list (everyone: templates are shared read-only), build with progress
streamed as NDJSON, and remove (the administrator's).

A build runs in a thread of the daemon, as root (debootstrap, image tools) and reads
sources on the daemon's host (``dir:``, ``oci-layout:``) or fetched by it (``registry:``),
so builds are the administrator's: a tenant's request answers 404 as for an unknown route.
A build goes on when its client disconnects (its template is registered when it ends);
the events are::

    {"event": "started", "name": "py"}
    {"event": "progress", "message": "debootstrap bookworm ..."}
    {"event": "done", "template": {...}}   or   {"event": "error", "code", "message"}
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Path, Response
from fastapi.responses import StreamingResponse

from ember.daemon.activity import Activity
from ember.daemon.auth import Principal
from ember.daemon.cluster_templates import publish_async
from ember.daemon.deps import Live, Who
from ember.daemon.models import TemplateBuildRequest
from ember.errors import BadRequestError, EmberError, NotFoundError, TemplateNotFoundError
from ember.net.policy import NetworkPolicy
from ember.sdk.results import DockerfileOptions, TemplateInfo
from ember.sdk.wire import error_body, event_line, to_json

router = APIRouter(tags=["templates"])
NDJSON = "application/x-ndjson"
#: Progress lines kept for a slow (or gone) reader; beyond it the oldest news is dropped.
MAX_QUEUED = 1024


def _admin(who: Principal) -> None:
    if not who.admin:
        raise NotFoundError("template builds are for the administrator")


@router.get("/templates")
async def templates(live: Live, who: Who) -> list[dict[str, Any]]:
    """The templates sandboxes can be created from."""
    return [to_json(i) for i in await live.local.list_templates()]


@router.post("/templates", responses={200: {"content": {NDJSON: {}}}})
async def build(body: TemplateBuildRequest, live: Live, who: Who) -> StreamingResponse:
    """Build a template (``ember image build``); its progress and result as NDJSON."""
    _admin(who)
    if not body.force:
        with contextlib.suppress(TemplateNotFoundError):
            await asyncio.to_thread(live.mgr.store.get_template, body.name)
            raise BadRequestError(f"template {body.name!r} exists already (use force)")
    d = body.dockerfile
    opts = None if d is None else DockerfileOptions(
        file=d.file, build_args=dict(d.build_args), target=d.target, no_cache=d.no_cache,
        vcpus=d.vcpus, memory_mib=d.memory_mib,
        network=None if d.network is None else NetworkPolicy.from_json(d.network).to_json())
    async def build_and_publish(progress: Callable[[str], None]) -> TemplateInfo:
        info = await live.local.build_template(
            body.name, body.source, packages=body.packages, force=body.force,
            rebuild=body.rebuild, free_mib=body.free_mib, on_progress=progress,
            dockerfile=opts)
        await publish_async(live.paths, live.mgr.store)  # on a cluster: it is here now
        return info

    return template_job_events(body.name, build_and_publish, live.activity)


def template_job_events(
        name: str, start: Callable[[Callable[[str], None]], Awaitable[TemplateInfo]],
        activity: Activity) -> StreamingResponse:
    """Run a template job (a build, a pull) as a task that goes on if the client leaves
    (holding ``activity`` until it ends: the daemon is not idle meanwhile):
    ``start(progress)``, where ``progress`` may be called from any thread. Its progress and
    result (or error) as NDJSON events: ``started``, ``progress``..., ``done`` or
    ``error``. At most :data:`MAX_QUEUED` lines wait for a slow reader (the oldest go)."""
    loop = asyncio.get_running_loop()
    news: asyncio.Queue[bytes | None] = asyncio.Queue(MAX_QUEUED)

    def tell(line: bytes | None) -> None:  # in the loop; the end (None) always gets in
        if news.full():
            news.get_nowait()
        news.put_nowait(line)

    def progress(msg: str) -> None:  # called in the job's thread
        loop.call_soon_threadsafe(tell, event_line({"event": "progress",
                                                    "message": msg[:2000]}))

    async def held() -> TemplateInfo:
        with activity.hold():
            return await start(progress)

    job = asyncio.ensure_future(held())
    job.add_done_callback(lambda _: tell(None))

    async def events() -> AsyncIterator[bytes]:
        yield event_line({"event": "started", "name": name})
        while (line := await news.get()) is not None:
            yield line
        err = job.exception()
        if err is None:
            yield event_line({"event": "done", "template": to_json(job.result())})
        elif isinstance(err, EmberError):
            yield event_line({"event": "error", **error_body(err)["error"]})
        else:
            yield event_line({"event": "error", "code": "internal",
                              "message": f"{type(err).__name__}: {err}"})

    return StreamingResponse(events(), media_type=NDJSON)


@router.post("/templates/prune")
async def prune(live: Live, who: Who) -> dict[str, Any]:
    """Remove the Dockerfile step cache entries no template uses (``ember image prune``)."""
    _admin(who)
    return to_json(await live.local.prune_build_cache())


@router.delete("/templates/{name}", status_code=204)
async def remove(live: Live, who: Who,
                 name: str = Path(min_length=1, max_length=63)) -> Response:
    """Remove a template (refused while sandboxes use it)."""
    _admin(who)
    await live.local.delete_template(name)
    await publish_async(live.paths, live.mgr.store)  # on a cluster: no longer here
    return Response(status_code=204)


@router.delete("/templates/{name}/snapshots")
async def drop_snapshots(live: Live, who: Who,
                         name: str = Path(min_length=1, max_length=63)) -> dict[str, Any]:
    """Remove a template's template snapshots (those live sandboxes use stay until they
    are gone); the next create of it boots and makes a new one."""
    _admin(who)
    return {"removed": await live.local.drop_template_snapshots(name)}


__all__ = ["router"]
