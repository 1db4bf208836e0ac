"""Asking every other live node of the cluster the same question, for the routes that
answer for the whole cluster beyond ember's own ``GET /v1/sandboxes`` (which
:class:`~ember.daemon.cluster_forward.ClusterForward` lists): E2B's lists and
many-sandbox metrics, the administrator's lists of API keys and tenants.

Each live peer that published a daemon is asked in parallel, vouched for as the caller
(:mod:`ember.cluster.vouch`), marked as forwarded (so it answers for itself only), and
given :data:`PEER_TIMEOUT_S`; a node that does not answer in time, or answers anything
but a 200 with JSON, is left out with a logged warning, never waited on. No Ray import:
the directory is the daemon's cached reading (a child process). Off a cluster, or on a
request that another node forwarded, there are no peers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import HTTPConnection

from ember.cluster.directory import Directory, NodeEntry
from ember.cluster.record import load_record, load_secret
from ember.cluster.vouch import FORWARDED_HEADER, VOUCH_HEADER, sign
from ember.daemon.auth import Principal
from ember.errors import EmberError

log = logging.getLogger("ember.daemon")

#: Each other node's part of a cluster-wide answer (as ``GET /v1/sandboxes``'s).
PEER_TIMEOUT_S = 5.0
#: Reaching another node's daemon.
CONNECT_TIMEOUT_S = 3.0
#: An answer read from a peer at most (bytes).
MAX_ANSWER = 16 << 20


@dataclass(frozen=True)
class PeerAnswer:
    node: NodeEntry
    #: Its JSON answer.
    doc: Any


def live_peers(directory: Directory, own_node_id: str) -> list[NodeEntry]:
    """The nodes to ask (pure): every other node Ray reports alive with a daemon."""
    return [n for n in directory.peers(own_node_id) if n.alive and n.daemon]


async def ask_peers(conn: HTTPConnection, who: Principal, path: str,
                    query: str = "") -> list[PeerAnswer]:
    """Every other live node's JSON answer to ``GET path?query`` for ``who`` (see the
    module); [] off a cluster or for a forwarded request."""
    if conn.headers.get(FORWARDED_HEADER) is not None:
        return []
    live = conn.app.state.live
    try:
        rec = await asyncio.to_thread(load_record, live.paths)
        secret = await asyncio.to_thread(load_secret, live.paths)
    except EmberError as err:
        log.warning("answering for this node only: %s", err)
        return []
    if rec is None or rec.daemon is None or not secret:
        return []
    cache = getattr(conn.app.state, "directory", None)
    if cache is None:
        return []
    try:
        directory = await cache.get(rec.address)
    except EmberError as err:
        log.warning("answering for this node only: %s", err)
        return []
    peers = live_peers(directory, rec.node_id)
    if not peers:
        return []
    headers = {VOUCH_HEADER: sign(secret, who.tenant, "GET", path),
               FORWARDED_HEADER: rec.node_id}
    async with httpx.AsyncClient(
            timeout=httpx.Timeout(PEER_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_keepalive_connections=0)) as client:

        async def one(node: NodeEntry) -> PeerAnswer | None:
            url = f"http://{node.daemon}{path}" + (f"?{query}" if query else "")
            try:
                r = await asyncio.wait_for(client.get(url, headers=headers), PEER_TIMEOUT_S)
                if r.status_code != 200:
                    raise ValueError(f"answered {r.status_code}")
                if len(r.content) > MAX_ANSWER:
                    raise ValueError(f"answered over {MAX_ANSWER} bytes")
                return PeerAnswer(node, r.json())
            except (httpx.HTTPError, TimeoutError, ValueError, OSError) as err:
                log.warning("node %s (%s) left out of %s: %s", node.node_id[:12],
                            node.daemon, path, f"{type(err).__name__}: {err}"[:300])
                return None

        got = await asyncio.gather(*(one(p) for p in peers))
    return [a for a in got if a is not None]


__all__ = ("PEER_TIMEOUT_S", "PeerAnswer", "ask_peers", "live_peers")
