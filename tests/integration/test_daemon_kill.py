"""The daemon killed with SIGKILL in the middle of create, upload, snapshot and destroy:
the client gets a typed error at once (never a hang), a new daemon finds everything again,
and nothing leaks (every QEMU process of the home belongs to a live registry row)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember import Sandbox
from ember.daemon import control
from ember.errors import EmberError
from ember.paths import Paths
from ember.runtime.states import LIVE_STATES
from tests.conftest import qemu_pids_under

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def url(ember_paths: Paths, debian_template: object) -> Iterator[str]:
    control.start(ember_paths)
    yield f"unix://{ember_paths.daemon_socket}"
    control.stop(ember_paths)


def _kill_daemon_during(ember_paths: Paths, op: Callable[[], object],
                        after: float) -> BaseException | None:
    """Run ``op`` in a thread, SIGKILL the daemon ``after`` seconds in; return what ``op``
    raised (None if it finished first). The client must not hang."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            op()
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(after)
    pid = control.status(ember_paths).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "a client hung after its daemon was killed"
    control.start(ember_paths)
    err = outcome[0]
    assert err is None or isinstance(err, EmberError), repr(err)
    return err


def _no_leaks(ember_paths: Paths, url: str) -> None:
    listed = Sandbox.list(url=url)  # reconciles: dead creators' sandboxes are released
    live_pids = set()
    for info in listed:
        assert info.state in (*LIVE_STATES, "failed"), info
    from ember.runtime.manager import SandboxManager

    mgr = SandboxManager(ember_paths)
    try:
        for rec in mgr.list():
            if rec.state in LIVE_STATES and rec.pid:
                live_pids.add(rec.pid)
    finally:
        mgr.close()
    stray = set(qemu_pids_under(ember_paths.home)) - live_pids
    assert not stray, f"QEMU processes without a live sandbox: {stray}"


def test_killed_during_create(ember_paths: Paths, url: str) -> None:
    before = {i.id for i in Sandbox.list(url=url)}
    made: list[Sandbox] = []
    err = _kill_daemon_during(
        ember_paths, lambda: made.append(Sandbox.create("debian-python", timeout=600,
                                                        url=url)), 0.4)
    _no_leaks(ember_paths, url)
    for sb in made:
        sb.close()
    for info in Sandbox.list(url=url):  # a half-made sandbox: gone, failed or usable
        if info.id not in before:
            assert err is not None or made, info
            _destroy(ember_paths, info.id)  # in any state (failed rows too)
    _no_leaks(ember_paths, url)
    assert {i.id for i in Sandbox.list(url=url)} == before


def _destroy(ember_paths: Paths, sandbox_id: str) -> None:
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(ember_paths.daemon_socket)),
                      base_url="http://emberd", timeout=60) as c:
        assert c.delete(f"/v1/sandboxes/{sandbox_id}").status_code in (204, 404)


def test_killed_during_upload_snapshot_and_destroy(ember_paths: Paths, url: str,
                                                   tmp_path: Path) -> None:
    sb = Sandbox.create("debian-python", timeout=900, url=url)
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))

    _kill_daemon_during(ember_paths, lambda: sb.files.upload(big, "/tmp/big.bin"), 1.0)
    assert sb.exec("echo alive after an upload died").stdout == "alive after an upload died\n"
    _no_leaks(ember_paths, url)

    _kill_daemon_during(ember_paths, lambda: sb.snapshot(), 0.3)
    assert sb.exec("echo alive after a snapshot died").exit_code == 0  # resumed, usable
    assert Sandbox.connect(sb.id, url=url).info().state == "running"
    _no_leaks(ember_paths, url)

    _kill_daemon_during(ember_paths, sb.kill, 0.05)
    # Finished or not, destroying again ends it; the registry and the host agree after.
    with contextlib.suppress(EmberError):
        Sandbox.connect(sb.id, url=url).kill()
    _destroy(ember_paths, sb.id)  # a row the interrupted destroy left (failed) goes too
    assert sb.id not in [i.id for i in Sandbox.list(url=url)]
    _no_leaks(ember_paths, url)
