"""connect: one TCP connection from the agent to a port on the guest's loopback, carried on
one stream, so that a guest port is reachable from the host with no network device at all.

STDIN frames on the stream are written to the connection (``stdin_eof`` shuts its sending
side); what the guest's server sends comes back as STDOUT frames, but only as much as the
host has room for: the host grants bytes (``window`` in the request, then ``credit``
messages as its reader consumes), and the agent stops reading the connection when the grant
is used up; each frame costs at least ``CONNECT_FRAME_CHARGE``, so the grant bounds the
frames in flight as well. So a slow reader on the host holds back the guest's server,
never the agent's channel. ``abort`` (or the session's end) closes the connection; the
final reply is ``closed`` once it is gone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from ember.protocol import CONNECT_FRAME_CHARGE, ErrorKind, Kind

from .errors import OpError, os_error
from .reply import Reply
from .stdin_feed import StdinFeed
from .threads import start_thread

CONNECT_TIMEOUT = 5.0
CHUNK = 64 * 1024
MAX_CREDIT = 16 << 20
"""Bytes the host may have granted and not yet received; a grant beyond it is capped."""
PUMP_JOIN = 5.0
"""How long the end of a connection waits for its input thread to let go of it."""
MAX_TUNNELS = 256
"""Connections one agent carries at once; more are refused."""

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket


class _SendSide:
    """What :meth:`StdinFeed.pump` writes to: the connection, whose sending side it shuts
    (not the whole socket: the reply may still be coming) when the input ends."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        import socket

        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)


class TunnelOp:
    """One carried connection. :meth:`run` is the body of its thread."""

    def __init__(self, port: int, window: int, reply: Reply,
                 on_final: Callable[[], None]) -> None:
        self.port = port
        self.reply = reply
        self.stdin = StdinFeed()
        self._on_final = on_final
        self._cond = threading.Condition()
        self._credit = min(window, MAX_CREDIT)
        self._sock: socket.socket | None = None
        self._closed = False

    def grant(self, nbytes: int) -> None:
        """The host has room for ``nbytes`` more."""
        with self._cond:
            self._credit = min(self._credit + nbytes, MAX_CREDIT)
            self._cond.notify_all()

    def close(self) -> None:
        """Close the connection (the host gave it up, or its session ended)."""
        import socket

        with self._cond:
            self._closed = True
            sock = self._sock
            self._cond.notify_all()
        self.stdin.abandon()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv

    def run(self) -> None:
        import socket

        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=CONNECT_TIMEOUT)
        except TimeoutError:
            self._end(OpError(ErrorKind.TIMEOUT, f"connect to port {self.port} in the guest: "
                                                 f"no answer within {CONNECT_TIMEOUT} s"))
            return
        except OSError as err:
            self._end(os_error(err, f"connect to port {self.port} in the guest"))
            return
        sock.settimeout(None)
        with contextlib.suppress(OSError):  # our writes go out at once (request heads)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._cond:
            self._sock = sock
            closed = self._closed
        pump: threading.Thread | None = None
        try:
            if closed or not self.reply.msg({"op": "connected"}):
                return
            feed, side = self.stdin, _SendSide(sock)
            pump = start_thread(f"tunnel-in-{self.reply.stream}", lambda: feed.pump(side))
            self._forward(sock)
        finally:
            with self._cond:
                self._sock = None
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # a write blocked in the pump fails now
            self.stdin.abandon()
            if pump is not None:
                pump.join(PUMP_JOIN)
            if pump is None or not pump.is_alive():  # never close an fd still written to
                sock.close()
            self._end(None)

    def _forward(self, sock: socket.socket) -> None:
        import socket

        while True:
            with self._cond:
                while self._credit <= 0 and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                want = min(self._credit, CHUNK)
            try:
                chunk = sock.recv(want)
                # ACK at once: a server that writes its answer's head and body apart
                # (Nagle) would otherwise wait out the 40 ms delayed ACK between them
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                return
            if not chunk:
                return
            with self._cond:  # may go below zero, by less than a charge: then it waits
                self._credit -= max(len(chunk), CONNECT_FRAME_CHARGE)
            if not self.reply.data(Kind.STDOUT, chunk):
                return  # the session is gone

    def _end(self, err: OpError | None) -> None:
        self.stdin.abandon()
        self._on_final()
        if err is not None:
            self.reply.fail(err)
        else:
            self.reply.msg({"op": "closed"})
