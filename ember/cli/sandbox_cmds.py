"""Sandbox commands: run, create, ls, inspect, exec, cp, logs, rm."""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.table import Table

from ember.cli.common import handle_errors, out_console, print_json, progress
from ember.cli.network_cmds import LIMIT_OPTIONS, limit_fields
from ember.errors import BadRequestError, CommandNotFoundError, EmberError
from ember.kinds import BOOTS, ISOLATIONS, ON_TIMEOUT, Boot, Isolation, OnTimeout
from ember.net.policy import NetworkPolicy
from ember.runtime.spec import DEFAULT_TEMPLATE

if TYPE_CHECKING:
    from ember.sdk.sandbox import Sandbox

NETWORK_MODES = ("none", "internet", "off")
CREATE_OPTIONS = [
    click.option("--template", "-t", default=DEFAULT_TEMPLATE, show_default=True),
    click.option("--vcpus", type=int, default=None,
                 help="vCPUs (default 1, or a baked template's)."),
    click.option("--memory", "memory_mib", type=int, default=None,
                 help="Guest RAM in MiB (default 256, or a baked template's)."),
    click.option("--disk", "disk_mib", type=int, default=None,
                 help="Disk size in MiB (default: the template's)."),
    click.option("--timeout", type=float, default=300.0, show_default=True,
                 help="Sandbox lifetime in seconds (0: no limit)."),
    click.option("--on-timeout", type=click.Choice(ON_TIMEOUT), default="destroy",
                 show_default=True, help="What happens when the lifetime ends."),
    click.option("--isolation", type=click.Choice(ISOLATIONS),
                 default="microvm", show_default=True,
                 help="Boundary: microVM (own kernel), gVisor, or container (host kernel); "
                      "see docs/isolation.md."),
    click.option("--boot", type=click.Choice(BOOTS), default="auto", show_default=True,
                 help="auto: restore the template snapshot of this template and size (made "
                      "by the first create); cold: boot the kernel."),
    click.option("--network", "network", type=click.Choice(NETWORK_MODES), default="none",
                 show_default=True,
                 help="none: no NIC at all; internet: outbound internet (private, host and "
                      "metadata ranges stay denied); off: a NIC reaching only --allow CIDRs. "
                      "See docs/networking.md."),
    click.option("--allow", multiple=True, metavar="CIDR|DOMAIN",
                 help="Destinations allowed: a CIDR (also a private one) or a domain "
                      "(example.com, *.example.com); repeatable."),
    click.option("--deny", multiple=True, metavar="CIDR|DOMAIN",
                 help="Destinations denied (wins over --allow); repeatable."),
    *LIMIT_OPTIONS,
    click.option("--env", "-e", "env", multiple=True, metavar="KEY=VALUE",
                 help="Environment for every command; repeatable."),
    click.option("--meta", "metadata", multiple=True, metavar="KEY=VALUE",
                 help="Metadata stored with the sandbox; repeatable."),
]


F = TypeVar("F", bound=Callable[..., Any])


def create_options(fn: F) -> F:
    for opt in reversed(CREATE_OPTIONS):
        fn = opt(fn)
    return fn


def _pairs(items: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise BadRequestError(f"{what} must be KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def network_policy(mode: str, allow: tuple[str, ...], deny: tuple[str, ...],
                   rate_out: float | None = None, rate_in: float | None = None,
                   max_connections: int | None = None) -> NetworkPolicy | None:
    """The policy the ``--network``, ``--allow``, ``--deny`` and limit options
    describe."""
    limits = limit_fields(rate_out, rate_in, max_connections)
    if mode == "none":
        if allow or deny or limits:
            raise BadRequestError("--allow, --deny, --rate-in, --rate-out and "
                                  "--max-connections need --network internet or off "
                                  "(none: the sandbox has no NIC at all)")
        return None
    return NetworkPolicy(internet=mode == "internet", allow=allow, deny=deny, **limits)


def _create(template: str, vcpus: int | None, memory_mib: int | None, disk_mib: int | None,
            timeout: float, on_timeout: OnTimeout, isolation: Isolation, boot: Boot,
            net: NetworkPolicy | None, env: tuple[str, ...], metadata: tuple[str, ...],
            show: bool) -> Sandbox:
    from ember.sdk.sandbox import Sandbox

    with progress(show, "sandbox", plain=False) as p:
        return Sandbox.create(template, vcpus=vcpus, memory_mib=memory_mib, disk_mib=disk_mib,
                              timeout=timeout or None, env=_pairs(env, "--env"),
                              metadata=_pairs(metadata, "--meta"), on_progress=p,
                              on_timeout=on_timeout, isolation=isolation, boot=boot,
                              network=net)


def _stream_exec(sb: Sandbox, cmd: list[str], stdin: bool, timeout: float | None) -> int:
    """Run ``cmd`` with its output copied to ours as produced; return its exit code (127 if
    the program does not exist, as a shell would)."""
    try:
        return _copy_output(sb, cmd, stdin, timeout)
    except CommandNotFoundError as err:
        click.echo(f"ember: {err}", err=True)
        return 127


def _copy_output(sb: Sandbox, cmd: list[str], stdin: bool, timeout: float | None) -> int:
    data = sys.stdin.buffer.read() if stdin else None
    argv: str | list[str] = cmd[0] if len(cmd) == 1 and " " in cmd[0] else cmd
    p = sb.spawn(argv, stdin=data is not None, timeout=timeout)
    if data is not None:
        p.write_stdin(data)
        p.close_stdin()
    for chunk in p.output():
        out = sys.stdout.buffer if chunk.stream == "stdout" else sys.stderr.buffer
        out.write(chunk.data)
        out.flush()
    result = p.wait()
    return int(result.exit_code)


@click.command("run", context_settings={"ignore_unknown_options": True})
@create_options
@click.option("--stdin", "-i", "stdin", is_flag=True, help="Send this process's stdin.")
@click.option("--cmd-timeout", type=float, default=None, help="Command timeout in seconds.")
@click.argument("cmd", nargs=-1, required=False, type=click.UNPROCESSED)
@handle_errors
def run(template: str, vcpus: int | None, memory_mib: int | None, disk_mib: int | None,
        timeout: float, on_timeout: OnTimeout, isolation: Isolation, boot: Boot, network: str,
        allow: tuple[str, ...], deny: tuple[str, ...], rate_out: float | None,
        rate_in: float | None, max_connections: int | None,
        env: tuple[str, ...], metadata: tuple[str, ...], stdin: bool, cmd_timeout: float | None,
        cmd: tuple[str, ...]) -> None:
    """Create a sandbox, run CMD in it with streamed output, destroy it; exit with CMD's code.

    Without CMD, the template's image command runs (its ENTRYPOINT followed by its CMD,
    from a Dockerfile or an OCI image); a template without one is an error.

    Example: ember run -- python3 -c "print(6*7)"
    """
    net = network_policy(network, allow, deny, rate_out, rate_in, max_connections)
    if not cmd:
        cmd = _image_command(template)
    sb = _create(template, vcpus, memory_mib, disk_mib, timeout, on_timeout, isolation, boot,
                 net, env, metadata, True)
    try:
        code = _stream_exec(sb, list(cmd), stdin, cmd_timeout)
    finally:
        sb.kill()
    sys.exit(code)


def _image_command(template: str) -> tuple[str, ...]:
    """ENTRYPOINT + CMD of ``template``'s image (asked before any sandbox is made)."""
    from ember.errors import TemplateNotFoundError
    from ember.runtime.exec_defaults import image_command
    from ember.sdk.sandbox import Sandbox

    found = [t for t in Sandbox.list_templates() if t.name == template]
    if not found:
        raise TemplateNotFoundError(f"no template named {template!r} (see ember image ls)")
    oci = found[0].config.get("oci")
    command = image_command(oci) if isinstance(oci, dict) else ()
    if not command:
        raise BadRequestError(f"template {template!r} has no CMD or ENTRYPOINT: give the "
                              "command to run (ember run -t TEMPLATE -- CMD...)")
    return command


@click.command("create")
@create_options
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def create(template: str, vcpus: int | None, memory_mib: int | None, disk_mib: int | None,
           timeout: float, on_timeout: OnTimeout, isolation: Isolation, boot: Boot,
           network: str, allow: tuple[str, ...], deny: tuple[str, ...],
           rate_out: float | None, rate_in: float | None, max_connections: int | None,
           env: tuple[str, ...], metadata: tuple[str, ...], as_json: bool) -> None:
    """Create a sandbox that keeps running after this command; print its id."""
    net = network_policy(network, allow, deny, rate_out, rate_in, max_connections)
    sb = _create(template, vcpus, memory_mib, disk_mib, timeout, on_timeout, isolation, boot,
                 net, env, metadata, not as_json)
    info = sb.info()
    sb.close()
    if as_json:
        print_json(dataclasses.asdict(info))
    else:
        click.echo(info.id)


@click.command("ls")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def ls(as_json: bool) -> None:
    """List sandboxes (dead VMs are detected and marked failed)."""
    from ember.sdk.sandbox import Sandbox

    infos = Sandbox.list()
    if as_json:
        print_json([dataclasses.asdict(i) for i in infos])
        return
    cluster = any(i.node for i in infos)  # a node of a cluster lists the whole cluster
    t = Table("ID", *(["NODE"] if cluster else []), "TEMPLATE", "ISOLATION", "STATE", "VCPUS",
              "MEMORY", "CREATED", "EXPIRES", "NOTE")
    for i in infos:
        created = datetime.datetime.fromtimestamp(i.created_at).strftime("%H:%M:%S")
        expires = (f"in {max(0, int(i.expires_at - time.time()))} s" if i.expires_at else "-")
        t.add_row(i.id, *([(i.node or "-")[:12]] if cluster else []), i.template, i.isolation,
                  i.state, str(i.vcpus), f"{i.memory_mib} MiB", created, expires,
                  (i.error or "")[:60])
    out_console.print(t)


@click.command("inspect")
@click.argument("sandbox_id")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def inspect(sandbox_id: str, as_json: bool) -> None:
    """Show one sandbox."""
    from ember.cli.network_cmds import live_stats
    from ember.sdk.sandbox import Sandbox

    info = Sandbox.get_info(sandbox_id)
    doc = dataclasses.asdict(info)
    if info.network is not None:
        stats = live_stats(info)
        doc["network_stats"] = None if stats is None else dataclasses.asdict(stats)
    if as_json:
        print_json(doc)
    else:
        for k, v in doc.items():
            click.echo(f"{k}: {v}")


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_id")
@click.option("--stdin", "-i", "stdin", is_flag=True, help="Send this process's stdin.")
@click.option("--tty", "-t", "tty", is_flag=True,
              help="On a terminal (with -i: interactive, as docker exec -it).")
@click.option("--timeout", type=float, default=None, help="Command timeout in seconds.")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def exec_(sandbox_id: str, stdin: bool, tty: bool, timeout: float | None,
          cmd: tuple[str, ...]) -> None:
    """Run CMD in a running sandbox; exit with its code.

    With -it, CMD runs on a terminal wired to this one: raw keys (Ctrl-C reaches the
    guest), window size followed. Example: ember exec -it sb-1234abcd -- bash
    """
    if tty:
        sys.exit(_terminal(sandbox_id, list(cmd) if len(cmd) > 1 else cmd[0]))
    from ember.sdk.sandbox import Sandbox

    sb = Sandbox.connect(sandbox_id)
    try:
        code = _stream_exec(sb, list(cmd), stdin, timeout)
    finally:
        sb.close()
    sys.exit(code)


@click.command("shell")
@click.argument("sandbox_id")
@handle_errors
def shell(sandbox_id: str) -> None:
    """A login shell in a running sandbox, on this terminal (exit leaves it running)."""
    sys.exit(_terminal(sandbox_id, None))


def _terminal(sandbox_id: str, cmd: str | list[str] | None) -> int:
    import asyncio

    from ember.cli.terminal import attach

    return asyncio.run(attach(sandbox_id, cmd))


@click.command("cp")
@click.argument("src")
@click.argument("dst")
@handle_errors
def cp(src: str, dst: str) -> None:
    """Copy a file into or out of a sandbox: ember cp FILE ID:/path | ember cp ID:/path FILE"""
    from ember.sdk.sandbox import Sandbox

    def split(s: str) -> tuple[str, str] | None:
        if ":" in s and s.startswith("sb-"):
            sid, path = s.split(":", 1)
            return sid, path
        return None

    s, d = split(src), split(dst)
    if (s is None) == (d is None):
        raise BadRequestError("exactly one of SRC and DST must be SANDBOX_ID:/path")
    sid = (s or d)[0]  # type: ignore[index]
    sb = Sandbox.connect(sid)
    try:
        if d is not None:
            n = sb.files.upload(src, d[1])
        else:
            assert s is not None
            n = sb.files.download(s[1], dst)
    finally:
        sb.close()
    click.echo(f"copied {n} bytes", err=True)


@click.command("logs")
@click.argument("sandbox_id")
@handle_errors
def logs(sandbox_id: str) -> None:
    """Print a sandbox's console log (kernel and init output)."""
    from ember.sdk.sandbox import Sandbox

    sys.stdout.write(Sandbox.logs(sandbox_id))


@click.command("rm")
@click.argument("sandbox_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Remove every sandbox.")
@handle_errors
def rm(sandbox_ids: tuple[str, ...], all_: bool) -> None:
    """Destroy sandboxes (VM, disk, sockets, registry row)."""
    from ember.sdk.sandbox import Sandbox

    ids = [i.id for i in Sandbox.list()] if all_ else list(sandbox_ids)
    if not ids and not all_:
        raise BadRequestError("give sandbox ids or --all")
    failed = False
    for sid in ids:
        try:
            Sandbox.kill(sid)
            click.echo(f"removed {sid}")
        except EmberError as err:
            failed = True
            click.echo(f"error: {sid}: {err}", err=True)
    if failed:
        sys.exit(1)
