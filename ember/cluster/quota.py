"""Tenants' quotas across the cluster: one admission at a time, whichever node was asked.

Every placed create (and every fork or restore on a node of a cluster, placed on that
node with a hard affinity) is admitted by one detached, named Ray actor, ``ember-quota``
(namespace ``ember``), before it may go on: the placement driver
(:func:`ember.cluster.placement.place`) has just named its placement actor, and asks the
keeper :func:`admit`. The keeper is a Ray actor with one thread, so its admissions are
serial: two creates through two nodes cannot both slip under a limit (Ray's KV alone has
no compare-and-set; an actor's mailbox is the lock). It keeps a book of every placement it
admitted (tenant, vCPUs, MiB), and counts a tenant's entries whose placement actor is still
alive (Ray's named-actor table, read once per admission): a placement actor lives exactly
as long as its sandbox (it ends once the sandbox is gone, and a failed create ends it at
once), so the book needs no release call and cannot leak.

A tenant's limits come from the cluster (``tenant/<name>`` in Ray's KV, written by ``ember
tenant set`` on any node: :mod:`ember.cluster.keys`), or, where the cluster has none for
that tenant, from the asking node's own store (passed with the placement).

The keeper writes its book to Ray's KV as it changes (``quota/<placement actor name>``:
tenant, vCPUs, MiB), so a keeper started again (its node died; the head restarted, Redis
keeping the KV) reads it back and drops what ended meanwhile. Everything but :func:`admit`
and the actor is pure and tested without Ray.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ember.cluster")

KEEPER_NAME = "ember-quota"
#: An admission (the keeper's start included, once per cluster) may take this long.
ADMIT_TIMEOUT_S = 60.0
#: Waiting for a killed placement actor's name to be gone.
END_TIMEOUT_S = 10.0
#: A full sweep of every tenant's entries every this many admissions (tenants that stop
#: creating would otherwise keep their dead entries).
SWEEP_EVERY = 100
#: The keeper's book in Ray's KV (namespace ``ember``): ``quota/<placement actor name>``.
BOOK_PREFIX = "quota/"
#: Entries a keeper reads back at most.
MAX_BOOK = 1_000_000
#: The limits' names, as ``TenantRecord`` and ``tenant/<name>`` carry them.
LIMITS = ("max_sandboxes", "max_vcpus", "max_memory_mib")


@dataclass(frozen=True)
class Limits:
    """A tenant's limits (None: no limit)."""

    max_sandboxes: int | None = None
    max_vcpus: int | None = None
    max_memory_mib: int | None = None

    @classmethod
    def from_json(cls, raw: object) -> Limits | None:
        """Parse untrusted limits (what does not fit: no limits at all, None)."""
        if not isinstance(raw, dict):
            return None
        values: dict[str, int | None] = {}
        for name in LIMITS:
            v = raw.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                  or not 0 <= v < 1 << 40):
                return None
            values[name] = v
        return cls(**values)

    def to_json(self) -> dict[str, int | None]:
        return {"max_sandboxes": self.max_sandboxes, "max_vcpus": self.max_vcpus,
                "max_memory_mib": self.max_memory_mib}


@dataclass(frozen=True)
class Held:
    """What one admitted placement holds."""

    tenant: str
    vcpus: int
    memory_mib: int
    #: Sandboxes it holds: 1 for a create or restore, ``n`` for a fork of ``n`` (the
    #: vCPUs and MiB are then all of theirs).
    sandboxes: int = 1


def over_limit(tenant: str, held: Iterable[Held], asked: Held,
               limits: Limits | None) -> str | None:
    """Why ``asked`` does not fit ``tenant``'s limits given what it holds, or None (pure;
    worded as a node's own quota error)."""
    if limits is None:
        return None
    mine = [h for h in held if h.tenant == tenant]
    used = (sum(h.sandboxes for h in mine), sum(h.vcpus for h in mine),
            sum(h.memory_mib for h in mine))
    more = (asked.sandboxes, asked.vcpus, asked.memory_mib)
    caps = (limits.max_sandboxes, limits.max_vcpus, limits.max_memory_mib)
    for what, have, add, cap in zip(("sandboxes", "vCPUs", "MiB of memory"), used, more,
                                    caps, strict=True):
        if cap is not None and have + add > cap:
            return (f"tenant {tenant} would have {have + add} {what} across the cluster "
                    f"(limit {cap}, {have} in use); destroy some, or ask for a higher quota")
    return None


@dataclass
class Book:
    """The keeper's book (pure): admitted placements by placement actor name."""

    entries: dict[str, Held] = field(default_factory=dict)
    admissions: int = 0

    def prune(self, alive: set[str], tenant: str | None) -> None:
        """Drop the entries (of ``tenant``, or all) whose placement actor is gone."""
        for name in [n for n, h in self.entries.items()
                     if (tenant is None or h.tenant == tenant) and n not in alive]:
            del self.entries[name]

    def admit(self, name: str, asked: Held, limits: Limits | None,
              alive: Callable[[], set[str]]) -> str | None:
        """Record ``name`` when ``asked`` fits its tenant's limits (None), else say why.
        ``alive``: the live placement actors' names, asked for only when needed."""
        self.admissions += 1
        sweep = self.admissions % SWEEP_EVERY == 0
        if limits is not None or sweep:
            self.prune(alive(), None if sweep else asked.tenant)
        refused = over_limit(asked.tenant, self.entries.values(), asked, limits)
        if refused is None:
            self.entries[name] = asked
        return refused


def held_value(h: Held) -> bytes:
    """A book entry as the KV keeps it (``quota/<placement actor name>``)."""
    return json.dumps({"tenant": h.tenant, "vcpus": h.vcpus, "memory_mib": h.memory_mib,
                       "sandboxes": h.sandboxes}).encode()


def book_from_kv(kv: dict[bytes, bytes]) -> Book:
    """The book as the KV kept it (pure; untrusted: what does not parse is left out)."""
    entries: dict[str, Held] = {}
    for raw_key, raw in kv.items():
        name = raw_key.decode(errors="replace").removeprefix(BOOK_PREFIX)
        try:
            doc = json.loads(raw[:4096])
        except (ValueError, TypeError):
            continue
        if not isinstance(doc, dict) or not 0 < len(name) <= 128:
            continue
        tenant, vcpus, memory = doc.get("tenant"), doc.get("vcpus"), doc.get("memory_mib")
        count = doc.get("sandboxes", 1)  # books written before forks counted: 1
        if isinstance(tenant, str) and isinstance(vcpus, int) and isinstance(memory, int) \
                and isinstance(count, int) and 0 < count <= 1024:
            entries[name] = Held(tenant, vcpus, memory, count)
    return Book(entries=entries)


def quota_error(message: str) -> dict[str, Any]:
    """A placement's answer for a create over its tenant's cluster-wide quota (pure)."""
    return {"status": 429, "error": {"code": "quota_exceeded", "message": message}}


# --- Ray's side (in the placement driver and the keeper actor) ---------------------------
def _keeper_class() -> Any:
    import ray

    from ember.cluster.keys import TENANT_PREFIX, parse_limits

    class QuotaKeeper:
        def __init__(self) -> None:
            # A keeper started again (its node died, the head restarted) reads its book
            # back from the KV (Redis keeps it) and drops what has ended meanwhile.
            from ray.experimental.internal_kv import (
                _internal_kv_get,
                _internal_kv_list,
            )

            from ember.cluster.directory import KV_NAMESPACE

            names = _internal_kv_list(BOOK_PREFIX, namespace=KV_NAMESPACE)[:MAX_BOOK]
            kv = {bytes(n): bytes(v) for n in names
                  if (v := _internal_kv_get(n, namespace=KV_NAMESPACE)) is not None}
            self.book = book_from_kv(kv)
            self._keep(None)

        @staticmethod
        def _alive() -> set[str]:
            from ember.cluster.placement import NAMESPACE

            return {str(a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)
                    if a.get("namespace") == NAMESPACE}

        def _keep(self, before: set[str] | None) -> None:
            """Write the book's changes since ``before`` to the KV (None: prune every
            tenant's ended entries first, as at the start)."""
            from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

            from ember.cluster.directory import KV_NAMESPACE

            if before is None:
                before = set(self.book.entries)
                self.book.prune(self._alive(), None)
            now = set(self.book.entries)
            for name in before - now:
                _internal_kv_del(f"{BOOK_PREFIX}{name}", namespace=KV_NAMESPACE)
            for name in now - before:
                _internal_kv_put(f"{BOOK_PREFIX}{name}", held_value(self.book.entries[name]),
                                 True, namespace=KV_NAMESPACE)

        def admit(self, name: str, tenant: str, vcpus: int, memory_mib: int,
                  fallback: dict[str, Any] | None, sandboxes: int = 1) -> str | None:
            from ray.experimental.internal_kv import _internal_kv_get

            from ember.cluster.directory import KV_NAMESPACE

            raw = _internal_kv_get(f"{TENANT_PREFIX}{tenant}", namespace=KV_NAMESPACE)
            limits = parse_limits(raw) if raw else Limits.from_json(fallback)
            before = set(self.book.entries)
            refused = self.book.admit(name, Held(tenant, vcpus, memory_mib, sandboxes), limits,
                                      self._alive)
            self._keep(before)
            return refused

    actor: Any = ray.remote
    return actor(num_cpus=0, max_restarts=0, max_concurrency=1)(QuotaKeeper)


def end_actor(handle: Any, name: str, timeout: float = END_TIMEOUT_S) -> None:
    """Kill a placement actor that will hold no sandbox, and wait (bounded) until Ray no
    longer knows its name: Ray's kill is only sent, and the driver exits right after its
    answer (a kill lost with it would leave a detached actor holding resources)."""
    import time

    import ray

    from ember.cluster.placement import NAMESPACE

    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
    log.warning("placement actor %s still known to Ray %.0f s after it was killed", name,
                timeout)


def admit(name: str, tenant: str, vcpus: int, memory_mib: int,
          fallback: dict[str, Any] | None, sandboxes: int = 1) -> dict[str, Any] | None:
    """Ask the cluster's keeper (started here when there is none) to admit the placement
    ``name`` for ``tenant`` (``sandboxes`` of them: a fork of n); None when admitted, else
    the placement's error answer. In a Ray driver (the placement's child process)."""
    import ray

    from ember.cluster.placement import NAMESPACE

    try:
        keeper = _keeper_class().options(name=KEEPER_NAME, namespace=NAMESPACE,
                                         lifetime="detached", get_if_exists=True).remote()
        refused = ray.get(keeper.admit.remote(name, tenant, vcpus, memory_mib, fallback,
                                              sandboxes), timeout=ADMIT_TIMEOUT_S)
    except Exception as err:  # no admission, no sandbox
        return {"status": 503, "error": {"code": "host", "message": (
            f"the cluster's quota keeper ({KEEPER_NAME}) did not answer: "
            f"{type(err).__name__}: {err}")[:2000]}}
    return None if refused is None else quota_error(str(refused))
