"""The host side of the protocol (AgentClient, AsyncProcess, AsyncFiles) against the real
guest agent serving a socketpair on this host, and against hostile fake guests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from ember import protocol as P
from ember.agent import AGENT_VERSION
from ember.agent.server import serve
from ember.errors import (
    BadRequestError,
    CommandNotFoundError,
    CommandTimeoutError,
    EmberTimeoutError,
    GuestError,
    GuestPathNotFoundError,
    ProtocolError,
)
from ember.runtime.agent_client import AgentClient
from ember.sdk.files import AsyncFiles
from ember.sdk.process import AsyncProcess, exec_request


async def with_agent(body: Callable[[AgentClient], Awaitable[None]]) -> None:
    host, guest = socket.socketpair()
    t = threading.Thread(target=serve, args=(guest.fileno(),), daemon=True)
    t.start()
    reader, writer = await asyncio.open_unix_connection(sock=host)
    client = await AgentClient.over(reader, writer, timeout=10)
    try:
        await body(client)
        assert (await client.request({"op": "shutdown"}))["op"] == "ok"
    finally:
        await client.close()
        await asyncio.to_thread(t.join, 10)
        guest.close()


def run(body: Callable[[AgentClient], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(with_agent(body), 60))


def exec_msg(cmd: str | list[str], timeout: float | None = 10) -> dict[str, object]:
    return exec_request(cmd, env=None, cwd=None, user=None, stdin=False, timeout=timeout)


def test_hello_and_exec_roundtrip() -> None:
    async def body(c: AgentClient) -> None:
        assert c.hello["op"] == "hello_ok"
        p = await AsyncProcess.start(c, exec_msg(["sh", "-c", "echo hi; echo err >&2; exit 4"]))
        r = await p.wait()
        assert (r.exit_code, r.stdout, r.stderr) == (4, "hi\n", "err\n")

    run(body)


def test_exec_errors_and_timeout() -> None:
    async def body(c: AgentClient) -> None:
        with pytest.raises(CommandNotFoundError):
            await AsyncProcess.start(c, exec_msg(["/no/such/binary"]))
        p = await AsyncProcess.start(c, exec_msg("sleep 20", timeout=0.5))
        with pytest.raises(CommandTimeoutError):
            await p.wait()

    run(body)


def test_files_roundtrip(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        files = AsyncFiles(lambda: c)
        data = bytes(range(256)) * 5000  # > several data frames
        assert await files.write(str(tmp_path / "f"), data) == len(data)
        assert await files.read(str(tmp_path / "f")) == data
        with pytest.raises(GuestPathNotFoundError):
            await files.read(str(tmp_path / "missing"))
        names = [e.name for e in await files.list(str(tmp_path))]
        assert names == ["f"]

    run(body)


# --- hostile guests ------------------------------------------------------------------------
async def hostile(behaviour: Callable[[socket.socket, int], None], *,
                  timeout: float = 5) -> AgentClient:
    """A fake guest: answers the hello, then does ``behaviour``."""
    host, guest = socket.socketpair()

    def fake() -> None:
        dec = P.FrameDecoder(P.HOST_TO_GUEST_KINDS)
        frames: list[P.Frame] = []
        while not frames:
            frames = dec.feed(guest.recv(65536))
        nonce = frames[0].msg()["nonce"]
        assert isinstance(nonce, int)
        guest.sendall(b"stale garbage" + P.encode_msg(0, P.hello_ok(
            nonce, agent=AGENT_VERSION, hostname="h", kernel="k")))
        behaviour(guest, nonce)

    threading.Thread(target=fake, daemon=True).start()
    reader, writer = await asyncio.open_unix_connection(sock=host)
    return await AgentClient.over(reader, writer, timeout=timeout)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00" * 64,  # bad magic
        b"EM\x01\x01\x00\x00\x00\x01\xff\xff\xff\xff",  # oversized length
        P.encode_frame(P.Kind.MSG, 1, b"[1,2]"),  # JSON that is not an object
        P.encode_frame(P.Kind.MSG, 1, b"\xff\xfe"),  # not UTF-8
        P.encode_frame(P.Kind.STDIN, 1, b"x"),  # a kind only the host may send
    ],
)
def test_protocol_violation_breaks_session_not_host(payload: bytes) -> None:
    broken: list[str] = []

    async def main() -> None:
        def later(g: socket.socket, n: int) -> None:
            time.sleep(0.3)  # after the hello has been taken
            g.sendall(payload)

        c = await hostile(later)
        c._on_broken = broken.append
        with pytest.raises(GuestError):
            await c.request({"op": "ping"}, timeout=5)
        await c.close()

    asyncio.run(main())
    assert broken and "protocol" in broken[0]


def test_invalid_reply_schema_is_rejected() -> None:
    async def main() -> None:
        def reply_badly(g: socket.socket, n: int) -> None:
            dec = P.FrameDecoder(P.HOST_TO_GUEST_KINDS)
            with contextlib.suppress(OSError):  # the host closed its end under us
                while data := g.recv(65536):  # b"": the host hung up
                    for f in dec.feed(data):
                        g.sendall(P.encode_msg(f.stream, {"op": "pong", "extra": "x" * 10}))

        c = await hostile(reply_badly)
        with pytest.raises(ProtocolError):
            await c.request({"op": "ping"}, timeout=5)
        await c.close()

    asyncio.run(main())


def test_silent_guest_times_out() -> None:
    async def main() -> None:
        c = await hostile(lambda g, n: time.sleep(3))
        with pytest.raises(EmberTimeoutError):
            await c.request({"op": "ping"}, timeout=0.5)
        await c.close()

    asyncio.run(main())


def test_guest_that_never_says_hello_times_out() -> None:
    async def main() -> None:
        host, guest = socket.socketpair()
        guest.sendall(b"\x00garbage" * 1000)
        reader, writer = await asyncio.open_unix_connection(sock=host)
        with pytest.raises(EmberTimeoutError):
            await AgentClient.over(reader, writer, timeout=1.0)
        guest.close()

    asyncio.run(main())


@pytest.mark.parametrize("hostname", ["ends-with-", "-starts", "has space", "x" * 64, ""])
def test_an_invalid_hostname_is_refused_before_the_hello_is_sent(hostname: str) -> None:
    """The agent answers a hello it finds invalid (so that the host learns its version) and
    then ignores the session: the host must never send one and wait for nothing."""
    async def main() -> None:
        host, guest = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=host)
        with pytest.raises(BadRequestError, match="hostname"):
            await AgentClient.over(reader, writer, timeout=30.0, hostname=hostname)
        guest.settimeout(5)
        assert guest.recv(1 << 16) == b""  # closed, and nothing was sent before
        guest.close()

    asyncio.run(asyncio.wait_for(main(), 5))


def test_flooding_guest_is_bounded() -> None:
    """Endless output for an exec that nobody reads: host memory stays bounded and the
    connection keeps being read."""

    async def main() -> None:
        stop = threading.Event()

        def flood(g: socket.socket, n: int) -> None:
            dec = P.FrameDecoder(P.HOST_TO_GUEST_KINDS)
            while True:
                for f in dec.feed(g.recv(65536)):
                    if f.kind == P.Kind.MSG and f.msg()["op"] == "exec":
                        g.sendall(P.encode_msg(f.stream, {"op": "started", "pid": 7}))
                        chunk = P.encode_frame(P.Kind.STDOUT, f.stream, b"y" * 65536)
                        g.settimeout(2)
                        try:
                            while not stop.is_set():
                                g.sendall(chunk)
                        except OSError:
                            pass
                        g.close()
                        return

        c = await hostile(flood)
        p = await AsyncProcess.start(c, exec_msg("yes", timeout=None))
        await asyncio.sleep(1.5)  # nobody consumes the output
        # the host keeps reading (no stall for other operations) but buffers a bounded amount
        from ember.runtime.agent_client import LOSSY_STREAM_BYTES

        buffered = sum(st.buffered for st in c._streams.values())
        assert 0 < buffered <= LOSSY_STREAM_BYTES
        assert c.dropped_bytes(p._sid) > 0
        stop.set()  # the guest goes away while the queue is full: the reader ends, no hang
        with pytest.raises(GuestError):
            await asyncio.wait_for(p.wait(), 30)
        await c.close()

    asyncio.run(main())
