"""How one node's daemon vouches for a caller to another node's daemon (pure; no I/O).

A request for a sandbox on another node is authenticated where it arrives (its API key,
or the Unix socket's peer uid, checked by that daemon as any request); the daemon then
forwards it with a header saying which tenant it is for, signed with the cluster's shared
secret (:mod:`ember.cluster.directory` keeps it in Ray's KV; each node copies it into its
home at join, mode 0600). The owning daemon believes the tenant only when the signature
fits the method, path and a timestamp within :data:`MAX_SKEW_S`. So an API key works
through any node that knows it, and the caller's key never travels further than the
node it was given to.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from ember.errors import UnauthorizedError

#: The header that carries ``<tenant>:<unix time>:<hex HMAC-SHA256>``.
VOUCH_HEADER = "x-ember-vouch"
#: Set on a forwarded request: the receiving daemon answers from its own home only.
FORWARDED_HEADER = "x-ember-forwarded"
#: How far apart two nodes' clocks and a request's flight may be.
MAX_SKEW_S = 120.0


def _mac(secret: str, tenant: str, method: str, path: str, ts: int) -> str:
    msg = f"{tenant}\n{method.upper()}\n{path}\n{ts}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def sign(secret: str, tenant: str, method: str, path: str, now: float | None = None) -> str:
    """The header value vouching for ``tenant`` on one request."""
    ts = int(time.time() if now is None else now)
    return f"{tenant}:{ts}:{_mac(secret, tenant, method, path, ts)}"


def verify(secret: str | None, value: str, method: str, path: str,
           now: float | None = None) -> str:
    """The tenant a valid vouch names; UnauthorizedError otherwise."""
    if not secret:
        raise UnauthorizedError("a vouched request, but this node has no cluster secret")
    parts = value.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or len(value) > 300:
        raise UnauthorizedError("malformed cluster vouch")
    tenant, ts_text, mac = parts
    ts = int(ts_text)
    t = time.time() if now is None else now
    if abs(t - ts) > MAX_SKEW_S:
        raise UnauthorizedError(f"cluster vouch too old or from the future ({t - ts:.0f} s)")
    if not tenant or not hmac.compare_digest(mac, _mac(secret, tenant, method, path, ts)):
        raise UnauthorizedError("cluster vouch does not verify (another cluster's secret?)")
    return tenant
