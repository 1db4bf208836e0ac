"""``ember image ...``: templates."""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time

import click
from rich.table import Table

from ember.cli.common import handle_errors, out_console, print_json, progress
from ember.errors import EmberError
from ember.paths import Paths
from ember.store import Store


def _store(paths: Paths) -> Store:
    return Store(paths.ensure().db)


@click.group("image")
def image() -> None:
    """Build, list, check and remove templates (root filesystem images)."""


@image.command("build")
@click.argument("name")
@click.option("--from", "source", metavar="SOURCE",
              help="debian:SUITE | oci-layout:DIR[:TAG] | docker-archive:FILE.tar | "
                   "registry:HOST/REPO[:TAG] | docker://HOST/REPO[:TAG] | dir:PATH | "
                   "dockerfile:PATH (a context directory or a Dockerfile; "
                   "docs/dockerfile.md). "
                   "Optional for built-in templates (debian-python, debian, "
                   "code-interpreter-v1).")
@click.option("--package", "-p", "packages", multiple=True,
              help="Extra Debian package (debian: sources only); repeatable.")
@click.option("--force", is_flag=True, help="Replace an existing template of that name.")
@click.option("--rebuild", is_flag=True, help="Ignore the cached image of the same recipe.")
@click.option("--free-mib", type=click.IntRange(0, 1 << 20), default=1024, show_default=True,
              help="Free space in the image's filesystem (sparse: costs no host disk).")
@click.option("--file", "-f", "dockerfile", metavar="FILE",
              help="dockerfile: the Dockerfile (default: PATH/Dockerfile).")
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY=VALUE",
              help="dockerfile: a value for an ARG; repeatable.")
@click.option("--target", metavar="STAGE", help="dockerfile: the stage to build.")
@click.option("--no-cache", is_flag=True, help="dockerfile: run every step again.")
@click.option("--network", "network", type=click.Choice(("none", "internet", "off")),
              default="none", show_default=True,
              help="dockerfile: the RUN steps' network (none: no NIC; internet; off: only "
                   "--allow); see docs/networking.md.")
@click.option("--allow", multiple=True, metavar="CIDR|DOMAIN",
              help="dockerfile: destinations the RUN steps may reach; repeatable.")
@click.option("--deny", multiple=True, metavar="CIDR|DOMAIN",
              help="dockerfile: destinations denied (wins over --allow); repeatable.")
@click.option("--build-vcpus", type=click.IntRange(1, 64), default=None,
              help="dockerfile: the build VM's vCPUs (default: the FROM template's).")
@click.option("--build-memory", "build_memory", type=click.IntRange(64, 1 << 20),
              default=None, help="dockerfile: the build VM's memory in MiB (default: the "
                                 "FROM template's, 256 for debian-python).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def build(name: str, source: str | None, packages: tuple[str, ...], force: bool, rebuild: bool,
          free_mib: int, dockerfile: str | None, build_args: tuple[str, ...],
          target: str | None, no_cache: bool, network: str, allow: tuple[str, ...],
          deny: tuple[str, ...], build_vcpus: int | None, build_memory: int | None,
          as_json: bool) -> None:
    """Build template NAME from SOURCE into the image cache and register it (the home's
    daemon builds it; its progress is shown here)."""
    import os

    from ember.cli.sandbox_cmds import network_policy
    from ember.errors import BadRequestError
    from ember.sdk.sandbox import Sandbox

    df_opts: dict[str, object] = {}
    if source is not None and source.startswith("dockerfile:"):
        path = os.path.abspath(source.removeprefix("dockerfile:") or ".")
        source = f"dockerfile:{path}"
        args: dict[str, str] = {}
        for item in build_args:
            k, eq, v = item.partition("=")
            if not eq:
                v = os.environ.get(k, "")  # docker build's --build-arg NAME
            args[k] = v
        file = None
        if dockerfile is not None:
            file = os.path.abspath(dockerfile)
        df_opts = {"dockerfile": file, "build_args": args, "target": target,
                   "no_cache": no_cache,
                   "build_network": network_policy(network, allow, deny),
                   "build_vcpus": build_vcpus, "build_memory_mib": build_memory}
    elif (dockerfile or build_args or target or no_cache or network != "none" or allow
          or deny or build_vcpus or build_memory):
        raise BadRequestError("-f, --build-arg, --target, --no-cache, --network, --allow, "
                              "--deny, --build-vcpus and --build-memory are for --from "
                              "dockerfile:PATH")
    t0 = time.monotonic()
    with progress(not as_json, f"image {name}") as p:
        rec = Sandbox.build_template(name, source, packages=packages, force=force,
                                     rebuild=rebuild, free_mib=free_mib, on_progress=p,
                                     **df_opts)  # type: ignore[arg-type]
    took = time.monotonic() - t0
    if as_json:
        print_json({**rec.__dict__, "seconds": round(took, 2)})
    else:
        out_console.print(f"template [bold]{rec.name}[/] ready: {rec.digest} "
                          f"({rec.size_bytes >> 20} MiB image, {took:.1f} s)")


@image.command("prune")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def prune(as_json: bool) -> None:
    """Free the Dockerfile step cache entries no template uses (and build sandboxes
    whose builder died)."""
    from ember.sdk.sandbox import Sandbox

    got = Sandbox.prune_build_cache()
    if as_json:
        print_json(dataclasses.asdict(got))
        return
    out_console.print(f"removed {len(got.removed)} cache entries, "
                      f"{got.freed_bytes / (1 << 20):.1f} MiB freed"
                      + (f"; {len(got.sandboxes)} orphaned build sandbox(es) destroyed"
                         if got.sandboxes else ""))


@image.command("ls")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def ls(as_json: bool) -> None:
    """List templates."""
    from ember.sdk.sandbox import Sandbox

    recs = Sandbox.list_templates()
    if as_json:
        print_json([dataclasses.asdict(r) for r in recs])
        return
    t = Table("NAME", "SOURCE", "DIGEST", "SIZE", "SNAPSHOTS", "CREATED")
    for r in recs:
        created = datetime.datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M")
        snaps = (f"{len(r.snapshots)} ({sum(s.size_bytes for s in r.snapshots) >> 20} MiB)"
                 if r.snapshots else "-")
        t.add_row(r.name, r.source, r.digest[:19], f"{r.size_bytes >> 20} MiB", snaps,
                  created)
    out_console.print(t)


@image.group("snapshot")
def snapshot() -> None:
    """Template snapshots: the booted, idle guest of a template and size that plain
    creates restore instead of booting (docs/snapshots.md)."""


@snapshot.command("ls")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def snapshot_ls(names: tuple[str, ...], as_json: bool) -> None:
    """List the template snapshots (of templates NAMES)."""
    from ember.sdk.sandbox import Sandbox

    rows = [(r.name, s) for r in Sandbox.list_templates() if not names or r.name in names
            for s in r.snapshots]
    if as_json:
        print_json([{"template": n, **dataclasses.asdict(s)} for n, s in rows])
        return
    t = Table("TEMPLATE", "ID", "VCPUS", "MEMORY", "DISK", "SIZE", "CURRENT", "CREATED")
    for n, s in rows:
        created = datetime.datetime.fromtimestamp(s.created_at).strftime("%Y-%m-%d %H:%M")
        t.add_row(n, s.id[:12], str(s.vcpus), f"{s.memory_mib} MiB", f"{s.disk_mib} MiB",
                  f"{s.size_bytes >> 20} MiB", "yes" if s.current else "no (stale)", created)
    out_console.print(t)


@snapshot.command("rm")
@click.argument("names", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every template's snapshots.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def snapshot_rm(names: tuple[str, ...], every: bool, as_json: bool) -> None:
    """Remove the template snapshots of templates NAMES (or --all); those live sandboxes
    were restored from stay until those are gone. The next create boots and makes a new
    one."""
    from ember.errors import BadRequestError
    from ember.sdk.sandbox import Sandbox

    if every == bool(names):
        raise BadRequestError("name the templates, or give --all")
    targets = list(names) or [r.name for r in Sandbox.list_templates()]
    removed = {n: Sandbox.drop_template_snapshots(n) for n in targets}
    if as_json:
        print_json(removed)
        return
    for n, ids in removed.items():
        out_console.print(f"{n}: removed {len(ids)} template snapshot(s)")


@snapshot.command("make")
@click.argument("name")
@click.option("--vcpus", type=int, default=None, help="vCPUs (default 1).")
@click.option("--memory", "memory_mib", type=int, default=None,
              help="Guest RAM in MiB (default 256).")
@click.option("--disk", "disk_mib", type=int, default=None,
              help="Disk size in MiB (default: the template's).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def snapshot_make(name: str, vcpus: int | None, memory_mib: int | None,
                  disk_mib: int | None, as_json: bool) -> None:
    """Make the template snapshot of template NAME at this size now (the first create
    would make it otherwise), by creating one sandbox and removing it."""
    from ember.sdk.sandbox import Sandbox

    with progress(not as_json, f"snapshot {name}") as p:
        sb = Sandbox.create(name, vcpus=vcpus, memory_mib=memory_mib, disk_mib=disk_mib,
                            timeout=600, on_progress=p)
        sb.kill()
    rec = next((r for r in Sandbox.list_templates() if r.name == name), None)
    snaps = [s for s in (rec.snapshots if rec else []) if s.current
             and (vcpus is None or s.vcpus == vcpus)
             and (memory_mib is None or s.memory_mib == memory_mib)]
    if as_json:
        print_json([dataclasses.asdict(s) for s in snaps])
    elif snaps:
        s = snaps[0]
        out_console.print(f"template {name}: snapshot {s.id[:12]} ({s.vcpus} vCPU, "
                          f"{s.memory_mib} MiB, {s.size_bytes >> 20} MiB on disk)")
    else:
        raise EmberError(f"template {name}: no template snapshot was made (see the "
                         "log: $EMBER_HOME/logs/ember.log)")


@image.command("rm")
@click.argument("names", nargs=-1, required=True)
@handle_errors
def rm(names: tuple[str, ...]) -> None:
    """Remove templates (refused while sandboxes use them); a baked template's snapshot
    goes with it unless still in use."""
    from ember.sdk.sandbox import Sandbox

    for n in names:
        Sandbox.delete_template(n)
        out_console.print(f"removed template {n}")


@image.command("bake")
@click.argument("name")
@click.option("--from", "base", default="debian-python", show_default=True,
              help="The template to start from.")
@click.option("--run", "setup", default=None, help="Shell command to run before the "
              "snapshot (must exit 0), e.g. 'pip install numpy'.")
@click.option("--vcpus", type=int, default=1, show_default=True)
@click.option("--memory", "memory_mib", type=int, default=256, show_default=True)
@click.option("--disk", "disk_mib", type=int, default=None)
@click.option("--force", is_flag=True, help="Replace an existing template NAME.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def bake(name: str, base: str, setup: str | None, vcpus: int, memory_mib: int,
         disk_mib: int | None, force: bool, as_json: bool) -> None:
    """Pre-bake template NAME: boot BASE, run a setup command, snapshot it. Sandboxes of
    NAME are then restored from the snapshot instead of booting."""
    import sys

    from ember.sdk.bake import bake_template_sync

    def echo(chunk: str) -> None:  # the setup command's output, as it comes
        if not as_json:
            sys.stderr.write(chunk)
            sys.stderr.flush()

    with progress(not as_json, f"bake {name}") as p:
        rec = bake_template_sync(name, base, setup, vcpus=vcpus, memory_mib=memory_mib,
                                 disk_mib=disk_mib, replace=force, on_output=echo,
                                 on_progress=p)
    if as_json:
        print_json(rec.to_json())
    else:
        out_console.print(f"template {name} baked from {base}: snapshot "
                          f"{str(rec.config['snapshot'])[:12]}")


@image.command("check")
@click.argument("name")
@click.option("--timeout", type=float, default=180.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def check(name: str, timeout: float, as_json: bool) -> None:
    """Boot template NAME once and prove the guest init ran (kernel version and digest)."""
    from ember.guest.check import check_image

    paths = Paths.from_env()
    with progress(not as_json, f"check {name}") as p:
        res = check_image(paths, _store(paths), name, timeout=timeout, progress=p)
    if as_json:
        print_json({"template": res.template, "kernel": res.kernel_release,
                    "digest": res.digest, "expected_digest": res.expected_digest,
                    "ok": res.ok, "accel": res.accel, "accel_reason": res.accel_reason,
                    "boot_to_init_s": round(res.boot_to_init_s, 3),
                    "total_s": round(res.total_s, 3)})
    else:
        out_console.print(f"guest kernel: {res.kernel_release}")
        out_console.print(f"image digest (read inside the guest): {res.digest}")
        out_console.print(f"accelerator: {res.accel} ({res.accel_reason})")
        out_console.print(f"boot to init: {res.boot_to_init_s:.2f} s; VM exited after "
                          f"{res.total_s:.2f} s")
        if res.ok:
            out_console.print("[green]ok[/]: digest matches the registry")
    if not res.ok:
        click.echo(f"digest mismatch: registry has {res.expected_digest}", err=True)
        sys.exit(1)
