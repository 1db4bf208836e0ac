"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.paths import Paths

from .test_agent_harness import AgentHarness


@pytest.fixture
def agent() -> Iterator[AgentHarness]:
    """An agent serving a socketpair in a thread of this process, after its hello."""
    harness = AgentHarness()
    harness.handshake()
    yield harness
    harness.close()


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[Paths]:
    """A fresh home and cache under the test's temporary directory (a module may define its
    own ``paths``)."""
    yield Paths(home=tmp_path / "home", cache=tmp_path / "cache",
                ram=tmp_path / "ram").ensure()
