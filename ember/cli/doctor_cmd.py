"""``ember doctor``: what this host supports and what ember will use."""

from __future__ import annotations

import sys

import click
from rich.table import Table

from ember.cli.common import handle_errors, out_console, print_json


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def doctor(as_json: bool) -> None:
    """Check the host: QEMU, accelerator (KVM or TCG, and why), kernel, images, tools."""
    from ember.engine.doctor import diagnose

    checks = diagnose()
    if as_json:
        print_json([c.__dict__ for c in checks])
    else:
        t = Table("CHECK", "OK", "DETAIL", "FIX")
        for c in checks:
            t.add_row(c.name, "[green]yes[/]" if c.ok else "[red]no[/]", c.detail, c.fix or "")
        out_console.print(t)
    if not all(c.ok for c in checks):
        sys.exit(1)
