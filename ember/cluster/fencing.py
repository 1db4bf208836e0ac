"""Fencing: a node that has lost the cluster kills its own placed sandboxes, so that a
sandbox the others reported lost never runs on (docs/cluster.md, "Failures"). Pure: the
daemon's watcher (:mod:`ember.daemon.cluster_watch`) feeds it what it sees and does what it
decides.

Only Ray's GCS declares a node dead, and only while it runs. So what a node sees of the
head's GCS address is one of three (:class:`Reach`):

* ``ok``: it accepts a connection: the node is in touch (and learns from the node table
  whether Ray declared it dead: :meth:`Fence.observe_self`);
* ``refused``: the head's host answers that nothing listens: no GCS runs (the head is being
  restarted), so nobody can declare this node dead meanwhile: that time does not count;
* ``silent``: no answer at all (a timeout, no route): this node is cut off, or the head's
  host is down; it cannot tell which, and a GCS on the other side of a partition goes on
  to declare it dead. Silent time counts; past :attr:`Fence.threshold_s` in a row (no
  ``ok`` between), the node fences.

The threshold must be longer than Ray's own detection of a cut-off node (so that a cut
shorter than that costs nothing, and the others report the node's sandboxes lost before
or about when it kills them), and longer than a head's host may stay unreachable without
costing every node its sandboxes. And a node that reaches the GCS again and reads that
Ray declared it dead (twice, :attr:`Fence.confirm_s` apart: a deliberate ``leave`` clears
the home's record in between) fences at once: its sandboxes were reported lost.

The states and the moves between them are one table (:data:`MOVES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

#: Default threshold: Ray's detection of a cut-off node with its default health checks
#: (5 misses of a check every 3 s, each waiting up to 10 s) is about a minute; its raylet
#: gives the GCS up after 60 s.
DEFAULT_THRESHOLD_S = 90.0
#: Two readings saying "this node is dead" at least this far apart fence it.
CONFIRM_S = 3.0


class Reach(StrEnum):
    OK = "ok"
    REFUSED = "refused"
    SILENT = "silent"


class Phase(StrEnum):
    MEMBER = "member"  # in touch with the head's GCS
    ADRIFT = "adrift"  # not in touch; silent time is counted
    FENCED = "fenced"  # its placed sandboxes were killed


#: (phase, what is seen) -> the next phase; crossing the threshold is decided apart.
MOVES: dict[tuple[Phase, Reach], Phase] = {
    (Phase.MEMBER, Reach.OK): Phase.MEMBER,
    (Phase.MEMBER, Reach.REFUSED): Phase.ADRIFT,
    (Phase.MEMBER, Reach.SILENT): Phase.ADRIFT,
    (Phase.ADRIFT, Reach.OK): Phase.MEMBER,
    (Phase.ADRIFT, Reach.REFUSED): Phase.ADRIFT,
    (Phase.ADRIFT, Reach.SILENT): Phase.ADRIFT,
    (Phase.FENCED, Reach.OK): Phase.MEMBER,
    (Phase.FENCED, Reach.REFUSED): Phase.FENCED,
    (Phase.FENCED, Reach.SILENT): Phase.FENCED,
}


@dataclass(frozen=True)
class FenceNow:
    """Kill this node's placed sandboxes, for ``reason``."""

    reason: str


@dataclass
class Fence:
    """One node identity's fencing state (a new one after each join: a new node id)."""

    node_id: str
    threshold_s: float = DEFAULT_THRESHOLD_S
    confirm_s: float = CONFIRM_S
    phase: Phase = Phase.MEMBER
    #: Silent seconds since the head's GCS last answered.
    silent_s: float = 0.0
    last_at: float | None = None
    #: When a reading first said Ray declared this node dead (None: none did).
    dead_seen_at: float | None = None
    #: Why it fenced (last time).
    reason: str = ""
    #: It fenced because Ray declared it dead (final for this identity: once is enough).
    dead_fenced: bool = False

    def observe_reach(self, now: float, reach: Reach) -> FenceNow | None:
        """What one look at the head's GCS address showed; a decision once the silence
        passes the threshold (once per silence)."""
        if reach is Reach.SILENT and self.last_at is not None and self.phase is not Phase.MEMBER:
            self.silent_s += max(0.0, now - self.last_at)
        self.last_at = now
        nxt = MOVES[(self.phase, reach)]
        if nxt is Phase.MEMBER:
            self.silent_s = 0.0
        self.phase = nxt
        if self.phase is Phase.ADRIFT and self.silent_s > self.threshold_s:
            return self._fence(f"this node has not reached the cluster's head for "
                               f"{self.silent_s:.0f} s (threshold {self.threshold_s:.0f} s)")
        return None

    def observe_self(self, now: float, alive: bool | None, why: str = "") -> FenceNow | None:
        """What a reading of Ray's node table says of this node (None: it does not list
        it); a decision on the second "dead" at least :attr:`confirm_s` after the first."""
        if alive is not False:
            self.dead_seen_at = None
            return None
        if self.dead_seen_at is None:
            self.dead_seen_at = now
            return None
        if now - self.dead_seen_at < self.confirm_s or self.dead_fenced:
            return None
        self.dead_fenced = True
        return self._fence("Ray reports this node dead" + (f" ({why})" if why else ""))

    def _fence(self, reason: str) -> FenceNow:
        self.phase = Phase.FENCED
        self.reason = reason[:500]
        return FenceNow(self.reason)
