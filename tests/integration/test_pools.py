"""Warm pools and pre-baked templates with real guests (issue 5)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from ember import NotFoundError, Sandbox
from ember.paths import Paths
from ember.runtime import pools
from ember.sdk.async_sandbox import manager
from ember.sdk.bake import bake_template_sync
from ember.sdk.results import CommandFailedError

pytestmark = pytest.mark.integration


def _wait_ready(paths: Paths, key: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [p for p in pools.status(manager(paths)) if p.pool.key == key]
        if got and got[0].ready >= n:
            return
        time.sleep(0.5)
    log = (paths.logs / "ember.log").read_text()[-3000:]
    states = [(r.id, r.state, r.pool, r.error) for r in manager(paths).store.list_sandboxes()]
    raise AssertionError(f"pool {key} did not fill to {n} within {timeout} s; {states}\n{log}")


def _wait_refused(sock: Path, timeout: float = 10.0) -> None:
    """Until the daemon's socket refuses connections: a killed daemon's other threads may
    still hold it open (and accept into its backlog) after its main thread is a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
            except (ConnectionRefusedError, FileNotFoundError):
                return
        time.sleep(0.01)
    raise AssertionError(f"{sock} still accepts connections {timeout:g} s after SIGKILL")


def _daemon_pid(paths: Paths) -> int | None:
    from ember.daemon.control import status

    return status(paths).pid


def test_pool_hands_out_ready_sandboxes_once_and_refills(ember_paths: Paths,
                                                         debian_template) -> None:  # type: ignore[no-untyped-def]
    mgr = manager(ember_paths)
    rec = Sandbox.set_pool("debian-python", 2, memory_mib=192, paths=ember_paths)  # daemon's
    assert (rec.template, rec.size, rec.memory_mib) == ("debian-python", 2, 192)
    try:
        _wait_ready(ember_paths, rec.key, 2)
        pooled = {r.id for r in pools.members(mgr, rec.key) if r.state == "pooled"}
        # the daemon that filled the pool dies; handing out starts one again, which refills
        pid = _daemon_pid(ember_paths)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # Dead, not dying: a connection a dying daemon's socket still accepted is lost
        # mid-request, which the SDK rightly does not send again (it may have been done).
        _wait_refused(ember_paths.daemon_socket)
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda _: Sandbox.create(memory_mib=192, paths=ember_paths,
                                                       metadata={"who": "test"}), range(2)))
        try:
            ids = [s.id for s in got]
            assert len(set(ids)) == 2 and set(ids) == pooled  # each handed out once
            for s in got:
                info = s.info()
                assert info.state == "running" and info.metadata == {"who": "test"}
                assert info.expires_at is not None
                assert s.exec("hostname").stdout.strip() == s.id
        finally:
            for s in got:
                s.kill()
        _wait_ready(ember_paths, rec.key, 2)
        assert _daemon_pid(ember_paths) not in (None, pid)
        status = next(p for p in Sandbox.list_pools(paths=ember_paths) if p.key == rec.key)
        assert status.idle_pss_bytes > 0 and status.ready == 2
    finally:
        Sandbox.remove_pool(rec.key, paths=ember_paths)
    assert not pools.members(mgr, rec.key)
    assert rec.key not in [p.key for p in Sandbox.list_pools(paths=ember_paths)]
    with pytest.raises(NotFoundError):
        Sandbox.remove_pool(rec.key, paths=ember_paths)


def test_baked_template_restores_with_setup_done(ember_paths: Paths,
                                                 debian_template) -> None:  # type: ignore[no-untyped-def]
    rec = bake_template_sync("baked-test", "debian-python",
                             "echo ready > /root/setup-done; mkdir -p /opt/warm", paths=ember_paths)
    snap_id = str(rec.config["snapshot"])
    with Sandbox.create("baked-test", paths=ember_paths) as sb:
        assert sb.info().snapshot == snap_id and sb.info().template == "baked-test"
        assert sb.files.read_text("/root/setup-done") == "ready\n"
        assert sb.exec("hostname").stdout.strip() == sb.id
    with pytest.raises(CommandFailedError):
        bake_template_sync("baked-bad", "debian-python", "exit 3", paths=ember_paths)
    mgr = manager(ember_paths)
    before = {s.id for s in mgr.store.list_snapshots()}  # other tests' snapshots may remain
    assert "baked-bad" not in [t.name for t in mgr.store.list_templates()]
    assert snap_id in before
    assert not [s for s in mgr.store.list_snapshots() if s.id != snap_id
                and s.created_at > rec.created_at]  # the failed bake kept no snapshot
    mgr.store.delete_template("baked-test")
    mgr.collect_snapshot(snap_id)
    assert {s.id for s in mgr.store.list_snapshots()} == before - {snap_id}
    assert not (ember_paths.snapshots / snap_id).exists()


def test_member_of_a_removed_pool_is_destroyed(ember_paths: Paths,
                                               debian_template) -> None:  # type: ignore[no-untyped-def]
    """A refill that finishes after `pool rm` deleted the pool leaves a pooled sandbox
    with no pool: reconciling destroys it instead of keeping it forever."""
    mgr = manager(ember_paths)
    rec = pools.set_pool(mgr, "debian-python", 1, memory_mib=160)
    try:
        _wait_ready(ember_paths, rec.key, 1)
        member = next(r for r in pools.members(mgr, rec.key) if r.state == "pooled")
        mgr.store.delete_pool(rec.key)  # what the race leaves: the pool gone, its member not
        assert member.id not in {r.id for r in mgr.list()}
        assert not Path(member.dir).exists()
    finally:
        pools.remove_pool(mgr, rec.key)
