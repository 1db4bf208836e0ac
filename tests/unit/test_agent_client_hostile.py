"""The real AgentClient against hostile guests, over a real socketpair.

Each guest is a thread on the other end of a socketpair speaking the wire protocol with the
real codec (``ember.protocol``), started by ``hostile`` of tests/unit/test_agent_client.py;
the host side is the unmodified :class:`AgentClient`.
Every test runs under a hard ``asyncio.wait_for`` so that it can never hang the suite, and
every guest thread ends once the host closes its end.

Tests marked ``xfail(strict=True)`` pin bugs this suite found (see each reason); they fail
by assertion only, and start failing (XPASS) once the bug is fixed, so that the marker can
be removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import select
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ClassVar

import pytest

from ember import protocol as P
from ember.agent import AGENT_VERSION
from ember.errors import BadRequestError, EmberError, EmberTimeoutError, GuestError, ProtocolError
from ember.runtime import agent_client
from ember.runtime.agent_client import (
    LOSSY_STREAM_BYTES,
    LOSSY_STREAM_FRAMES,
    LOSSY_STREAM_MSGS,
    STREAM_QUEUE_FRAMES,
    AgentClient,
)
from ember.sdk.files import AsyncFiles
from ember.sdk.process import AsyncProcess
from tests.unit.test_agent_client import exec_msg, hostile
from tests.unit.test_protocol_fuzz import hostile_garbage

HARD = 30.0  # no test may take longer than this, whatever the guest does
SCAN_BOUND = P.HEADER_SIZE + P.MAX_MSG_PAYLOAD
STREAM_READER_LIMIT = 64 * 1024  # asyncio's default, as used by the tests' connections


def run(main: Callable[[], Awaitable[None]], hard: float = HARD) -> None:
    asyncio.run(asyncio.wait_for(main(), hard))


# --- the guest's side -----------------------------------------------------------------------
def host_frames(g: socket.socket, stop: threading.Event | None = None) -> Iterator[P.Frame]:
    """Frames from the host until it hangs up (or ``stop`` is set)."""
    dec = P.FrameDecoder(P.HOST_TO_GUEST_KINDS)
    while stop is None or not stop.is_set():
        try:
            ready, _, _ = select.select([g], [], [], 0.05)
            if not ready:
                continue
            data = g.recv(65536)
        except (OSError, ValueError):  # closed under us
            return
        if not data:
            return
        yield from dec.feed(data)


def op_of(frame: P.Frame) -> str | None:
    return str(frame.msg()["op"]) if frame.kind is P.Kind.MSG else None


def send(g: socket.socket, data: bytes) -> bool:
    """Send everything; False once the host has gone (EPIPE, reset, closed)."""
    try:
        g.sendall(data)
    except OSError:
        return False
    return True


def msg(sid: int, op: str, **fields: Any) -> bytes:
    return P.encode_msg(sid, {"op": op, **fields})


def out(sid: int, data: bytes, kind: P.Kind = P.Kind.STDOUT) -> bytes:
    return P.encode_frame(kind, sid, data)


EXIT_0 = {"code": 0, "signal": None, "timed_out": False}


async def until(check: Callable[[], bool], timeout: float) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() >= end:
            return False
        await asyncio.sleep(0.02)
    return True


def queued_frames(c: AgentClient, sid: int, kinds: Any = P.ALL_KINDS) -> list[P.Frame]:
    queue = c._streams[sid].queue._queue  # type: ignore[attr-defined]
    return [item for item in queue if isinstance(item, P.Frame) and item.kind in kinds]


DATA_KINDS = P.GUEST_TO_HOST_KINDS - {P.Kind.MSG}


# --- before the hello -----------------------------------------------------------------------
class RecordingScanner(P.HelloScanner):
    """The real HelloScanner, recording what it was fed and the most it buffered."""

    made: ClassVar[list[RecordingScanner]] = []

    def __init__(self, nonce: int, *, kinds: Any = P.ALL_KINDS) -> None:
        super().__init__(nonce, kinds=kinds)
        self.fed = 0
        self.max_buffered = 0
        RecordingScanner.made.append(self)

    def feed(self, data: bytes) -> P.Handshake | None:
        self.fed += len(data)
        try:
            return super().feed(data)
        finally:
            self.max_buffered = max(self.max_buffered, self.buffered)


def test_endless_garbage_without_hello_times_out_with_bounded_buffers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A guest that floods the scanner's worst cases and never answers the hello: the hello
    times out on time, the host keeps reading (no stall) and never holds more than one MSG
    frame in its scanner, nor more than asyncio's flow-control bound in its reader."""
    RecordingScanner.made = []
    monkeypatch.setattr(P, "HelloScanner", RecordingScanner)
    garbage = hostile_garbage(random.Random(7), 2 << 20)
    broken: list[str] = []

    async def main() -> None:
        host, guest = socket.socketpair()
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set() and send(guest, garbage):
                pass
            guest.close()

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        reader, writer = await asyncio.open_unix_connection(sock=host)
        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(reader._buffer))  # type: ignore[attr-defined]
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        timeout = 1.5
        try:
            with pytest.raises(EmberTimeoutError):
                # the slack covers a loaded host; a hello that ignores its deadline fails
                # here with asyncio's plain TimeoutError instead
                await asyncio.wait_for(
                    AgentClient.over(reader, writer, timeout=timeout, on_broken=broken.append),
                    timeout + 5,
                )
        finally:
            sampler.cancel()
            stop.set()
        await asyncio.to_thread(thread.join, 5)
        assert not thread.is_alive()  # the host closed its end: the flood ended
        assert peak <= 2 * STREAM_READER_LIMIT + 256 * 1024

    run(main)
    (scanner,) = RecordingScanner.made
    assert scanner.fed > 1 << 20  # it kept reading the flood
    assert scanner.max_buffered <= SCAN_BOUND
    assert scanner.discarded + scanner.buffered == scanner.fed
    assert broken == []  # no session was ever established


def _hello_ok(nonce: int, **changes: Any) -> dict[str, Any]:
    return {**P.hello_ok(nonce, agent=AGENT_VERSION, hostname="h", kernel="k"), **changes}


@pytest.mark.parametrize(
    ("answer", "hang_up", "error"),
    [
        (lambda n: msg(0, "hello_ok", nonce=n, version=1), False, ProtocolError),
        (lambda n: P.encode_msg(0, _hello_ok(n, version=2)), False, ProtocolError),
        (lambda n: P.encode_msg(0, _hello_ok(n, extra=1)), False, ProtocolError),
        (lambda n: P.encode_msg(0, _hello_ok(n, kernel=5)), False, ProtocolError),
        (lambda n: P.encode_msg(0, _hello_ok(n)) + b"garbage", False, ProtocolError),
        (lambda n: P.encode_msg(0, _hello_ok(n, agent="0.0.1")), False, GuestError),
        (lambda n: P.encode_msg(0, _hello_ok(n))[:-3], True, GuestError),
        (lambda n: b"\x00" * 100, True, GuestError),
    ],
    ids=["missing-fields", "version-2", "unknown-field", "mistyped-field", "garbage-after",
         "other-agent", "cut-short-then-eof", "garbage-then-eof"],
)
def test_bad_hello_answers(
    answer: Callable[[int], bytes], hang_up: bool, error: type[Exception]
) -> None:
    """Answers to the hello that carry our nonce but are bad, or that end the connection:
    a typed error at once (well before the timeout), and the host closes its end."""

    async def main() -> None:
        host, guest = socket.socketpair()
        hung_up = threading.Event()

        def fake() -> None:
            for frame in host_frames(guest):
                nonce = frame.msg()["nonce"]
                assert isinstance(nonce, int)
                send(guest, answer(nonce))
                if hang_up:
                    break
            else:
                hung_up.set()  # the host closed its end
            guest.close()

        thread = threading.Thread(target=fake, daemon=True)
        thread.start()
        reader, writer = await asyncio.open_unix_connection(sock=host)
        with pytest.raises(error):
            await asyncio.wait_for(AgentClient.over(reader, writer, timeout=20), 10)
        await asyncio.to_thread(thread.join, 5)
        assert not thread.is_alive()
        assert hang_up or hung_up.is_set()

    run(main)


# --- after the hello ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "length"),
    [
        (P.Kind.MSG, P.MAX_MSG_PAYLOAD + 1),
        (P.Kind.STDOUT, P.MAX_DATA_PAYLOAD + 1),
        (P.Kind.FILEDATA, 2**31),
    ],
)
def test_oversized_frame_breaks_the_session_before_its_payload(kind: P.Kind, length: int) -> None:
    """A maximal legal frame passes; one byte more is refused from its header alone, while
    the guest is still pushing the payload: nothing of it is buffered."""
    broken: list[str] = []

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            exec_sid, pings = 0, 0
            for frame in host_frames(g):
                if op_of(frame) == "exec":
                    exec_sid = frame.stream
                    send(g, msg(exec_sid, "started", pid=7)
                         + out(exec_sid, b"m" * P.MAX_DATA_PAYLOAD))
                elif op_of(frame) == "ping" and pings == 0:
                    pings += 1
                    send(g, msg(frame.stream, "pong"))
                elif op_of(frame) == "ping":
                    send(g, b"EM\x01" + bytes([kind]) + exec_sid.to_bytes(4, "big")
                         + length.to_bytes(4, "big"))
                    for _ in range(32):  # then up to 8 MiB of the announced payload
                        if not send(g, b"p" * (256 * 1024)):
                            break
                    return

        c = await hostile(guest)
        c._on_broken = broken.append  # as in test_agent_client.py (after the hello)
        p = await AsyncProcess.start(c, exec_msg("x", timeout=None))
        # once this is answered, the legal frame before it has been taken
        assert await c.request({"op": "ping"}, timeout=10) == {"op": "pong"}
        with pytest.raises(ProtocolError, match="announces"):
            await c.request({"op": "ping"}, timeout=10)
        with pytest.raises(ProtocolError, match="announces"):
            await p.wait()
        assert bytes(p._out) == b"m" * P.MAX_DATA_PAYLOAD  # the legal frame came through
        assert c._decoder.buffered == 0
        await c.close()

    run(main)
    assert len(broken) == 1 and "protocol" in broken[0]


def test_unread_output_is_accounted_exactly() -> None:
    """Output nobody reads: frames beyond LOSSY_STREAM_BYTES are dropped and counted, to the
    byte; the connection keeps serving other requests meanwhile; what was kept is delivered
    in order, with ``truncated`` set."""
    rng = random.Random(3)
    sizes = [rng.randrange(64 * 1024, P.MAX_DATA_PAYLOAD + 1) for _ in range(100)]  # ~16 MiB
    chunks = [bytes([65 + i % 26]) * size for i, size in enumerate(sizes)]
    kept, room = [], LOSSY_STREAM_BYTES
    for chunk in chunks:  # the documented rule: drop a frame that does not fit what is left
        if len(chunk) <= room:
            kept.append(chunk)
            room -= len(chunk)

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g):
                if op_of(frame) == "exec":
                    sid = frame.stream
                    send(g, msg(sid, "started", pid=7))
                    for chunk in chunks:
                        send(g, out(sid, chunk))
                    send(g, msg(sid, "exit", **EXIT_0))
                elif op_of(frame) == "ping":
                    send(g, msg(frame.stream, "pong"))

        c = await hostile(guest)
        p = await AsyncProcess.start(c, exec_msg("x", timeout=None))
        assert await c.request({"op": "ping"}, timeout=10) == {"op": "pong"}  # not stalled
        st = c._streams[p._sid]
        assert st.buffered == sum(map(len, kept)) <= LOSSY_STREAM_BYTES
        assert st.dropped == c.dropped_bytes(p._sid) == sum(sizes) - st.buffered > 0
        assert sum(len(f.payload) for f in queued_frames(c, p._sid, DATA_KINDS)) == st.buffered
        result = await p.wait()
        assert result.exit_code == 0 and result.truncated
        assert result.stdout_bytes == b"".join(kept)
        assert p._sid not in c._streams
        await c.close()

    run(main)


def test_flood_of_tiny_frames_on_an_unread_stream_is_bounded() -> None:
    """12-byte empty STDOUT frames cost the guest nothing and count as 0 buffered bytes; the
    host memory they take must still stay within LOSSY_STREAM_BYTES."""

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g):
                if op_of(frame) == "exec":
                    sid = frame.stream
                    send(g, msg(sid, "started", pid=7))
                    send(g, out(sid, b"") * 200_000 + out(sid, b"x") * 100_000)
                elif op_of(frame) == "ping":
                    send(g, msg(frame.stream, "pong"))

        c = await hostile(guest)
        p = await AsyncProcess.start(c, exec_msg("x", timeout=None))
        await c.request({"op": "ping"}, timeout=20)  # every frame before the pong is routed
        held = sum(sys.getsizeof(f) + sys.getsizeof(f.payload) for f in queued_frames(c, p._sid))
        await c.close()
        assert held <= LOSSY_STREAM_BYTES, f"{held} bytes held for an unread stream"

    run(main)


def test_exit_after_many_small_output_frames_is_not_a_flood() -> None:
    """A well-behaved guest: a command that printed 300 short lines, one frame each."""

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g):
                if op_of(frame) == "exec":
                    sid = frame.stream
                    lines = b"".join(out(sid, b"%d\n" % i) for i in range(300))
                    send(g, msg(sid, "started", pid=7) + lines + msg(sid, "exit", **EXIT_0))

        c = await hostile(guest)
        p = await AsyncProcess.start(c, exec_msg("seq 300", timeout=None))
        try:
            result = await p.wait()
        except ProtocolError as err:
            raise AssertionError(f"a valid exec was taken for a flood: {err}") from err
        finally:
            await c.close()
        assert result.exit_code == 0
        assert result.stdout == "".join(f"{i}\n" for i in range(300))

    run(main)


def test_message_flood_on_an_exec_stream_breaks_the_session() -> None:
    """More than LOSSY_STREAM_MSGS messages on one exec stream is a hostile guest."""
    broken: list[str] = []

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g):
                if op_of(frame) == "exec":
                    sid = frame.stream
                    send(g, msg(sid, "started", pid=7) * (LOSSY_STREAM_MSGS * 4))

        c = await hostile(guest)
        c._on_broken = broken.append  # as in test_agent_client.py (after the hello)
        p = await AsyncProcess.start(c, exec_msg("x", timeout=None))
        assert await until(lambda: c.broken is not None, 10)
        assert len(queued_frames(c, p._sid)) <= LOSSY_STREAM_MSGS
        with pytest.raises(GuestError):
            await p.wait()
        with pytest.raises(GuestError, match="broken"):
            await c.request({"op": "ping"}, timeout=10)
        await c.close()

    run(main)
    assert len(broken) == 1 and "flooded" in broken[0]


def test_guest_that_stops_answering_mid_request() -> None:
    """Half a reply, then silence: the request times out, the client is marked broken with
    ``on_broken`` called exactly once (not again on the later hang-up nor on close), an
    operation waiting without a timeout is failed at once, and new requests fail fast."""
    broken: list[str] = []
    hang_up = threading.Event()

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g, stop=hang_up):
                if op_of(frame) == "exec":
                    send(g, msg(frame.stream, "started", pid=7))
                elif op_of(frame) == "ping":
                    send(g, msg(frame.stream, "pong")[:7])  # half a header, then nothing
            g.close()

        c = await hostile(guest)
        c._on_broken = broken.append  # as in test_agent_client.py (after the hello)
        p = await AsyncProcess.start(c, exec_msg("sleep infinity", timeout=None))
        waiting = asyncio.create_task(p.wait())  # waits without any timeout of its own
        with pytest.raises(EmberTimeoutError, match="stopped answering"):
            await c.request({"op": "ping"}, timeout=0.5)
        assert c.broken is not None and len(broken) == 1
        with pytest.raises(GuestError):
            await asyncio.wait_for(waiting, 5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(GuestError, match="broken"):
            await c.request({"op": "ping"}, timeout=10)
        assert loop.time() - started < 5  # it did not wait for an answer
        assert c._decoder.buffered == 7
        hang_up.set()  # now the guest goes away: the reader sees EOF
        await asyncio.sleep(0.3)
        await c.close()
        assert len(broken) == 1

    run(main)


@pytest.mark.parametrize("cut", [3, P.HEADER_SIZE, P.HEADER_SIZE + 5])
@pytest.mark.parametrize("kind", ["reply", "output"])
def test_guest_closes_the_connection_mid_frame(cut: int, kind: str) -> None:
    """Every pending operation (a request, and an exec waiting without timeout) fails with
    GuestError as soon as the guest hangs up mid-frame, not at its timeout."""
    broken: list[str] = []

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            exec_sid = 0
            for frame in host_frames(g):
                if op_of(frame) == "exec":
                    exec_sid = frame.stream
                    send(g, msg(exec_sid, "started", pid=7))
                elif op_of(frame) == "ping":
                    half = (msg(frame.stream, "pong", pad="x" * 40) if kind == "reply"
                            else out(exec_sid, b"y" * 40))
                    send(g, half[:cut])
                    g.close()
                    return

        c = await hostile(guest)
        c._on_broken = broken.append  # as in test_agent_client.py (after the hello)
        p = await AsyncProcess.start(c, exec_msg("x", timeout=None))
        waiting = asyncio.create_task(p.wait())
        with pytest.raises(GuestError, match="closed"):
            await asyncio.wait_for(c.request({"op": "ping"}, timeout=60), 10)
        with pytest.raises(GuestError, match="closed"):
            await asyncio.wait_for(waiting, 10)
        assert c._decoder.buffered == cut
        await c.close()

    run(main)
    assert len(broken) == 1 and "closed" in broken[0]


def test_frames_for_unknown_streams_are_dropped() -> None:
    """Frames of every kind for streams the host never opened, and late replies for
    finished requests, are dropped without growing anything or disturbing the session."""
    broken: list[str] = []
    strange = [1000, 4242, 2**31, P.MAX_STREAM]

    def spam(count: int) -> bytes:
        frames = []
        for i in range(count):
            sid = strange[i % len(strange)]
            pick = i % 6
            if pick == 0:
                frames.append(msg(sid, "exit", **EXIT_0))
            elif pick == 1:
                frames.append(msg(sid, "no_such_op", junk=[1, {"x": None}]))  # bad schema
            elif pick == 2:
                frames.append(msg(0, "error", kind="io", message="spam"))
            else:
                frames.append(out(sid, b"z" * (i % 300), [P.Kind.STDOUT, P.Kind.STDERR,
                                                          P.Kind.FILEDATA][pick - 3]))
        return b"".join(frames)

    noise, late_noise = spam(20_000), spam(2_000)

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            send(g, noise)
            for frame in host_frames(g):
                if op_of(frame) == "ping":
                    sid = frame.stream
                    # the answer, then late junk for the same (soon finished) request
                    send(g, msg(sid, "pong") + msg(sid, "pong") + out(sid, b"late"))
                    send(g, late_noise)

        c = await hostile(guest)
        c._on_broken = broken.append  # as in test_agent_client.py (after the hello)
        for _ in range(5):
            assert await c.request({"op": "ping"}, timeout=10) == {"op": "pong"}
        assert c._streams == {}
        assert c.broken is None
        await c.close()

    run(main)
    assert broken == []


def test_reply_flood_is_held_back_by_the_consumer() -> None:
    """A listing in thousands of parts: the host queues at most STREAM_QUEUE_FRAMES of them
    at a time (the guest is slowed down instead), and the parts are merged in order."""
    parts = 3000

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g):
                if op_of(frame) == "list":
                    sid = frame.stream
                    for i in range(parts):
                        entry = {"name": f"f{i}", "type": "file", "size": i, "mode": 0o644,
                                 "mtime": 0}
                        send(g, msg(sid, "list_result", entries=[entry], more=i < parts - 1))

        c = await hostile(guest)
        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                for st in list(c._streams.values()):
                    peak = max(peak, st.queue.qsize())
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        try:
            listing = await c.request({"op": "list", "path": "/"}, timeout=10)
        finally:
            sampler.cancel()
        assert [e["name"] for e in listing["entries"]] == [f"f{i}" for i in range(parts)]
        assert 0 < peak <= STREAM_QUEUE_FRAMES
        await c.close()

    run(main)


def test_reply_flood_after_the_final_reply_does_not_wedge_the_reader() -> None:
    """Extra replies that fill a finished request's queue are dropped with it: the reader
    is not left waiting to queue them, so it still notices the guest hanging up."""
    broken: list[str] = []

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g):
                if op_of(frame) == "ping":
                    send(g, msg(frame.stream, "pong") * (STREAM_QUEUE_FRAMES + 40))
                    break
            g.close()  # the VM dies

        c = await hostile(guest)
        c._on_broken = broken.append  # as in test_agent_client.py (after the hello)
        assert await c.request({"op": "ping"}, timeout=10) == {"op": "pong"}
        noticed = await until(lambda: bool(broken), 2)
        await c.close()
        assert noticed, "the host never noticed that the guest hung up"

    run(main)


def test_abandoned_file_read_does_not_wedge_the_connection() -> None:
    """A file read given up while its queue is full (a slow consumer, then the size limit)
    does not leave the reader waiting for room: the connection keeps serving requests."""

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g):
                if op_of(frame) == "read":
                    sid = frame.stream
                    send(g, msg(sid, "file", size=100 << 16, mode=0o644))
                    for _ in range(100):
                        send(g, out(sid, b"d" * 65536, P.Kind.FILEDATA))
                    send(g, msg(sid, "eof"))
                elif op_of(frame) == "ping":
                    send(g, msg(frame.stream, "pong"))

        c = await hostile(guest)
        files = AsyncFiles(lambda: c)
        with pytest.raises(BadRequestError, match="larger than"):
            async for _ in files.read_chunks("/big", limit=1_000_000):
                await asyncio.sleep(0.02)  # a slow consumer: writing to a disk, say
        try:
            pong = await c.request({"op": "ping"}, timeout=2)
        except EmberError as err:
            raise AssertionError(f"the connection is wedged: {err}") from err
        finally:
            await c.close()
        assert pong == {"op": "pong"}

    run(main)


def test_request_with_endless_partial_replies_ends() -> None:
    """A guest answering ``more: true`` forever, each part well within the timeout: the
    request still ends, with a typed error, once its timeout has passed in all."""

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g):
                if op_of(frame) == "list":
                    part = msg(frame.stream, "list_result", entries=[], more=True)
                    while send(g, part):
                        time.sleep(0.1)
                    return

        c = await hostile(guest)
        task = asyncio.create_task(c.request({"op": "list", "path": "/"}, timeout=1))
        done, _ = await asyncio.wait({task}, timeout=4)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await c.close()
        assert task in done, "request(timeout=1) still pending after 4 s"
        assert isinstance(task.exception(), EmberError)

    run(main)


def test_data_frames_beyond_the_frame_bound_are_dropped_and_counted() -> None:
    """Tiny frames on an unread lossy stream: at most LOSSY_STREAM_FRAMES are queued, the
    rest are dropped and counted like frames beyond LOSSY_STREAM_BYTES (so the result is
    ``truncated``), and a later message still gets through."""
    extra = 100

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g):
                if op_of(frame) == "exec":
                    sid = frame.stream
                    send(g, msg(sid, "started", pid=7)
                         + out(sid, b"ab") * (LOSSY_STREAM_FRAMES + extra)
                         + msg(sid, "exit", **EXIT_0))
                elif op_of(frame) == "ping":
                    send(g, msg(frame.stream, "pong"))

        c = await hostile(guest)
        p = await AsyncProcess.start(c, exec_msg("x", timeout=None))
        assert await c.request({"op": "ping"}, timeout=10) == {"op": "pong"}  # all routed
        assert len(queued_frames(c, p._sid, DATA_KINDS)) == LOSSY_STREAM_FRAMES
        assert c.dropped_bytes(p._sid) == 2 * extra
        result = await p.wait()
        assert result.exit_code == 0 and result.truncated
        assert result.stdout_bytes == b"ab" * LOSSY_STREAM_FRAMES
        await c.close()

    run(main)


def _list_parts(sid: int, total: int) -> list[bytes]:
    """A listing in 3 parts whose payloads add up to exactly ``total`` bytes."""

    def part(name: str, more: bool) -> bytes:
        entry = {"name": name, "type": "file", "size": 1, "mode": 0o644, "mtime": 0}
        return msg(sid, "list_result", entries=[entry], more=more)

    first = [part("a" * 1000, True), part("b" * 1000, True)]
    used = sum(len(f) - P.HEADER_SIZE for f in first)
    last_len = len(part("", False)) - P.HEADER_SIZE
    last = part("c" * (total - used - last_len), False)
    assert sum(len(f) - P.HEADER_SIZE for f in [*first, last]) == total
    return [*first, last]


@pytest.mark.parametrize("over", [0, 1])
def test_reply_size_cap_is_exact_and_keeps_the_session(
    monkeypatch: pytest.MonkeyPatch, over: int
) -> None:
    """A reply whose parts total REQUEST_REPLY_BYTES is taken; one byte more fails that
    request with GuestError naming the cap, and only that request: the session goes on."""
    cap = 50_000
    monkeypatch.setattr(agent_client, "REQUEST_REPLY_BYTES", cap)

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g):
                if op_of(frame) == "list":
                    send(g, b"".join(_list_parts(frame.stream, cap + over)))
                elif op_of(frame) == "ping":
                    send(g, msg(frame.stream, "pong"))

        c = await hostile(guest)
        if over:
            with pytest.raises(GuestError, match=f"exceeds {cap} bytes"):
                await c.request({"op": "list", "path": "/"}, timeout=10)
        else:
            listing = await c.request({"op": "list", "path": "/"}, timeout=10)
            assert [e["name"][0] for e in listing["entries"]] == ["a", "b", "c"]
        assert await c.request({"op": "ping"}, timeout=10) == {"op": "pong"}
        assert c.broken is None and c._streams == {}
        await c.close()

    run(main)


def test_fast_endless_partial_replies_hit_the_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """``more: true`` forever, as fast as the guest can: the request fails on the size cap
    long before its timeout, and the merged listing never holds more than the cap."""
    cap = 1 << 20
    monkeypatch.setattr(agent_client, "REQUEST_REPLY_BYTES", cap)
    entry = {"name": "n" * 200, "type": "file", "size": 1, "mode": 0o644, "mtime": 0}
    merged_entries: list[int] = []
    merge = agent_client.merge_reply

    def recording_merge(merged: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
        result = merge(merged, part)
        merged_entries.append(len(result["entries"]))
        return result

    monkeypatch.setattr(agent_client, "merge_reply", recording_merge)

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            for frame in host_frames(g):
                if op_of(frame) == "list":
                    part = msg(frame.stream, "list_result", entries=[entry], more=True)
                    while send(g, part * 64):
                        pass
                    return

        c = await hostile(guest)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(GuestError, match="exceeds"):
            await c.request({"op": "list", "path": "/"}, timeout=60)
        assert loop.time() - started < 20
        part_size = len(msg(1, "list_result", entries=[entry], more=True)) - P.HEADER_SIZE
        assert merged_entries and max(merged_entries) == cap // part_size
        await c.close()

    run(main)


def test_slow_endless_partial_replies_end_at_the_deadline() -> None:
    """Parts that keep coming, each well within the timeout: the request fails with
    EmberTimeoutError once the timeout has passed in all (not much later), and only the
    request: the guest is still answering, so the session goes on."""
    timeout = 1.0

    async def main() -> None:
        def guest(g: socket.socket, nonce: int) -> None:
            lock = threading.Lock()

            def locked_send(data: bytes) -> bool:
                with lock:
                    return send(g, data)

            def parts(sid: int) -> None:
                part = msg(sid, "list_result", entries=[], more=True)
                while locked_send(part):
                    time.sleep(0.05)

            for frame in host_frames(g):
                if op_of(frame) == "list":
                    threading.Thread(target=parts, args=(frame.stream,), daemon=True).start()
                elif op_of(frame) == "ping":
                    locked_send(msg(frame.stream, "pong"))

        c = await hostile(guest)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(EmberTimeoutError, match="did not finish its reply"):
            await c.request({"op": "list", "path": "/"}, timeout=timeout)
        elapsed = loop.time() - started
        assert timeout <= elapsed < timeout + 2
        assert c.broken is None
        assert await c.request({"op": "ping"}, timeout=10) == {"op": "pong"}
        await c.close()

    run(main)
