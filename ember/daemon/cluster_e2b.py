"""E2B's API through any node of the cluster (docs/cluster.md, docs/e2b.md): requests for a
sandbox another node holds are carried to that node's daemon, as ember's own ``/v1``
requests are (:class:`~ember.daemon.cluster_forward.ClusterForward`'s lookup and
streaming), by an ASGI layer outside E2B's envd and port layers:

* E2B's lifecycle API on one sandbox (``/sandboxes/{id}[/...]``, ``/v2/sandboxes/{id}
  /connect``): authenticated here (``X-API-KEY``, ``Authorization``, the socket's uid) and
  vouched for to the owning node, the caller's key dropped, as for ``/v1``;
* envd's requests (``E2b-Sandbox-Id``, ``X-Access-Token`` or ``Host: 49983-<id>.<domain>``),
  requests naming a port by E2B's ``E2b-Sandbox-Id`` / ``E2b-Sandbox-Port`` headers, and the
  code interpreter's (``49999-<id>``): carried as they came, credentials included (the
  envd access token and the traffic token are the owning node's to check; this node
  cannot), with the sandbox named in E2B's headers so the owning node routes them whatever
  its domain;
* ``Host: <port>-<id>.<domain>`` for any other port (an E2B sandbox's server, or an ember
  sandbox's exposed port): carried with the ``Host`` kept and, when the caller is known
  here, its ember credential replaced by a vouch over the path-form the owning node's
  :class:`~ember.daemon.port_proxy.HostRouting` makes of it (the nodes share one ports
  domain).

Everything else passes. No Ray import here.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from ember.cluster.record import load_secret
from ember.cluster.vouch import FORWARDED_HEADER, VOUCH_HEADER, sign
from ember.daemon.auth import Principal, principal_of
from ember.daemon.cluster_forward import ClusterForward, _header, _record
from ember.daemon.port_proxy import EMBER_AUTH, parse_host, rewrite_host_form
from ember.e2b import mapping as M
from ember.e2b.envd import is_envd_path
from ember.e2b.jupyter_wire import JUPYTER_PORT
from ember.errors import EmberError
from ember.paths import Paths

log = logging.getLogger("ember.daemon")

_ID = r"[A-Za-z0-9_.-]{1,64}"
#: E2B's lifecycle paths about one sandbox (``/sandboxes/metrics`` is the many-sandbox one).
LIFECYCLE_PATH = re.compile(rf"^(?:/sandboxes/(?!metrics$)({_ID})(?:/[a-z]+)?"
                            rf"|/v2/sandboxes/({_ID})/connect)$")
#: Hop-by-hop headers and ember's own, never carried.
HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade",
                 b"proxy-authorization", VOUCH_HEADER.encode(), FORWARDED_HEADER.encode(),
                 b"x-ember-placement", b"x-ember-tenant"})
Kind = Literal["api", "traffic", "host"]


@dataclass(frozen=True)
class Target:
    sandbox_id: str
    #: ``api``: the lifecycle API (vouched); ``traffic``: envd or an E2B-named port (as it
    #: came); ``host``: another port by ``Host`` (vouched over the path form when known).
    kind: Kind
    #: The guest port a ``traffic`` or ``host`` request names (envd's when by token).
    port: int = M.ENVD_PORT


def target_of(path: str, headers: list[tuple[bytes, bytes]], domain: str) -> Target | None:
    """Which sandbox an E2B request is about, and how it is carried (pure)."""
    named = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
    sid, port = named.get("e2b-sandbox-id"), named.get("e2b-sandbox-port")
    by_host = parse_host(named.get("host", ""), domain) if "host" in named else None
    if sid is not None and re.fullmatch(_ID, sid):
        if port is not None and port != str(M.ENVD_PORT):  # a guest port by E2B's headers
            ok = port.isdigit() and 0 < int(port) < 65536
            return Target(sid, "traffic", int(port)) if ok else None
        if is_envd_path(path):
            return Target(sid, "traffic")
        # else: the SDK names the sandbox on some lifecycle calls too (below)
    if by_host is not None:
        if (by_host[1] == M.ENVD_PORT and is_envd_path(path)) or by_host[1] == JUPYTER_PORT:
            return Target(by_host[0], "traffic", by_host[1])
        if by_host[1] != M.ENVD_PORT:
            return Target(by_host[0], "host", by_host[1])
        return None
    token = named.get("x-access-token")
    if token is not None and is_envd_path(path):
        by_token = M.sandbox_of_token(token)
        return Target(by_token, "traffic") if re.fullmatch(_ID, by_token) else None
    m = LIFECYCLE_PATH.match(path)
    if m is not None:
        return Target(m.group(1) or m.group(2), "api")
    return None


def carried_headers(headers: list[tuple[bytes, bytes]], target: Target, own_node: str,
                    vouch: str | None, credential: bytes | None) -> list[tuple[bytes, bytes]]:
    """The headers a carried E2B request has (pure): hop-by-hop and ember's own dropped;
    for ``api``, the caller's key dropped too; with a ``vouch``, ``credential`` (the header
    that was ember's credential) replaced by it; the sandbox named in E2B's headers for
    ``traffic``."""
    drop = set(HOP)
    if target.kind == "api":
        drop |= {b"authorization", b"x-api-key", b"host"}
    if vouch is not None and credential is not None:
        drop.add(credential)
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    if vouch is not None and credential == EMBER_AUTH:  # still says: Authorization is the
        out.append((EMBER_AUTH, b""))                  # guest's (port_proxy), now empty
    if target.kind == "traffic":
        names = {k.lower() for k, _ in out}
        if b"e2b-sandbox-id" not in names:
            out.append((b"e2b-sandbox-id", target.sandbox_id.encode()))
        if b"e2b-sandbox-port" not in names and target.port != M.ENVD_PORT:
            out.append((b"e2b-sandbox-port", str(target.port).encode()))
    if vouch is not None:
        out.append((VOUCH_HEADER.encode(), vouch.encode()))
    out.append((FORWARDED_HEADER.encode(), own_node.encode()))
    return out


class E2bClusterForward(ClusterForward):
    """ASGI layer: E2B's requests for another node's sandbox go there (see the module)."""

    def __init__(self, app: ASGIApp, paths: Paths, domain: str) -> None:
        super().__init__(app, paths)
        self.domain = domain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _header(scope, FORWARDED_HEADER) is not None:
            await self.app(scope, receive, send)
            return
        target = target_of(scope.get("path", ""), list(scope.get("headers") or ()),
                           self.domain)
        rec = await _record(self.paths) if target is not None else None
        if target is None or rec is None or rec.daemon is None:
            await self.app(scope, receive, send)
            return
        node = await self._elsewhere(_as_bearer(scope), target.sandbox_id, rec)
        if node is None:
            await self.app(scope, receive, send)
            return
        vouch, credential = await self._vouch(scope, target)
        if target.kind == "api" and vouch is None:
            await self.app(scope, receive, send)  # the app answers an unknown caller
            return
        headers = carried_headers(list(scope.get("headers") or ()), target, rec.node_id,
                                  vouch, credential)
        await self._forward(scope, receive, send, rec, node, target.sandbox_id, None,
                            headers=headers)

    async def _vouch(self, scope: Scope, target: Target) -> tuple[str | None, bytes | None]:
        """The vouch for the caller (and the header that was its credential), or Nones
        where it is not needed or the caller is not known here."""
        if target.kind == "traffic":
            return None, None
        key = _header(scope, "x-api-key") if target.kind == "api" else None
        ember_auth = _header(scope, EMBER_AUTH.decode())
        credential = b"x-api-key" if key else EMBER_AUTH if ember_auth is not None \
            else b"authorization"
        auth = f"Bearer {key}" if key else ember_auth if ember_auth is not None \
            else _header(scope, "authorization")
        live = scope["app"].state.live
        try:
            who: Principal = await asyncio.to_thread(
                principal_of, live.mgr.store, scope.get("client"), auth)
        except EmberError:
            return None, None
        secret = await asyncio.to_thread(load_secret, self.paths)
        if secret is None:
            return None, None
        path: str = scope.get("path", "")
        if target.kind == "host":  # what the owning node's HostRouting makes of it
            path = rewrite_host_form(scope, self.domain).get("path", path)
        return sign(secret, who.tenant, scope["method"], path), credential


def _as_bearer(scope: Scope) -> Scope:
    """``scope`` with E2B's ``X-API-KEY`` also as ``Authorization: Bearer`` (for the
    lookup's probe of the other nodes, which knows ember's header only)."""
    key = _header(scope, "x-api-key")
    if not key or _header(scope, "authorization") is not None:
        return scope
    return {**scope, "headers": [*(scope.get("headers") or ()),
                                 (b"authorization", f"Bearer {key}".encode())]}
