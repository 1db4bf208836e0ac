"""``ember apikey`` and ``ember tenant``: who may use the daemon over the network, and how
much each tenant may hold at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click
from rich.table import Table

from ember.cli.common import handle_errors, out_console, print_json

if TYPE_CHECKING:
    from ember.store import Store


def _store() -> Store:
    from ember.paths import Paths
    from ember.store import Store

    return Store(Paths.from_env().ensure().db)


T = TypeVar("T")


def _to_cluster(what: str, fn: Callable[[str], T]) -> T | None:
    """``fn(address)`` on the cluster this home joined (bounded; docs/cluster.md): None
    outside a cluster; a failure is said, and this node keeps what it did."""
    from ember.cluster.nodes import QUERY_TIMEOUT_S, bounded
    from ember.cluster.record import load_record
    from ember.errors import EmberError
    from ember.paths import Paths

    rec = load_record(Paths.from_env())
    if rec is None:
        return None
    try:
        return bounded(lambda: fn(rec.address), QUERY_TIMEOUT_S, what)
    except EmberError as err:
        click.echo(f"warning: {what}: {err} (done on this node only)", err=True)
        return None


@click.group("apikey")
def apikey() -> None:
    """API keys for the daemon (required over TCP; on the Unix socket the caller's uid
    decides). Only a hash of each key is stored."""


@apikey.command("create")
@click.option("--tenant", required=True, help="The tenant the key acts for ('admin': all).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def apikey_create(tenant: str, as_json: bool) -> None:
    """Create a key for TENANT and print it (shown this once)."""
    from ember.cluster.keys import publish_key
    from ember.daemon.auth import new_key

    rec, token = new_key(_store(), tenant)
    _to_cluster("giving the key to the cluster", lambda address: publish_key(address, rec))
    if as_json:
        print_json({**rec.to_json(), "key": token})
    else:
        click.echo(token)
        click.echo(f"key {rec.id} for tenant {rec.tenant}: keep it, it is not shown again",
                   err=True)


@apikey.command("ls")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def apikey_ls(as_json: bool) -> None:
    """Keys: id, tenant, created, revoked. On a node of a cluster, the cluster's keys and
    this node's, with where each is kept (WHERE: here, here-only, cluster)."""
    from ember.cluster.keys import listed_keys, read

    local = _store().list_api_keys()
    reg = _to_cluster("reading the cluster's keys", read)
    rows = [(k, None) for k in local] if reg is None else listed_keys(local, reg)
    if as_json:
        print_json([{**k.to_json(), **({"where": w} if w else {})} for k, w in rows])
        return
    cols = ("ID", "TENANT", "CREATED", "REVOKED") + (("WHERE",) if reg is not None else ())
    t = Table(*cols)
    for k, w in rows:
        t.add_row(k.id, k.tenant, time.strftime("%F %T", time.localtime(k.created_at)),
                  time.strftime("%F %T", time.localtime(k.revoked_at)) if k.revoked_at else "",
                  *((w or "",) if reg is not None else ()))
    out_console.print(t)


@apikey.command("revoke")
@click.argument("key_id")
@handle_errors
def apikey_revoke(key_id: str) -> None:
    """Revoke a key: the daemon refuses it from the next request on (on a cluster, every
    node within a few seconds, whichever node made it)."""
    from ember.cluster.keys import revoke_key
    from ember.errors import NotFoundError

    now = time.time()
    try:
        rec = _store().revoke_api_key(key_id, now)
    except NotFoundError:  # a key another node of the cluster made
        there = _to_cluster("revoking the key in the cluster",
                            lambda address: revoke_key(address, key_id, now))
        if there is None:
            raise
        click.echo(f"revoked {there.id} (tenant {there.tenant}) in the cluster")
        return
    _to_cluster("revoking the key in the cluster",
                lambda address: revoke_key(address, key_id, now))
    click.echo(f"revoked {rec.id} (tenant {rec.tenant})")


@click.group("tenant")
def tenant() -> None:
    """Tenants' quotas: running sandboxes, vCPUs and memory (429 beyond them)."""


@tenant.command("set")
@click.argument("name")
@click.option("--max-sandboxes", type=click.IntRange(0), default=None)
@click.option("--max-vcpus", type=click.IntRange(0), default=None)
@click.option("--max-memory", "max_memory_mib", type=click.IntRange(0), default=None,
              help="MiB")
@handle_errors
def tenant_set(name: str, max_sandboxes: int | None, max_vcpus: int | None,
               max_memory_mib: int | None) -> None:
    """Set NAME's limits (an option left out: no limit)."""
    from ember.cluster.keys import publish_tenant
    from ember.store.records import TenantRecord

    rec = TenantRecord(name, max_sandboxes, max_vcpus, max_memory_mib)
    _store().put_tenant(rec)
    _to_cluster("giving the limits to the cluster",
                lambda address: publish_tenant(address, rec))
    click.echo(f"tenant {name}: sandboxes {max_sandboxes}, vcpus {max_vcpus}, "
               f"memory {max_memory_mib} MiB")


@tenant.command("ls")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def tenant_ls(as_json: bool) -> None:
    """Tenants with limits. On a node of a cluster, the cluster's and this node's, with
    the limits that apply (the cluster's) and where each is kept (WHERE: here, here-only,
    cluster)."""
    from ember.cluster.keys import listed_tenants, read

    local = _store().list_tenants()
    reg = _to_cluster("reading the cluster's tenants", read)
    rows = [(r, None) for r in local] if reg is None else listed_tenants(local, reg)
    if as_json:
        print_json([{**r.to_json(), **({"where": w} if w else {})} for r, w in rows])
        return
    cols = ("TENANT", "MAX SANDBOXES", "MAX VCPUS", "MAX MEMORY MIB") + (
        ("WHERE",) if reg is not None else ())
    t = Table(*cols)
    for r, w in rows:
        t.add_row(r.name, *(str(v) if v is not None else "-" for v in
                            (r.max_sandboxes, r.max_vcpus, r.max_memory_mib)),
                  *((w or "",) if reg is not None else ()))
    out_console.print(t)
