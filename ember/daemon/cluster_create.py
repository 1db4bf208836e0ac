"""Creates on a node of an ember cluster (docs/cluster.md): the create route asks here
first. A home in a cluster places each new sandbox with Ray (:mod:`ember.cluster.placement`,
run in a child process so that the daemon never becomes a Ray driver); the create that the
placement actor then sends to its own node's daemon is marked, and is created there as any
other. Without a cluster, with ``EMBER_CLUSTER_PLACEMENT=off``, or while Ray cannot be
reached, a create is local. No Ray import here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from ember.cluster import child
from ember.cluster.placement import (
    CONNECT_TIMEOUT_S,
    CREATE_TIMEOUT_S,
    PLACE_TIMEOUT_S,
    PLACEMENT_HEADER,
    TENANT_HEADER,
    demand,
)
from ember.cluster.record import ClusterRecord, load_record
from ember.daemon.auth import ADMIN, Principal
from ember.daemon.cluster_templates import ensure as ensure_template
from ember.daemon.live import LiveSandboxes
from ember.daemon.models import CreateRequest
from ember.errors import EmberError, HostError, TemplateNotFoundError
from ember.sdk.wire import error_from_body

log = logging.getLogger("ember.daemon")
ENV_SWITCH = "EMBER_CLUSTER_PLACEMENT"


@dataclass(frozen=True)
class Decision:
    #: The placed sandbox's info (the answer), or None: create here, as ``who``.
    info: dict[str, Any] | None
    who: Principal


async def decide(request: Request, body: CreateRequest, live: LiveSandboxes,
                 who: Principal) -> Decision:
    """Place the create with Ray, or say to create it here (and for whom)."""
    return await _decide(request, body, live, who, "/v1/sandboxes", None)


async def decide_e2b(request: Request, body: CreateRequest, e2b_body: dict[str, Any],
                     live: LiveSandboxes, who: Principal) -> Decision:
    """:func:`decide` for a create through E2B's API: ``body`` its ember translation (the
    demand), ``e2b_body`` what the chosen node's E2B route is sent, so that the answer
    (E2B's, with that node's envd token) comes from the node that holds the sandbox."""
    return await _decide(request, body, live, who, "/v2/sandboxes", e2b_body)


async def _decide(request: Request, body: CreateRequest, live: LiveSandboxes,
                  who: Principal, path: str, payload: dict[str, Any] | None) -> Decision:
    if request.headers.get(PLACEMENT_HEADER) is not None and who.admin:
        # A placement actor's create on its own node: never placed again. It comes from
        # root on this host's socket, for the tenant that asked the first daemon (from
        # anyone else the header is ignored: it would skip the cluster's quota).
        await ensure_template(live.paths, live.mgr.store, body.template)  # fetched here
        tenant = request.headers.get(TENANT_HEADER)
        if who.admin and tenant:
            return Decision(None, Principal(tenant, tenant == ADMIN))
        return Decision(None, who)
    if os.environ.get(ENV_SWITCH, "").lower() in ("off", "0", "no"):
        return Decision(None, who)
    try:
        rec = await asyncio.to_thread(load_record, live.paths)
    except HostError as err:
        log.warning("creating locally: %s", err)
        return Decision(None, who)
    if rec is None:
        return Decision(None, who)
    answer = await asyncio.to_thread(_place, rec, body, who, live, path, payload)
    if "unreachable" in answer:
        log.warning("the cluster at %s cannot be reached (%s): creating locally",
                    rec.address, answer["unreachable"])
        return Decision(None, who)
    if "info" not in answer:
        raise error_from_body(answer, int(answer.get("status", 500)))
    log.info("sandbox %s placed by Ray on node %s (actor %s)", answer["info"].get("id"),
             answer.get("node_id"), answer.get("actor"))
    info: dict[str, Any] = answer["info"]
    return Decision(info, who)


def _place(rec: ClusterRecord, body: CreateRequest, who: Principal,
           live: LiveSandboxes, path: str = "/v1/sandboxes",
           payload: dict[str, Any] | None = None) -> dict[str, Any]:
    vcpus, memory = body.vcpus, body.memory_mib
    try:  # the template's own shape when this node has it
        config = live.mgr.store.get_template(body.template).config
        vcpus = vcpus or int(config.get("vcpus", 1))
        memory = memory or int(config.get("memory_mib", 256))
    except TemplateNotFoundError:
        pass
    request = {"address": rec.address, "prefer_node": rec.node_id, "tenant": who.tenant,
               "body": payload if payload is not None else
               body.model_dump(mode="json", exclude_unset=True),
               "demand": demand(body.template, body.isolation, vcpus or 1, memory or 256),
               "path": path, "limits": _local_limits(live, who.tenant),
               "template": body.template}
    try:
        return child.ask("placement", what="placing a sandbox with Ray",
                         stdin=json.dumps(request).encode(), error_is_failure=False,
                         timeout=CONNECT_TIMEOUT_S + PLACE_TIMEOUT_S + CREATE_TIMEOUT_S + 60)
    except HostError:
        raise
    except EmberError as err:
        raise HostError(f"placing a sandbox with Ray failed: {err}") from err


@dataclass(frozen=True)
class HereDecision:
    #: The placed fork's or restore's answer (a list of infos, or one), or None: do it
    #: here, as ``who``.
    info: Any
    who: Principal


@dataclass(frozen=True)
class Shape:
    """What a fork or restore makes (pure): all of it counts for the tenant at once."""

    isolation: str
    vcpus: int
    memory_mib: int
    sandboxes: int = 1


async def decide_here(request: Request, live: LiveSandboxes, who: Principal, path: str,
                      payload: dict[str, Any], shape: Shape) -> HereDecision:
    """A fork or restore (``path``, ``payload``: its route and body) on a node of a
    cluster: placed by Ray on this node (a hard affinity: its source is here), so that the
    cluster's quota keeper admits it and its placement actor counts it while it lives, as
    a placed create is; or, marked as that actor's own request, or off a cluster, or while
    Ray cannot be reached, to be done here (and for whom)."""
    if request.headers.get(PLACEMENT_HEADER) is not None and who.admin:
        tenant = request.headers.get(TENANT_HEADER)  # else ignored, as for creates
        if tenant:
            return HereDecision(None, Principal(tenant, tenant == ADMIN))
        return HereDecision(None, who)
    if os.environ.get(ENV_SWITCH, "").lower() in ("off", "0", "no"):
        return HereDecision(None, who)
    try:
        rec = await asyncio.to_thread(load_record, live.paths)
    except HostError as err:
        log.warning("forking or restoring without the cluster's quota: %s", err)
        return HereDecision(None, who)
    if rec is None or not rec.node_id:
        return HereDecision(None, who)
    ask = {"address": rec.address, "prefer_node": rec.node_id, "tenant": who.tenant,
           "body": payload, "path": path, "limits": _local_limits(live, who.tenant),
           "demand": demand("", shape.isolation, shape.vcpus, shape.memory_mib),
           "hard": True, "sandboxes": shape.sandboxes}
    answer = await asyncio.to_thread(
        child.ask, "placement", what="placing a fork or restore with Ray",
        stdin=json.dumps(ask).encode(), error_is_failure=False,
        timeout=CONNECT_TIMEOUT_S + PLACE_TIMEOUT_S + CREATE_TIMEOUT_S + 60)
    if "unreachable" in answer:
        log.warning("the cluster at %s cannot be reached (%s): %s here, counted against "
                    "this node's quota only", rec.address, answer["unreachable"], path)
        return HereDecision(None, who)
    if "info" not in answer:
        raise error_from_body(answer, int(answer.get("status", 500)))
    log.info("%s placed by Ray on this node (actor %s)", path, answer.get("actor"))
    return HereDecision(answer["info"], who)


def _local_limits(live: LiveSandboxes, tenant: str) -> dict[str, Any] | None:
    """This node's own limits for ``tenant`` (the cluster's, where it has them, win in the
    quota keeper: ember.cluster.quota)."""
    rec = live.mgr.store.get_tenant(tenant)
    return None if rec is None else {"max_sandboxes": rec.max_sandboxes,
                                     "max_vcpus": rec.max_vcpus,
                                     "max_memory_mib": rec.max_memory_mib}
