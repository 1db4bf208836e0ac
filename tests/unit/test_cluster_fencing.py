"""Fencing's state machine without a cluster: silence counted toward the threshold,
refusals not, an answer resetting it; a node that reads it was declared dead fences after
a confirmation; each silence fences once."""

from __future__ import annotations

import asyncio
import json
import socket

from hypothesis import given
from hypothesis import strategies as st

from ember.cluster.directory import Directory
from ember.cluster.fencing import MOVES, Fence, FenceNow, Phase, Reach
from ember.daemon.cluster_watch import PlacedHere, look

NODE = "a" * 56


def _feed(f: Fence, seen: list[tuple[float, Reach]]) -> list[tuple[float, FenceNow]]:
    return [(t, d) for t, r in seen if (d := f.observe_reach(t, r)) is not None]


def test_every_phase_and_reach_has_a_move() -> None:
    assert set(MOVES) == {(p, r) for p in Phase for r in Reach}


def test_silence_past_the_threshold_fences_once() -> None:
    f = Fence(NODE, threshold_s=10)
    got = _feed(f, [(float(t), Reach.OK if t < 3 else Reach.SILENT) for t in range(0, 30)])
    assert [t for t, _ in got] == [14.0]  # silent from 3, counted from the second look
    assert f.phase is Phase.FENCED and "11 s (threshold 10 s)" in got[0][1].reason
    assert f.reason == got[0][1].reason


def test_an_answer_resets_the_silence() -> None:
    f = Fence(NODE, threshold_s=10)
    seen = [(float(t), Reach.SILENT) for t in range(0, 9)] + [(9.0, Reach.OK)]
    seen += [(float(t), Reach.SILENT) for t in range(10, 19)]
    assert _feed(f, seen) == [] and f.phase is Phase.ADRIFT and f.silent_s == 8


def test_a_refusing_head_does_not_count() -> None:
    """The head's host answers, nothing listens: no GCS runs to declare anyone dead (a
    head restart), so that time never fences."""
    f = Fence(NODE, threshold_s=10)
    assert _feed(f, [(float(t), Reach.REFUSED) for t in range(0, 100)]) == []
    assert f.phase is Phase.ADRIFT and f.silent_s == 0
    seen = [(float(t), Reach.SILENT if t % 2 else Reach.REFUSED) for t in range(100, 130)]
    assert [t for t, _ in _feed(f, seen)] == [121.0]  # only the silent seconds count


def test_after_fencing_an_answer_makes_it_a_member_again() -> None:
    f = Fence(NODE, threshold_s=2)
    assert _feed(f, [(float(t), Reach.SILENT) for t in range(5)])
    assert f.observe_reach(6, Reach.OK) is None and f.phase is Phase.MEMBER
    assert f.silent_s == 0


def test_declared_dead_fences_on_the_second_reading() -> None:
    f = Fence(NODE, confirm_s=3)
    assert f.observe_self(0, False, "killed") is None
    assert f.observe_self(1, False) is None  # too soon: a leave may be clearing the record
    got = f.observe_self(4, False, "killed")
    assert got is not None and got.reason == "Ray reports this node dead (killed)"
    assert f.observe_self(8, False) is None  # once per identity
    g = Fence(NODE, confirm_s=3)
    assert g.observe_self(0, False) is None
    assert g.observe_self(5, True) is None  # alive again in between: starts over
    assert g.observe_self(9, None) is None and g.dead_seen_at is None


@given(st.lists(st.tuples(st.floats(0, 5), st.sampled_from(list(Reach))), max_size=200))
def test_it_fences_only_after_the_threshold_of_silence(steps: list[tuple[float, Reach]]) -> None:
    f = Fence(NODE, threshold_s=20)
    now, silent, fenced = 0.0, 0.0, 0
    prev_member = True
    for dt, reach in steps:
        now += dt
        if reach is Reach.SILENT and not prev_member:
            silent += dt
        if reach is Reach.OK:
            silent = 0.0
        got = f.observe_reach(now, reach)
        if got is not None:
            fenced += 1
            assert silent > 20
        prev_member = reach is Reach.OK
        assert f.silent_s == silent or abs(f.silent_s - silent) < 1e-6
    assert fenced <= sum(1 for _, r in steps if r is not Reach.OK)


def test_placed_here_is_what_the_directory_records_and_what_was_noted() -> None:
    placed = PlacedHere()

    async def send(msg: object) -> None:
        pass

    async def answer() -> None:
        noting = placed.noting(send)
        await noting({"type": "http.response.start", "status": 201})
        await noting({"type": "http.response.body", "body": b'{"id": "sb-', "more_body": True})
        await noting({"type": "http.response.body", "body": b'new"}'})
        failed = placed.noting(send)
        await failed({"type": "http.response.start", "status": 429})
        await failed({"type": "http.response.body", "body": b'{"id": "sb-no"}'})

    asyncio.run(answer())
    assert placed.ids() == {"sb-new"}
    placed.update(Directory(sandboxes={"sb-1": NODE, "sb-2": "b" * 56}), NODE,
                  ["sb-1", "sb-new"])
    assert placed.ids() == {"sb-1", "sb-new"}
    placed.update(Directory(sandboxes={}), NODE, [])
    assert placed.ids() == set()


def test_a_look_tells_an_answer_from_a_refusal_from_silence() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert asyncio.run(look(f"127.0.0.1:{port}")) is Reach.OK
    assert asyncio.run(look(f"127.0.0.1:{port}")) is Reach.REFUSED
    # 192.0.2.0/24 (TEST-NET-1) is routed nowhere from here: no answer, or no route.
    assert asyncio.run(look("192.0.2.77:6380", timeout=0.3)) is Reach.SILENT
    assert json.dumps(Reach.SILENT) == '"silent"'
