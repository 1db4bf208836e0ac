"""The sandbox state table: every state reachable, FAILED terminal, every live state able
to fail, and the checks raise the typed error naming both states."""

from __future__ import annotations

import pytest

from ember.errors import SandboxStateError
from ember.kinds import SANDBOX_STATES
from ember.runtime.states import LIVE_STATES, TRANSITIONS, State, check_transition
from ember.sdk.results import SnapshotInfo, snapshot_ref


def test_the_table_covers_every_public_state() -> None:
    assert {s.value for s in State} == set(SANDBOX_STATES) == set(TRANSITIONS)
    assert set(LIVE_STATES) == set(SANDBOX_STATES) - {"failed"}


def test_every_state_is_reachable_from_creating_and_every_live_one_can_fail() -> None:
    seen, todo = {State.CREATING}, [State.CREATING]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(State)
    assert TRANSITIONS[State.FAILED] == frozenset()
    assert all(State.FAILED in TRANSITIONS[s] for s in State if s is not State.FAILED)


@pytest.mark.parametrize(("src", "dst"), [("creating", "booting"), ("booting", "pooled"),
                                          ("pooled", "running"), ("running", "paused"),
                                          ("paused", "running"), ("running", "running"),
                                          ("snapshotting", "running"), ("failed", "failed")])
def test_allowed(src: str, dst: str) -> None:
    assert check_transition("sb-1", src, dst) == State(dst)


@pytest.mark.parametrize(("src", "dst"), [("failed", "running"), ("creating", "running"),
                                          ("paused", "snapshotting"), ("running", "pooled"),
                                          ("running", "nonsense")])
def test_refused_with_both_states_named(src: str, dst: str) -> None:
    with pytest.raises(SandboxStateError, match="sb-1") as err:
        check_transition("sb-1", src, dst)
    assert src in str(err.value) and dst in str(err.value)


def test_a_snapshot_is_named_by_string_or_by_what_snapshot_returned() -> None:
    info = SnapshotInfo(id="ab" * 32, name="warm", template="t", vcpus=1, memory_mib=256,
                        disk_mib=512, size_bytes=1, created_at=0.0, source="sb-1",
                        ram_file=True)
    assert snapshot_ref(info) == "ab" * 32
    assert snapshot_ref("warm") == "warm"
    for bad in (None, 42, "", b"warm", ["warm"]):
        with pytest.raises(Exception, match="snapshot must be") as err:
            snapshot_ref(bad)
        assert type(err.value).__name__ == "BadRequestError"
