"""A host-side test client for the agent: the agent serves one end of a socketpair in a
thread, the test drives the other end with the protocol codec. No VM needed.

Other test_agent_* modules import :class:`AgentHarness` from here.
"""

from __future__ import annotations

import collections
import itertools
import socket
import subprocess
import threading
import time
from typing import Any

from ember.agent.server import Outcome, serve
from ember.protocol import (
    GUEST_TO_HOST_KINDS,
    MAX_DATA_PAYLOAD,
    Frame,
    FrameDecoder,
    HelloScanner,
    Kind,
    check_reply,
    encode_frame,
    encode_msg,
    hello,
    is_final_reply,
)

TIMEOUT = 20.0


class AgentHarness:
    """Serves in a thread of this process, or (``process``) in a child process."""

    def __init__(self, process: list[str] | None = None) -> None:
        self.host, self.guest = socket.socketpair()
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        if process is None:
            self.thread.start()
        else:
            fd = self.guest.fileno()
            argv = [arg.replace("{fd}", str(fd)) for arg in process]
            self.process = subprocess.Popen(argv, pass_fds=[fd], stderr=subprocess.PIPE)
        self.decoder: FrameDecoder | None = None
        self.queues: dict[int, collections.deque[Frame]] = collections.defaultdict(
            collections.deque
        )
        self._ids = itertools.count(1)

    def _serve(self) -> None:
        try:
            self.outcome = serve(self.guest.fileno())
        except BaseException as exc:  # surfaced by close()
            self.error = exc

    # --- connection -------------------------------------------------------------------------
    def handshake(self, nonce: int = 42) -> dict[str, Any]:
        self.send_raw(encode_msg(0, hello(nonce)))
        scanner = HelloScanner(nonce, kinds=GUEST_TO_HOST_KINDS)
        deadline = time.monotonic() + TIMEOUT
        while True:
            found = scanner.feed(self._recv(deadline))
            if found is not None:
                self.decoder = found.decoder
                self.queues.clear()
                for frame in found.frames:
                    self.queues[frame.stream].append(frame)
                return found.message

    def send_raw(self, data: bytes) -> None:
        self.host.sendall(data)

    def send_msg(self, stream: int, msg: dict[str, Any]) -> None:
        self.send_raw(encode_msg(stream, msg))

    def send_data(self, kind: Kind, stream: int, data: bytes) -> None:
        for start in range(0, max(len(data), 1), MAX_DATA_PAYLOAD):
            self.send_raw(encode_frame(kind, stream, data[start : start + MAX_DATA_PAYLOAD]))

    def new_stream(self) -> int:
        return next(self._ids)

    def close(self) -> Outcome | None:
        self.host.close()
        if self.process is not None:
            self.guest.close()
            _, stderr = self.process.communicate(timeout=TIMEOUT)
            assert self.process.returncode == 0, stderr.decode()
            return Outcome.DISCONNECTED
        self.thread.join(TIMEOUT)
        self.guest.close()
        if self.error is not None:
            raise self.error
        return self.outcome

    # --- reading ----------------------------------------------------------------------------
    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer from the agent")
        self.host.settimeout(remaining)
        data = self.host.recv(1 << 20)
        if not data:
            raise EOFError("the agent closed the connection")
        return data

    def next_frame(self, stream: int, timeout: float = TIMEOUT) -> Frame:
        assert self.decoder is not None, "handshake first"
        deadline = time.monotonic() + timeout
        while not self.queues[stream]:
            for frame in self.decoder.feed(self._recv(deadline)):
                if frame.kind is Kind.MSG:
                    check_reply(frame.stream, frame.msg())
                self.queues[frame.stream].append(frame)
        return self.queues[stream].popleft()

    def next_msg(self, stream: int, timeout: float = TIMEOUT) -> dict[str, Any]:
        frame = self.next_frame(stream, timeout)
        assert frame.kind is Kind.MSG, frame
        return frame.msg()

    def collect(self, stream: int, timeout: float = TIMEOUT) -> list[Frame]:
        """Frames of a stream up to and including its final reply."""
        frames = []
        while True:
            frame = self.next_frame(stream, timeout)
            frames.append(frame)
            if frame.kind is Kind.MSG and is_final_reply(frame.msg()):
                return frames

    def request(self, msg: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        """Send a request on a fresh stream; return its final reply."""
        stream = self.new_stream()
        self.send_msg(stream, msg)
        return self.collect(stream, timeout)[-1].msg()

    def run(self, msg: dict[str, Any], stdin: bytes | None = None) -> ExecResult:
        stream = self.new_stream()
        self.send_msg(stream, {"op": "exec", **msg, **({"stdin": True} if stdin else {})})
        if stdin:
            self.send_data(Kind.STDIN, stream, stdin)
            self.send_msg(stream, {"op": "stdin_eof"})
        return ExecResult.of(self.collect(stream))


class ExecResult:
    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames
        self.stdout = b"".join(f.payload for f in frames if f.kind is Kind.STDOUT)
        self.stderr = b"".join(f.payload for f in frames if f.kind is Kind.STDERR)
        self.final = frames[-1].msg()
        msgs = [f.msg() for f in frames if f.kind is Kind.MSG]
        self.started = msgs[0] if msgs[0]["op"] == "started" else None

    @classmethod
    def of(cls, frames: list[Frame]) -> ExecResult:
        return cls(frames)


def test_harness_handshake() -> None:
    harness = AgentHarness()
    try:
        answer = harness.handshake(7)
        assert answer["nonce"] == 7 and answer["op"] == "hello_ok"
        assert harness.request({"op": "ping"}) == {"op": "pong"}
    finally:
        assert harness.close() is Outcome.DISCONNECTED
