"""Files in a sandbox: download and upload streamed in bounded chunks whatever the size
(the body flows to the guest as it arrives, with backpressure), list, stat, mkdir, rename,
remove."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, cast

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from ember import protocol as P
from ember.daemon.deps import Live, OwnedId
from ember.daemon.models import MkdirRequest, RemoveRequest, RenameRequest
from ember.sdk.async_sandbox import AsyncSandbox
from ember.sdk.wire import to_json

router = APIRouter(tags=["files"])
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
