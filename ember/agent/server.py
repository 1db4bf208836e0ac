"""The agent: one reader loop decoding frames and dispatching them, replies written as whole
frames under one lock, and a thread per exec and per file operation.

Sessions: nothing is served before a ``hello``. A new hello, a host disconnect or a
protocol violation ends the session: its stream ids are forgotten, replies still pending
for it are dropped (processes keep running), and the agent scans for the next hello.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import threading
from collections.abc import Callable

from ember.protocol import (
    HOST_TO_GUEST_KINDS,
    STREAM_CONTROL_OPS,
    ErrorKind,
    Frame,
    FrameDecoder,
    Kind,
    Message,
    MessageScanner,
    ProtocolViolation,
    check_request,
    encode_msg,
    error,
    get_int,
    hello_ok,
)

from . import AGENT_VERSION, SHUTDOWN_EXIT_CODE
from .channel import Channel, VirtioPortChannel, wait_for_port
from .chunking import chunked
from .errors import OpError
from .identity import reseed, set_clock, set_hostname
from .ops_exec import ExecOp, exec_spec
from .ops_files import (
    FileWriter,
    list_dir,
    make_dir,
    remove_path,
    rename_path,
    stat_path,
    stream_read,
)
from .ops_tunnel import MAX_TUNNELS, TunnelOp
from .ops_watch import WatchOp
from .reply import Reply
from .threads import log, start_thread

MAX_STREAMS = 1024
"""Operations in flight per session; more are refused with ``bad_request``."""


class Outcome(enum.Enum):
    SHUTDOWN = "shutdown"
    """The host asked the guest to power off."""
    DISCONNECTED = "disconnected"
    """The stream ended for good (a socket's peer closed)."""
    STOPPED = "stopped"
    """:meth:`Channel.stop` was called."""


class _Busy:
    """A one-shot operation running in its own thread."""


class _Discard:
    """FILEDATA for this stream is dropped until ``eof`` (its write failed or never began)."""


_Op = ExecOp | TunnelOp | FileWriter | WatchOp | _Busy | _Discard
_FileWork = Callable[[Message], list[Message]]
_FILE_OPS: dict[str, _FileWork] = {
    "list": list_dir,
    "stat": stat_path,
    "mkdir": make_dir,
    "remove": remove_path,
    "rename": rename_path,
}


class Agent:
    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._write_lock = threading.Lock()  # taken before _state_lock, never after
        self._state_lock = threading.Lock()
        self._generation = 0
        self._broken = False
        self._ops: dict[int, _Op] = {}
        self._execs: set[ExecOp] = set()
        self._decoder: FrameDecoder | None = None
        self._scanner = self._hello_scanner()
        self._shutdown = False

    # --- any thread ------------------------------------------------------------------------
    def send(self, generation: int, frame: bytes) -> bool:
        """Write a whole frame for session ``generation``; False if that session is over."""
        with self._write_lock:
            if generation != self._generation or self._broken:
                return False
            if not self._channel.write(frame):
                self._broken = True  # the host is gone; the reader will see EOF
                return False
            return True

    # --- the serving thread ------------------------------------------------------------------
    def serve(self) -> Outcome:
        """Serve until shutdown, stop, or (for a plain stream) EOF."""
        self._channel.attach()
        try:
            while not self._shutdown:
                data = self._channel.read()
                if data is None:
                    return Outcome.STOPPED
                if not data:
                    self._end_session()
                    if not self._channel.wait_for_host():
                        return Outcome.DISCONNECTED
                    continue
                self._ingest(data)
            return Outcome.SHUTDOWN
        finally:
            self._end_session()
            with self._state_lock:
                execs = list(self._execs)
            for op in execs:
                op.kill()

    def _ingest(self, data: bytes) -> None:
        while True:
            try:
                if self._decoder is None:
                    found = self._scanner.feed(data)
                    if found is None:
                        return
                    self._decoder = found.decoder
                    self._on_hello(found.message)
                    frames = found.frames if self._decoder is not None else []
                else:
                    frames = self._decoder.feed(data)
                for frame in frames:
                    if self._decoder is None or self._shutdown:
                        return
                    self._dispatch(frame)
                return
            except ProtocolViolation as exc:
                log(f"protocol violation, dropping the session: {exc}")
                self._send_now(0, error(ErrorKind.BAD_REQUEST, f"protocol violation: {exc}"))
                self._end_session()
                data = exc.rest
                if not data:
                    return

    def _hello_scanner(self) -> MessageScanner:
        return MessageScanner(lambda m: m.get("op") == "hello", kinds=HOST_TO_GUEST_KINDS)

    def _send_now(self, stream: int, message: Message) -> bool:
        return self.send(self._generation, encode_msg(stream, message))

    def _reset(self) -> None:
        """Forget the session's streams (caller holds _write_lock)."""
        self._generation += 1
        self._broken = False
        with self._state_lock:
            ops, self._ops = self._ops, {}
        for op in ops.values():
            if isinstance(op, ExecOp):
                op.detach()
            elif isinstance(op, TunnelOp):
                op.close()
            elif isinstance(op, FileWriter):
                op.abort()
            elif isinstance(op, WatchOp):
                op.stop()

    def _end_session(self) -> None:
        if self._decoder is not None or self._ops:
            with self._write_lock:
                self._reset()
        self._decoder = None
        self._scanner = self._hello_scanner()

    def _on_hello(self, msg: Message) -> None:
        nonce = msg.get("nonce")
        try:
            check_request(0, msg)
        except ProtocolViolation as exc:
            # Answer a hello with a usable nonce anyway: the host then sees our version.
            if isinstance(nonce, int) and not isinstance(nonce, bool) and nonce >= 0:
                self._send_now(0, self._hello_ok(nonce))
            else:
                self._send_now(0, error(ErrorKind.BAD_REQUEST, str(exc)))
            self._end_session()
            return
        self._refresh_identity(msg)
        answer = encode_msg(0, self._hello_ok(get_int(msg, "nonce")))
        with self._write_lock:
            self._reset()
            if not self._channel.write(answer):
                self._broken = True

    def _refresh_identity(self, msg: Message) -> None:
        """Apply what the host says this guest is now (a restored clone learns it here)."""
        host_time = msg.get("time")
        if isinstance(host_time, int | float) and not isinstance(host_time, bool):
            set_clock(float(host_time))
        entropy = msg.get("entropy")
        if isinstance(entropy, str):
            reseed(bytes.fromhex(entropy))
        hostname = msg.get("hostname")
        if isinstance(hostname, str) and set_hostname(hostname):
            log(f"this guest is now {hostname[:64]} (a restored clone: new name, "
                "machine-id, RNG seed and clock)")

    def _hello_ok(self, nonce: int) -> Message:
        # uname() holds what gethostname(2) returns; no need to import ``socket`` (slow to
        # import on a TCG guest) for it.
        uts = os.uname()
        return hello_ok(nonce, agent=AGENT_VERSION, hostname=uts.nodename, kernel=uts.release)

    # --- dispatch ----------------------------------------------------------------------------
    def _dispatch(self, frame: Frame) -> None:
        stream = frame.stream
        if frame.kind is Kind.MSG:
            msg = frame.msg()
            if stream == 0:
                if msg["op"] == "hello":
                    self._on_hello(msg)
                else:
                    self._send_now(0, error(ErrorKind.BAD_REQUEST, f"{msg['op']} on stream 0"))
            else:
                self._on_message(stream, msg)
            return
        with self._state_lock:
            op = self._ops.get(stream)
        if frame.kind is Kind.STDIN:
            if isinstance(op, ExecOp | TunnelOp) and op.stdin is not None:
                op.stdin.put(frame.payload)
            return  # a finished exec's late input is dropped
        if isinstance(op, FileWriter):
            try:
                op.write(frame.payload)
            except OpError as err:
                self._replace(stream, op, _Discard())
                self._reply(stream).fail(err)
        elif not isinstance(op, _Discard):
            self._reply(stream).error(
                ErrorKind.BAD_REQUEST, f"FILEDATA on stream {stream}, which has no write"
            )
            if op is None:
                self._register(stream, _Discard())

    def _on_message(self, stream: int, msg: Message) -> None:
        reply = self._reply(stream)
        op_name = str(msg["op"])
        try:
            check_request(stream, msg)
        except ProtocolViolation as exc:
            reply.error(ErrorKind.BAD_REQUEST, str(exc))
            return
        if op_name in STREAM_CONTROL_OPS:
            self._on_control(stream, op_name, msg, reply)
            return
        with self._state_lock:
            if stream in self._ops:
                busy = f"stream {stream} is busy"
            elif len(self._ops) >= MAX_STREAMS:
                busy = f"too many operations in flight ({MAX_STREAMS})"
            else:
                busy = ""
        if busy:
            reply.error(ErrorKind.BAD_REQUEST, busy)
            return
        try:
            self._start(op_name, stream, msg, reply)
        except OpError as err:
            reply.fail(err)
        except Exception as exc:  # a bug: report it, keep serving
            log(f"{op_name} on stream {stream} failed: {exc!r}")
            reply.error(ErrorKind.INTERNAL, f"{op_name} failed: {exc!r}")

    def _on_control(self, stream: int, op_name: str, msg: Message, reply: Reply) -> None:
        with self._state_lock:
            op = self._ops.get(stream)
        if op_name == "stdin_eof":
            if isinstance(op, ExecOp | TunnelOp) and op.stdin is not None:
                op.stdin.finish()
            return
        if op_name == "credit":
            if isinstance(op, TunnelOp):
                op.grant(get_int(msg, "bytes"))
            return  # a finished connection's late credit is dropped
        if op_name == "abort":  # its client gave the write up and hears nothing more
            if isinstance(op, TunnelOp):
                op.close()  # its "closed" follows
            elif isinstance(op, FileWriter):
                self._unregister(stream, op)
                op.abort()
            elif isinstance(op, WatchOp):  # a watch given up: no reply
                self._unregister(stream, op)
                op.stop()
            elif isinstance(op, _Discard):
                self._unregister(stream, op)
            return
        if isinstance(op, FileWriter):
            self._unregister(stream, op)
            try:
                reply.msg(op.finish())
            except OpError as err:
                reply.fail(err)
        elif isinstance(op, _Discard):
            self._unregister(stream, op)
        else:
            reply.error(ErrorKind.BAD_REQUEST, f"eof on stream {stream}, which has no write")

    def _start(self, op_name: str, stream: int, msg: Message, reply: Reply) -> None:
        if op_name == "ping":
            reply.msg({"op": "pong"})
        elif op_name == "exec":
            self._start_exec(stream, msg, reply)
        elif op_name == "connect":
            self._start_tunnel(stream, msg, reply)
        elif op_name == "signal":
            with self._state_lock:
                target = self._ops.get(get_int(msg, "target"))
            if not isinstance(target, ExecOp):
                raise OpError(ErrorKind.NOT_FOUND, f"no exec on stream {msg['target']}")
            target.signal(get_int(msg, "signal"))
            reply.msg({"op": "ok"})
        elif op_name == "resize":
            with self._state_lock:
                target = self._ops.get(get_int(msg, "target"))
            if not isinstance(target, ExecOp):
                raise OpError(ErrorKind.NOT_FOUND, f"no exec on stream {msg['target']}")
            target.resize(get_int(msg, "rows"), get_int(msg, "cols"))
            reply.msg({"op": "ok"})
        elif op_name == "ps":
            with self._state_lock:
                execs = [op for op in self._ops.values() if isinstance(op, ExecOp)]
            processes = [p for p in (op.describe() for op in execs) if p is not None]
            for message in chunked("ps_result", "processes", processes):
                reply.msg(message)
        elif op_name == "write":
            try:
                self._register(stream, FileWriter.open(msg))
            except OpError:
                self._register(stream, _Discard())
                raise
        elif op_name == "read":
            self._in_thread(stream, reply, lambda: stream_read(msg, reply))
        elif op_name == "watch":
            self._start_watch(stream, msg, reply)
        elif op_name == "shutdown":
            reply.msg({"op": "ok"})
            self._shutdown = True
        else:
            work = _FILE_OPS[op_name]
            self._in_thread(stream, reply, lambda: work(msg))

    def _start_exec(self, stream: int, msg: Message, reply: Reply) -> None:
        spec = exec_spec(msg)
        op: ExecOp | None = None

        def finished() -> None:
            assert op is not None
            self._unregister(stream, op)
            with self._state_lock:
                self._execs.discard(op)

        op = ExecOp(spec, reply, finished)
        self._register(stream, op)
        with self._state_lock:
            self._execs.add(op)
        start_thread(f"exec-{stream}", op.run)

    def _start_tunnel(self, stream: int, msg: Message, reply: Reply) -> None:
        with self._state_lock:
            carried = sum(isinstance(op, TunnelOp) for op in self._ops.values())
        if carried >= MAX_TUNNELS:
            raise OpError(ErrorKind.BAD_REQUEST, f"too many connections at once ({MAX_TUNNELS})")
        op: TunnelOp | None = None

        def finished() -> None:
            assert op is not None
            self._unregister(stream, op)

        op = TunnelOp(get_int(msg, "port"), get_int(msg, "window"), reply, finished)
        self._register(stream, op)
        start_thread(f"tunnel-{stream}", op.run)

    def _start_watch(self, stream: int, msg: Message, reply: Reply) -> None:
        op: WatchOp | None = None

        def finished() -> None:
            if op is not None:
                self._unregister(stream, op)

        op = WatchOp.open(msg, reply, finished)
        self._register(stream, op)
        start_thread(f"watch-{stream}", op.run)

    def _in_thread(self, stream: int, reply: Reply, work: Callable[[], list[Message]]) -> None:
        """Run ``work`` in a thread; its last message is the final reply."""
        marker = _Busy()
        self._register(stream, marker)

        def run() -> None:
            try:
                messages = work()
                for message in messages[:-1]:
                    if not reply.msg(message):
                        return
                self._unregister(stream, marker)
                if messages:
                    reply.msg(messages[-1])
            except OpError as err:
                self._unregister(stream, marker)
                reply.fail(err)
            except Exception as exc:
                self._unregister(stream, marker)
                log(f"operation on stream {stream} failed: {exc!r}")
                reply.error(ErrorKind.INTERNAL, f"{exc!r}")
            finally:
                self._unregister(stream, marker)

        start_thread(f"op-{stream}", run)

    # --- the stream table -------------------------------------------------------------------
    def _reply(self, stream: int) -> Reply:
        return Reply(self, self._generation, stream)

    def _register(self, stream: int, op: _Op) -> None:
        with self._state_lock:
            self._ops[stream] = op

    def _unregister(self, stream: int, op: _Op) -> None:
        with self._state_lock:
            if self._ops.get(stream) is op:
                del self._ops[stream]

    def _replace(self, stream: int, old: _Op, new: _Op) -> None:
        with self._state_lock:
            if self._ops.get(stream) is old:
                self._ops[stream] = new


def serve(fd: int) -> Outcome:
    """Serve the protocol on any stream fd (a socket in tests) until EOF or shutdown.

    The caller keeps ownership of ``fd``.
    """
    channel = Channel(fd)
    try:
        return Agent(channel).serve()
    finally:
        channel.close()


def main() -> int:
    """The guest agent process (forked by init): returns its exit code."""
    os.chdir("/")
    os.umask(0o022)
    signal.signal(signal.SIGIO, lambda _signum, _frame: None)  # never fatal
    path = wait_for_port()
    if path is None:
        log("no virtio-serial port named ember.agent")
        return 1
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    channel = VirtioPortChannel(fd)
    log(f"serving on {path}")
    outcome = Agent(channel).serve()
    log(f"agent ends: {outcome.value}")
    return SHUTDOWN_EXIT_CODE if outcome is Outcome.SHUTDOWN else 1


def main_unix(path: str) -> int:
    """The agent of a container sandbox: serve host connections on the Unix socket ``path``
    (in a directory the host sees), one at a time, until one asks to shut down.

    A container has no virtio port; each host client connects afresh, and a disconnect
    ends only that session (the processes it started keep running)."""
    import socket

    os.chdir("/")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.umask(0o077)  # the socket: owner only
    listener.bind(path)
    os.umask(0o022)  # what the commands it runs inherit, as in a microVM
    listener.listen(4)
    log(f"serving on {path}")
    try:
        while True:
            conn, _ = listener.accept()
            with conn:
                outcome = serve(conn.fileno())
            if outcome is Outcome.SHUTDOWN:
                log("agent ends: shutdown")
                return SHUTDOWN_EXIT_CODE
    finally:
        listener.close()
