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

    def lister() -> None:
        while not stop.is_set():
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
