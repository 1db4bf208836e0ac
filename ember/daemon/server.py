"""Serving: one daemon per home, elected by an flock, on a Unix socket in the home.

``$EMBER_HOME/emberd.sock`` is created by the daemon with mode 0660 (owner: the daemon's
user, root on a normal install; group: the home's group), so that only root and members of
that group can reach it. ``emberd.lock`` elects the daemon (held while it runs, released
by the kernel whatever kills it) and holds its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from ember.daemon.middleware import MAX_HEADER_BYTES
from ember.errors import BadRequestError, HostError
from ember.locks import FileLock
from ember.paths import Paths

log = logging.getLogger("ember.daemon")


class AlreadyServing(HostError):
    """Another daemon won the home's lock (two processes started one at once)."""


#: Connections served at once; beyond it new requests get 503 instead of queuing forever.
MAX_CONNECTIONS = 1024


def socket_path(paths: Paths) -> Path:
    return paths.daemon_socket


def lock_path(paths: Paths) -> Path:
    return paths.daemon_lock


def bind_unix(path: Path) -> socket.socket:
    """A listening socket at ``path`` (a stale one from a dead daemon is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # born 0660: never reachable by others, not even for a moment
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(256)
    sock.set_inheritable(False)
    return sock


class _Server(uvicorn.Server):
    """A uvicorn server whose signals the daemon handles (it runs two servers at once)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(paths: Paths, *, listen: str | None = None, tls_cert: str | None = None,
          tls_key: str | None = None, idle_exit: float | None = None,
          ports_domain: str | None = None) -> None:
    """Run the daemon of ``paths``' home in this process until SIGTERM or SIGINT: the Unix
    socket, and with ``listen`` also TCP (TLS with ``tls_cert``/``tls_key``);
    ``ports_domain``: exposed ports answer HTTP for ``Host: <port>-<id>.<domain>``."""
    from ember.daemon.app import create_app
    from ember.daemon.auth import PeerCredH11, PeerCredWebSocket
    from ember.daemon.port_proxy import check_domain, domain_from_env

    if (tls_cert is None) != (tls_key is None):
        raise HostError("--tls-cert and --tls-key go together")
    if tls_cert and not listen:
        raise HostError("--tls-cert needs --listen HOST:PORT (the Unix socket has no TLS)")
    for f in (tls_cert, tls_key):
        if f is not None and not os.access(f, os.R_OK):
            raise HostError(f"cannot read {f}")
    try:
        ports_domain = check_domain(ports_domain) if ports_domain else domain_from_env()
    except BadRequestError as err:
        raise HostError(f"--ports-domain / EMBER_PORTS_DOMAIN: {err}") from None
    os.environ.pop("EMBER_URL", None)  # the daemon itself works in-process, never via itself
    paths.ensure()
    lock = FileLock(lock_path(paths))
    for _ in range(20):  # a status probe holds it for an instant: try for a second
        if lock.try_acquire():
            break
        time.sleep(0.05)
    else:
        raise AlreadyServing(f"a daemon already serves {paths.home} (pid {lock.holder()})")
    app = create_app(paths, idle_exit=idle_exit, ports_domain=ports_domain)
    common: dict[str, Any] = dict(
        http=PeerCredH11, log_config=None, access_log=False, ws=PeerCredWebSocket,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=30, timeout_graceful_shutdown=10, ws_max_size=1 << 20)
    unix = bind_unix(socket_path(paths))
    servers = [(_Server(uvicorn.Config(app, lifespan="on", **common)), unix)]
    if listen:
        tcp = _bind_tcp(listen)
        servers.append((_Server(uvicorn.Config(app, lifespan="off", ssl_certfile=tls_cert,
                                               ssl_keyfile=tls_key, **common)), tcp))
    log.info("emberd %d serving %s on %s", os.getpid(), paths.home,
             ", ".join(str(sock.getsockname()) for _, sock in servers))

    async def run_all() -> None:
        def stop() -> None:
            for server, _ in servers:
                server.should_exit = True

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        await asyncio.gather(*(s.serve(sockets=[sock]) for s, sock in servers))

    try:
        asyncio.run(run_all())
    finally:
        for _, sock in servers:
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path(paths).unlink()
        lock.release()  # its sandboxes run on; the next daemon enforces their lifetimes
        log.info("emberd %d stopped", os.getpid())


def _bind_tcp(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise HostError(f"--listen wants HOST:PORT, got {listen!r}")
    sock = socket.create_server((host.strip("[]"), int(port)), reuse_port=False)
    sock.set_inheritable(False)
    # Accepted connections inherit it. asyncio sets it only on sockets whose proto says
    # TCP, which create_server's (proto 0) do not: without it an answer written as a head
    # and then a body waits out the client's 40 ms delayed ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def main() -> None:
    import sys

    from ember.logconfig import setup_logging

    paths = setup_logging(verbose="-v" in sys.argv)
    log.info("emberd %d starting", os.getpid())

    def opt(name: str) -> str | None:
        return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        idle = opt("--idle-exit")
        serve(paths, listen=opt("--listen"), tls_cert=opt("--tls-cert"),
              tls_key=opt("--tls-key"), idle_exit=float(idle) if idle else None,
              ports_domain=opt("--ports-domain"))
    except AlreadyServing as err:  # lost the race to start: the winner serves
        log.info("emberd %d: %s", os.getpid(), err)
        print(f"emberd: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except HostError as err:
        log.error("emberd %d: %s", os.getpid(), err)
        print(f"emberd: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except BaseException:
        log.exception("emberd %d failed", os.getpid())
        raise


if __name__ == "__main__":
    main()
