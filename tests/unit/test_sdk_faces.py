"""The blocking face has every public method of the async one, and no others."""

from __future__ import annotations

import pytest

from ember import (
    AsyncFiles,
    AsyncProcess,
    AsyncPty,
    AsyncSandbox,
    AsyncWatch,
    Files,
    Process,
    Pty,
    Sandbox,
    Watch,
)
from ember.sdk.network import AsyncNetwork
from ember.sdk.sandbox import Network


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


@pytest.mark.parametrize(("sync", "async_"), [
    (Sandbox, AsyncSandbox), (Process, AsyncProcess), (Files, AsyncFiles), (Pty, AsyncPty),
    (Network, AsyncNetwork), (Watch, AsyncWatch)])
def test_the_blocking_face_mirrors_the_async_one(sync: type, async_: type) -> None:
    # only the async side has: chunk streams, the factory, a terminal's resize (the
    # blocking face of a terminal is Pty, not Process), the result once known
    by_nature = {"read_chunks", "write_chunks", "result", "start", "resize"}
    missing = _public(async_) - _public(sync) - by_nature
    assert not missing, f"{sync.__name__} lacks {sorted(missing)}"


def test_verbs_work_on_the_class_and_on_an_instance() -> None:
    for verb in ("kill", "pause", "resume", "logs"):
        assert getattr(Sandbox, verb).__name__ == f"_{verb}_id"
        assert getattr(AsyncSandbox, verb).__name__ == f"_{verb}_id"
