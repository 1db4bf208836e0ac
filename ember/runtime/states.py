"""Sandbox states and the transitions between them: one table, checked in one place.

The lifecycle code asks :func:`check_transition` (through ``SandboxManager._set_state``)
instead of comparing strings. Destroying a sandbox deletes its row from any state; that is
not a transition. Moving to the state it is in already is allowed (idempotent retries).
"""

from __future__ import annotations

from enum import StrEnum

from ember.errors import SandboxStateError
from ember.kinds import SANDBOX_STATES


class State(StrEnum):
    CREATING = "creating"  # registered; its VM or container is being built
    BOOTING = "booting"  # the VMM runs; the agent has not answered yet
    RUNNING = "running"  # the agent answered; its lifetime runs
    PAUSED = "paused"  # vCPUs stopped (or cgroup frozen)
    POOLED = "pooled"  # ready and waiting in a warm pool
    SNAPSHOTTING = "snapshotting"  # stopped while a snapshot is copied, then running again
    FAILED = "failed"  # dead or misbehaved; only its console log and row are kept


TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATING: frozenset({State.BOOTING, State.FAILED}),
    State.BOOTING: frozenset({State.RUNNING, State.POOLED, State.FAILED}),
    State.RUNNING: frozenset({State.PAUSED, State.SNAPSHOTTING, State.FAILED}),
    State.PAUSED: frozenset({State.RUNNING, State.FAILED}),
    State.POOLED: frozenset({State.RUNNING, State.FAILED}),
    # PAUSED: its lifetime ended (on_timeout="pause") while a dead writer left it stopped.
    State.SNAPSHOTTING: frozenset({State.RUNNING, State.PAUSED, State.FAILED}),
    State.FAILED: frozenset(),
}

#: States whose sandbox holds resources (a process, a uid, a cgroup).
LIVE_STATES: tuple[str, ...] = tuple(s.value for s in State if s is not State.FAILED)

assert {s.value for s in State} == set(SANDBOX_STATES), "ember.kinds.SandboxState drifted"


def check_transition(sandbox_id: str, src: str, dst: str) -> State:
    """``dst`` as a :class:`State` if a sandbox in ``src`` may move there, else
    :class:`SandboxStateError` naming both."""
    try:
        here, there = State(src), State(dst)
    except ValueError as err:
        raise SandboxStateError(f"sandbox {sandbox_id}: unknown state in {src!r} -> "
                                f"{dst!r}") from err
    if here is not there and there not in TRANSITIONS[here]:
        raise SandboxStateError(f"sandbox {sandbox_id} is {src}; it cannot become {dst}")
    return there
