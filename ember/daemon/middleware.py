"""ASGI middleware at the edge: bounded request bodies, request ids, access logs.

JSON bodies are small: beyond :data:`MAX_JSON_BODY` a request is refused (413) before or
while it is read, so that a client cannot make the daemon buffer more. File uploads are
the one exception: they stream through to the guest in bounded chunks, whatever their size.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.daemon.activity import Activity
from ember.daemon.port_proxy import proxied
from ember.errors import BadRequestError
from ember.sdk.wire import error_body, event_line

MAX_JSON_BODY = 2 << 20
#: Request line and headers together; h11 bounds what it buffers incomplete, this bounds
#: what arrives complete in one read.
MAX_HEADER_BYTES = 32 * 1024
access = logging.getLogger("ember.daemon.access")


def _streamed(scope: Scope) -> bool:
    """Requests whose body streams through (uploads, stdin, HTTP to an exposed port),
    unbounded in total."""
    path: str = scope.get("path", "")
    return path.endswith("/files/content") or path.endswith("/stdin") or proxied(path)


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, activity: Activity | None = None) -> None:
        self.app = app
        #: Held while a request runs (a daemon started on demand is not idle meanwhile).
        self.activity = activity or Activity()
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # the app's whole life: not work in progress
            await self.app(scope, receive, send)
            return
        with self.activity.hold():  # a request or a websocket, while it runs
            if scope["type"] != "http":
                await self.app(scope, receive, send)
            else:
                await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = f"{self._prefix}-{next(self._ids)}"
        t0 = time.monotonic()
        status = [0]
        limit = None if _streamed(scope) else MAX_JSON_BODY
        raw_headers = scope.get("headers") or []
        if sum(len(k) + len(v) + 4 for k, v in raw_headers) > MAX_HEADER_BYTES:
            await _refuse(send, rid, MAX_HEADER_BYTES, status=431,
                          what="request headers larger than")
            self._log(scope, rid, 431, t0)
            return
        headers = dict(raw_headers)
        declared = headers.get(b"content-length")
        if limit is not None and declared is not None and declared.isdigit() \
                and int(declared) > limit:
            await _refuse(send, rid, limit)
            self._log(scope, rid, 413, t0)
            return
        seen = [0]
        over = [False]

        async def bounded_receive() -> Message:
            if over[0]:
                return {"type": "http.disconnect"}
            msg = await receive()
            if limit is not None and msg["type"] == "http.request":
                seen[0] += len(msg.get("body", b""))
                if seen[0] > limit:  # the app sees a cut body; its answer becomes a 413
                    over[0] = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return msg

        async def tagged_send(msg: Message) -> None:
            if over[0]:
                if msg["type"] == "http.response.start" and status[0] == 0:
                    status[0] = 413
                    await _refuse(send, rid, limit or 0)
                return
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []),
                                          (b"x-request-id", rid.encode())]}
            await send(msg)

        try:
            await self.app(scope, bounded_receive, tagged_send)
        finally:
            self._log(scope, rid, status[0], t0)

    @staticmethod
    def _log(scope: Scope, rid: str, status: int, t0: float) -> None:
        access.info("%s %s %s %d %.1fms", rid, scope.get("method", "?"),
                    scope.get("path", "?"), status, (time.monotonic() - t0) * 1000,
                    extra={"request_id": rid})


async def _refuse(send: Send, rid: str, limit: int, *, status: int = 413,
                  what: str = "request body larger than") -> None:
    hint = " (files go through /files/content)" if status == 413 else ""
    body: dict[str, Any] = error_body(BadRequestError(f"{what} {limit} bytes{hint}"))
    data = event_line(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"x-request-id", rid.encode())]})
    await send({"type": "http.response.body", "body": data})
