"""Files in a sandbox: download and upload streamed in bounded chunks whatever the size
(the body flows to the guest as it arrives, with backpressure), list, stat, mkdir, rename,
remove, and a directory's changes watched (an NDJSON stream)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, cast

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from ember import protocol as P
from ember.daemon.deps import Live, OwnedId
from ember.daemon.models import MkdirRequest, RemoveRequest, RenameRequest
from ember.errors import EmberError
from ember.sdk.async_sandbox import AsyncSandbox
from ember.sdk.watch import AsyncWatch, event_json
from ember.sdk.wire import error_body, event_line, to_json

router = APIRouter(tags=["files"])
#: A quiet watch sends a keep-alive line this often (proxies and clients keep it open).
WATCH_KEEPALIVE_S = 30.0
GuestPath = Annotated[str, Query(min_length=1, max_length=4096, description="absolute guest path")]


@router.get("/sandboxes/{sandbox_id}/files/content")
async def download(path: GuestPath, live: Live, sandbox_id: OwnedId) -> StreamingResponse:
    """A guest file's bytes, streamed as the guest sends them."""
    return await file_response(await live.get(sandbox_id), path)


async def file_response(sb: AsyncSandbox, path: str) -> StreamingResponse:
    """A guest file as a streamed answer (the E2B front's ``GET /files`` too)."""
    chunks = cast(AsyncGenerator[bytes, None], sb.files.read_chunks(path))
    first = await anext(chunks, b"")  # a missing file answers 404 before the 200 starts

    async def body() -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for c in chunks:
                yield c
        finally:
            await chunks.aclose()

    return StreamingResponse(body(), media_type="application/octet-stream")


@router.put("/sandboxes/{sandbox_id}/files/content")
async def upload(path: GuestPath, request: Request, live: Live, sandbox_id: OwnedId,
                 mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644) -> dict[str, int]:
    """Write the raw body to a guest file (created or truncated); answers its size."""
    sb = await live.get(sandbox_id)

    async def chunks() -> AsyncIterator[bytes]:
        async for c in request.stream():
            for i in range(0, len(c), P.MAX_DATA_PAYLOAD):
                yield c[i:i + P.MAX_DATA_PAYLOAD]

    return {"size": await sb.files.write_chunks(path, chunks(), mode=mode)}


@router.get("/sandboxes/{sandbox_id}/files/list")
async def list_dir(path: GuestPath, live: Live, sandbox_id: OwnedId) -> list[dict[str, Any]]:
    sb = await live.get(sandbox_id)
    return [to_json(e) for e in await sb.files.list(path)]


@router.get("/sandboxes/{sandbox_id}/files/stat")
async def stat(path: GuestPath, live: Live, sandbox_id: OwnedId) -> dict[str, Any]:
    sb = await live.get(sandbox_id)
    return to_json(await sb.files.stat(path))


@router.post("/sandboxes/{sandbox_id}/files/mkdir", status_code=204)
async def mkdir(body: MkdirRequest, live: Live, sandbox_id: OwnedId) -> Response:
    sb = await live.get(sandbox_id)
    await sb.files.mkdir(body.path, parents=body.parents)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/files/remove", status_code=204)
async def remove(body: RemoveRequest, live: Live, sandbox_id: OwnedId) -> Response:
    sb = await live.get(sandbox_id)
    await sb.files.remove(body.path, recursive=body.recursive)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/files/rename", status_code=204)
async def rename(body: RenameRequest, live: Live, sandbox_id: OwnedId) -> Response:
    sb = await live.get(sandbox_id)
    await sb.files.rename(body.src, body.dst)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox_id}/files/watch")
async def watch(path: GuestPath, live: Live, sandbox_id: OwnedId,
                recursive: bool = False) -> StreamingResponse:
    """A directory's changes as NDJSON: ``{"event": "watching"}`` once the watch is set
    (a missing directory answers 404 instead), then ``{"event": "fs", "name", "type"}``
    per change, ``{"event": "keepalive"}`` while quiet, and ``{"event": "end"}`` if the
    directory goes (or an ``error`` event). Closing the answer ends the watch."""
    sb = await live.get(sandbox_id)
    w = await sb.files.watch(path, recursive=recursive)
    return StreamingResponse(watch_lines(w), media_type="application/x-ndjson")


async def watch_lines(w: AsyncWatch) -> AsyncIterator[bytes]:
    try:
        yield event_line({"event": "watching"})
        while True:
            try:
                ev = await asyncio.wait_for(anext(w), WATCH_KEEPALIVE_S)
            except EmberError as err:  # before TimeoutError: some are both
                yield event_line({"event": "error", **error_body(err)["error"]})
                return
            except TimeoutError:
                yield event_line({"event": "keepalive"})
                continue
            except StopAsyncIteration:
                yield event_line({"event": "end"})
                return
            yield event_line(event_json(ev))
    finally:
        await w.close()
