"""Warm pool commands: pool set/ls/rm."""

from __future__ import annotations

import click
from rich.table import Table

from ember.cli.common import handle_errors, out_console, print_json


@click.group("pool")
def pool() -> None:
    """Warm pools: sandboxes started ahead so that create() returns at once."""


@pool.command("set")
@click.argument("template")
@click.option("--size", type=int, required=True, help="Ready sandboxes to keep (0 removes).")
@click.option("--vcpus", type=int, default=None)
@click.option("--memory", "memory_mib", type=int, default=None)
@click.option("--disk", "disk_mib", type=int, default=None)
@handle_errors
def pool_set(template: str, size: int, vcpus: int | None, memory_mib: int | None,
             disk_mib: int | None) -> None:
    """Keep SIZE sandboxes of TEMPLATE (at that size) ready; the home's supervisor fills
    the pool in the background."""
    from ember.sdk.sandbox import Sandbox

    rec = Sandbox.set_pool(template, size, vcpus=vcpus, memory_mib=memory_mib,
                           disk_mib=disk_mib)
    click.echo(f"pool {rec.key}: size {rec.size}")


@pool.command("ls")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def pool_ls(as_json: bool) -> None:
    """Pools, how many members are ready or starting, and their idle host memory (PSS)."""
    from ember.sdk.sandbox import Sandbox

    pools = Sandbox.list_pools()
    if as_json:
        print_json([p.__dict__ for p in pools])
        return
    t = Table("POOL", "SIZE", "READY", "STARTING", "IDLE MEMORY (PSS)")
    for p in pools:
        t.add_row(p.key, str(p.size), str(p.ready), str(p.starting),
                  f"{p.idle_pss_bytes / 2**20:.0f} MiB")
    out_console.print(t)


@pool.command("rm")
@click.argument("key")
@handle_errors
def pool_rm(key: str) -> None:
    """Remove pool KEY (as `ember pool ls` shows it) and destroy its ready members."""
    from ember.sdk.sandbox import Sandbox

    Sandbox.remove_pool(key)
    click.echo(f"removed pool {key}")
