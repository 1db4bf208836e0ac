"""E2B's official ``e2b`` SDK against a real daemon (TCP listener, API keys) and real
guests: lifecycle, commands, files, bad input."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ember.daemon import control
from ember.daemon.auth import new_key
from ember.paths import Paths
from ember.store import Store
from tests.oci_fixtures import free_port

e2b = pytest.importorskip("e2b")
from e2b import (  # noqa: E402
    AuthenticationException,
    CommandExitException,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    TimeoutException,
)

pytestmark = pytest.mark.integration
#: Another interpreter with an older ``e2b`` release (>= 2.7.0), for the drive below.
#: scripts/install.sh makes one in ember's cache; EMBER_E2B_OLD_PYTHON names another.
OLD_SDK_PYTHON = os.environ.get("EMBER_E2B_OLD_PYTHON") or next(
    (p for p in [os.path.join(os.environ.get("EMBER_CACHE") or "/var/lib/ember/cache",
                              "e2b-sdk-2.7.0", "bin", "python")] if os.path.exists(p)), None)
DRIVE = os.path.join(os.path.dirname(__file__), "e2b_drive.py")


@pytest.fixture(scope="module")
def api(ember_paths: Paths, debian_template: object) -> Iterator[dict[str, Any]]:
    """The daemon on TCP; the SDK's options for tenant alice, and bob's key."""
    url = f"http://127.0.0.1:{free_port()}"
    control.stop(ember_paths)
    control.start(ember_paths, listen=url.removeprefix("http://"))
    store = Store(ember_paths.db)
    _, alice = new_key(store, "alice")
    _, bob = new_key(store, "bob")
    try:
        yield {"opts": {"api_key": alice, "api_url": url, "sandbox_url": url},
               "bob": bob, "url": url}
    finally:
        control.stop(ember_paths)


@pytest.fixture(scope="module")
def sbx(api: dict[str, Any]) -> Iterator[Sandbox]:
    box = Sandbox.create("base", timeout=900, metadata={"suite": "e2b"}, **api["opts"])
    yield box
    box.kill()


def test_create_info_list_and_timeout(sbx: Sandbox, api: dict[str, Any]) -> None:
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id and info.metadata == {"suite": "e2b"}
    assert info.state.value == "running"
    mine = Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b"}), **api["opts"])
    assert [s.sandbox_id for s in mine.next_items()] == [sbx.sandbox_id]
    none = Sandbox.list(query=SandboxQuery(metadata={"suite": "other"}), **api["opts"])
    assert none.next_items() == [] and not none.has_next
    m = sbx.get_metrics()[-1]
    assert m.cpu_count == info.cpu_count and m.mem_total == info.memory_mb << 20
    assert m.mem_used > 0 and 0 <= m.cpu_used_pct <= 100
    sbx.set_timeout(1200)
    assert sbx.get_info().end_at > info.end_at
    assert sbx.is_running()
    # the many-sandbox form: the caller's own ids only, others left out
    many = httpx.get(api["url"] + "/sandboxes/metrics", timeout=30,
                     params={"sandbox_ids": f"{sbx.sandbox_id},sb-nope"},
                     headers={"X-API-KEY": api["opts"]["api_key"]})
    assert many.status_code == 200 and list(many.json()["sandboxes"]) == [sbx.sandbox_id]
    assert many.json()["sandboxes"][sbx.sandbox_id]["memTotal"] == m.mem_total
    theirs = httpx.get(api["url"] + "/sandboxes/metrics", timeout=30,
                       params={"sandbox_ids": sbx.sandbox_id}, headers={"X-API-KEY": api["bob"]})
    assert theirs.json() == {"sandboxes": {}}


def test_commands_stream_and_background_stdin_and_kill(sbx: Sandbox) -> None:
    seen: list[str] = []
    r = sbx.commands.run("echo one; echo two >&2; echo three", on_stdout=seen.append)
    assert r.exit_code == 0 and r.stdout == "one\nthree\n" and r.stderr == "two\n"
    assert "".join(seen) == "one\nthree\n"
    with pytest.raises(CommandExitException) as exc:
        sbx.commands.run("exit 3")
    assert exc.value.exit_code == 3
    h = sbx.commands.run("cat", background=True, stdin=True)
    assert h.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.send_stdin(h.pid, "hello\n")
    sbx.commands.stream_input(h.pid, ["str", b"eamed", "\n" * 3])
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "hello\nstreamed\n\n\n"
    sleeper = sbx.commands.run("sleep 600", background=True)
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        sleeper.wait()
    assert sbx.commands.kill(sleeper.pid) is False
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=2)


def test_terminal_and_reconnect(sbx: Sandbox) -> None:
    shown: list[bytes] = []
    term = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(term.pid, b"echo pty-$((6*7))\n")
    sbx.pty.resize(term.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(term.pid, b"stty size; exit 0\n")
    assert term.wait(on_pty=shown.append).exit_code == 0
    out = b"".join(shown)
    assert b"pty-42" in out and b"30 100" in out, out[-500:]
    h = sbx.commands.run("read x; echo got $x", background=True, stdin=True)
    h.disconnect()  # the command keeps running; another stream takes it up
    again = sbx.commands.connect(h.pid)
    sbx.commands.send_stdin(h.pid, "it\n")
    assert again.wait().stdout == "got it\n"


def test_files(sbx: Sandbox) -> None:
    fs = sbx.files
    fs.write("/tmp/e2b/a.txt", "hello")  # parent directories made, as envd does
    assert fs.read("/tmp/e2b/a.txt") == "hello"
    fs.write("/tmp/e2b/b.bin", b"\x00\x01" * 100_000, use_octet_stream=True)
    assert fs.read("/tmp/e2b/b.bin", format="bytes") == b"\x00\x01" * 100_000
    big = os.urandom(24 << 20)
    fs.write("/tmp/e2b/big.bin", io.BytesIO(big))  # a file object: streamed
    assert hashlib.sha256(fs.read("/tmp/e2b/big.bin", format="bytes")).digest() == \
        hashlib.sha256(big).digest()
    fs.remove("/tmp/e2b/big.bin")
    assert fs.exists("/tmp/e2b/a.txt") and not fs.exists("/tmp/e2b/nope")
    fs.write("/tmp/e2b/z/g.txt", "zipped " * 1000, gzip=True)
    assert fs.read("/tmp/e2b/z/g.txt") == "zipped " * 1000
    fs.write_files([{"path": "/tmp/e2b/z/m1", "data": "one"},
                    {"path": "/tmp/e2b/z/m2", "data": b"two"}])
    assert (fs.read("/tmp/e2b/z/m1"), fs.read("/tmp/e2b/z/m2")) == ("one", "two")
    assert fs.make_dir("/tmp/e2b/d") is True and fs.make_dir("/tmp/e2b/d") is False
    fs.rename("/tmp/e2b/a.txt", "/tmp/e2b/d/c.txt")
    names = sorted(e.name for e in fs.list("/tmp/e2b"))
    assert names == ["b.bin", "d", "z"]
    deep = sorted(e.path for e in fs.list("/tmp/e2b", depth=2))
    assert "/tmp/e2b/d/c.txt" in deep
    assert fs.get_info("/tmp/e2b/d/c.txt").size == 5
    fs.remove("/tmp/e2b/d")
    assert not fs.exists("/tmp/e2b/d/c.txt")
    with pytest.raises(NotFoundException):
        fs.read("/tmp/e2b/nope")


WATCH_SCRIPT = ("cd /tmp/e2b-watch && echo hi > a.txt && chmod 600 a.txt && mv a.txt b.txt "
                "&& rm b.txt && mkdir -p new/deep && echo x > new/deep/f")
WATCH_WANT = {("a.txt", "create"), ("a.txt", "write"), ("a.txt", "chmod"),
              ("a.txt", "rename"), ("b.txt", "create"), ("b.txt", "remove"),
              ("new", "create"), ("new/deep/f", "create")}


def test_watch_dir_polling_and_streamed(sbx: Sandbox, api: dict[str, Any]) -> None:
    """The blocking SDK polls (CreateWatcher, GetWatcherEvents, RemoveWatcher); the async
    one reads WatchDir's stream."""
    import asyncio
    import time

    from e2b import AsyncSandbox, FileNotFoundException, FilesystemEvent

    sbx.files.make_dir("/tmp/e2b-watch")
    handle = sbx.files.watch_dir("/tmp/e2b-watch", recursive=True)
    sbx.commands.run(WATCH_SCRIPT)
    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 60
    while not seen >= WATCH_WANT and time.monotonic() < deadline:
        seen |= {(e.name, e.type.value) for e in handle.get_new_events()}
        time.sleep(0.2)
    assert seen >= WATCH_WANT, WATCH_WANT - seen
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()
    with pytest.raises(FileNotFoundException):
        sbx.files.watch_dir("/tmp/e2b-watch/no/such/dir")

    async def streamed() -> set[tuple[str, str]]:
        asbx = await AsyncSandbox.connect(sbx.sandbox_id, **api["opts"])
        got: list[FilesystemEvent] = []
        with pytest.raises(FileNotFoundException):
            await asbx.files.watch_dir("/tmp/e2b-watch/nope", on_event=got.append)
        h = await asbx.files.watch_dir("/tmp/e2b-watch", on_event=got.append, recursive=True)
        await asbx.commands.run("cd /tmp/e2b-watch && touch s1 && rm s1 && touch new/s2")
        want = {("s1", "create"), ("s1", "remove"), ("new/s2", "create")}
        for _ in range(300):
            if want <= {(e.name, e.type.value) for e in got}:
                break
            await asyncio.sleep(0.2)
        await h.stop()
        return {(e.name, e.type.value) for e in got}

    got = asyncio.run(streamed())
    assert {("s1", "create"), ("s1", "remove"), ("new/s2", "create")} <= got, got
    sbx.files.remove("/tmp/e2b-watch")


def test_watch_dir_over_a_huge_tree_says_events_were_lost(sbx: Sandbox) -> None:
    import time

    sbx.commands.run("mkdir -p /tmp/e2b-huge && cd /tmp/e2b-huge && seq 4200 | xargs mkdir")
    handle = sbx.files.watch_dir("/tmp/e2b-huge", recursive=True)
    with pytest.raises(SandboxException, match="events were lost"):  # at the poll after
        for _ in range(100):                                         # the loss is known
            assert handle.get_new_events() == []
            time.sleep(0.2)
    sbx.files.write("/tmp/e2b-huge/top.txt", "x")
    seen: list[tuple[str, str]] = []
    for _ in range(100):
        seen += [(e.name, e.type.value) for e in handle.get_new_events()]
        if ("top.txt", "create") in seen:
            break
        time.sleep(0.2)
    assert ("top.txt", "create") in seen  # the watcher goes on
    handle.stop()
    sbx.files.remove("/tmp/e2b-huge")


def test_bad_input(sbx: Sandbox, api: dict[str, Any]) -> None:
    opts = api["opts"]
    with pytest.raises(SandboxException) as exc:
        Sandbox.create("no-such-template", **opts)
    assert exc.value.status_code == 404 and "no-such-template" in str(exc.value)
    with pytest.raises(AuthenticationException):
        Sandbox.list(**{**opts, "api_key": "ek_nope_nope"}).next_items()
    bob = {**opts, "api_key": api["bob"]}
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id, **bob)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **bob)
    assert Sandbox.kill(sbx.sandbox_id, **bob) is False
    envd = {"e2b-sandbox-id": sbx.sandbox_id, "e2b-sandbox-port": "49983"}
    with httpx.Client(base_url=api["url"], timeout=30) as c:
        r = c.get("/health", headers={**envd, "x-access-token": "wrong"})
        assert r.status_code == 401
        by_host = {"host": f"49983-{sbx.sandbox_id}.localhost:443",  # E2B_DOMAIN's form
                   "x-access-token": sbx._envd_access_token}
        r = c.post("/filesystem.Filesystem/Stat", json={"path": "/etc"}, headers=by_host)
        assert r.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY", r.text
        r = c.get("/health", headers={"host": by_host["host"]})  # envd's, by the host alone
        assert r.status_code == 401 and "X-Access-Token" in r.json()["message"]
        stream = {**envd, "x-access-token": sbx._envd_access_token,
                  "content-type": "application/connect+json"}
        for body in (b"\x00\x00\x00\x00\x09{}", b"\x01\x00\x00\x00\x02{}",
                     struct.pack(">BI", 0, 1 << 30) + b"{}", b"junk"):
            r = c.post("/process.Process/Start", content=body, headers=stream)
            assert r.status_code == 200 and r.content[0] == 2, r.content
            assert b'"error"' in r.content
        r = c.post("/process.Process/StreamInput", headers=stream,
                   content=b"\x00\x00\x00\x00\x0b{\"data\":{}}")
        assert r.status_code == 200 and b"first event must be start" in r.content
        r = c.post("/filesystem.Filesystem/Stat", content=b"[1]",
                   headers={**stream, "content-type": "application/json"})
        assert r.status_code == 400 and r.json()["code"] == "invalid_argument"


def test_concurrent_commands_paging_pause_and_kill(api: dict[str, Any], sbx: Sandbox) -> None:
    box = Sandbox.create(timeout=300, **api["opts"])
    outs: list[str] = []

    def run(n: int) -> None:
        outs.append(box.commands.run(f"echo {n}").stdout.strip())

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outs) == ["0", "1", "2", "3"]
    pages = Sandbox.list(limit=1, **api["opts"])
    ids = pages.next_items()
    assert pages.has_next and len(ids) == 1
    ids += pages.next_items()
    assert not pages.has_next and {i.sandbox_id for i in ids} == {box.sandbox_id, sbx.sandbox_id}
    box.files.write("/root/kept.txt", "kept")
    sleeper = box.commands.run("sleep 300", background=True)
    box.pause()
    assert box.get_info().state.value == "paused"
    again = Sandbox.connect(box.sandbox_id, **api["opts"])
    assert again.get_info().state.value == "running"
    assert again.commands.run("echo back").stdout == "back\n"
    assert again.files.read("kept.txt") == "kept"  # relative: in the user's home
    assert sleeper.pid in [p.pid for p in again.commands.list()]
    assert box.kill() is True
    with pytest.raises(SandboxNotFoundException):
        box.get_info()
    assert box.kill() is False


@pytest.mark.parametrize("python", [
    sys.executable,
    pytest.param(OLD_SDK_PYTHON, marks=pytest.mark.skipif(
        not OLD_SDK_PYTHON, reason="EMBER_E2B_OLD_PYTHON names no interpreter with an "
        "older e2b release"))])
def test_the_same_calls_with_this_and_an_older_sdk_release(api: dict[str, Any],
                                                           python: str | None) -> None:
    assert python is not None
    opts = api["opts"]
    env = {**os.environ, "E2B_API_KEY": opts["api_key"], "E2B_API_URL": opts["api_url"],
           "E2B_SANDBOX_URL": opts["sandbox_url"]}
    done = subprocess.run([python, DRIVE], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        done.stdout[-2000:] + done.stderr[-4000:])
