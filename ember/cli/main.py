"""``ember``: self-hosted microVM sandboxes for untrusted code."""

from __future__ import annotations

import click

from ember.cli import (
    apikey_cmds,
    cluster_cmds,
    daemon_cmds,
    doctor_cmd,
    image_cmds,
    kernel_cmds,
    network_cmds,
    pool_cmds,
    sandbox_cmds,
    snapshot_cmds,
)
from ember.cli.bench_cmd import bench
from ember.cli.top_cmd import top
from ember.logconfig import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="Also print debug logs to stderr.")
@click.version_option("0.1.0", prog_name="ember")
def cli(verbose: bool) -> None:
    """ember: microVM sandboxes for code you did not write.

    State lives in EMBER_HOME (default /var/lib/ember as root); logs in
    $EMBER_HOME/logs/ember.log; kernels and images in EMBER_CACHE ($EMBER_HOME/cache).
    """
    setup_logging(verbose)


cli.add_command(kernel_cmds.kernel)
cli.add_command(image_cmds.image)
cli.add_command(doctor_cmd.doctor)
cli.add_command(bench)
cli.add_command(top)
cli.add_command(daemon_cmds.daemon)
cli.add_command(apikey_cmds.apikey)
cli.add_command(apikey_cmds.tenant)
cli.add_command(network_cmds.network)
cli.add_command(network_cmds.port)
cli.add_command(cluster_cmds.cluster)
for _cmd in (sandbox_cmds.run, sandbox_cmds.create, sandbox_cmds.ls, sandbox_cmds.inspect,
             sandbox_cmds.exec_, sandbox_cmds.shell, sandbox_cmds.cp, sandbox_cmds.logs,
             sandbox_cmds.rm):
    cli.add_command(_cmd)
for _cmd in (snapshot_cmds.snapshot, snapshot_cmds.restore, snapshot_cmds.fork,
             snapshot_cmds.pause, snapshot_cmds.resume, pool_cmds.pool):
    cli.add_command(_cmd)


def main() -> None:
    cli(prog_name="ember")
