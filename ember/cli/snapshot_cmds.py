"""Snapshot commands: snapshot create/ls/rm, restore, fork, pause, resume."""

from __future__ import annotations

import datetime
import time

import click
from rich.table import Table

from ember.cli.common import handle_errors, out_console, print_json, progress


@click.group("snapshot")
def snapshot() -> None:
    """Save sandboxes (memory, devices, disk) and list or remove snapshots."""


@snapshot.command("create")
@click.argument("sandbox_id")
@click.option("--name", default=None, help="A name to restore it by (default: only its id).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def snapshot_create(sandbox_id: str, name: str | None, as_json: bool) -> None:
    """Snapshot a running sandbox (paused only while it is copied; it keeps running)."""
    from ember.sdk.sandbox import Sandbox

    sb = Sandbox.connect(sandbox_id)
    try:
        t0 = time.monotonic()
        info = sb.snapshot(name)
        total_s = time.monotonic() - t0
    finally:
        sb.close()
    if as_json:
        print_json({**info.__dict__, "total_s": total_s})
    else:
        click.echo(info.id)
        click.echo(f"paused {(info.pause_s or 0) * 1000:.0f} ms, took {total_s * 1000:.0f} ms, "
                   f"{info.size_bytes / 2**20:.0f} MiB on disk", err=True)


@snapshot.command("ls")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def snapshot_ls(as_json: bool) -> None:
    """List snapshots."""
    from ember.sdk.sandbox import Sandbox

    infos = Sandbox.list_snapshots()
    if as_json:
        print_json([i.__dict__ for i in infos])
        return
    t = Table("ID", "NAME", "TEMPLATE", "SIZE", "VCPUS", "MEMORY", "SOURCE", "CREATED")
    for i in infos:
        created = datetime.datetime.fromtimestamp(i.created_at).strftime("%Y-%m-%d %H:%M")
        t.add_row(i.id[:12], i.name or "-", i.template, f"{i.size_bytes / 2**20:.0f} MiB",
                  str(i.vcpus), f"{i.memory_mib} MiB", i.source, created)
    out_console.print(t)


@snapshot.command("rm")
@click.argument("snapshots", nargs=-1, required=True)
@handle_errors
def snapshot_rm(snapshots: tuple[str, ...]) -> None:
    """Remove snapshots by name or id (refused while sandboxes restored from them run)."""
    from ember.sdk.sandbox import Sandbox

    for ref in snapshots:
        Sandbox.delete_snapshot(ref)
        click.echo(f"removed snapshot {ref}")


@click.command("restore")
@click.argument("snapshot_ref")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Sandbox lifetime in seconds (0: no limit).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def restore(snapshot_ref: str, timeout: float, as_json: bool) -> None:
    """Start a new sandbox from a snapshot (name or id); print its id."""
    from ember.sdk.sandbox import Sandbox

    with progress(not as_json, "restore", plain=False) as p:
        sb = Sandbox.restore(snapshot_ref, timeout=timeout or None, on_progress=p)
    info = sb.info()
    sb.close()
    if as_json:
        print_json(info.__dict__)
    else:
        click.echo(info.id)


@click.command("fork")
@click.argument("sandbox_id")
@click.option("-n", "count", type=int, default=1, show_default=True, help="How many clones.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def fork(sandbox_id: str, count: int, as_json: bool) -> None:
    """Clone a running sandbox's current state N times; print the clones' ids."""
    from ember.sdk.sandbox import Sandbox

    sb = Sandbox.connect(sandbox_id)
    try:
        clones = sb.fork(count)
    finally:
        sb.close()
    infos = []
    for c in clones:
        infos.append(c.info())
        c.close()
    if as_json:
        print_json([i.__dict__ for i in infos])
    else:
        for i in infos:
            click.echo(i.id)


@click.command("pause")
@click.argument("sandbox_id")
@handle_errors
def pause(sandbox_id: str) -> None:
    """Pause a sandbox's vCPUs (memory and processes are kept)."""
    from ember.sdk.sandbox import Sandbox

    Sandbox.pause(sandbox_id)
    click.echo(f"paused {sandbox_id}")


@click.command("resume")
@click.argument("sandbox_id")
@handle_errors
def resume(sandbox_id: str) -> None:
    """Resume a paused sandbox."""
    from ember.sdk.sandbox import Sandbox

    Sandbox.resume(sandbox_id)
    click.echo(f"resumed {sandbox_id}")
