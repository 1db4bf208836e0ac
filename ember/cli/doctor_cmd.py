"""``ember doctor``: what this host supports and what ember will use."""

from __future__ import annotations

import sys

import click
from rich.table import Table

from ember.cli.common import handle_errors, out_console, print_json
from ember.engine.doctor import Check


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def doctor(as_json: bool) -> None:
    """Check the host: QEMU, accelerator (KVM or TCG, and why), kernel, images, tools."""
    from ember.engine.doctor import diagnose
    from ember.net.doctor import checks as network_checks

    checks = [*diagnose(), _template_snapshots(), *network_checks()]
    if as_json:
        print_json([c.__dict__ for c in checks])
    else:
        t = Table("CHECK", "OK", "DETAIL", "FIX")
        for c in checks:
            t.add_row(c.name, "[green]yes[/]" if c.ok else "[red]no[/]", c.detail, c.fix or "")
        out_console.print(t)
    if not all(c.ok for c in checks):
        sys.exit(1)


def _template_snapshots() -> Check:
    """Which templates of this home have template snapshots, and their size (information:
    a template without one boots on its next create and makes it)."""
    from ember.paths import Paths
    from ember.runtime.template_snapshots import is_template_snapshot
    from ember.store import Store

    paths = Paths.from_env().ensure()
    store = Store(paths.db)
    try:
        snaps = [s for s in store.list_snapshots() if is_template_snapshot(s)]
        names = [t.name for t in store.list_templates() if not t.config.get("snapshot")]
    finally:
        store.close()
    having = sorted({s.template for s in snaps})
    without = [n for n in names if n not in having]
    detail = (f"{len(snaps)} ({sum(s.size_bytes for s in snaps) / 2**20:.0f} MiB) for "
              f"{', '.join(having) or 'no template'}")
    if without:
        detail += f"; none yet for {', '.join(without)} (made by its first create)"
    return Check("template snapshots", True, detail)
