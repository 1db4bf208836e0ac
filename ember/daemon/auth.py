"""Who is asking: API keys, the Unix socket's peer uid, tenants and their quotas.

* On the Unix socket the caller's uid (SO_PEERCRED, read by :class:`PeerCredH11`) decides:
  root is the administrator, any other uid is the tenant ``uid-<uid>``.
* Over TCP an API key is required: ``Authorization: Bearer ek_<id>_<secret>``. Keys are
  created with ``ember apikey create --tenant T``; only a SHA-256 of the secret is stored
  (the secret is 32 random bytes, so a plain hash cannot be brute-forced), compared in
  constant time; a revoked key answers 401 at once. A key also works on the socket.
* A tenant sees and touches only its own sandboxes and snapshots: another tenant's id
  answers 404, exactly as an id that does not exist. Templates are shared read-only.
* Quotas (``ember tenant set T --max-sandboxes N --max-vcpus N --max-memory MiB``) are
  checked, under one lock per tenant, before a create, restore or fork: 429 with
  ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Protocol

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from ember.errors import (
    BadRequestError,
    QuotaExceededError,
    SandboxNotFoundError,
    SnapshotNotFoundError,
    UnauthorizedError,
)
from ember.runtime.states import LIVE_STATES
from ember.store import Store
from ember.store.records import (
    TENANT_KEY,
    ApiKeyRecord,
    SandboxRecord,
    SnapshotRecord,
    TenantRecord,
)

log = logging.getLogger("ember.daemon")

ADMIN = "admin"
#: The ``client`` of a request that came over the Unix socket: ``(PEER_UID, uid)``.
PEER_UID = "unix-peer-uid"
KEY_PREFIX = "ek_"


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool

    def owns(self, metadata: dict[str, str]) -> bool:
        return self.sees(metadata.get(TENANT_KEY))

    def sees(self, tenant: str | None) -> bool:
        """Whether what belongs to ``tenant`` is the caller's to see and touch."""
        return self.admin or tenant == self.tenant


def _peer(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    """``(PEER_UID, uid)`` of a Unix socket connection (SO_PEERCRED), else None."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return (PEER_UID, uid)


#: A request's head (request line and headers) must arrive within this many seconds of
#: the connection (or of the previous response): a client dribbling bytes is cut off
#: instead of holding a connection forever (uvicorn itself has no such deadline).
HEAD_TIMEOUT_S = 30.0


class PeerCredH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, which also records the peer uid of a Unix socket
    connection as the request's ``client`` and closes connections whose request head
    takes longer than :data:`HEAD_TIMEOUT_S`."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = _peer(transport)
        if peer is not None:
            self.client = peer
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_deadline)

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request head took over %g s",
                     HEAD_TIMEOUT_S)
            self.transport.close()


class PeerCredWebSocket(WebSocketsSansIOProtocol):
    """The same for a connection upgraded to a WebSocket (the PTY)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = _peer(transport)
        if peer is not None:
            self.client = peer


# --- keys ---------------------------------------------------------------------------------
def new_key(store: Store, tenant: str) -> tuple[ApiKeyRecord, str]:
    """A new API key for ``tenant``: its record and the secret token (shown once)."""
    if not tenant or len(tenant) > 64 or not all(c.isalnum() or c in "-_." for c in tenant):
        raise BadRequestError(f"tenant names are 1-64 letters, digits, '-', '_', '.': "
                              f"{tenant!r}")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    rec = ApiKeyRecord(id=key_id, tenant=tenant, created_at=time.time(),
                       secret_sha256=hashlib.sha256(secret.encode()).hexdigest())
    store.add_api_key(rec)
    return rec, f"{KEY_PREFIX}{key_id}_{secret}"


# --- the cluster's keys and limits (docs/cluster.md) --------------------------------------
class ClusterView(Protocol):
    """The keys and tenants' limits a cluster holds (:mod:`ember.daemon.cluster_keys`)."""

    def key(self, key_id: str, *, unknown_here: bool) -> ApiKeyRecord | None: ...

    def limits(self, tenant: str) -> Any: ...


#: Per store (its database's path): the view of the cluster its home may belong to.
_cluster_views: dict[str, ClusterView] = {}


def use_cluster_view(store: Store, view: ClusterView) -> None:
    """Check keys and limits of ``store``'s home against its cluster's too (the daemon
    does this once; a home in no cluster answers nothing)."""
    _cluster_views[str(store.path)] = view


def _cluster_key(store: Store, key_id: str,
                 local: ApiKeyRecord | None) -> ApiKeyRecord | None:
    view = _cluster_views.get(str(store.path))
    if view is None:
        return local
    from ember.cluster.keys import merged_key

    return merged_key(local, view.key(key_id, unknown_here=local is None))


def tenant_limits(store: Store, tenant: str) -> TenantRecord | None:
    """A tenant's limits: its cluster's when the home is in one that has them, else the
    home's own."""
    view = _cluster_views.get(str(store.path))
    limits = view.limits(tenant) if view is not None else None
    if limits is not None:
        return TenantRecord(tenant, limits.max_sandboxes, limits.max_vcpus,
                            limits.max_memory_mib)
    return store.get_tenant(tenant)


def check_key(store: Store, token: str) -> ApiKeyRecord:
    if not token.startswith(KEY_PREFIX) or token.count("_") < 2 or len(token) > 200:
        raise UnauthorizedError("malformed API key (expected ek_<id>_<secret>)")
    key_id, _, secret = token[len(KEY_PREFIX):].partition("_")
    rec = _cluster_key(store, key_id, store.get_api_key(key_id))
    digest = hashlib.sha256(secret.encode()).hexdigest()
    if rec is None or not hmac.compare_digest(digest, rec.secret_sha256):
        raise UnauthorizedError("unknown API key")
    if rec.revoked_at is not None:
        raise UnauthorizedError(f"API key {rec.id} was revoked")
    return rec


def principal_of(store: Store, client: Any, authorization: str | None) -> Principal:
    """The caller of one request (UnauthorizedError if it cannot be told)."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise UnauthorizedError("Authorization must be 'Bearer <API key>'")
        rec = check_key(store, token.strip())
        return Principal(rec.tenant, rec.tenant == ADMIN)
    if isinstance(client, tuple | list) and len(client) == 2 and client[0] == PEER_UID:
        uid = int(client[1])
        return Principal(ADMIN, True) if uid == 0 else Principal(f"uid-{uid}", False)
    raise UnauthorizedError("an API key is required: Authorization: Bearer <key> "
                            "(`ember apikey create --tenant T`)")


# --- ownership ----------------------------------------------------------------------------
def own_sandbox(who: Principal, rec: SandboxRecord) -> SandboxRecord:
    if not who.owns(rec.metadata):
        raise SandboxNotFoundError(f"no sandbox {rec.id!r} (see `ember ls`)")
    return rec


def own_snapshot(who: Principal, rec: SnapshotRecord, ref: str) -> SnapshotRecord:
    if not who.owns(rec.metadata):
        raise SnapshotNotFoundError(f"no snapshot {ref!r} (see `ember snapshot ls`)")
    return rec


class Quotas:
    """Checks a tenant's limits before it gets more; one lock per tenant makes the check
    and the create that follows one step."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, who: Principal) -> asyncio.Lock:
        return self._locks.setdefault(who.tenant, asyncio.Lock())

    def check(self, who: Principal, *, sandboxes: int, vcpus: int, memory_mib: int) -> None:
        limits = tenant_limits(self._store, who.tenant)
        if limits is None:
            return
        mine = [r for r in self._store.list_sandboxes()
                if r.state in LIVE_STATES and r.metadata.get(TENANT_KEY) == who.tenant]
        used = (len(mine), sum(r.vcpus for r in mine), sum(r.memory_mib for r in mine))
        asked = (sandboxes, vcpus, memory_mib)
        caps = (limits.max_sandboxes, limits.max_vcpus, limits.max_memory_mib)
        for what, have, more, cap in zip(("sandboxes", "vCPUs", "MiB of memory"), used, asked,
                                          caps, strict=True):
            if cap is not None and have + more > cap:
                raise QuotaExceededError(
                    f"tenant {who.tenant} would have {have + more} {what} (limit {cap}, "
                    f"{have} in use); destroy some, or ask for a higher quota")
