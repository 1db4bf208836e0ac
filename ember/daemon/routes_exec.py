"""Commands: run to completion with output streamed as NDJSON, background processes
(spawn, output, stdin, signals), the process list.

Output is NDJSON (one JSON event per line, ``application/x-ndjson``): it streams over plain
HTTP/1.1 chunked responses that every client, proxy and ``curl`` handles, needs no upgrade
(unlike WebSocket, kept for the PTY, which needs both directions at once), and carries the
exit status as one more event (SSE would add its own framing for nothing). Events::

    {"event": "started", "pid": 42}
    {"event": "stdout", "data": "<base64>"}     {"event": "stderr", "data": "<base64>"}
    {"event": "exit", "exit_code": 0, "signal": null, "timed_out": false, "truncated": false,
     "duration": 0.01, "pid": 42}
    {"event": "error", "code": "command_timeout", "message": "..."}
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import StreamingResponse

from ember.daemon.deps import Live, Meter, OwnedId
from ember.daemon.models import ExecRequest, SignalRequest, SpawnRequest
from ember.errors import BadRequestError, EmberError
from ember.sdk.process import AsyncProcess
from ember.sdk.wire import EVENT_CHUNK, error_body, event_line, output_event, to_json

router = APIRouter(tags=["commands"])
log = logging.getLogger("ember.daemon")
NDJSON = "application/x-ndjson"
Pid = Path(ge=1, le=1 << 22, description="the process id in the guest")


def _exit_event(proc: AsyncProcess) -> bytes:
    r = proc.result
    assert r is not None
    return event_line({"event": "exit", "exit_code": r.exit_code, "signal": r.signal,
                       "timed_out": r.timed_out, "truncated": r.truncated,
                       "duration": r.duration, "pid": r.pid})


async def _events(proc: AsyncProcess, *, kill_on_disconnect: bool,
                  on_end: Any = None) -> AsyncIterator[bytes]:
    """A process's output as NDJSON, ending with its exit (or an error event)."""
    try:
        yield event_line({"event": "started", "pid": proc.pid})
        try:
            async for chunk in proc.output():
                for i in range(0, len(chunk.data), EVENT_CHUNK):
                    yield output_event(chunk.stream, chunk.data[i:i + EVENT_CHUNK])
        except EmberError as err:
            yield event_line({"event": "error", **error_body(err)["error"]})
            return
        yield _exit_event(proc)
    finally:
        if proc.result is None and kill_on_disconnect:  # the client went away: so does it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(proc.kill()), 5.0)
        if on_end is not None:
            on_end()


@router.post("/sandboxes/{sandbox_id}/exec")
async def exec_(body: ExecRequest, live: Live, meter: Meter,
                sandbox_id: OwnedId) -> StreamingResponse:
    """Run a command to completion; its output streams back as NDJSON events as produced.
    If the client disconnects first, the command is killed."""
    t0 = time.monotonic()
    stdin = None
    if body.stdin is not None:
        try:
            stdin = base64.b64decode(body.stdin, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequestError("stdin must be base64") from None
    sb = await live.get(sandbox_id)
    proc = await sb._spawn(body.cmd, env=body.env, cwd=body.cwd, user=body.user,
                           stdin=stdin is not None, timeout=body.timeout, keep_output=False)
    if stdin is not None:
        await proc.write_stdin(stdin)
        await proc.close_stdin()

    def done() -> None:
        meter.latency.labels("exec").observe(time.monotonic() - t0)

    return StreamingResponse(_events(proc, kill_on_disconnect=True, on_end=done),
                             media_type=NDJSON)


@router.post("/sandboxes/{sandbox_id}/processes", status_code=201)
async def spawn(body: SpawnRequest, live: Live, sandbox_id: OwnedId) -> dict[str, int]:
    """Start a command in the background; read its output with GET .../output."""
    sb = await live.get(sandbox_id)
    proc = await sb._spawn(body.cmd, env=body.env, cwd=body.cwd, user=body.user,
                           stdin=body.stdin, timeout=body.timeout, keep_output=False)
    live.keep_process(sandbox_id, proc)
    return {"pid": proc.pid}


@router.get("/sandboxes/{sandbox_id}/processes")
async def processes(live: Live, sandbox_id: OwnedId) -> list[dict[str, Any]]:
    """Processes the agent started (running and recently ended)."""
    sb = await live.get(sandbox_id)
    return [to_json(p) for p in await sb.processes()]


@router.get("/sandboxes/{sandbox_id}/processes/{pid}/output")
async def output(live: Live, sandbox_id: OwnedId, pid: int = Pid) -> StreamingResponse:
    """A background process's output as NDJSON, from where the last reader stopped, to its
    exit. A reader that disconnects leaves the process running."""
    proc = live.process(sandbox_id, pid)

    def done() -> None:
        if proc.result is not None:
            live.drop_process(sandbox_id, pid)

    return StreamingResponse(_events(proc, kill_on_disconnect=False, on_end=done),
                             media_type=NDJSON)


@router.post("/sandboxes/{sandbox_id}/processes/{pid}/stdin", status_code=204)
async def stdin(request: Request, live: Live, sandbox_id: OwnedId,
                pid: int = Pid) -> Response:
    """Bytes for the process's stdin (the raw body, streamed through)."""
    proc = live.process(sandbox_id, pid)
    async for chunk in request.stream():
        for i in range(0, len(chunk), EVENT_CHUNK):
            await proc.write_stdin(chunk[i:i + EVENT_CHUNK])
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/processes/{pid}/close-stdin", status_code=204)
async def close_stdin(live: Live, sandbox_id: OwnedId, pid: int = Pid) -> Response:
    await live.process(sandbox_id, pid).close_stdin()
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/processes/{pid}/signal", status_code=204)
async def signal(body: SignalRequest, live: Live, sandbox_id: OwnedId,
                 pid: int = Pid) -> Response:
    await live.process(sandbox_id, pid).signal(body.signal)
    return Response(status_code=204)
