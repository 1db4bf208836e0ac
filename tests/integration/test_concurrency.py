"""Sandboxes created in parallel while another thread keeps reconciling (`ember ls`, which
also sweeps leftovers): the sweep must never take a sandbox that is being created."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from ember import Sandbox
from ember.engine.container import tier_status
from ember.paths import Paths


@pytest.mark.parametrize("isolation", ["microvm", "container"])
def test_parallel_creates_survive_a_concurrent_sweep(ember_paths: Paths, debian_template,
                                                     isolation: str) -> None:  # type: ignore[no-untyped-def]
    if isolation != "microvm" and not tier_status(isolation).ok:
        pytest.skip(f"isolation={isolation} unavailable here")
    stop = threading.Event()

    # Lists as the creates run, paced. A tight loop once made a container's init, read while
    # it exec'd, look gone (an empty /proc cmdline): test_engine_handle.py covers that race.
    def lister() -> None:
        while not stop.wait(0.02):
            Sandbox.list(paths=ember_paths)

    t = threading.Thread(target=lister)
    t.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            futures = [ex.submit(Sandbox.create, "debian-python", isolation=isolation,
                                 timeout=300, paths=ember_paths) for _ in range(3)]
        made = [f.result() for f in futures if f.exception() is None]
        try:
            errors = [f.exception() for f in futures if f.exception() is not None]
            assert errors == []
            for sb in made:
                assert sb.exec("echo ok").stdout == "ok\n"
        finally:
            for sb in made:
                sb.kill()
    finally:
        stop.set()
        t.join()
    assert Sandbox.list(paths=ember_paths) == []


def test_sweep_takes_a_new_sandbox_directory_only_once_its_creator_is_dead(
        ember_paths: Paths) -> None:
    """A directory is briefly ``.new-<pid>-<id>`` before its creator locks it: a sweep in
    that instant must not lock it first and remove it (the race CI once hit)."""
    import subprocess

    from ember.runtime.leftovers import NEW_DIR_PREFIX

    dead = subprocess.Popen(["true"])
    dead.wait()
    ember_paths.sandboxes.mkdir(parents=True, exist_ok=True)
    alive = subprocess.Popen(["sleep", "60"])
    try:
        live_dir = ember_paths.sandboxes / f"{NEW_DIR_PREFIX}{alive.pid}-sb-000000000001"
        dead_dir = ember_paths.sandboxes / f"{NEW_DIR_PREFIX}{dead.pid}-sb-000000000002"
        for d in (live_dir, dead_dir):
            d.mkdir()
        Sandbox.list(paths=ember_paths)
        assert live_dir.is_dir() and not (live_dir / "client.lock").exists()
        assert not dead_dir.exists()
    finally:
        alive.kill()
        alive.wait()
    Sandbox.list(paths=ember_paths)
    assert not live_dir.exists()
