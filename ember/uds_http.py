"""httpx transports for plain HTTP over a Unix socket (the daemon's own socket).

httpx makes a TLS context for every transport, loading the CA bundle (about 15 ms on these
hosts), also for a Unix socket that never speaks TLS: every SDK sandbox owns a transport,
so each ``Sandbox.create()`` through the daemon paid it (issue 12's create-to-first-exec
figure). These transports share one context, made on first use, as httpx would make it.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def _tls() -> ssl.SSLContext:
    return httpx.create_ssl_context()


def uds_transport(path: str) -> httpx.HTTPTransport:
    """A blocking transport to the Unix socket ``path``."""
    return httpx.HTTPTransport(uds=path, verify=_tls())


def async_uds_transport(path: str, *, keepalive: bool = True) -> httpx.AsyncHTTPTransport:
    """An asyncio transport to the Unix socket ``path`` (``keepalive=False``: a connection
    per request)."""
    limits = httpx.Limits() if keepalive else httpx.Limits(max_keepalive_connections=0)
    return httpx.AsyncHTTPTransport(uds=path, verify=_tls(), limits=limits)
