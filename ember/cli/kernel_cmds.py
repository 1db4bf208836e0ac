"""``ember kernel ...``"""

from __future__ import annotations

import time

import click

from ember.cli.common import handle_errors, out_console, print_json, progress
from ember.paths import Paths


@click.group("kernel")
def kernel() -> None:
    """Build and inspect the guest kernel."""


@kernel.command("build")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), default=None,
              help="Parallel compile jobs (default: number of CPUs).")
@click.option("--force", is_flag=True, help="Rebuild even if the cache has this kernel.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def build(jobs: int | None, force: bool, as_json: bool) -> None:
    """Build the minimal guest kernel from Debian's linux-source-6.1 (cached by content hash)."""
    from ember.guest.kernel import build_kernel

    paths = Paths.from_env().ensure()
    t0 = time.monotonic()
    with progress(not as_json, "kernel") as p:
        k = build_kernel(paths, jobs=jobs, force=force, progress=p)
    took = time.monotonic() - t0
    if as_json:
        print_json({"key": k.key, "release": k.release, "bzimage": str(k.bzimage),
                    "vmlinux": str(k.vmlinux), "seconds": round(took, 2)})
    else:
        out_console.print(f"kernel {k.release} ready: {k.bzimage} ({took:.1f} s)")


@kernel.command("show")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def show(as_json: bool) -> None:
    """Show the cached kernel, if built."""
    from ember.guest.kernel import require_kernel

    k = require_kernel(Paths.from_env())
    if as_json:
        print_json({"key": k.key, "release": k.release, "bzimage": str(k.bzimage)})
    else:
        out_console.print(f"{k.release}  {k.bzimage}")
