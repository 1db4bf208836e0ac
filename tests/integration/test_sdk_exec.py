"""Commands in a real microVM through the SDK (one shared sandbox; fresh ones where needed)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import pytest

from ember import (
    AsyncSandbox,
    CommandNotFoundError,
    CommandTimeoutError,
    ExecResult,
    Sandbox,
)

pytestmark = pytest.mark.integration


def test_exec_python_and_exit_codes(shared_sandbox: Sandbox) -> None:
    r = shared_sandbox.exec(["python3", "-c", "import sys; print(6*7); sys.exit(3)"])
    assert isinstance(r, ExecResult)
    assert (r.exit_code, r.stdout, r.stderr) == (3, "42\n", "")
    assert r.duration > 0
    assert shared_sandbox.exec("echo out; echo err >&2; exit 0").stderr == "err\n"


def test_exec_env_cwd_user_stdin(shared_sandbox: Sandbox) -> None:
    r = shared_sandbox.exec("echo $FOO; pwd; id -u", env={"FOO": "bar"}, cwd="/tmp",
                            user="nobody")
    assert r.stdout.split() == ["bar", "/tmp", "65534"]
    r = shared_sandbox.exec(["wc", "-c"], stdin=b"x" * 100_000)
    assert r.stdout.strip() == "100000"


def test_exec_does_not_leak_agent_environment(shared_sandbox: Sandbox) -> None:
    env = dict(line.split("=", 1) for line in shared_sandbox.exec(["env"]).stdout.splitlines())
    assert not [k for k in env if k.startswith(("PYTHON", "LD_"))]
    assert "/usr/bin" in env["PATH"]


def test_streaming_callbacks_and_iterator(shared_sandbox: Sandbox) -> None:
    seen: list[str] = []
    r = shared_sandbox.exec("for i in 1 2 3; do echo line$i; sleep 0.2; done",
                            on_stdout=seen.append)
    assert "".join(seen) == r.stdout == "line1\nline2\nline3\n"
    assert len(seen) >= 2  # delivered as produced, not in one piece at the end
    p = shared_sandbox.spawn("echo a; sleep 0.3; echo b >&2")
    chunks = [(c.stream, c.text) for c in p.output()]
    assert ("stdout", "a\n") in chunks and ("stderr", "b\n") in chunks
    assert p.wait().exit_code == 0


def test_background_process_stdin_signal_and_ps(shared_sandbox: Sandbox) -> None:
    p = shared_sandbox.spawn(["cat"], stdin=True, timeout=None)
    p.write_stdin("hello ")
    p.write_stdin(b"world")
    p.close_stdin()
    assert p.wait().stdout == "hello world"
    sleeper = shared_sandbox.spawn(["sleep", "600"], timeout=None)
    assert any(pi.pid == sleeper.pid and pi.running for pi in shared_sandbox.processes())
    sleeper.signal(signal.SIGTERM)
    r = sleeper.wait()
    assert (r.signal, r.exit_code) == (signal.SIGTERM, 128 + signal.SIGTERM)


def test_command_timeout_kills_the_command(shared_sandbox: Sandbox) -> None:
    with pytest.raises(CommandTimeoutError) as ei:
        shared_sandbox.exec("echo started; sleep 30", timeout=1.5)
    assert ei.value.result.stdout == "started\n"  # type: ignore[attr-defined]
    assert shared_sandbox.exec("pgrep -x sleep || true").stdout == ""


def test_missing_command_is_a_typed_error(shared_sandbox: Sandbox) -> None:
    with pytest.raises(CommandNotFoundError, match="no-such-program"):
        shared_sandbox.exec(["no-such-program", "x"])
    r = shared_sandbox.exec("no-such-program")  # through the shell: exit 127 like a terminal
    assert r.exit_code == 127
    assert shared_sandbox.ping() > 0  # the sandbox is still healthy


def test_large_output_is_streamed_completely(shared_sandbox: Sandbox) -> None:
    r = shared_sandbox.exec(["python3", "-c", "import sys; sys.stdout.write('y' * 5_000_000)"])
    assert len(r.stdout_bytes) == 5_000_000


def test_concurrent_commands_on_one_sandbox(ember_paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    async def main() -> list[str]:
        async with await AsyncSandbox.create("debian-python", paths=ember_paths) as sb:
            results = await asyncio.gather(
                *(sb.exec(f"sleep 0.5; echo {i}") for i in range(5)))
            return [r.stdout.strip() for r in results]

    assert asyncio.run(main()) == ["0", "1", "2", "3", "4"]


def test_unread_background_output_does_not_stall_the_sandbox(shared_sandbox: Sandbox) -> None:
    done = f"/tmp/noisy-{uuid.uuid4().hex}"
    noisy = shared_sandbox.spawn(f"head -c 30000000 /dev/zero; touch {done}", timeout=None)
    deadline = time.monotonic() + 120
    # other operations go on while nobody reads the noisy output, until all of it was
    # written (and what did not fit the host's bound dropped): the guest is never held up
    while shared_sandbox.exec(["test", "-e", done]).exit_code != 0:
        assert time.monotonic() < deadline, "the noisy command never finished"
    r = noisy.wait()
    assert r.exit_code == 0 and r.truncated and len(r.stdout_bytes) < 30_000_000
