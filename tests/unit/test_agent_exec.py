"""exec, signal and ps, against an agent serving a socketpair (no VM)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from ember.agent.ops_exec import build_env, exec_spec
from ember.agent.users import Account
from ember.protocol import Kind

from .test_agent_harness import AgentHarness


def test_echo(agent: AgentHarness) -> None:
    result = agent.run({"argv": ["echo", "hello", "world"]})
    assert result.started is not None and result.started["pid"] > 0
    assert result.stdout == b"hello world\n" and result.stderr == b""
    assert result.final == {"op": "exit", "code": 0, "signal": None, "timed_out": False}


def test_shell_exit_code_and_stderr(agent: AgentHarness) -> None:
    result = agent.run({"shell": "echo out; echo err >&2; exit 7"})
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    assert result.final["code"] == 7


def test_output_streams_before_exit(agent: AgentHarness) -> None:
    stream = agent.new_stream()
    agent.send_msg(
        stream, {"op": "exec", "shell": "echo first; read line; echo $line", "stdin": True}
    )
    assert agent.next_msg(stream)["op"] == "started"
    first = agent.next_frame(stream)
    assert (first.kind, first.payload) == (Kind.STDOUT, b"first\n")
    agent.send_data(Kind.STDIN, stream, b"second\n")
    agent.send_msg(stream, {"op": "stdin_eof"})
    frames = agent.collect(stream)
    assert b"".join(f.payload for f in frames if f.kind is Kind.STDOUT) == b"second\n"
    assert frames[-1].msg()["code"] == 0


def test_large_output_is_chunked(agent: AgentHarness) -> None:
    result = agent.run({"shell": "head -c 3000000 /dev/zero"})
    assert result.stdout == bytes(3_000_000)
    assert all(len(f.payload) <= 64 * 1024 for f in result.frames if f.kind is Kind.STDOUT)


def test_stdin_round_trip(agent: AgentHarness) -> None:
    data = os.urandom(700_000)
    result = agent.run({"argv": ["cat"]}, stdin=data)
    assert result.stdout == data


def test_without_stdin_reads_dev_null(agent: AgentHarness) -> None:
    assert agent.run({"argv": ["cat"]}).stdout == b""


def test_killed_by_signal(agent: AgentHarness) -> None:
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "exec", "argv": ["sleep", "30"]})
    assert agent.next_msg(stream)["op"] == "started"
    assert agent.request({"op": "signal", "target": stream, "signal": 15}) == {"op": "ok"}
    final = agent.collect(stream)[-1].msg()
    assert final == {"op": "exit", "code": None, "signal": 15, "timed_out": False}


def test_signal_reaches_the_whole_group(agent: AgentHarness) -> None:
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "exec", "shell": "sleep 30 & sleep 30; echo survived"})
    assert agent.next_msg(stream)["op"] == "started"
    agent.request({"op": "signal", "target": stream, "signal": 9})
    frames = agent.collect(stream)
    assert frames[-1].msg()["signal"] == 9
    assert b"survived" not in b"".join(f.payload for f in frames[:-1])


def test_signal_errors(agent: AgentHarness) -> None:
    reply = agent.request({"op": "signal", "target": 999, "signal": 9})
    assert reply["op"] == "error" and reply["kind"] == "not_found"
    reply = agent.request({"op": "signal", "target": 1, "signal": 0})
    assert reply["kind"] == "bad_request"


def test_timeout_kills_the_group(agent: AgentHarness) -> None:
    result = agent.run({"shell": "sleep 30 & sleep 30", "timeout": 0.3})
    assert result.final == {"op": "exit", "code": None, "signal": 9, "timed_out": True}


def test_leftover_background_process_does_not_block_exit(agent: AgentHarness) -> None:
    result = agent.run({"shell": "sleep 30 & echo $!"})
    assert result.final["code"] == 0
    os.kill(int(result.stdout), 9)  # it was left running, holding the output pipes


def test_env_is_clean_and_merged(agent: AgentHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONSECRET", "leak")
    monkeypatch.setenv("LD_PRELOAD", "leak.so")
    result = agent.run({"argv": ["env"], "env": {"FOO": "bar baz", "LANG": "C"}})
    env = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
    assert env["FOO"] == "bar baz" and env["LANG"] == "C"
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert "PYTHONSECRET" not in env and "LD_PRELOAD" not in env
    assert set(env) == {"PATH", "HOME", "USER", "LOGNAME", "LANG", "FOO"}


def test_cwd(agent: AgentHarness, tmp_path: Path) -> None:
    assert agent.run({"argv": ["pwd"], "cwd": str(tmp_path)}).stdout == f"{tmp_path}\n".encode()


def test_default_cwd_is_home(agent: AgentHarness) -> None:
    home = pwd.getpwuid(os.getuid()).pw_dir
    expected = home if os.path.isdir(home) else "/"
    assert agent.run({"argv": ["pwd"]}).stdout.decode().strip() == os.path.realpath(expected)


def test_not_found(agent: AgentHarness, tmp_path: Path) -> None:
    reply = agent.run({"argv": ["no-such-command-xyz"]}).final
    assert reply == {
        "op": "error",
        "kind": "not_found",
        "message": "command not found: no-such-command-xyz",
    }
    reply = agent.run({"argv": ["/no/such/path"]}).final
    assert reply["message"] == "command not found: /no/such/path"
    reply = agent.run({"argv": ["true"], "cwd": str(tmp_path / "absent")}).final
    assert (reply["kind"], reply["message"]) == (
        "not_found",
        f"no such directory: {tmp_path}/absent",
    )
    (tmp_path / "file").write_text("")
    reply = agent.run({"argv": ["true"], "cwd": str(tmp_path / "file")}).final
    assert reply["kind"] == "not_a_directory"


def test_not_executable(agent: AgentHarness, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    reply = agent.run({"argv": [str(script)]}).final
    assert reply["kind"] == "permission"
    script.chmod(0o755)
    assert agent.run({"argv": [str(script)]}).stdout == b"hi\n"


def test_unknown_user(agent: AgentHarness) -> None:
    reply = agent.run({"argv": ["true"], "user": "no-such-user-xyz"}).final
    assert (reply["kind"], reply["message"]) == ("not_found", "no such user: no-such-user-xyz")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_run_as_other_user(agent: AgentHarness) -> None:
    nobody = pwd.getpwnam("nobody")
    result = agent.run({"argv": ["sh", "-c", "id -u; id -g; echo $HOME $USER"], "user": "nobody"})
    lines = result.stdout.decode().split("\n")
    assert lines[:2] == [str(nobody.pw_uid), str(nobody.pw_gid)]
    assert lines[2] == f"{nobody.pw_dir} nobody"
    assert agent.run({"argv": ["id", "-u"], "user": 12345}).stdout == b"12345\n"


def test_ps(agent: AgentHarness) -> None:
    stream = agent.new_stream()
    agent.send_msg(stream, {"op": "exec", "argv": ["sh", "-c", "sleep 30", "x" * 1000]})
    pid = agent.next_msg(stream)["pid"]
    reply = agent.request({"op": "ps"})
    assert reply["op"] == "ps_result" and reply["more"] is False
    (process,) = reply["processes"]
    assert process["stream"] == stream and process["pid"] == pid and process["running"]
    assert process["argv"][:3] == ["sh", "-c", "sleep 30"] and len(process["argv"][3]) < 1000
    agent.request({"op": "signal", "target": stream, "signal": 9})
    agent.collect(stream)
    assert agent.request({"op": "ps"})["processes"] == []


def test_many_concurrent_execs(agent: AgentHarness) -> None:
    streams = [agent.new_stream() for _ in range(20)]
    for i, stream in enumerate(streams):
        agent.send_msg(stream, {"op": "exec", "shell": f"echo {i}"})
    for i, stream in enumerate(streams):
        frames = agent.collect(stream)
        out = b"".join(f.payload for f in frames if f.kind is Kind.STDOUT)
        assert out == f"{i}\n".encode()


def test_exec_spec_defaults(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text(f"me:x:{os.getuid()}:{os.getgid()}::{tmp_path}:/bin/sh\n")
    spec = exec_spec(
        {"op": "exec", "shell": "true", "user": "me"}, passwd=str(passwd), group="/nonexistent"
    )
    assert spec.argv == ("/bin/sh", "-c", "true")
    assert spec.cwd == str(tmp_path) and spec.env["HOME"] == str(tmp_path)
    assert spec.stdin is False and spec.timeout is None


def test_build_env() -> None:
    env = build_env(Account("u", 1, 1, "/home/u"), {"PATH": "/x"})
    assert env == {"PATH": "/x", "HOME": "/home/u", "USER": "u", "LOGNAME": "u", "LANG": "C.UTF-8"}
