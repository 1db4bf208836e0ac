"""Ray's node table, read through Ray's public API (``ray.init`` + ``ray.nodes()``): the
only membership there is. The one module of ember that imports Ray, inside its functions.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ember.cluster.advertise import PREFIX, Advertisement
from ember.errors import EmberTimeoutError, HostError, MissingDependencyError

T = TypeVar("T")
HEAD_RESOURCE = "node:__internal_head__"
#: How long a read of the node table may take before the caller is told (the GCS may be
#: restarting: Ray's client would otherwise retry for a minute or more).
QUERY_TIMEOUT_S = 30.0
INSTALL_HINT = "Ray is not installed: pip install 'ember[cluster]'"


@dataclass(frozen=True)
class NodeView:
    node_id: str
    ip: str
    alive: bool
    head: bool
    #: What the node advertised to ember (None: a Ray node that is no ember node).
    advertised: Advertisement | None
    #: Its ember resources as Ray counts them: totals, from the node table.
    resources: dict[str, float] = field(default_factory=dict)
    death_reason: str | None = None

    @property
    def state(self) -> str:
        return "ALIVE" if self.alive else "DEAD"

    def to_json(self) -> dict[str, object]:
        return {"node_id": self.node_id, "ip": self.ip, "alive": self.alive,
                "state": self.state, "head": self.head,
                "advertised": self.advertised.to_json() if self.advertised else None,
                "resources": self.resources, "death_reason": self.death_reason}


def view_of(entry: dict[str, Any]) -> NodeView:
    """One row of ``ray.nodes()`` as ember shows it (pure: tested without Ray)."""
    totals = {str(k): float(v) for k, v in (entry.get("Resources") or {}).items()}
    reason = entry.get("DeathReasonMessage") or None
    return NodeView(node_id=str(entry.get("NodeID", "")),
                    ip=str(entry.get("NodeManagerAddress", "")),
                    alive=bool(entry.get("Alive")), head=HEAD_RESOURCE in totals,
                    advertised=Advertisement.from_resources(totals),
                    resources={k: v for k, v in totals.items() if k.startswith(PREFIX)},
                    death_reason=str(reason) if reason else None)


def bounded(fn: Callable[[], T], timeout: float, what: str) -> T:
    """``fn`` in a thread, waited for at most ``timeout`` s: Ray's client cannot be
    cancelled, so a stuck call is left behind (a daemon thread) and the caller is told."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["ok"] = fn()
        except BaseException as err:
            box["err"] = err

    thread = threading.Thread(target=body, name="ember-ray-query", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise EmberTimeoutError(f"{what}: no answer from Ray within {timeout:.0f} s "
                                "(is the head up?)")
    if "err" in box:
        err = box["err"]
        if isinstance(err, MissingDependencyError | EmberTimeoutError):
            raise err
        raise HostError(f"{what}: {type(err).__name__}: {err}") from err
    return box["ok"]  # type: ignore[no-any-return]


def raw_nodes(address: str, *, timeout: float = QUERY_TIMEOUT_S) -> list[dict[str, Any]]:
    """``ray.nodes()`` of the cluster whose GCS is at ``address``, dead nodes included."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    def query() -> list[dict[str, Any]]:
        try:
            import ray
        except ImportError as err:
            raise MissingDependencyError(INSTALL_HINT) from err
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
                 configure_logging=False)
        try:
            return list(ray.nodes())  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()

    return bounded(query, timeout, f"reading the node table of {address}")


def list_nodes(address: str, *, timeout: float = QUERY_TIMEOUT_S) -> list[NodeView]:
    """The cluster's nodes, alive first, each with what it advertised."""
    views = [view_of(e) for e in raw_nodes(address, timeout=timeout)]
    return sorted(views, key=lambda v: (not v.alive, not v.head, v.ip, v.node_id))


def own_node_id(address: str, ray_temp_dir: str, *,
                timeout: float = QUERY_TIMEOUT_S) -> str | None:
    """The id of the live node whose raylet lives in ``ray_temp_dir`` (this host's)."""
    prefix = ray_temp_dir.rstrip("/") + "/"
    for entry in raw_nodes(address, timeout=timeout):
        if entry.get("Alive") and str(entry.get("RayletSocketName", "")).startswith(prefix):
            return str(entry["NodeID"])
    return None
