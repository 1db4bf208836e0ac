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
from pathlib import Path

import uvicorn

from ember.daemon.middleware import MAX_HEADER_BYTES
from ember.errors import HostError
from ember.locks import FileLock
from ember.paths import Paths
from ember.runtime.reaper import ensure_reaper

log = logging.getLogger("ember.daemon")
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


def serve(paths: Paths, *, listen: str | None = None) -> None:
    """Run the daemon of ``paths``' home in this process until SIGTERM or SIGINT."""
    from ember.daemon.app import create_app

    os.environ.pop("EMBER_URL", None)  # the daemon itself works in-process, never via itself
    paths.ensure()
    lock = FileLock(lock_path(paths))
    for _ in range(20):  # a status probe holds it for an instant: try for a second
        if lock.try_acquire():
            break
        time.sleep(0.05)
    else:
        raise HostError(f"a daemon already serves {paths.home} (pid {lock.holder()})")
    sockets = [bind_unix(socket_path(paths))]
    if listen:
        sockets.append(_bind_tcp(listen))
    config = uvicorn.Config(
        create_app(paths), http="h11", log_config=None, access_log=False, lifespan="on",
        h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=30, timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    log.info("emberd %d serving %s on %s", os.getpid(), paths.home,
             ", ".join(str(s.getsockname()) for s in sockets))
    try:
        asyncio.run(server.serve(sockets=sockets))
    finally:
        for s in sockets:
            s.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path(paths).unlink()
        lock.release()
        ensure_reaper(paths)  # sandboxes outlive the daemon: their lifetimes still end
        log.info("emberd %d stopped", os.getpid())


def _bind_tcp(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise HostError(f"--listen wants HOST:PORT, got {listen!r}")
    sock = socket.create_server((host.strip("[]"), int(port)), reuse_port=False)
    sock.set_inheritable(False)
    return sock


def main() -> None:
    import sys

    from ember.logconfig import setup_logging

    paths = setup_logging(verbose="-v" in sys.argv)
    listen = None
    if "--listen" in sys.argv:
        listen = sys.argv[sys.argv.index("--listen") + 1]
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        serve(paths, listen=listen)
    except HostError as err:
        print(f"emberd: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
