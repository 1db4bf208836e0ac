"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .test_agent_harness import AgentHarness


@pytest.fixture
def agent() -> Iterator[AgentHarness]:
    """An agent serving a socketpair in a thread of this process, after its hello."""
    harness = AgentHarness()
    harness.handshake()
    yield harness
    harness.close()
