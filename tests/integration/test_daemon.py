"""The daemon, as its clients see it: a real emberd process on the test home's socket,
real sandboxes, the SDK over HTTP (``url=``) and raw HTTP for what the SDK never sends."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember import Sandbox
from ember.daemon import control
from ember.daemon.server import socket_path
from ember.errors import (
    BadRequestError,
    CommandNotFoundError,
    CommandTimeoutError,
    EmberError,
    GuestPathNotFoundError,
    SandboxNotFoundError,
)
from ember.paths import Paths

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def daemon(ember_paths: Paths, debian_template: object) -> Iterator[str]:
    """A running daemon of the test home; its unix:// URL."""
    st = control.start(ember_paths)
    assert st.running and st.pid
    yield f"unix://{socket_path(ember_paths)}"
    control.stop(ember_paths)


@pytest.fixture(scope="module")
def sb(daemon: str) -> Iterator[Sandbox]:
    box = Sandbox.create("debian-python", timeout=1800, url=daemon)
    yield box
    box.kill()


def http(ember_paths: Paths) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path(ember_paths))),
                        base_url="http://emberd", timeout=60)


def daemon_pid(ember_paths: Paths) -> int:
    pid = control.status(ember_paths).pid
    assert pid is not None
    return pid


def test_exec_streams_output_as_it_is_produced(sb: Sandbox) -> None:
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()
    r = sb.exec("echo first; sleep 2; echo second; echo oops >&2; exit 3",
                on_stdout=lambda s: seen.append((time.monotonic() - t0, s)))
    assert (r.exit_code, r.stdout, r.stderr) == (3, "first\nsecond\n", "oops\n")
    assert seen[0][1] == "first\n"
    assert seen[0][0] < seen[-1][0] - 1.0, f"output was not streamed: {seen}"


def test_errors_are_the_same_types_as_in_process(sb: Sandbox, daemon: str) -> None:
    with pytest.raises(CommandNotFoundError):
        sb.exec(["/no/such/program"])
    with pytest.raises(GuestPathNotFoundError):
        sb.files.read("/no/such/file")
    with pytest.raises(BadRequestError):
        sb.files.read("relative/path")
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect("sb-0000dead", url=daemon)
    with pytest.raises(CommandTimeoutError) as info:
        sb.exec("echo partial; sleep 30", timeout=1)
    assert info.value.result.stdout == "partial\n"  # type: ignore[attr-defined]


def test_files_stream_in_bounded_daemon_memory(sb: Sandbox, ember_paths: Paths,
                                               tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    pid = daemon_pid(ember_paths)

    def hwm() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    before = hwm()
    assert sb.files.upload(src, "/tmp/big.bin") == 96 << 20
    back = tmp_path / "back.bin"
    assert sb.files.download("/tmp/big.bin", back) == 96 << 20
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    grown = hwm() - before
    assert grown < 48 << 20, f"the daemon's peak memory grew {grown >> 20} MiB for 96 MiB"
    sb.files.mkdir("/tmp/d/e")
    sb.files.rename("/tmp/big.bin", "/tmp/d/e/big.bin")
    assert [e.name for e in sb.files.list("/tmp/d/e")] == ["big.bin"]
    assert sb.files.stat("/tmp/d/e/big.bin").size == 96 << 20
    sb.files.remove("/tmp/d", recursive=True)
    assert not sb.files.exists("/tmp/d")


def test_background_process_stdin_and_signals(sb: Sandbox) -> None:
    p = sb.spawn(["cat"], stdin=True)
    p.write_stdin("line one\n")
    p.write_stdin(b"x" * 300_000)
    p.close_stdin()
    r = p.wait()
    assert r.exit_code == 0 and len(r.stdout_bytes) == 9 + 300_000
    sleeper = sb.spawn("sleep 300")
    assert any(i.pid == sleeper.pid and i.running for i in sb.processes())
    sleeper.signal(signal.SIGTERM)
    assert sleeper.wait().exit_code == 128 + signal.SIGTERM


def test_many_clients_at_once_on_one_sandbox(sb: Sandbox, daemon: str) -> None:
    errors: list[BaseException] = []
    outputs: list[str] = []

    def client(n: int) -> None:
        try:
            other = Sandbox.connect(sb.id, url=daemon)
            try:
                for i in range(5):
                    outputs.append(other.exec(f"echo {n}-{i}").stdout.strip())
            finally:
                other.close()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(outputs) == sorted(f"{n}-{i}" for n in range(6) for i in range(5))


def test_a_client_that_disconnects_mid_exec_ends_its_command(sb: Sandbox,
                                                             ember_paths: Paths) -> None:
    with http(ember_paths) as c, c.stream(
            "POST", f"/v1/sandboxes/{sb.id}/exec",
            json={"cmd": "echo $$ > /tmp/victim.pid; echo go; sleep 300"}) as r:
        for line in r.iter_lines():
            if json.loads(line)["event"] == "stdout":
                break
    pid = sb.files.read_text("/tmp/victim.pid").strip()
    for _ in range(100):
        if sb.exec(f"kill -0 {pid}").exit_code != 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the command outlived its client's disconnect")


def test_raw_bad_input_and_slow_clients(ember_paths: Paths, sb: Sandbox) -> None:
    with http(ember_paths) as c:
        r = c.post(f"/v1/sandboxes/{sb.id}/exec", content=b"{oops",
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
        r = c.get("/v1/health", headers={"x-huge": "h" * 100_000})
        assert r.status_code in (400, 431)
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(str(socket_path(ember_paths)))
    try:
        slow.sendall(b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Le")
        with http(ember_paths) as c:  # a client sending a byte at a time blocks nobody
            for _ in range(3):
                assert c.get("/v1/health").status_code == 200
                slow.sendall(b"n")
    finally:
        slow.close()


def test_two_clients_destroying_one_sandbox(daemon: str, ember_paths: Paths) -> None:
    box = Sandbox.create("debian-python", timeout=600, url=daemon)
    outcomes: list[str] = []

    def destroy() -> None:
        try:
            with http(ember_paths) as c:
                outcomes.append(str(c.delete(f"/v1/sandboxes/{box.id}").status_code))
        except BaseException as err:  # pragma: no cover - reported below
            outcomes.append(repr(err))

    threads = [threading.Thread(target=destroy) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(outcomes) in (["204", "404"], ["204", "204"]), outcomes
    assert box.id not in [i.id for i in Sandbox.list(url=daemon)]
    box.kill()  # already gone: not an error


def test_daemon_killed_mid_exec_then_restarted_reattaches(daemon: str, ember_paths: Paths,
                                                          sb: Sandbox) -> None:
    failure: list[BaseException] = []

    def long_exec() -> None:
        try:
            sb.exec("sleep 60", timeout=120)
        except BaseException as err:
            failure.append(err)

    t = threading.Thread(target=long_exec)
    t.start()
    time.sleep(1.0)
    os.kill(daemon_pid(ember_paths), signal.SIGKILL)
    t.join(30)
    assert not t.is_alive(), "a client hung after its daemon died"
    assert failure and isinstance(failure[0], EmberError), failure
    st = control.start(ember_paths)
    assert st.running
    again = Sandbox.connect(sb.id, url=daemon)
    try:
        assert again.exec("echo still here").stdout == "still here\n"
        assert sb.exec("echo old handle works").stdout == "old handle works\n"
    finally:
        again.close()


def test_snapshot_restore_and_fork_through_the_daemon(sb: Sandbox, daemon: str) -> None:
    sb.files.write("/root/marker", "from the origin")
    snap = sb.snapshot("through-the-daemon")
    assert snap.id in [s.id for s in Sandbox.list_snapshots(url=daemon)]
    restored = Sandbox.restore(snap, timeout=600, url=daemon)
    try:
        assert restored.files.read_text("/root/marker") == "from the origin"
        assert restored.info().snapshot == snap.id
    finally:
        restored.kill()
    clones = sb.fork(2)
    try:
        assert len({c.id for c in clones}) == 2
        for c in clones:
            assert c.files.read_text("/root/marker") == "from the origin"
    finally:
        for c in clones:
            c.kill()
    Sandbox.delete_snapshot(snap, url=daemon)


def test_lifecycle_and_metrics(sb: Sandbox, ember_paths: Paths) -> None:
    sb.set_timeout(1200)
    exp = sb.info().expires_at
    assert exp is not None and exp > time.time() + 1100
    sb.pause()
    assert sb.info().state == "paused"
    sb.resume()
    assert sb.exec("echo resumed").stdout == "resumed\n"
    assert sb.ping() > 0
    assert "ember-agent" in sb.logs()  # the console of this guest (restored: from then on)
    with http(ember_paths) as c:
        text = c.get("/metrics").text
    assert 'ember_operation_seconds_count{op="exec"}' in text
    assert 'ember_sandboxes{isolation="microvm",state="running",tenant="admin"}' in text


def test_the_daemon_enforces_lifetimes_itself(daemon: str, ember_paths: Paths) -> None:
    box = Sandbox.create("debian-python", timeout=2, url=daemon)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if box.id not in [i.id for i in Sandbox.list(url=daemon)]:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("a sandbox outlived its lifetime under the daemon")
    with pytest.raises(EmberError):
        box.exec("true")
    box.close()


def test_an_upload_cut_off_midway_leaves_the_old_file(ember_paths: Paths, sb: Sandbox) -> None:
    """The client disconnects after part of the body: the guest file is as it was, with no
    partial or staged copy, and the sandbox goes on serving."""
    sb.files.write("/root/cut.txt", "the old content")
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(socket_path(ember_paths)))
    raw.sendall(f"PUT /v1/sandboxes/{sb.id}/files/content?path=/root/cut.txt HTTP/1.1\r\n"
                f"Host: x\r\nContent-Length: {10 << 20}\r\n\r\n".encode())
    raw.sendall(b"x" * (1 << 20))
    time.sleep(0.5)
    raw.close()
    deadline = time.monotonic() + 30
    while True:
        names = sb.exec("ls -A /root").stdout.split()
        if not [n for n in names if n.endswith(".part")]:
            break
        assert time.monotonic() < deadline, f"a staged copy stayed: {names}"
        time.sleep(0.2)
    assert sb.files.read_text("/root/cut.txt") == "the old content"
    sb.files.remove("/root/cut.txt")
