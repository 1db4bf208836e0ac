"""Sessions: hello, resynchronisation after hostile bytes, busy streams, shutdown."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from ember.agent.channel import Channel, find_port
from ember.agent.server import Agent, Outcome
from ember.protocol import (
    GUEST_TO_HOST_KINDS,
    FrameDecoder,
    HelloScanner,
    Kind,
    ProtocolViolation,
    encode_frame,
    encode_msg,
    hello,
)

from .test_agent_harness import AgentHarness


@pytest.fixture
def agent() -> AgentHarness:
    return AgentHarness()


def test_nothing_is_served_before_hello(agent: AgentHarness) -> None:
    agent.send_msg(1, {"op": "ping"})
    agent.send_msg(2, {"op": "exec", "argv": ["touch", "/tmp/should-not-exist-ember"]})
    agent.handshake(3)
    assert agent.request({"op": "ping"}) == {"op": "pong"}
    assert agent.close() is Outcome.DISCONNECTED
    assert not os.path.exists("/tmp/should-not-exist-ember")


def test_hello_ok_fields(agent: AgentHarness) -> None:
    answer = agent.handshake(99)
    assert answer["agent"] and answer["kernel"] == os.uname().release
    assert answer["hostname"] == socket.gethostname()
    agent.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 100,
        b"GET / HTTP/1.1\r\n\r\n",
        encode_frame(Kind.MSG, 1, b"{broken json"),
        encode_frame(Kind.STDOUT, 1, b"host may not send STDOUT"),
        b"EM\x01\x05\x00\x00\x00\x01\xff\xff\xff\xff",  # oversize FILEDATA
    ],
)
def test_garbage_drops_the_session_then_a_new_hello_works(
    agent: AgentHarness, garbage: bytes
) -> None:
    agent.handshake(1)
    agent.send_raw(garbage)
    violation = agent.next_msg(0)
    assert violation["op"] == "error" and "protocol violation" in violation["message"]
    agent.send_msg(1, {"op": "ping"})  # ignored: no session
    agent.handshake(2)
    assert agent.request({"op": "ping"}) == {"op": "pong"}
    agent.close()


def test_garbage_and_hello_in_one_write(agent: AgentHarness) -> None:
    agent.handshake(1)
    agent.send_raw(b"E" + encode_msg(0, hello(2)) + encode_msg(9, {"op": "ping"}))
    found = None
    scanner = HelloScanner(2, kinds=GUEST_TO_HOST_KINDS)
    deadline = time.monotonic() + 10
    while found is None:
        found = scanner.feed(agent._recv(deadline))
    agent.decoder = found.decoder
    agent.queues.clear()
    for frame in found.frames:
        agent.queues[frame.stream].append(frame)
    assert agent.next_msg(9) == {"op": "pong"}
    agent.close()


def test_new_hello_forgets_streams_but_processes_keep_running(
    agent: AgentHarness, tmp_path: Path
) -> None:
    agent.handshake(1)
    marker = tmp_path / "marker"
    agent.send_msg(5, {"op": "exec", "shell": f"sleep 0.5; touch {marker}; echo late"})
    assert agent.next_msg(5)["op"] == "started"
    agent.handshake(2)
    assert agent.request({"op": "ps"})["processes"] == []
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    assert agent.request({"op": "ping"}) == {"op": "pong"}
    assert not agent.queues[5]  # the old session's output and exit were dropped
    agent.close()


def test_bad_hello_version_is_answered_but_not_served(agent: AgentHarness) -> None:
    agent.send_msg(0, {"op": "hello", "version": 2, "nonce": 5})
    scanner = HelloScanner(5)  # a host speaking version 2 would reject this hello_ok
    deadline = time.monotonic() + 10
    while (found := scanner.feed(agent._recv(deadline))) is None:
        pass
    assert found.message["version"] == 1
    agent.send_msg(999, {"op": "ping"})  # no session yet: ignored
    agent.handshake(6)
    assert agent.request({"op": "ping"}) == {"op": "pong"}
    assert not agent.queues[999]
    agent.close()


def test_requests_on_stream_0_are_refused(agent: AgentHarness) -> None:
    agent.handshake()
    agent.send_msg(0, {"op": "ping"})
    assert agent.next_msg(0)["kind"] == "bad_request"
    assert agent.request({"op": "ping"}) == {"op": "pong"}
    agent.close()


def test_bad_requests_get_errors_and_keep_the_session(agent: AgentHarness) -> None:
    agent.handshake()
    assert agent.request({"op": "frobnicate"})["kind"] == "bad_request"
    assert agent.request({"op": "read"})["message"] == "read: missing field 'path'"
    assert agent.request({"op": "exec", "argv": ["true"], "bogus": 1})["kind"] == "bad_request"
    assert agent.request({"op": "ping"}) == {"op": "pong"}
    agent.close()


def test_busy_stream(agent: AgentHarness) -> None:
    agent.handshake()
    agent.send_msg(4, {"op": "exec", "argv": ["sleep", "30"]})
    assert agent.next_msg(4)["op"] == "started"
    agent.send_msg(4, {"op": "ping"})
    reply = agent.next_msg(4)
    assert reply["kind"] == "bad_request" and "busy" in reply["message"]
    agent.request({"op": "signal", "target": 4, "signal": 9})
    assert agent.collect(4)[-1].msg()["signal"] == 9
    agent.close()


def test_shutdown(agent: AgentHarness) -> None:
    agent.handshake()
    assert agent.request({"op": "shutdown"}) == {"op": "ok"}
    agent.thread.join(10)
    assert agent.outcome is Outcome.SHUTDOWN
    agent.close()


def test_serving_ends_kill_running_execs(agent: AgentHarness) -> None:
    agent.handshake()
    agent.send_msg(1, {"op": "exec", "argv": ["sleep", "30"]})
    pid = agent.next_msg(1)["pid"]
    assert agent.close() is Outcome.DISCONNECTED
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("the exec survived the agent")


def test_stop() -> None:
    host, guest = socket.socketpair()
    channel = Channel(guest.fileno())
    outcome: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcome.append(Agent(channel).serve()))
    thread.start()
    channel.stop()
    thread.join(10)
    assert outcome == [Outcome.STOPPED]
    channel.close()
    host.close()
    guest.close()


def test_hostile_random_bytes_never_kill_the_agent(agent: AgentHarness) -> None:
    rng = __import__("random").Random(1234)
    for round_ in range(20):
        agent.handshake(round_ + 100)
        agent.send_raw(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))))
    agent.handshake(7)
    assert agent.request({"op": "ping"}) == {"op": "pong"}
    assert agent.thread.is_alive()
    agent.close()


def test_decoder_used_by_agent_rejects_host_stdout() -> None:
    with pytest.raises(ProtocolViolation):
        FrameDecoder(GUEST_TO_HOST_KINDS - {Kind.STDOUT}).feed(encode_frame(Kind.STDOUT, 1, b""))


def test_find_port(tmp_path: Path) -> None:
    sys_dir, dev_dir = tmp_path / "sys", tmp_path / "dev"
    for name, port in (("org.qemu.guest_agent.0", "vport0p1"), ("ember.agent", "vport0p2")):
        (sys_dir / port).mkdir(parents=True)
        (sys_dir / port / "name").write_text(name + "\n")
        (dev_dir / port).parent.mkdir(exist_ok=True)
        (dev_dir / port).write_text("")
    assert find_port(sys_dir=str(sys_dir), dev_dir=str(dev_dir)) == str(dev_dir / "vport0p2")
    assert find_port("other", sys_dir=str(sys_dir), dev_dir=str(dev_dir)) is None
    (dev_dir / "virtio-ports").mkdir()
    (dev_dir / "virtio-ports/ember.agent").write_text("")
    assert find_port(sys_dir=str(sys_dir), dev_dir=str(dev_dir)) == str(
        dev_dir / "virtio-ports/ember.agent"
    )
    assert find_port(sys_dir=str(tmp_path / "absent"), dev_dir=str(tmp_path)) is None
