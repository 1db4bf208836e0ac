"""Lost sandboxes: what the cluster says about a sandbox whose node Ray reports dead, and
what a node does about its own records once it reaches the cluster again. Pure (no I/O):
the daemon feeds it readings of the directory (:mod:`ember.cluster.directory`).

Ray alone decides that a node is dead (its node table, fed by the GCS's health checks);
ember builds no membership of its own. A sandbox whose ``sandbox/<id>`` record names a
dead node is **lost**, for good: nobody forwards to it again, and the node that held it
kills it as soon as it learns so (:mod:`ember.cluster.fencing`, :func:`reconcile`). A lost
record stays in the directory, so that every node keeps answering ``lost`` with the
reason, until the node that held it drops it (it reached the cluster again) or until
:data:`RETENTION_S` after the node died, when any daemon drops it (:func:`expired`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember.cluster.directory import Directory, NodeEntry
from ember.errors import SandboxLostError

#: The state a lost sandbox is listed in (a cluster-wide view's state, never a local one).
LOST_STATE = "lost"
#: The HTTP status of any other operation on a lost sandbox: gone for good.
LOST_STATUS = 410
#: How long a lost record is kept after its node died (then any daemon drops it).
RETENTION_S = 3600.0
#: Local states that hold resources (a lost one in them is killed): as the runtime's.
KILLABLE = frozenset({"creating", "booting", "running", "paused", "pooled", "snapshotting"})


def lost_on(directory: Directory, sandbox_id: str) -> NodeEntry | None:
    """The dead node that held ``sandbox_id``, or None (not recorded, or its node lives)."""
    node = directory.node_of(sandbox_id)
    return node if node is not None and not node.alive else None


def reason(node: NodeEntry) -> str:
    """Why a sandbox of ``node`` is lost: the node, its address, when and why Ray says it
    died."""
    where = node.ip or (node.daemon or "").rpartition(":")[0] or "address unknown"
    when = (time.strftime(" at %Y-%m-%dT%H:%M:%SZ", time.gmtime(node.died_at))
            if node.died_at else "")
    why = f": {node.death_reason}" if node.death_reason else ""
    return f"node {node.node_id[:12]} ({where}) died{when}{why}"[:500]


def lost_info(sandbox_id: str, node: NodeEntry) -> dict[str, Any]:
    """``GET /v1/sandboxes/{id}``'s answer for a lost sandbox (a SandboxInfo's fields)."""
    return {"id": sandbox_id, "template": "", "state": LOST_STATE, "vcpus": 0,
            "memory_mib": 0, "disk_mib": 0, "created_at": 0.0, "expires_at": None,
            "accel": "", "node": node.node_id, "error": reason(node)}


def lost_error(sandbox_id: str, node: NodeEntry) -> dict[str, Any]:
    """The error body of any other operation on a lost sandbox."""
    return {"error": {"code": SandboxLostError.code, "message": (
        f"sandbox {sandbox_id} is lost: {reason(node)} (Ray reports the node dead; "
        "the sandbox is gone for good)")[:2000]}}


def listed_lost(directory: Directory, node: NodeEntry) -> list[dict[str, Any]]:
    """The list entries of a dead node's sandboxes, as the directory records them."""
    return [lost_info(sid, node) for sid, where in sorted(directory.sandboxes.items())
            if where == node.node_id]


@dataclass(frozen=True)
class Reconciliation:
    """What a node does about its own records after a reading of the directory."""

    #: Local sandboxes to kill: the cluster reported them lost (their node is dead).
    kill: tuple[str, ...] = ()
    #: Directory records to drop, each ``(sandbox id, the node id it names)``.
    forget: tuple[tuple[str, str], ...] = ()


def reconcile(directory: Directory, own_node_id: str, local: Mapping[str, str], *,
              own_dead: bool = False) -> Reconciliation:
    """``local``: this home's sandboxes (id -> state), any state. Each one the directory
    records on a dead node (an earlier identity of this node, before a rejoin; or its
    current one once Ray's death of it is confirmed, ``own_dead``: a ``leave`` clears the
    record first) was reported lost: it is killed if it still holds anything, and its
    record dropped. A record that no local sandbox matches is left alone (its node's, or
    the retention's: :func:`expired`)."""
    kill: list[str] = []
    forget: list[tuple[str, str]] = []
    for sid, state in sorted(local.items()):
        where = directory.sandboxes.get(sid)
        if where is None or (where == own_node_id and not own_dead):
            continue
        node = directory.nodes.get(where)
        if node is not None and node.alive:
            continue  # a live node holds it (this one, or another: never ours to touch)
        if state in KILLABLE:
            kill.append(sid)
        forget.append((sid, where))
    return Reconciliation(tuple(kill), tuple(forget))


def expired(directory: Directory, now: float,
            retention_s: float = RETENTION_S) -> list[tuple[str, str]]:
    """Lost records past their retention: their node died more than ``retention_s`` ago
    (as Ray's node table dates it), or neither Ray nor the directory knows the node at all.
    A dead node Ray does not date keeps its records until it reconciles them itself."""
    out = []
    for sid, where in sorted(directory.sandboxes.items()):
        node = directory.nodes.get(where)
        past = node is not None and not node.alive and node.died_at is not None \
            and now - node.died_at > retention_s
        if node is None or past:
            out.append((sid, where))
    return out
