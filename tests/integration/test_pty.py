"""Interactive terminals as a person uses them: `ember shell` / `ember exec -it` in a tmux
pane, keys typed with send-keys, the screen read with capture-pane; in process and through
the daemon. Plus the SDK's pty() and the daemon's WebSocket refusing bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import Sandbox
from ember.daemon import control
from ember.errors import BadRequestError
from ember.paths import Paths

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def daemon_url(ember_paths: Paths, debian_template: object) -> Iterator[str]:
    control.start(ember_paths)
    yield f"unix://{ember_paths.daemon_socket}"
    control.stop(ember_paths)


@pytest.fixture(scope="module")
def box(daemon_url: str) -> Iterator[Sandbox]:
    sb = Sandbox.create("debian-python", timeout=1800, url=daemon_url)
    yield sb
    sb.kill()


class Tmux:
    """One tmux server of our own (its own socket), one session."""

    def __init__(self, tmp: Path) -> None:
        self.sock = str(tmp / f"tmux-{uuid.uuid4().hex[:8]}")

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.sock, *args], check=True, text=True,
                              capture_output=True, timeout=30).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "T")

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never showed; the screen:\n{self.screen()}")

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", "T", *keys)

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True,
                       timeout=30)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("via", ["in-process", "daemon"])
def test_a_shell_as_a_person_types_it(via: str, box: Sandbox, daemon_url: str,
                                      tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EMBER_URL"}
    if via == "daemon":
        env["EMBER_URL"] = daemon_url
        argv = f"{sys.executable} -m ember.cli exec -it {box.id} -- bash"
    else:  # in process: the daemon holds the sandbox, so a fresh one of our own
        env["EMBER_URL"] = ""
    exit_file = tmp_path / "exit"
    tmux = Tmux(tmp_path)
    own: Sandbox | None = None
    try:
        if via == "in-process":
            own = Sandbox.create("debian-python", timeout=600, paths=Paths.from_env())
            own.close()
            argv = f"{sys.executable} -m ember.cli shell {own.id}"
        script = f"cd {REPO} && {argv}; echo EXITED=$? > {exit_file}; sleep 600"
        tmux("-f", "/dev/null", "new-session", "-d", "-s", "T", "-x", "120", "-y", "40",
             "-e", f"EMBER_URL={env['EMBER_URL']}", script)
        tmux.wait_for(":~#")
        tmux.keys("echo $((6*7)); stty size", "Enter")
        screen = tmux.wait_for("\n42\n")
        assert "42\n40 120\n" in tmux.wait_for("40 120"), screen
        tmux("resize-window", "-t", "T", "-x", "100", "-y", "30")
        tmux.keys("stty size; sleep 100", "Enter")
        tmux.wait_for("30 100")
        tmux.keys("C-c")  # reaches sleep in the guest, not this ember process
        tmux.wait_for("^C")
        tmux.keys("echo after-$((1+1))", "Enter")
        tmux.wait_for("after-2")
        tmux.keys("exit 5", "Enter")
        deadline = time.monotonic() + 60
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert exit_file.read_text().strip() == "EXITED=5"
    finally:
        tmux.kill()
        if own is not None:
            Sandbox.connect(own.id, paths=Paths.from_env()).kill()


def test_pty_from_the_sdk(box: Sandbox) -> None:
    term = box.pty(["sh", "-c", "stty size; read x; echo got:$x; exit 3"], rows=10, cols=50)
    seen = b""
    out = term.output()
    while b"10 50" not in seen:
        seen += next(out)
    term.write("hi\r")
    for chunk in out:
        seen += chunk
    assert b"got:hi" in seen
    assert term.wait() == 3
    with pytest.raises(BadRequestError):
        box.pty(rows=0, cols=80)


def test_the_websocket_refuses_bad_input(box: Sandbox, ember_paths: Paths) -> None:
    import asyncio

    from websockets.asyncio.client import unix_connect

    async def first_answer(first: str) -> dict[str, object]:
        async with unix_connect(str(ember_paths.daemon_socket),
                                f"ws://emberd/v1/sandboxes/{box.id}/pty") as ws:
            await ws.send(first)
            return dict(json.loads(await ws.recv()))

    for bad in ("not json", '{"rows": 0}', '{"cmd": "sh", "bogus": 1}', '{"cols": 5000}'):
        answer = asyncio.run(first_answer(bad))
        assert answer["event"] == "error" and answer["code"] == "bad_request", answer

    async def unknown() -> dict[str, object]:
        async with unix_connect(str(ember_paths.daemon_socket),
                                "ws://emberd/v1/sandboxes/sb-0000dead/pty") as ws:
            # the daemon answers (and closes) before any request: sending one would race
            # its close
            return dict(json.loads(await ws.recv()))

    assert asyncio.run(unknown())["code"] == "sandbox_not_found"
