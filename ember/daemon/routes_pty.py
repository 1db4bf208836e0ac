"""Interactive terminals over a WebSocket: ``/v1/sandboxes/{id}/pty``.

A WebSocket because a terminal needs both directions at once, keys in while output comes
out, with message framing for the few control messages. The exchange:

* client, first: a text message ``{"cmd": ..., "rows": 24, "cols": 80, "env": {},
  "cwd": null, "user": null}`` (``cmd`` null: a login shell);
* server: ``{"event": "started", "pid": N}``, then binary messages (what the terminal
  shows), and at the end ``{"event": "exit", "exit_code": N, ...}`` or ``{"event":
  "error", "code": ..., "message": ...}``, then it closes;
* client: binary messages (keys), text ``{"resize": {"rows": R, "cols": C}}`` or
  ``{"signal": N}``. When the client goes away, the command is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import MutableMapping
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from ember.daemon.auth import own_sandbox
from ember.daemon.deps import caller
from ember.daemon.live import LiveSandboxes
from ember.daemon.models import PtyControl, PtyRequest
from ember.errors import BadRequestError, EmberError
from ember.sdk.pty import AsyncPty
from ember.sdk.wire import error_body

router = APIRouter(tags=["commands"])
log = logging.getLogger("ember.daemon")
FIRST_MESSAGE_S = 30.0


async def _fail(ws: WebSocket, err: EmberError) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps({"event": "error", **error_body(err)["error"]}))
        await ws.close(code=1011 if not isinstance(err, BadRequestError) else 1008)


@router.websocket("/sandboxes/{sandbox_id}/pty")
async def pty(ws: WebSocket, sandbox_id: str) -> None:
    await ws.accept()
    live: LiveSandboxes = ws.app.state.live
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", sandbox_id):
        await _fail(ws, BadRequestError(f"invalid sandbox id {sandbox_id[:80]!r}"))
        return
    try:
        # a vouch from another node of the cluster, too; a key may need the cluster's
        # records read (ember.daemon.cluster_keys): off the event loop
        who = await asyncio.to_thread(caller, live, ws, "WS")
        own_sandbox(who, await asyncio.to_thread(live.mgr.get, sandbox_id))
        raw = await asyncio.wait_for(ws.receive_text(), FIRST_MESSAGE_S)
        req = PtyRequest.model_validate_json(raw)
        sb = await live.get(sandbox_id)
        term = await sb.pty(req.cmd, rows=req.rows, cols=req.cols, env=req.env, cwd=req.cwd,
                            user=req.user)
    except (ValidationError, ValueError, KeyError) as err:
        await _fail(ws, BadRequestError(f"invalid pty request: {str(err)[:500]}"))
        return
    except TimeoutError:
        await _fail(ws, BadRequestError(f"no pty request within {FIRST_MESSAGE_S:g} s"))
        return
    except EmberError as err:
        await _fail(ws, err)
        return
    except WebSocketDisconnect:
        return
    await ws.send_text(json.dumps({"event": "started", "pid": term.pid}))
    keys = asyncio.create_task(_keys(ws, term))
    try:
        async for chunk in term.output():
            await ws.send_bytes(chunk)
        code = await term.wait()
        await ws.send_text(json.dumps({"event": "exit", "exit_code": code}))
        await ws.close(code=1000)
    except EmberError as err:
        await _fail(ws, err)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away
    finally:
        keys.cancel()
        with contextlib.suppress(BaseException):
            await keys
        if term._proc.result is None:  # its client is gone: so is the command
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(term.kill()), 5.0)


async def _keys(ws: WebSocket, term: AsyncPty) -> None:
    """Client to terminal: keys, resizes and signals, until the client goes away."""
    try:
        while True:
            msg: MutableMapping[str, Any] = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                with contextlib.suppress(Exception):
                    await term.kill()
                return
            if msg.get("bytes"):
                await term.write(msg["bytes"])
            elif msg.get("text"):
                ctl = PtyControl.model_validate_json(msg["text"])
                if ctl.resize is not None:
                    await term.resize(ctl.resize.rows, ctl.resize.cols)
                if ctl.signal is not None:
                    await term.signal(ctl.signal)
    except (ValidationError, ValueError) as err:
        await _fail(ws, BadRequestError(f"invalid pty control message: {str(err)[:300]}"))
        with contextlib.suppress(Exception):
            await term.kill()
    except EmberError as err:
        log.info("pty input for %s failed: %s", term.pid, err)
