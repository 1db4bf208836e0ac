"""Placement: Ray decides which node runs a sandbox; that node's daemon creates it.

Each placed sandbox has a detached, named Ray actor (``ember-sandbox-<uuid>`` in the
``ember`` namespace) that holds the sandbox's resources (:func:`demand`) for as long as the
sandbox lives. Ray schedules the actor on a node that has them, preferring the node that was
asked (soft node affinity); the actor then asks its own node's daemon, over that daemon's
Unix socket, to create the sandbox. The VM is the daemon's, as any other: never a child of
a Ray worker. The actor watches its sandbox and ends itself once it is gone, which gives
its resources back to Ray.

The asking daemon does not become a Ray driver: it runs :func:`main` in a short-lived
child process (``python -m ember.cluster.placement``), JSON in and out, so that Ray's client
never lives inside the daemon. Ray is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ember.cluster import child
from ember.cluster.advertise import MEMORY_MIB, TIER, VCPUS
from ember.cluster.directory import forget_sandbox, record_sandbox
from ember.cluster.templates import placement_preference

log = logging.getLogger("ember.cluster")

NAMESPACE = "ember"
ACTOR_PREFIX = "ember-sandbox-"
#: What a capability (tier, template) costs a placement: a sliver, so that it only selects.
SLIVER = 0.001
#: A request header that marks a create a placement actor sends to its own node's daemon
#: (never placed again), and the tenant it creates for (honoured from the administrator).
PLACEMENT_HEADER = "x-ember-placement"
TENANT_HEADER = "x-ember-tenant"
#: How long a sandbox may wait for a node with room before the answer is "cluster full".
PLACE_TIMEOUT_S = 30.0
#: How long the chosen daemon's create may take (a cold boot under TCG included).
CREATE_TIMEOUT_S = 300.0
#: How often a placement actor looks whether its sandbox still lives.
WATCH_INTERVAL_S = 2.0
#: Connecting to Ray; past it the cluster counts as unreachable.
CONNECT_TIMEOUT_S = 20.0
#: The routes a placement actor may send its own node's daemon: a create (ember's or
#: E2B's), or a fork or restore of what that node holds (placed there: a hard affinity).
HERE_PATH = re.compile(r"^(?:/v1/sandboxes/(?!\.)[A-Za-z0-9_.-]{1,64}/fork"
                       r"|/v1/snapshots/(?!\.)[A-Za-z0-9_.:-]{1,128}/restore)$")


def route_of(raw: object) -> str:
    """The chosen daemon's route a placement names (pure; anything else: ember's create)."""
    if raw == "/v2/sandboxes" or (isinstance(raw, str) and HERE_PATH.fullmatch(raw)):
        return str(raw)
    return "/v1/sandboxes"


def created_ids(info: object) -> list[str]:
    """The sandboxes a create, restore (one object) or fork (a list) answered (pure)."""
    items = info if isinstance(info, list) else [info]
    return [str(i.get("id") or i["sandboxID"]) for i in items if isinstance(i, dict)]


@dataclass(frozen=True)
class Placement:
    """What :func:`main` is asked (the JSON on its stdin)."""

    address: str  # the cluster's GCS
    prefer_node: str | None  # the asking node's Ray id (soft affinity)
    body: dict[str, Any]  # the create request, as the asking daemon received it
    tenant: str
    demand: dict[str, float]
    #: The chosen daemon's create route: ``/v1/sandboxes``, or E2B's ``/v2/sandboxes``.
    path: str = "/v1/sandboxes"
    #: The tenant's limits on the asking node, where the cluster has none (quota.py).
    limits: dict[str, Any] | None = None
    #: The template's name (its holders are preferred: a soft affinity).
    template: str | None = None
    #: Only ``prefer_node`` may run it (a fork or restore of what that node holds).
    hard: bool = False
    #: How many sandboxes it makes (a fork of n), for the tenant's quota.
    sandboxes: int = 1


def demand(template: str, isolation: str, vcpus: int, memory_mib: int) -> dict[str, float]:
    """The Ray resources a sandbox holds while it lives (pure). The template is no hard
    demand: any node can fetch it (ember.cluster.templates); its holders are preferred
    (:func:`ember.cluster.templates.placement_preference`)."""
    return {VCPUS: float(vcpus), MEMORY_MIB: float(memory_mib),
            f"{TIER}{isolation}": SLIVER}


def _holder_class() -> Any:
    """The placement actor's class, made a Ray actor here (Ray imported only now)."""
    import httpx
    import ray

    from ember.paths import Paths
    from ember.runtime.states import LIVE_STATES
    from ember.uds_http import uds_transport

    class SandboxHolder:
        """Runs on the node Ray chose; creates the sandbox through that node's daemon and
        lives as long as the sandbox does."""

        def __init__(self) -> None:
            self.node_id = ray.get_runtime_context().get_node_id()
            self.sock = str(Paths.from_env().daemon_socket)
            self.sandbox_ids: list[str] = []

        def _client(self, timeout: float) -> httpx.Client:
            # Never starts a daemon: one started here would be a child of this Ray worker.
            return httpx.Client(transport=uds_transport(self.sock), timeout=timeout)

        def node(self) -> str:
            return str(self.node_id)

        def create(self, body: dict[str, Any], tenant: str, name: str,
                   path: str = "/v1/sandboxes") -> dict[str, Any]:
            """Create (or fork, or restore: ``path``) through this node's daemon."""
            try:
                with self._client(CREATE_TIMEOUT_S) as c:
                    r = c.post(f"http://emberd{path}", json=body,
                               headers={PLACEMENT_HEADER: name, TENANT_HEADER: tenant})
            except httpx.HTTPError as err:  # the driver ends this actor on an error
                return {"status": 503, "error": {
                    "code": "host", "message": f"the daemon of the node Ray chose "
                    f"({self.node_id}) does not answer on {self.sock}: {err}"}}
            if r.status_code != 201:
                try:
                    got = r.json()
                    error = got.get("error") or (  # E2B's route answers {code, message}
                        {"code": "host", "message": str(got["message"])[:2000]}
                        if isinstance(got.get("message"), str) else None)
                except (ValueError, AttributeError):
                    error = None
                return {"status": r.status_code, "error": error or {
                    "code": "host", "message": r.text[:500]}}
            info = r.json()
            self.sandbox_ids = created_ids(info)  # ember's or E2B's; a fork's n
            threading.Thread(target=self._watch, name="ember-watch", daemon=True).start()
            return {"info": info, "node_id": self.node_id, "actor": name}

        def _watch(self) -> None:
            left = list(self.sandbox_ids)  # a fork's clones: held until the last is gone
            while left:
                time.sleep(WATCH_INTERVAL_S)
                for sid in list(left):
                    try:
                        with self._client(10.0) as c:
                            r = c.get(f"http://emberd/v1/sandboxes/{sid}")
                    except httpx.HTTPError:
                        break  # the daemon restarts: its sandboxes live on
                    if r.status_code == 404 or (
                            r.status_code == 200 and r.json().get("state") not in LIVE_STATES):
                        left.remove(sid)
            self._end()

        def _end(self) -> None:
            """Forget where the sandbox was and give the resources back: this actor ends."""
            for sid in self.sandbox_ids:
                try:
                    forget_sandbox(sid)
                except Exception as err:  # a stale record answers 404 from the node itself
                    log.warning("could not forget sandbox %s in the directory: %s", sid, err)
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    actor: Any = ray.remote  # Ray's stubs know functions, not actor classes' options
    return actor(num_cpus=0, max_restarts=0, max_concurrency=4)(SandboxHolder)


def place(p: Placement) -> dict[str, Any]:
    """Place one sandbox (in a Ray driver: :func:`main`'s process). Answers ``{"info",
    "node_id", "actor"}``, or ``{"status", "error": {"code", "message"}}``, or
    ``{"unreachable": message}`` when Ray cannot be reached (the asker creates locally)."""
    from ember.cluster.nodes import bounded

    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    except ImportError:
        return {"unreachable": "Ray is not installed"}
    try:
        bounded(lambda: ray.init(address=p.address, namespace=NAMESPACE,
                                  logging_level=logging.ERROR, log_to_driver=False,
                                  configure_logging=False),
                 CONNECT_TIMEOUT_S, f"connecting to the cluster at {p.address}")
    except Exception as err:
        return {"unreachable": str(err)}
    name = f"{ACTOR_PREFIX}{uuid.uuid4().hex}"
    options: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "lifetime": "detached",
                               "resources": p.demand}
    if p.hard and p.prefer_node:  # a fork or restore: where its source is, or nowhere
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(p.prefer_node,
                                                                        soft=False)
    elif prefer := placement_preference(p.address, p.prefer_node, p.template):  # holders
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(prefer, soft=True)
    holder = _holder_class().options(**options).remote()
    from ember.cluster.quota import admit, end_actor  # the tenant's cluster-wide quotas

    refused = admit(name, p.tenant, int(p.demand.get(VCPUS, 0)),
                    int(p.demand.get(MEMORY_MIB, 0)), p.limits, p.sandboxes)
    if refused is not None:
        end_actor(holder, name)
        return refused
    placed, _ = ray.wait([holder.node.remote()], timeout=PLACE_TIMEOUT_S)
    if not placed:
        end_actor(holder, name)  # waited for: the driver exits right after
        where = f"node {p.prefer_node} has no" if p.hard else "no node of the cluster has"
        return {"status": 429, "error": {
            "code": "quota_exceeded", "message": f"{where} room for "
            f"{p.demand} (waited {PLACE_TIMEOUT_S:.0f} s)"}}
    try:
        out: dict[str, Any] = ray.get(holder.create.remote(p.body, p.tenant, name, p.path),
                                      timeout=CREATE_TIMEOUT_S + 30)
    except Exception:
        end_actor(holder, name)  # waited for: the driver exits right after
        raise
    if "info" not in out:  # no sandbox: nothing to hold
        end_actor(holder, name)  # waited for: the driver exits right after
        return out
    # Where it lives, for every node's daemon to find (Ray stays off the data path).
    for sid in created_ids(out["info"]):
        record_sandbox(sid, str(out["node_id"]))
    return out


def main() -> None:
    """``python -m ember.cluster.placement``: one :class:`Placement` as JSON on stdin, the
    answer of :func:`place` as JSON on stdout."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raw = json.load(sys.stdin)
    p = Placement(address=str(raw["address"]), prefer_node=raw.get("prefer_node"),
                  body=dict(raw["body"]), tenant=str(raw["tenant"]),
                  demand={str(k): float(v) for k, v in raw["demand"].items()},
                  path=route_of(raw.get("path")), limits=raw.get("limits"),
                  template=raw["template"] if isinstance(raw.get("template"), str) else None,
                  hard=raw.get("hard") is True, sandboxes=max(1, int(raw.get("sandboxes", 1))))

    def compute() -> dict[str, Any]:
        try:
            return place(p)
        except Exception as err:  # told to the asking daemon, which raises it
            return {"status": 500, "error": {"code": "host",
                                             "message": f"placement failed: {err}"}}

    child.answer(compute)


if __name__ == "__main__":
    main()
