"""E2B's sandbox URLs: what ``sandbox.get_host(port)`` names, ``<port>-<id>.<domain>``
(and the same port addressed by the ``E2b-Sandbox-Id`` / ``E2b-Sandbox-Port`` headers),
for any guest port but envd's and the code interpreter's, which the daemon answers itself.

A sandbox made through E2B's API serves its ports the way E2B's do: to anyone who reaches
the daemon's listener, unless it was created with ``network.allowPublicTraffic: false``;
then a request needs its ``e2b-traffic-access-token``. The request is carried to the
guest's loopback by the agent (:mod:`ember.runtime.guest_port`), so a sandbox without a
network device serves ports too. Sandboxes made with ember's own API are left to its own
port route (``ember.daemon.port_proxy``: exposed ports, ember's credentials).

Errors come in E2B's shape, ``{"code", "message"}`` (plus ``sandboxId`` and ``port``), as
its proxy answers: 502 for a port nothing listens on, a gone or paused sandbox, 403 for a
missing or wrong traffic token, 504 when the guest's server does not answer in time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpcore
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ember.daemon.live import LiveSandboxes
from ember.daemon.port_proxy import (
    IO_TIMEOUT_S,
    MAX_RESPONSE_HEADER_BYTES,
    parse_host,
    response_headers,
    upstream_headers,
)
from ember.e2b import mapping as M
from ember.e2b.state import E2bState
from ember.errors import EmberError, PortNotOpenError, SandboxNotFoundError
from ember.runtime.guest_port import GuestConnection

log = logging.getLogger("ember.daemon")
access = logging.getLogger("ember.daemon.access")

#: Ports the daemon answers itself (envd, the code interpreter): never carried.
OWN_PORTS = frozenset({M.ENVD_PORT, 49999})
TRAFFIC_HEADER = b"e2b-traffic-access-token"
#: Connections to guest servers at once (all sandboxes), kept alive when idle, and for how
#: long (each holds a connection in its guest and one of its agent's 256).
MAX_CONNECTIONS = 256
MAX_KEPT_ALIVE = 32
KEEPALIVE_S = 5.0
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# --- pure parts ---------------------------------------------------------------------------
def port_target(headers: list[tuple[bytes, bytes]], domain: str) -> tuple[str, int] | None:
    """``(sandbox id, guest port)`` a request addresses: by E2B's sandbox headers, else by
    ``Host: <port>-<id>.<domain>``; None for anything else (and for the daemon's own
    ports)."""
    named = {k.lower(): v for k, v in headers}
    sid, port = named.get(b"e2b-sandbox-id"), named.get(b"e2b-sandbox-port")
    hit: tuple[str, int] | None = None
    if sid is not None and port is not None:
        text = port.decode("latin-1").strip()
        if text.isdigit() and 1 <= int(text) <= 65535 and _ID.match(sid.decode("latin-1")):
            hit = (sid.decode("latin-1"), int(text))
    elif b"host" in named:
        hit = parse_host(named[b"host"].decode("latin-1"), domain)
    if hit is None or hit[1] in OWN_PORTS:
        return None
    return hit


def e2b_error(status: int, message: str, sandbox_id: str, port: int) -> JSONResponse:
    return JSONResponse({"code": status, "message": message, "sandboxId": sandbox_id,
                         "port": port}, status_code=status)


# --- the ASGI layer -----------------------------------------------------------------------
class E2bPortRouting:
    """ASGI layer: requests for a port of a sandbox made through E2B's API are carried to
    the guest; all others pass (ember's own port route answers its sandboxes' ports)."""

    def __init__(self, app: ASGIApp, ports: E2bPorts, domain: str) -> None:
        self.app = app
        self.ports = ports
        self.domain = domain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            target = port_target(list(scope.get("headers") or ()), self.domain)
            if target is not None:
                response = await self.ports.answer(target, scope, receive)
                if response is not None:
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class E2bPorts:
    def __init__(self, live: LiveSandboxes, state: E2bState) -> None:
        self.live = live
        self.state = state
        # Kept-alive connections to guest servers, by (sandbox, port): a carried
        # connection costs the agent a connect and two threads, which a TCG guest feels.
        self._pool = httpcore.AsyncConnectionPool(
            network_backend=_GuestBackend(live), max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_KEPT_ALIVE, keepalive_expiry=KEEPALIVE_S,
            retries=0)

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def answer(self, target: tuple[str, int], scope: Scope,
                     receive: Receive) -> Response | None:
        """The answer to a request for ``target``; None when the sandbox is not one of
        E2B's (or not known: ember's own route then says so)."""
        sid, port = target
        try:
            rec = await asyncio.to_thread(self.live.mgr.get, sid)
        except SandboxNotFoundError:
            return None
        mode = rec.metadata.get(M.PORTS_KEY)
        if mode is None:
            return None
        t0 = time.monotonic()
        headers = {k.lower(): v for k, v in scope.get("headers") or ()}
        token = headers.get(TRAFFIC_HEADER)
        if mode != M.PORTS_PUBLIC and not M.traffic_token_matches(
                self.state.secret, rec.id, token.decode("latin-1") if token else None):
            response: Response = e2b_error(
                403, f"sandbox {rec.id}'s ports are private: send its traffic access token "
                     "in e2b-traffic-access-token", rec.id, port)
        else:
            response = await self._forward(rec.id, port, scope, receive)
        access.info("e2b-port %s:%d %s %s %d %.1fms", rec.id, port, scope.get("method"),
                    scope.get("path"), response.status_code, (time.monotonic() - t0) * 1000)
        return response

    async def _forward(self, sid: str, port: int, scope: Scope, receive: Receive) -> Response:
        headers, has_body = upstream_headers(scope, prefix=None)
        query: bytes = scope.get("query_string", b"")
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        request = httpcore.Request(
            scope["method"],
            httpcore.URL(scheme=b"http", host=sid.encode(), port=port,
                         target=raw_path + (b"?" + query if query else b"")),
            headers=headers,
            content=_body(Request(scope, receive)) if has_body else None,
            extensions={"timeout": {"connect": IO_TIMEOUT_S, "read": IO_TIMEOUT_S,
                                    "write": IO_TIMEOUT_S, "pool": IO_TIMEOUT_S}})
        try:
            answer = await self._pool.handle_async_request(request)
        except PortNotOpenError:
            return e2b_error(502, f"the sandbox is running but port {port} is not open",
                             sid, port)
        except SandboxNotFoundError:
            return e2b_error(502, f"sandbox {sid} was not found", sid, port)
        except EmberError as err:  # gone, paused, broken
            return e2b_error(502, f"sandbox {sid} cannot be reached: {err}", sid, port)
        except httpcore.TimeoutException:
            return e2b_error(504, f"port {port} did not answer within {IO_TIMEOUT_S:g} s",
                             sid, port)
        except (httpcore.NetworkError, httpcore.ProtocolError) as err:
            return e2b_error(502, f"port {port} answered no HTTP: {type(err).__name__}: "
                                  f"{err}"[:500], sid, port)
        if sum(len(k) + len(v) + 4 for k, v in answer.headers) > MAX_RESPONSE_HEADER_BYTES:
            await answer.aclose()
            return e2b_error(502, f"port {port} answered with headers over "
                                  f"{MAX_RESPONSE_HEADER_BYTES} bytes", sid, port)
        out = StreamingResponse(_relay(answer, f"port {port} of {sid}"),
                                status_code=answer.status)
        out.raw_headers = response_headers(list(answer.headers))
        return out


class _GuestBackend(httpcore.AsyncNetworkBackend):
    """httpcore's connections, made by the agent: the URL's host is the sandbox's id."""

    def __init__(self, live: LiveSandboxes) -> None:
        self.live = live

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        sb = await self.live.get(host)
        return _CarriedStream(await sb._connect_port(port))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("guest ports are TCP")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _CarriedStream(httpcore.AsyncNetworkStream):
    """httpcore's view of a carried connection."""

    def __init__(self, conn: GuestConnection) -> None:
        self._conn = conn
        self._buf = b""

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if not self._buf:
            try:
                self._buf = await asyncio.wait_for(self._conn.read(), timeout)
            except TimeoutError:
                raise httpcore.ReadTimeout(f"nothing from the guest within {timeout} s") \
                    from None
            except EmberError as err:
                raise httpcore.ReadError(str(err)) from err
        out, self._buf = self._buf[:max_bytes], self._buf[max_bytes:]
        return out

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._conn.write(bytes(buffer)), timeout)
        except TimeoutError:
            raise httpcore.WriteTimeout(f"the guest took no input within {timeout} s") \
                from None
        except EmberError as err:
            raise httpcore.WriteError(str(err)) from err

    async def aclose(self) -> None:
        await self._conn.aclose()

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no TLS to a guest port: the daemon's listener has it")

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # asked of an idle kept-alive connection: is it closed?
            return bool(self._buf) or self._conn.readable()
        return None


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


async def _relay(answer: httpcore.Response, what: str) -> AsyncIterator[bytes]:
    """The guest's answer body as it arrives; cut (not failed) if the guest stops. Its
    connection goes back to the pool (or is closed, if the answer was cut)."""
    try:
        async for chunk in answer.aiter_stream():
            yield chunk
    except httpcore.TimeoutException as err:
        log.info("%s: answer cut: %s", what, err)
    except (httpcore.NetworkError, httpcore.ProtocolError) as err:
        log.info("%s: answer cut: %s: %s", what, type(err).__name__, err)
    finally:
        await answer.aclose()


__all__ = ["E2bPortRouting", "E2bPorts", "port_target"]
