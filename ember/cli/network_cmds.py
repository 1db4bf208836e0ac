"""``ember network``: show and change a running sandbox's egress policy."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from ember.cli.common import handle_errors, print_json
from ember.errors import BadRequestError
from ember.net.policy import NetworkPolicy
from ember.net.stats import NetworkStats
from ember.sdk.results import SandboxInfo

#: Limits on a sandbox's network, given at create (run, create) or later (network set).
LIMIT_OPTIONS = [
    click.option("--rate-out", type=float, default=None, metavar="MBIT",
                 help="Bandwidth from the guest, Mbit/s (0: no limit)."),
    click.option("--rate-in", type=float, default=None, metavar="MBIT",
                 help="Bandwidth to the guest, Mbit/s (0: no limit)."),
    click.option("--max-connections", type=int, default=None, metavar="N",
                 help="Connections the guest may have open at once (0: no limit)."),
]


def limit_fields(rate_out: float | None, rate_in: float | None,
                 max_connections: int | None) -> dict[str, Any]:
    """The NetworkPolicy fields the given limit options set (0: no limit, None: not
    given)."""
    given = (("rate_out_mbit", rate_out), ("rate_in_mbit", rate_in),
             ("max_connections", max_connections))
    return {k: (v or None) for k, v in given if v is not None}


@click.group("network")
def network() -> None:
    """A sandbox's network: its egress policy (docs/networking.md)."""


def _show(policy: NetworkPolicy | None, as_json: bool,
          stats: NetworkStats | None = None) -> None:
    if as_json:
        doc = None if policy is None else policy.to_json()
        if doc is not None and stats is not None:
            doc = {**doc, "stats": dataclasses.asdict(stats)}
        print_json(doc)
    elif policy is None:
        click.echo("no network (the sandbox has no NIC)")
    else:
        click.echo(f"internet: {'on' if policy.internet else 'off'}")
        click.echo(f"allow: {', '.join(policy.allow) or '-'}")
        click.echo(f"deny: {', '.join(policy.deny) or '-'}")
        limits = {"rate out": f"{policy.rate_out_mbit:g} Mbit/s" if policy.rate_out_mbit
                  else None, "rate in": f"{policy.rate_in_mbit:g} Mbit/s"
                  if policy.rate_in_mbit else None, "max connections": policy.max_connections}
        click.echo("limits: " + (", ".join(f"{k} {v}" for k, v in limits.items() if v)
                                 or "none"))
        if stats is not None:
            click.echo(f"traffic: out {stats.bytes_out} B / {stats.packets_out} packets, in "
                       f"{stats.bytes_in} B / {stats.packets_in} packets; refused "
                       f"{stats.refused_packets} packets, dropped {stats.dropped_packets}")


@network.command("show")
@click.argument("sandbox_id")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def show(sandbox_id: str, as_json: bool) -> None:
    """Print the sandbox's egress policy."""
    from ember.sdk.sandbox import Sandbox

    info = Sandbox.get_info(sandbox_id)
    _show(info.network, as_json, live_stats(info))


def live_stats(info: SandboxInfo) -> NetworkStats | None:
    """The counters of a running or paused networked sandbox (else None)."""
    from ember.sdk.sandbox import Sandbox

    if info.network is None or info.state not in ("running", "paused"):
        return None
    sb = Sandbox.connect(info.id)
    try:
        return sb.network_stats()
    finally:
        sb.close()


@network.command("set")
@click.argument("sandbox_id")
@click.option("--internet/--no-internet", default=None,
              help="Outbound internet on or off (default: unchanged).")
@click.option("--allow", multiple=True, metavar="CIDR|DOMAIN",
              help="Allowed destinations, replacing the list; repeatable.")
@click.option("--deny", multiple=True, metavar="CIDR|DOMAIN",
              help="Denied destinations (win over --allow), replacing the list; repeatable.")
@LIMIT_OPTIONS[0]
@LIMIT_OPTIONS[1]
@LIMIT_OPTIONS[2]
@click.option("--clear", is_flag=True, help="Empty the allow and deny lists first.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def set_policy(sandbox_id: str, internet: bool | None, allow: tuple[str, ...],
               deny: tuple[str, ...], rate_out: float | None, rate_in: float | None,
               max_connections: int | None, clear: bool, as_json: bool) -> None:
    """Change a running sandbox's egress policy, atomically. Options not given keep their
    current value.

    Example: ember network set sb-1234abcd --no-internet --allow 203.0.113.0/24
    --allow pypi.org --allow '*.pythonhosted.org'
    """
    from ember.sdk.sandbox import Sandbox

    current = Sandbox.get_info(sandbox_id).network
    if current is None:
        raise BadRequestError(f"sandbox {sandbox_id} was created without a network "
                              "(--network none); create it with --network internet or off")
    base = dataclasses.replace(current, allow=(), deny=()) if clear else current
    limits = limit_fields(rate_out, rate_in, max_connections)
    policy = dataclasses.replace(
        base, internet=base.internet if internet is None else internet,
        allow=allow or base.allow, deny=deny or base.deny, **limits)
    _show(Sandbox.update_network(sandbox_id, policy).network, as_json)


@click.command("port")
@click.argument("sandbox_id")
@click.argument("port", type=click.IntRange(1, 65535), required=False)
@click.option("--close", is_flag=True, help="Stop exposing PORT.")
@click.option("--pause-after-idle", type=float, default=None, metavar="SECONDS",
              help="Scale to zero: pause the sandbox after SECONDS without traffic on its "
                   "exposed ports; the next connection resumes it.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def port(sandbox_id: str, port: int | None, close: bool, pause_after_idle: float | None,
         as_json: bool) -> None:
    """Expose the guest's TCP PORT at an address of this host, and print it; without PORT,
    list the exposed ports. The sandbox needs a network (--network off is enough).

    Example: ember port sb-1234abcd 8000   # then: curl http://127.0.0.1:<printed port>/
    """
    from ember.sdk.sandbox import Sandbox

    if close and port is None:
        raise BadRequestError("--close needs a PORT")
    sb = Sandbox.connect(sandbox_id)
    try:
        if port is None:
            shown = sb.ports()
        elif close:
            sb.unexpose(port)
            shown = sb.ports()
        else:
            shown = [sb.expose(port, pause_after_idle=pause_after_idle)]
    finally:
        sb.close()
    if as_json:
        print_json([dataclasses.asdict(p) for p in shown])
    else:
        for p in shown:
            http = f"  (HTTP via the daemon: Host {p.http_host}, or {p.http_path}/)" \
                if p.http_host and p.http_path else ""
            click.echo(f"{p.port} -> {p.address}{http}")
