"""``ember network``: show and change a running sandbox's egress policy."""

from __future__ import annotations

import dataclasses

import click

from ember.cli.common import handle_errors, print_json
from ember.errors import BadRequestError
from ember.net.policy import NetworkPolicy


@click.group("network")
def network() -> None:
    """A sandbox's network: its egress policy (docs/networking.md)."""


def _show(policy: NetworkPolicy | None, as_json: bool) -> None:
    if as_json:
        print_json(None if policy is None else policy.to_json())
    elif policy is None:
        click.echo("no network (the sandbox has no NIC)")
    else:
        click.echo(f"internet: {'on' if policy.internet else 'off'}")
        click.echo(f"allow: {', '.join(policy.allow) or '-'}")
        click.echo(f"deny: {', '.join(policy.deny) or '-'}")


@network.command("show")
@click.argument("sandbox_id")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def show(sandbox_id: str, as_json: bool) -> None:
    """Print the sandbox's egress policy."""
    from ember.sdk.sandbox import Sandbox

    _show(Sandbox.get_info(sandbox_id).network, as_json)


@network.command("set")
@click.argument("sandbox_id")
@click.option("--internet/--no-internet", default=None,
              help="Outbound internet on or off (default: unchanged).")
@click.option("--allow", multiple=True, metavar="CIDR|DOMAIN",
              help="Allowed destinations, replacing the list; repeatable.")
@click.option("--deny", multiple=True, metavar="CIDR|DOMAIN",
              help="Denied destinations (win over --allow), replacing the list; repeatable.")
@click.option("--clear", is_flag=True, help="Empty the allow and deny lists first.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def set_policy(sandbox_id: str, internet: bool | None, allow: tuple[str, ...],
               deny: tuple[str, ...], clear: bool, as_json: bool) -> None:
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
    base = NetworkPolicy(internet=current.internet) if clear else current
    policy = dataclasses.replace(
        base, internet=base.internet if internet is None else internet,
        allow=allow or base.allow, deny=deny or base.deny)
    _show(Sandbox.update_network(sandbox_id, policy).network, as_json)
