"""``ember cluster``: this host's daemon as a node of a Ray cluster (docs/cluster.md).

Needs the ``cluster`` extra (Ray), imported only when one of these commands runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.table import Table

from ember.cli.common import handle_errors, out_console, print_json

F = TypeVar("F", bound=Callable[..., Any])


@click.group("cluster")
def cluster() -> None:
    """Many hosts behind one API: each host's daemon joins a Ray cluster as a node and
    advertises what it may give sandboxes (vCPUs, memory, tiers, KVM or TCG, templates)
    as Ray resources. Ray's node table is the membership. Needs pip install ember[cluster]."""


def _advertise_options(fn: F) -> F:
    fn = click.option("--node-ip", default=None, metavar="IP",
                      help="This node's address in the cluster (default: the local address "
                      "that reaches the head, or Redis for a head).")(fn)
    fn = click.option("--memory-mib", type=click.IntRange(min=1), default=None,
                      help="Memory sandboxes may have on this host (default: all but 1 GiB).")(fn)
    fn = click.option("--vcpus", type=click.IntRange(min=1), default=None,
                      help="vCPUs sandboxes may have on this host (default: its CPU count).")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")(fn)
    fn = click.option("--daemon-port", type=click.IntRange(1, 65535), default=None,
                      help="TCP port of this node's daemon on --node-ip, where the other "
                      "nodes' daemons forward requests for its sandboxes (default 7707).")(fn)
    return fn


def _serve_and_show(rec: object, as_json: bool) -> None:
    """A node serves: its daemon runs (started here unless it does, never by Ray), so that
    what Ray places on it can be created; then the record is shown."""
    from ember.cluster.record import ClusterRecord
    from ember.daemon import control
    from ember.paths import Paths

    assert isinstance(rec, ClusterRecord)
    st = control.start(Paths.from_env(), listen=rec.daemon)
    if as_json:
        print_json(rec.to_json())
        return
    click.echo(f"{rec.role} of {rec.address}: node {rec.node_id} at {rec.node_ip}")
    click.echo("advertised: " + ", ".join(f"{k}={v:g}" for k, v in sorted(rec.resources.items())))
    click.echo(f"emberd running: pid {st.pid}, socket {st.socket}")


@cluster.command("start-head")
@click.option("--redis", required=True, metavar="HOST:PORT", envvar="EMBER_CLUSTER_REDIS",
              help="The Redis that keeps the cluster's state (GCS), so that a head restart "
              "loses nothing [env EMBER_CLUSTER_REDIS].")
@click.option("--redis-password", default=None, envvar="EMBER_CLUSTER_REDIS_PASSWORD",
              help="Its password [env EMBER_CLUSTER_REDIS_PASSWORD].")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="The head's GCS port, the one nodes join (default 6380).")
@_advertise_options
@handle_errors
def start_head(redis: str, redis_password: str | None, port: int | None, as_json: bool,
               vcpus: int | None, memory_mib: int | None, node_ip: str | None,
               daemon_port: int | None) -> None:
    """Start the cluster's head on this host (also a node that runs sandboxes; its daemon
    is started unless it runs). Run it again after the head died, with the same Redis and
    port: the cluster resumes."""
    from ember.cluster.advertise import detect_advertisement
    from ember.cluster.node import DEFAULT_DAEMON_PORT, DEFAULT_PORT
    from ember.cluster.node import start_head as start
    from ember.paths import Paths

    paths = Paths.from_env().ensure()
    adv = detect_advertisement(paths, vcpus=vcpus, memory_mib=memory_mib)
    _serve_and_show(start(paths, adv, redis=redis, node_ip=node_ip, port=port or DEFAULT_PORT,
                redis_password=redis_password,
                daemon_port=daemon_port or DEFAULT_DAEMON_PORT), as_json)


@cluster.command("join")
@click.argument("address", metavar="ADDRESS")
@_advertise_options
@handle_errors
def join(address: str, as_json: bool, vcpus: int | None, memory_mib: int | None,
         node_ip: str | None, daemon_port: int | None) -> None:
    """Join the cluster whose head is at ADDRESS (HOST:PORT, as start-head printed); this
    home's daemon is started unless it runs."""
    from ember.cluster.advertise import detect_advertisement
    from ember.cluster.node import DEFAULT_DAEMON_PORT
    from ember.cluster.node import join as join_cluster
    from ember.paths import Paths

    paths = Paths.from_env().ensure()
    adv = detect_advertisement(paths, vcpus=vcpus, memory_mib=memory_mib)
    _serve_and_show(join_cluster(paths, adv, address, node_ip=node_ip,
                                 daemon_port=daemon_port or DEFAULT_DAEMON_PORT), as_json)


@cluster.command("leave")
@handle_errors
def leave() -> None:
    """Stop this host's Ray node and forget the cluster. Its sandboxes keep running."""
    from ember.cluster.node import leave as leave_cluster
    from ember.paths import Paths

    rec = leave_cluster(Paths.from_env())
    click.echo(f"left {rec.address} (node {rec.node_id})" if rec else "was in no cluster")


@cluster.command("nodes")
@click.option("--address", default=None, metavar="HOST:PORT",
              help="The head's address (default: the cluster this home joined).")
@click.option("--all", "show_all", is_flag=True, help="Also nodes that are dead or left.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def nodes(address: str | None, show_all: bool, as_json: bool) -> None:
    """The cluster's nodes as Ray's node table has them, with what each advertises (on a
    node of the cluster: Ray's client reads it through this host's raylet)."""
    from ember.cluster.node import running_raylet
    from ember.cluster.nodes import list_nodes
    from ember.cluster.record import load_record
    from ember.errors import BadRequestError
    from ember.paths import Paths

    if running_raylet(None) is None:
        raise BadRequestError("no Ray node runs on this host: run this on a node of the "
                              "cluster (ember cluster join)")
    if address is None:
        rec = load_record(Paths.from_env())
        if rec is None:
            raise BadRequestError("this home joined no cluster: give --address HOST:PORT")
        address = rec.address
    views = [v for v in list_nodes(address) if show_all or v.alive]
    if as_json:
        print_json([v.to_json() for v in views])
        return
    t = Table("NODE", "IP", "STATE", "ROLE", "VCPUS", "MEMORY", "TIERS", "ACCEL", "TEMPLATES")
    for v in views:
        a = v.advertised
        t.add_row(v.node_id[:12], v.ip, v.state, "head" if v.head else "worker",
                  str(a.vcpus) if a else "-", f"{a.memory_mib} MiB" if a else "-",
                  ",".join(a.tiers) if a else "-", a.accel if a else "-",
                  ",".join(a.templates) if a else "-")
    out_console.print(t)


@cluster.command("pull")
@click.argument("template")
@click.option("--force", is_flag=True,
              help="Replace this node's template of that name when it has another digest.")
@click.option("--url", default=None, envvar="EMBER_URL",
              help="The daemon to ask (default: this home's) [env EMBER_URL].")
@click.option("--json", "as_json", is_flag=True, help="Print the template as JSON.")
@handle_errors
def pull(template: str, force: bool, url: str | None, as_json: bool) -> None:
    """Fetch TEMPLATE from a node of the cluster that holds it, check its digest and
    register it on this node (a create of a template a node does not hold does this
    itself). The administrator's."""
    import asyncio
    import dataclasses
    import time

    from ember.cli.common import progress

    t0 = time.monotonic()
    with progress(not as_json, f"pull {template}") as p:
        info = asyncio.run(_pull(template, force, url, p))
    if as_json:
        print_json({**dataclasses.asdict(info), "seconds": round(time.monotonic() - t0, 3)})
        return
    click.echo(f"{info.name}: {info.digest} ({info.size_bytes >> 20} MiB image) in "
               f"{time.monotonic() - t0:.1f} s")


async def _pull(template: str, force: bool, url: str | None,
                on_progress: Callable[[str], None]) -> Any:
    """``POST /v1/cluster/templates/NAME/pull`` and its NDJSON events."""
    import asyncio
    import os
    from urllib.parse import quote

    from ember.paths import Paths
    from ember.sdk.remote import Transport
    from ember.sdk.template_ops import template_events

    if url:
        t = Transport(url, os.environ.get("EMBER_API_KEY"))
    else:
        from ember.daemon.control import ensure_running

        home = Paths.from_env()
        await asyncio.to_thread(ensure_running, home)
        t = Transport(f"unix://{home.daemon_socket}", os.environ.get("EMBER_API_KEY"))
    try:
        r = await t.stream("POST", f"/cluster/templates/{quote(template, safe='')}/pull",
                           json={"force": force})
        return await template_events(r, on_progress, f"the pull of {template!r}")
    finally:
        await t.close()

