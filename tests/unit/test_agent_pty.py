"""exec on a terminal (``pty``), against an agent serving a socketpair (no VM)."""

from __future__ import annotations

import time

import pytest

from ember.protocol import Kind

from .test_agent_harness import AgentHarness


def _until(agent: AgentHarness, stream: int, needle: bytes, timeout: float = 10.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        assert time.monotonic() < deadline, f"no {needle!r} in {seen!r}"
        frame = agent.next_frame(stream)
        assert frame.kind is Kind.STDOUT, frame
        seen += frame.payload
    return seen


def test_a_terminal_of_the_asked_size_that_is_the_controlling_one(agent: AgentHarness) -> None:
    result = agent.run({"shell": "tty; stty size; echo TERM=$TERM; echo err >&2",
                        "pty": {"rows": 30, "cols": 100}})
    out = result.stdout.replace(b"\r\n", b"\n")
    assert b"/dev/pts/" in out and b"30 100\n" in out and b"TERM=xterm-256color" in out
    assert b"err" in out and result.stderr == b""  # one terminal carries both
    assert result.final["code"] == 0


def test_input_resize_and_ctrl_c(agent: AgentHarness) -> None:
    stream = agent.new_stream()
    script = ("trap 'stty size' WINCH; echo ready; "
              "while read line; do [ $line = stop ] && break; echo got:$line; done; "
              "echo sleeping; exec sleep 30")
    agent.send_msg(stream, {"op": "exec", "shell": script, "pty": {"rows": 24, "cols": 80}})
    assert agent.next_msg(stream)["op"] == "started"
    _until(agent, stream, b"ready")
    agent.send_data(Kind.STDIN, stream, b"hello\r")
    _until(agent, stream, b"got:hello")
    control = agent.new_stream()
    agent.send_msg(control, {"op": "resize", "target": stream, "rows": 50, "cols": 132})
    assert agent.next_msg(control)["op"] == "ok"
    agent.send_data(Kind.STDIN, stream, b"again\r")  # the trap runs once read returns
    _until(agent, stream, b"50 132")
    agent.send_data(Kind.STDIN, stream, b"stop\r")
    _until(agent, stream, b"sleeping")
    agent.send_data(Kind.STDIN, stream, b"\x03")  # Ctrl-C: the line discipline's SIGINT
    frames = agent.collect(stream)
    final = frames[-1].msg()
    assert final["op"] == "exit" and final["signal"] == 2, final


@pytest.mark.parametrize("size", [{"rows": 0, "cols": 80}, {"rows": 24}, {"rows": 24,
                                  "cols": 80, "x": 1}, [24, 80], {"rows": 5000, "cols": 80}])
def test_bad_terminal_sizes_are_refused(agent: AgentHarness, size: object) -> None:
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "exec", "shell": "true", "pty": size})
    reply = agent.next_msg(stream)
    assert reply["op"] == "error" and reply["kind"] == "bad_request"


def test_resize_of_an_exec_without_a_terminal(agent: AgentHarness) -> None:
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "exec", "shell": "sleep 5"})
    assert agent.next_msg(stream)["op"] == "started"
    control = agent.new_stream()
    agent.send_msg(control, {"op": "resize", "target": stream, "rows": 10, "cols": 10})
    reply = agent.next_msg(control)
    assert reply["op"] == "error" and reply["kind"] == "bad_request"
    agent.send_msg(control + 1, {"op": "signal", "target": stream, "signal": 9})
