"""Templates between the nodes of a cluster (docs/cluster.md, "Templates across nodes"):
what a holder serves to a node that pulls (the manifest and each file of a template's
image directory, by digest) and the explicit pull (``ember cluster pull``), its progress
as NDJSON::

    {"event": "started", "name": "py"}
    {"event": "progress", "message": "pulling py ... from node ..."}
    {"event": "done", "template": {...}}   or   {"event": "error", "code", "message"}

All of it is the administrator's: another node's daemon asks with a vouch for the
administrator signed with the cluster's secret (:mod:`ember.cluster.vouch`), a person as
root on the socket or with an ``admin`` key; anyone else gets 404 as for an unknown route.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse

from ember.cluster.record import load_record
from ember.cluster.transfer import frames
from ember.daemon import cluster_templates as ct
from ember.daemon.auth import Principal
from ember.daemon.deps import Live, Who
from ember.daemon.models import Strict
from ember.daemon.routes_templates import NDJSON, template_job_events
from ember.errors import NotFoundError
from ember.sdk.results import TemplateInfo
from ember.sdk.template_ops import info as template_info

router = APIRouter(tags=["cluster"])
TemplateName = Path(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")


class TemplatePullRequest(Strict):
    #: Replace this node's template of that name when it has another digest.
    force: bool = False


def _admin(who: Principal) -> None:
    if not who.admin:
        raise NotFoundError("templates between nodes are the administrator's")


@router.get("/cluster/templates/{name}/manifest")
async def manifest(live: Live, who: Who, name: str = TemplateName) -> dict[str, Any]:
    """What this node holds of template ``name``: its digest, source, config and each file
    of its image directory with its size and the bytes of data it is sent as."""
    _admin(who)
    m = await asyncio.to_thread(ct.manifest_of, live.paths, live.mgr.store, name)
    return m.to_json()


@router.get("/cluster/images/{digest_hex}/{file}",
            responses={200: {"content": {"application/octet-stream": {}}}})
async def image_file(live: Live, who: Who,
                     digest_hex: str = Path(pattern=r"^[0-9a-f]{64}$"),
                     file: str = Path(pattern=r"^(meta\.json|rootfs\.ext4)$")
                     ) -> StreamingResponse:
    """One file of the image ``images/<digest>/``, as frames of its data regions
    (``offset u64 | length u64 | data``, big-endian, ended by a frame of length 0 at the
    file's size): a sparse image travels without its holes."""
    _admin(who)
    path = await asyncio.to_thread(ct.image_file, live.paths, digest_hex, file)
    return StreamingResponse(frames(path), media_type="application/octet-stream")


@router.post("/cluster/templates/{name}/pull", responses={200: {"content": {NDJSON: {}}}})
async def pull(body: TemplatePullRequest, live: Live, who: Who,
               name: str = TemplateName) -> StreamingResponse:
    """Fetch template ``name`` from a node of the cluster that holds it, check its digest
    and register it here (``ember cluster pull``); progress and result as NDJSON."""
    _admin(who)
    rec = await asyncio.to_thread(load_record, live.paths)
    if rec is None:
        raise NotFoundError("this node is in no cluster (ember cluster join)")
    cluster = rec

    async def pull_here(progress: Callable[[str], None]) -> TemplateInfo:
        return template_info(await asyncio.to_thread(
            ct.pull, live.paths, live.mgr.store, cluster, name, force=body.force,
            progress=progress))

    return template_job_events(name, pull_here, live.activity)


__all__ = ["router"]
