"""HTTP to an exposed port through the daemon's own listener (docs/networking.md, "Exposed
ports").

Two addresses reach the same exposed guest port, both behind the daemon's authentication:

* by path: ``/v1/sandboxes/{id}/ports/{port}/http/{rest}``, a route like any other;
* by host: a request whose ``Host`` is ``<port>-<id>.<domain>`` (``:port`` allowed),
  whatever its path: :class:`HostRouting`, an ASGI layer in front of the application,
  rewrites it into the path form, so that both forms share one route, one owner check and
  one proxy. The domain is ``EMBER_PORTS_DOMAIN`` (or ``--ports-domain``; default
  ``localhost``).

The ember credential of a proxied request is ``X-Ember-Authorization`` when that header is
present (even empty: then the Unix socket's peer decides), else ``Authorization``; the one
ember used never reaches the guest, so an API key is never handed to sandbox code.

:class:`PortProxy` carries a request to the exposed port's listener on this host (so that
it counts as traffic for scale to zero, and wakes an idle-paused sandbox) with a fresh
connection each time: bodies stream both ways, hop-by-hop headers are dropped,
``X-Forwarded-*`` added. No WebSocket upgrade: a WebSocket goes to the exposed port's host
address instead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ember.daemon import API_VERSION
from ember.errors import BadRequestError, EmberTimeoutError, NetworkError
from ember.net.forward import Exposed
from ember.sdk.wire import error_body

log = logging.getLogger("ember.daemon")

DEFAULT_DOMAIN = "localhost"
#: Waiting for the exposed port: its connection (a paused sandbox is resumed first), and
#: each read and write of a request or an answer (an answer's head included).
CONNECT_TIMEOUT_S = 30.0
IO_TIMEOUT_S = 120.0
#: The guest's answer head: request heads are bounded at the edge (middleware), answer
#: heads by httpcore (100 KiB incomplete) and then here, complete.
MAX_RESPONSE_HEADER_BYTES = 64 * 1024
#: Proxied requests carried at once (beyond it they wait for a slot, then time out: 504).
MAX_UPSTREAM = 256
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
#: The credential header of a proxied request, when the guest's app wants Authorization.
EMBER_AUTH = b"x-ember-authorization"
#: Where :class:`HostRouting` leaves what a request said about itself, for the proxy.
APP_AUTH_KEY = "ember.app_authorization"
HOST_FORM_KEY = "ember.port_host"

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection"})
_PREFIX = re.compile(rf"^/{API_VERSION}/sandboxes/([A-Za-z0-9_.-]{{1,64}})/ports/"
                     r"([0-9]{1,5})/http(?=/|$|\?)")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOST_PORT = re.compile(r"^([0-9]{1,5})-([a-z0-9_-]{1,64})$")


# --- pure parts (no I/O) ------------------------------------------------------------------
def check_domain(domain: str) -> str:
    """The ports domain, lower case; BadRequestError unless it is a DNS name."""
    d = domain.strip().lower().rstrip(".")
    if not d or len(d) > 200 or not all(_LABEL.match(label) for label in d.split(".")):
        raise BadRequestError(f"the ports domain must be a DNS name (like localhost or "
                              f"ports.example.com), not {domain!r}")
    return d


def domain_from_env() -> str:
    return check_domain(os.environ.get("EMBER_PORTS_DOMAIN") or DEFAULT_DOMAIN)


def host_name(sandbox_id: str, port: int, domain: str) -> str:
    """The ``Host`` that reaches ``port`` of the sandbox through the daemon."""
    return f"{port}-{sandbox_id.lower()}.{domain}"


def http_path(sandbox_id: str, port: int) -> str:
    """The path prefix that reaches ``port`` of the sandbox through the daemon."""
    return f"/{API_VERSION}/sandboxes/{sandbox_id}/ports/{port}/http"


def parse_host(host: str, domain: str) -> tuple[str, int] | None:
    """``(sandbox id, guest port)`` of a ``Host`` header ``<port>-<id>.<domain>[:port]``,
    else None (any other host: the daemon's own API)."""
    if len(host) > 300:
        return None
    name = host.strip().lower()
    if name.startswith("["):  # an IPv6 literal is never a port's name
        return None
    name, _, port = name.partition(":")
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    suffix = "." + domain
    if not name.endswith(suffix):
        return None
    m = _HOST_PORT.match(name[:-len(suffix)])
    if m is None or not 1 <= int(m.group(1)) <= 65535:
        return None
    return m.group(2), int(m.group(1))


def proxied(path: str) -> bool:
    """Whether a request path is a proxied one (its body streams through, unbounded)."""
    return _PREFIX.match(path) is not None


def upstream_target(raw_path: bytes, query: bytes) -> bytes:
    """What the guest is asked for: the request's path after the proxy prefix (``/`` if
    none), and its query, as the client sent them (still percent-encoded)."""
    m = _PREFIX.match(raw_path.decode("latin-1"))
    rest = raw_path[m.end():] if m else raw_path
    return (rest or b"/") + (b"?" + query if query else b"")


def _connection_listed(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names a ``Connection`` header makes hop-by-hop."""
    named: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            named |= {t.strip().lower() for t in v.split(b",") if t.strip()}
    return named


def request_headers(headers: list[tuple[bytes, bytes]], *, app_authorization: bytes | None,
                    client: str | None, scheme: str, prefix: str | None
                    ) -> list[tuple[bytes, bytes]]:
    """The headers the guest gets: the client's, less hop-by-hop ones and ember's
    credentials (``app_authorization``: the client's own Authorization, meant for the
    guest), with ``X-Forwarded-For/Proto/Host`` (and ``-Prefix`` for the path form)."""
    drop = HOP_BY_HOP | _connection_listed(headers) | {
        b"authorization", EMBER_AUTH, b"x-forwarded-for", b"x-forwarded-proto",
        b"x-forwarded-host", b"x-forwarded-prefix", b"forwarded"}
    out = [(k.lower(), v) for k, v in headers if k.lower() not in drop]
    if app_authorization is not None:
        out.append((b"authorization", app_authorization))
    earlier = [v for k, v in headers if k.lower() == b"x-forwarded-for"]
    if client:
        out.append((b"x-forwarded-for", b", ".join([*earlier, client.encode()])))
    elif earlier:
        out.append((b"x-forwarded-for", b", ".join(earlier)))
    out.append((b"x-forwarded-proto", scheme.encode()))
    host = next((v for k, v in headers if k.lower() == b"host"), None)
    if host is not None:
        out.append((b"x-forwarded-host", host))
    if prefix is not None:
        out.append((b"x-forwarded-prefix", prefix.encode()))
    return out


def upstream_headers(scope: Scope, *, prefix: str | None
                     ) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The headers a proxied request carries to the guest (:func:`request_headers`, its
    body chunked when its length is not known), and whether it has a body at all."""
    client = scope.get("client")
    peer = str(client[0]) if isinstance(client, tuple | list) and client and \
        isinstance(client[0], str) and client[0] != "unix-peer-uid" else None
    headers = request_headers(list(scope.get("headers") or []),
                              app_authorization=scope.get(APP_AUTH_KEY), client=peer,
                              scheme=scope.get("scheme", "http"), prefix=prefix)
    has_body = any(k in (b"content-length", b"transfer-encoding")
                   for k, _ in scope.get("headers") or [])
    if not any(k == b"content-length" for k, _ in headers) and has_body:
        headers.append((b"transfer-encoding", b"chunked"))
    return headers, has_body


def response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The guest's answer headers the client gets: hop-by-hop ones dropped."""
    drop = HOP_BY_HOP | _connection_listed(headers)
    return [(k.lower(), v) for k, v in headers if k.lower() not in drop]


def rewrite_host_form(scope: Scope, domain: str) -> Scope:
    """A request for ``<port>-<id>.<domain>`` turned into the path form (any other one as it
    is); ember's credential taken from ``X-Ember-Authorization`` when present."""
    headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or [])
    host = next((v for k, v in headers if k == b"host"), b"").decode("latin-1")
    hit = parse_host(host, domain) if host else None
    path: str = scope.get("path", "")
    if hit is None and not proxied(path):
        return scope
    scope = dict(scope)
    if hit is not None:
        sandbox_id, port = hit
        prefix = http_path(sandbox_id, port)
        scope["path"] = prefix + path
        scope["raw_path"] = prefix.encode() + (scope.get("raw_path") or path.encode())
        scope[HOST_FORM_KEY] = True
    ember_auth = next((v for k, v in headers if k == EMBER_AUTH), None)
    if ember_auth is not None:  # Authorization, if any, is the guest's
        scope[APP_AUTH_KEY] = next((v for k, v in headers if k == b"authorization"), None)
        kept = [(k, v) for k, v in headers if k not in (b"authorization", EMBER_AUTH)]
        scope["headers"] = kept + ([(b"authorization", ember_auth)] if ember_auth else [])
    return scope


# --- the ASGI layer and the proxy -----------------------------------------------------------
class HostRouting:
    """ASGI middleware: ``<port>-<id>.<domain>`` requests become path-form ones."""

    def __init__(self, app: ASGIApp, domain: str) -> None:
        self.app = app
        self.domain = domain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = rewrite_host_form(scope, self.domain)
        await self.app(scope, receive, send)


def _connect_host(bind: str) -> str:
    """Where the proxy reaches a listener bound to ``bind`` (a wildcard: loopback)."""
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(bind)
        if ip.is_unspecified:
            return "::1" if ip.version == 6 else "127.0.0.1"
    return bind


def _error(err: Exception, status: int) -> JSONResponse:
    assert isinstance(err, NetworkError | EmberTimeoutError)
    return JSONResponse(error_body(err), status_code=status)


class PortProxy:
    """Carries HTTP requests to exposed ports' listeners (one per daemon)."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self._transport: httpx.AsyncHTTPTransport | None = None

    def _pool(self) -> httpx.AsyncHTTPTransport:
        # A transport, not a client: no cookie jar shared between callers, no redirects
        # followed, no proxy from the environment. No keep-alive: an idle pooled
        # connection would hold the port busy and keep its sandbox from idling.
        if self._transport is None:
            self._transport = httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=MAX_UPSTREAM, max_keepalive_connections=0),
                retries=0)
        return self._transport

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    async def forward(self, request: Request, exposed: Exposed) -> Response:
        scope = request.scope
        host_form = bool(scope.get(HOST_FORM_KEY))
        prefix = None if host_form else http_path(exposed.sandbox_id, exposed.port)
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        if not host_form and raw_path == (prefix or "").encode():
            # ".../http" alone: the guest's relative links need the slash
            location = (raw_path + b"/" + (b"?" + query if query else b"")).decode("latin-1")
            return Response(status_code=308, headers={"location": location})
        target = upstream_target(raw_path, query)
        headers, has_body = upstream_headers(scope, prefix=prefix)
        timeout = httpx.Timeout(IO_TIMEOUT_S, connect=CONNECT_TIMEOUT_S,
                                pool=CONNECT_TIMEOUT_S)
        url = httpx.URL(scheme="http", host=_connect_host(exposed.host),
                        port=exposed.host_port, raw_path=target)
        upstream = httpx.Request(request.method, url, headers=headers,
                                 stream=_Body(request) if has_body else None,
                                 extensions={"timeout": timeout.as_dict()})
        what = f"port {exposed.port} of sandbox {exposed.sandbox_id}"
        try:
            answer = await self._pool().handle_async_request(upstream)
        except httpx.TimeoutException:
            return _error(EmberTimeoutError(f"{what} did not answer within "
                                            f"{IO_TIMEOUT_S:g} s"), 504)
        except httpx.TransportError as err:
            return _error(NetworkError(f"{what} cannot be reached: "
                                       f"{type(err).__name__}: {err}"[:500]), 502)
        raw = list(answer.headers.raw)
        if sum(len(k) + len(v) + 4 for k, v in raw) > MAX_RESPONSE_HEADER_BYTES:
            await answer.aclose()
            return _error(NetworkError(f"{what} answered with headers over "
                                       f"{MAX_RESPONSE_HEADER_BYTES} bytes"), 502)
        out = StreamingResponse(_relay(answer, what), status_code=answer.status_code)
        out.raw_headers = response_headers(raw)
        return out


class _Body(httpx.AsyncByteStream):
    """The client's request body, streamed to the guest as it arrives."""

    def __init__(self, request: Request) -> None:
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._request.stream():
            if chunk:
                yield chunk


async def _relay(answer: httpx.Response, what: str) -> AsyncIterator[bytes]:
    """The guest's answer body, as it arrives; cut (not failed) if the guest stops."""
    try:
        stream: Any = answer.stream
        async for chunk in stream:
            yield chunk
    except httpx.HTTPError as err:
        log.info("%s: answer cut: %s: %s", what, type(err).__name__, err)
    finally:
        await answer.aclose()


__all__ = ["DEFAULT_DOMAIN", "HostRouting", "PortProxy", "check_domain", "domain_from_env",
           "host_name", "http_path", "parse_host", "proxied", "response_headers",
           "upstream_headers"]
