"""``ember daemon``: start, stop, inspect or run the home's daemon (emberd)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ember.cli.common import handle_errors, print_json

F = TypeVar("F", bound=Callable[..., Any])


@click.group("daemon")
def daemon() -> None:
    """The home's daemon: it owns the sandboxes and serves the HTTP API on
    $EMBER_HOME/emberd.sock. Clients reach it with EMBER_URL=unix://$EMBER_HOME/emberd.sock
    (or url= in the SDK). Its log: $EMBER_HOME/logs/ember.log."""


def _show(st: object, as_json: bool) -> None:
    from ember.daemon.control import DaemonStatus

    assert isinstance(st, DaemonStatus)
    if as_json:
        print_json(st.to_json())
    elif st.running:
        click.echo(f"emberd running: pid {st.pid}, version {st.version}, socket {st.socket}, "
                   f"{st.open_sandboxes} sandbox connection(s) open")
        if st.cluster:
            c = st.cluster
            click.echo(f"cluster: {c.get('role')} of {c.get('address')}, node "
                       f"{c.get('node_id')}" if "address" in c else f"cluster: {c}")
    else:
        click.echo(f"emberd not running (socket {st.socket})")


def _network_options(fn: F) -> F:
    fn = click.option("--ports-domain", default=None, metavar="DOMAIN",
                      help="Exposed ports answer HTTP here for Host: <port>-<id>.DOMAIN "
                      "(default: $EMBER_PORTS_DOMAIN or localhost).")(fn)
    fn = click.option("--tls-key", default=None, type=click.Path(dir_okay=False),
                      help="Private key (PEM) for --tls-cert.")(fn)
    fn = click.option("--tls-cert", default=None, type=click.Path(dir_okay=False),
                      help="Serve TCP with TLS: certificate chain (PEM).")(fn)
    fn = click.option("--listen", default=None, metavar="HOST:PORT",
                      help="Also serve TCP on HOST:PORT; every request there needs an API "
                      "key (ember apikey create).")(fn)
    return fn


@daemon.command("start")
@_network_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@handle_errors
def start(listen: str | None, tls_cert: str | None, tls_key: str | None,
          ports_domain: str | None, as_json: bool) -> None:
    """Start the daemon in the background unless it runs; return once it answers."""
    from ember.daemon import control
    from ember.paths import Paths

    _show(control.start(Paths.from_env(), listen=listen, tls_cert=tls_cert, tls_key=tls_key,
                        ports_domain=ports_domain), as_json)


@daemon.command("stop")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@handle_errors
def stop(as_json: bool) -> None:
    """Stop the daemon (SIGTERM). Sandboxes keep running; a new daemon re-attaches. While
    no daemon runs, nothing ends their lifetimes: the next one (started by `ember daemon
    start`, systemd, or any SDK or CLI call) destroys what expired meanwhile."""
    from ember.daemon import control
    from ember.paths import Paths
    from ember.runtime.states import LIVE_STATES
    from ember.store import Store

    paths = Paths.from_env()
    before = control.status(paths)
    after = control.stop(paths)
    if as_json or not before.running:
        _show(after, as_json)
    else:
        click.echo(f"emberd stopped (was pid {before.pid}, socket {after.socket})")
    if paths.db.exists() and not as_json:
        store = Store(paths.db)
        try:
            live = [r for r in store.list_sandboxes() if r.state in LIVE_STATES]
        finally:
            store.close()
        if live:
            click.echo(f"{len(live)} sandbox(es) keep running, unsupervised until a daemon "
                       "runs again (which ends the lifetimes that expired meanwhile)",
                       err=True)


@daemon.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@handle_errors
def status(as_json: bool) -> None:
    """Whether the daemon runs, its pid, version and socket (exit code 3 if not)."""
    from ember.daemon import control
    from ember.paths import Paths

    st = control.status(Paths.from_env())
    _show(st, as_json)
    if not st.running:
        raise SystemExit(3)


@daemon.command("serve")
@_network_options
@handle_errors
def serve(listen: str | None, tls_cert: str | None, tls_key: str | None,
          ports_domain: str | None) -> None:
    """Run the daemon in the foreground (what the systemd unit runs)."""
    from ember.daemon.server import serve as run
    from ember.paths import Paths

    run(Paths.from_env(), listen=listen, tls_cert=tls_cert, tls_key=tls_key,
        ports_domain=ports_domain)


@daemon.command("openapi")
def openapi() -> None:
    """Print the API's OpenAPI document (JSON), as committed in docs/openapi.json."""
    from ember.daemon.openapi import document

    click.echo(document())
