"""API keys and tenants' limits across the cluster, in Ray's GCS key-value store
(namespace ``ember``, next to :mod:`ember.cluster.directory`'s records):

* ``apikey/<id>``: JSON ``{"tenant", "secret_sha256", "created_at", "revoked_at"}``, the
  same record a node keeps in its SQLite (a SHA-256 of the secret, never the secret),
  written by ``ember apikey create`` / ``revoke`` on a node of a cluster;
* ``tenant/<name>``: JSON ``{"max_sandboxes", "max_vcpus", "max_memory_mib"}``, written by
  ``ember tenant set`` on a node of a cluster.

Every node's daemon reads them (in a child process, ``python -m ember.cluster.keys
ADDRESS``, as it reads the directory; :mod:`ember.daemon.cluster_keys` caches the
reading), so a key made on one node works on all, a revocation anywhere wins everywhere,
and a tenant's limits are the cluster's. Everything that parses is pure and tested without
Ray; what comes back from the KV is untrusted and bounded.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ember.cluster import child
from ember.cluster.quota import LIMITS, Limits
from ember.store.records import ApiKeyRecord, TenantRecord

KEY_PREFIX = "apikey/"
TENANT_PREFIX = "tenant/"
#: One GCS call (the child as a whole is bounded by its parent).
RPC_TIMEOUT_S = 5.0
#: Records a reading keeps at most (of each kind); a value's size at most.
MAX_RECORDS = 100_000
MAX_VALUE = 4096
_KEY_ID = re.compile(r"^[0-9a-f]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _ok_name(s: str) -> bool:
    return 0 < len(s) <= 64 and all(c.isalnum() or c in "-_." for c in s)


def key_value(rec: ApiKeyRecord) -> bytes:
    return json.dumps({"tenant": rec.tenant, "secret_sha256": rec.secret_sha256,
                       "created_at": rec.created_at, "revoked_at": rec.revoked_at}).encode()


def tenant_value(rec: TenantRecord) -> bytes:
    return json.dumps({name: getattr(rec, name) for name in LIMITS}).encode()


def parse_key(key_id: str, raw: bytes | str) -> ApiKeyRecord | None:
    """An ``apikey/<id>`` record, or None when it does not parse (pure)."""
    try:
        doc = json.loads(raw[:MAX_VALUE])
    except (ValueError, TypeError):
        return None
    if not isinstance(doc, dict) or not _KEY_ID.match(key_id):
        return None
    tenant, digest = doc.get("tenant"), doc.get("secret_sha256")
    created, revoked = doc.get("created_at"), doc.get("revoked_at")
    if not isinstance(tenant, str) or not _ok_name(tenant) or not isinstance(digest, str) \
            or not _SHA256.match(digest) or not isinstance(created, int | float) \
            or not (revoked is None or isinstance(revoked, int | float)):
        return None
    return ApiKeyRecord(id=key_id, tenant=tenant, secret_sha256=digest,
                        created_at=float(created),
                        revoked_at=None if revoked is None else float(revoked))


def parse_limits(raw: bytes | str) -> Limits | None:
    """A ``tenant/<name>`` record, or None when it does not parse (pure)."""
    try:
        return Limits.from_json(json.loads(raw[:MAX_VALUE]))
    except (ValueError, TypeError):
        return None


def merged_key(local: ApiKeyRecord | None, cluster: ApiKeyRecord | None
               ) -> ApiKeyRecord | None:
    """The record a node checks a key against (pure): its own, or the cluster's when it has
    none; a revocation on either side wins (the earlier time); when the two disagree on the
    secret (an id made twice), the node's own record is the key."""
    if local is None or cluster is None:
        return local or cluster
    if cluster.secret_sha256 != local.secret_sha256 or cluster.tenant != local.tenant:
        return local
    times = [t for t in (local.revoked_at, cluster.revoked_at) if t is not None]
    return replace(local, revoked_at=min(times) if times else None)


#: Where a listed key or tenant is kept (``ember apikey ls`` / ``ember tenant ls`` on a
#: node of a cluster): this node's store and the cluster's; this node's only (made before
#: joining, or while the cluster could not be reached: a key that works on this node only,
#: limits that apply where the cluster has none); the cluster's only (another node's).
HERE, HERE_ONLY, ELSEWHERE = "here", "here-only", "cluster"


def listed_keys(local: list[ApiKeyRecord], reg: Registry
                ) -> list[tuple[ApiKeyRecord, str]]:
    """The cluster's keys and this node's (pure), each as this node checks it
    (:func:`merged_key`) with where it is kept, oldest first."""
    mine = {k.id: k for k in local}
    out: list[tuple[ApiKeyRecord, str]] = []
    for key_id in mine.keys() | reg.keys.keys():
        here, there = mine.get(key_id), reg.keys.get(key_id)
        rec = merged_key(here, there)
        if rec is not None:
            out.append((rec, ELSEWHERE if here is None else HERE if there else HERE_ONLY))
    return sorted(out, key=lambda r: (r[0].created_at, r[0].id))


def listed_tenants(local: list[TenantRecord], reg: Registry
                   ) -> list[tuple[TenantRecord, str]]:
    """The cluster's tenants and this node's (pure), with the limits that apply (the
    cluster's where it has them) and where each is kept, by name."""
    mine = {t.name: t for t in local}
    out: list[tuple[TenantRecord, str]] = []
    for name in sorted(mine.keys() | reg.tenants.keys()):
        lim = reg.tenants.get(name)
        if lim is None:
            out.append((mine[name], HERE_ONLY))
        else:
            out.append((TenantRecord(name, lim.max_sandboxes, lim.max_vcpus,
                                     lim.max_memory_mib),
                        HERE if name in mine else ELSEWHERE))
    return out


@dataclass(frozen=True)
class Registry:
    """One reading of the cluster's keys and tenants."""

    keys: dict[str, ApiKeyRecord] = field(default_factory=dict)
    tenants: dict[str, Limits] = field(default_factory=dict)

    @classmethod
    def from_kv(cls, kv: Mapping[bytes, bytes]) -> Registry:
        """From the KV's records under ``apikey/`` and ``tenant/`` (pure, untrusted)."""
        keys: dict[str, ApiKeyRecord] = {}
        tenants: dict[str, Limits] = {}
        for raw_key, raw_value in kv.items():
            key = raw_key.decode(errors="replace")
            if key.startswith(KEY_PREFIX) and len(keys) < MAX_RECORDS:
                rec = parse_key(key[len(KEY_PREFIX):], raw_value)
                if rec is not None:
                    keys[rec.id] = rec
            elif key.startswith(TENANT_PREFIX) and len(tenants) < MAX_RECORDS:
                name = key[len(TENANT_PREFIX):]
                limits = parse_limits(raw_value)
                if limits is not None and _ok_name(name):
                    tenants[name] = limits
        return cls(keys=keys, tenants=tenants)

    def to_json(self) -> dict[str, Any]:
        return {"keys": {k: json.loads(key_value(r)) for k, r in self.keys.items()},
                "tenants": {n: lim.to_json() for n, lim in self.tenants.items()}}

    @classmethod
    def from_json(cls, raw: object) -> Registry:
        """Parse the child's answer (untrusted: what does not fit is dropped)."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        keys, tenants = raw.get("keys") or {}, raw.get("tenants") or {}
        if not isinstance(keys, dict) or not isinstance(tenants, dict):
            raise ValueError("keys and tenants must be objects")
        kv = {f"{KEY_PREFIX}{k}".encode(): json.dumps(v).encode() for k, v in keys.items()
              if isinstance(k, str)}
        kv.update({f"{TENANT_PREFIX}{n}".encode(): json.dumps(v).encode()
                   for n, v in tenants.items() if isinstance(n, str)})
        return cls.from_kv(kv)


# --- Ray's side (in the child process and in the CLI, bounded by their callers) ----------
def _gcs(address: str) -> Any:
    from ember.cluster.directory import _client

    return _client(address)


def read(address: str) -> Registry:
    """Read every key and tenant record from the GCS at ``address`` (blocks while the head
    is down: call it where it can be abandoned)."""
    from ember.cluster.directory import KV_NAMESPACE

    gcs = _gcs(address)
    names = [k for prefix in (KEY_PREFIX, TENANT_PREFIX)
             for k in gcs.internal_kv_keys(prefix.encode(), KV_NAMESPACE,
                                           timeout=RPC_TIMEOUT_S)][:2 * MAX_RECORDS]
    kv = gcs.internal_kv_multi_get(names, KV_NAMESPACE, timeout=RPC_TIMEOUT_S) \
        if names else {}
    return Registry.from_kv(kv)


def publish_key(address: str, rec: ApiKeyRecord) -> None:
    from ember.cluster.directory import KV_NAMESPACE

    _gcs(address).internal_kv_put(f"{KEY_PREFIX}{rec.id}".encode(), key_value(rec), True,
                                  KV_NAMESPACE, timeout=RPC_TIMEOUT_S)


def revoke_key(address: str, key_id: str, now: float) -> ApiKeyRecord | None:
    """Mark the cluster's record of ``key_id`` revoked (kept if it already was); None when
    the cluster has no such key."""
    from ember.cluster.directory import KV_NAMESPACE

    gcs = _gcs(address)
    name = f"{KEY_PREFIX}{key_id}".encode()
    raw = gcs.internal_kv_get(name, KV_NAMESPACE, timeout=RPC_TIMEOUT_S)
    rec = parse_key(key_id, bytes(raw)) if raw else None
    if rec is None:
        return None
    if rec.revoked_at is None:
        rec = replace(rec, revoked_at=now)
        gcs.internal_kv_put(name, key_value(rec), True, KV_NAMESPACE, timeout=RPC_TIMEOUT_S)
    return rec


def publish_tenant(address: str, rec: TenantRecord) -> None:
    from ember.cluster.directory import KV_NAMESPACE

    _gcs(address).internal_kv_put(f"{TENANT_PREFIX}{rec.name}".encode(), tenant_value(rec),
                                  True, KV_NAMESPACE, timeout=RPC_TIMEOUT_S)


def main() -> None:
    """``python -m ember.cluster.keys ADDRESS``: the cluster's keys and tenants as JSON."""
    child.answer(lambda: {"registry": read(sys.argv[1]).to_json()})


if __name__ == "__main__":
    main()
