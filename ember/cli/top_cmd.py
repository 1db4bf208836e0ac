"""``ember top``: live CPU and memory of every sandbox, from the daemon."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click
from rich.live import Live
from rich.table import Table

from ember.cli.common import handle_errors, out_console, print_json

if TYPE_CHECKING:
    from ember.sdk.results import SandboxUsage


def _rows(before: list[SandboxUsage], after: list[SandboxUsage]) -> list[dict[str, object]]:
    """Per sandbox in both samples: CPU use between them (100 = one host CPU busy)."""
    old = {u.id: u for u in before}
    out: list[dict[str, object]] = []
    for u in after:
        prev = old.get(u.id)
        wall = u.sampled_at - prev.sampled_at if prev is not None else 0.0
        cpu = (max(0.0, u.cpu_seconds - prev.cpu_seconds) / wall * 100
               if prev is not None and wall > 0 else 0.0)
        out.append({"id": u.id, "state": u.state, "vcpus": u.vcpus,
                    "cpu_percent": round(cpu, 1), "cpu_seconds": round(u.cpu_seconds, 2),
                    "memory_bytes": u.memory_bytes, "memory_limit_mib": u.memory_mib})
    return sorted(out, key=lambda r: -float(str(r["cpu_percent"])))


def _table(rows: list[dict[str, object]]) -> Table:
    t = Table("ID", "STATE", "VCPUS", "CPU %", "CPU TIME", "MEMORY", "LIMIT")
    for r in rows:
        mem = int(str(r["memory_bytes"])) / 2**20
        t.add_row(str(r["id"]), str(r["state"]), str(r["vcpus"]), f"{r['cpu_percent']}",
                  f"{r['cpu_seconds']} s", f"{mem:.0f} MiB", f"{r['memory_limit_mib']} MiB")
    return t


@click.command("top")
@click.option("--interval", "-n", type=click.FloatRange(0.2, 60), default=2.0,
              show_default=True, help="Seconds between samples.")
@click.option("--once", is_flag=True, help="One table (two samples INTERVAL apart), then exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once: the rows as JSON.")
@handle_errors
def top(interval: float, once: bool, as_json: bool) -> None:
    """Live CPU and memory of each running sandbox, as the daemon measures them on the
    host (CPU % of one host CPU; memory the sandbox holds: its cgroup, or its VMM).
    Ctrl-C to leave."""
    from ember.sdk.sandbox import Sandbox

    before = Sandbox.list_usage()
    if once or as_json:
        time.sleep(interval)
        rows = _rows(before, Sandbox.list_usage())
        if as_json:
            print_json(rows)
        else:
            out_console.print(_table(rows))
        return
    with Live(_table(_rows(before, before)), console=out_console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            after = Sandbox.list_usage()
            live.update(_table(_rows(before, after)), refresh=True)
            before = after
