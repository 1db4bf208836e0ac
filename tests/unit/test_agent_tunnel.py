"""connect: a TCP connection to a loopback port carried on a stream, against an agent
serving a socketpair (no VM) and real listening sockets on this host's loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from ember.agent.ops_tunnel import CHUNK
from ember.protocol import CONNECT_FRAME_CHARGE, Frame, Kind

from .test_agent_harness import AgentHarness


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)
    yield srv
    srv.close()


def _port(srv: socket.socket) -> int:
    return int(srv.getsockname()[1])


def _stdout(frames: list[Frame]) -> bytes:
    return b"".join(f.payload for f in frames if f.kind is Kind.STDOUT)


def test_round_trip_and_half_close(agent: AgentHarness, listener: socket.socket) -> None:
    """Bytes both ways; stdin_eof shuts the sending side only, and the answer still comes."""
    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            got = b""
            while chunk := conn.recv(65536):
                got += chunk
            conn.sendall(b"echo:" + got)

    t = threading.Thread(target=serve)
    t.start()
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "connect", "port": _port(listener), "window": 1 << 20})
    assert agent.next_msg(stream) == {"op": "connected"}
    agent.send_data(Kind.STDIN, stream, b"hello ")
    agent.send_data(Kind.STDIN, stream, b"world")
    agent.send_msg(stream, {"op": "stdin_eof"})
    frames = agent.collect(stream)
    t.join(10)
    assert _stdout(frames) == b"echo:hello world"
    assert frames[-1].msg() == {"op": "closed"}


def test_refused_port_is_an_error(agent: AgentHarness, listener: socket.socket) -> None:
    port = _port(listener)
    listener.close()
    reply = agent.request({"op": "connect", "port": port, "window": 65536})
    assert reply["op"] == "error" and "refused" in reply["message"].lower()
    assert str(port) in reply["message"]


def test_bad_requests(agent: AgentHarness) -> None:
    for bad in ({"op": "connect", "port": 0, "window": 1}, {"op": "connect", "port": 80},
                {"op": "connect", "port": 70000, "window": 1},
                {"op": "connect", "port": 80, "window": 0},
                {"op": "connect", "port": 80, "window": 1, "host": "10.0.0.1"}):
        reply = agent.request(bad)
        assert reply["op"] == "error" and reply["kind"] == "bad_request", bad


def test_output_waits_for_credit(agent: AgentHarness, listener: socket.socket) -> None:
    """The agent reads no more than granted: a reader that grants nothing gets nothing more."""
    total = 5 * CHUNK
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"x" * total)
            done.wait(20)

    t = threading.Thread(target=serve)
    t.start()
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "connect", "port": _port(listener), "window": 1000})
    assert agent.next_msg(stream) == {"op": "connected"}
    got = b""
    while len(got) < 1000:
        frame = agent.next_frame(stream)
        assert frame.kind is Kind.STDOUT
        got += frame.payload
    assert len(got) == 1000
    with pytest.raises(TimeoutError):
        agent.next_frame(stream, timeout=0.5)  # nothing beyond the grant
    agent.send_msg(stream, {"op": "credit", "bytes": 2 * total})  # the first frame overdrew
    while len(got) < total:
        got += agent.next_frame(stream).payload
    done.set()
    frames = agent.collect(stream)
    t.join(10)
    assert got == b"x" * total and frames[-1].msg() == {"op": "closed"}


def test_abort_closes_the_connection(agent: AgentHarness, listener: socket.socket) -> None:
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            seen.append(conn.recv(100))  # b"" once the agent closed it

    t = threading.Thread(target=serve)
    t.start()
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "connect", "port": _port(listener), "window": 65536})
    assert agent.next_msg(stream) == {"op": "connected"}
    agent.send_msg(stream, {"op": "abort"})
    assert agent.collect(stream)[-1].msg() == {"op": "closed"}
    t.join(10)
    assert seen == [b""]


def test_session_end_closes_connections(listener: socket.socket) -> None:
    """A host that goes away leaves no connection open in the guest."""
    harness = AgentHarness()
    harness.handshake()
    stream = harness.new_stream()
    harness.send_msg(stream, {"op": "connect", "port": _port(listener), "window": 65536})
    conn, _ = listener.accept()
    assert harness.next_msg(stream) == {"op": "connected"}
    harness.handshake(nonce=43)  # a new session: the old one's streams are forgotten
    conn.settimeout(10)
    t0 = time.monotonic()
    assert conn.recv(10) == b""
    assert time.monotonic() - t0 < 10
    conn.close()
    harness.close()


def test_small_writes_cost_a_frame_charge_each(agent: AgentHarness,
                                               listener: socket.socket) -> None:
    """A server writing a byte at a time gets no more frames out than the grant allows:
    each costs at least CONNECT_FRAME_CHARGE, so a window bounds frames, not just bytes."""
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(10):
                conn.sendall(b"a")
                time.sleep(0.05)
            done.wait(20)

    t = threading.Thread(target=serve)
    t.start()
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "connect", "port": _port(listener),
                            "window": 2 * CONNECT_FRAME_CHARGE})
    assert agent.next_msg(stream) == {"op": "connected"}
    frames = [agent.next_frame(stream), agent.next_frame(stream)]
    time.sleep(0.8)  # the server wrote everything by now
    with pytest.raises(TimeoutError):
        agent.next_frame(stream, timeout=0.3)
    agent.send_msg(stream, {"op": "credit", "bytes": 16 * CONNECT_FRAME_CHARGE})
    got = b"".join(f.payload for f in frames)
    while len(got) < 10:
        got += agent.next_frame(stream).payload
    done.set()
    assert got == b"a" * 10 and agent.collect(stream)[-1].msg() == {"op": "closed"}
    t.join(10)
