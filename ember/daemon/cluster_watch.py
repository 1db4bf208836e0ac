"""The daemon's watch over its place in the cluster (docs/cluster.md, "Failures"): fencing
(:mod:`ember.cluster.fencing`) and reconciling lost records (:mod:`ember.cluster.lost`).
The decisions are those pure modules'; this is the I/O around them, in one background
task of the daemon:

* every :data:`LOOK_INTERVAL_S`, a TCP connection to the head's GCS address says whether
  this node is in touch (``ok``), the head's host refuses (``refused``) or nothing
  answers (``silent``); past the threshold of silence the node kills its placed
  sandboxes, marking each ``failed`` with the reason (visible in its info);
* while in touch, a reading of the directory (the same child process as forwarding's, and
  given to forwarding's cache, so that a head outage finds a recent one to serve; every
  :data:`READ_EVERY_S` while this home holds sandboxes, :data:`IDLE_READ_EVERY_S`
  otherwise, and at once when the head answers again) says whether Ray declared this node
  dead (then it fences), which local sandboxes the cluster reported lost (killed; their
  records dropped) and which lost records are past their retention (dropped).

"Placed here" is what the directory records on this node, plus each placement actor's
create this daemon answered since (noted by the forwarding middleware), so that a sandbox
placed just before a cut is fenced too. No Ray import: Ray's client runs in the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.types import Message, Send

from ember.cluster import child
from ember.cluster.directory import Directory
from ember.cluster.fencing import DEFAULT_THRESHOLD_S, Fence, Reach
from ember.cluster.lost import KILLABLE, RETENTION_S, expired, reason, reconcile
from ember.cluster.record import ClusterRecord, load_record
from ember.daemon.cluster_forward import DirectoryCache, read_directory
from ember.daemon.live import LiveSandboxes
from ember.errors import EmberError, HostError, SandboxNotFoundError
from ember.paths import Paths

log = logging.getLogger("ember.daemon")
T = TypeVar("T")

#: How often the head's GCS address is looked at, and how long a look may take.
LOOK_INTERVAL_S = 1.0
LOOK_TIMEOUT_S = 2.0
#: Directory readings while in touch: with sandboxes here, without, at most.
READ_EVERY_S = 10.0
IDLE_READ_EVERY_S = 30.0
#: The environment that sets the fencing threshold and the lost records' retention (s).
FENCE_ENV = "EMBER_CLUSTER_FENCE_S"
RETENTION_ENV = "EMBER_CLUSTER_LOST_RETENTION_S"
#: Dropping records (a child process, as reading).
FORGET_TIMEOUT_S = 15.0
#: Placement creates remembered at most (the oldest are dropped first).
MAX_NOTED = 10_000
#: Closing the daemon's connection to a sandbox being fenced, at most.
CLOSE_TIMEOUT_S = 10.0


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not a number of seconds: using %.0f", env, raw, default)
        return default
    return value if 0 < value < 10**7 else default


def fence_threshold() -> float:
    return _seconds(FENCE_ENV, DEFAULT_THRESHOLD_S)


def lost_retention() -> float:
    return _seconds(RETENTION_ENV, RETENTION_S)


class PlacedHere:
    """The sandboxes Ray placed on this node, as far as this daemon knows."""

    def __init__(self) -> None:
        self.recorded: set[str] = set()  # what the last reading records on this node
        self.noted: dict[str, None] = {}  # placement creates answered here (ordered)

    def noting(self, send: Send) -> Send:
        """``send`` for a placement create: notes the created sandbox's id on the way."""
        status: list[int] = [0]
        body: list[bytes] = []

        async def wrapped(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status[0] = int(msg.get("status", 0))
            elif msg["type"] == "http.response.body" and status[0] == 201:
                body.append(bytes(msg.get("body", b""))[:65536])
                if not msg.get("more_body", False):
                    self.note(b"".join(body))
            await send(msg)

        return wrapped

    def note(self, raw: bytes) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            sid = json.loads(raw).get("id")
            if isinstance(sid, str) and 0 < len(sid) <= 128:
                self.noted[sid] = None
                while len(self.noted) > MAX_NOTED:
                    self.noted.pop(next(iter(self.noted)))

    def update(self, directory: Directory, own_node_id: str, local: Iterable[str]) -> None:
        self.recorded = {s for s, n in directory.sandboxes.items() if n == own_node_id}
        keep = set(local)
        for sid in [s for s in self.noted if s not in keep]:
            del self.noted[sid]

    def ids(self) -> set[str]:
        return self.recorded | set(self.noted)


async def look(address: str, timeout: float = LOOK_TIMEOUT_S) -> Reach:
    """One look at the head's GCS address (a TCP connection, closed at once)."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout)
    except ConnectionRefusedError:
        return Reach.REFUSED
    except (OSError, TimeoutError, ValueError):
        return Reach.SILENT
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return Reach.OK


def forget_records(address: str, records: list[tuple[str, str]]) -> None:
    """Drop lost records, by ``python -m ember.cluster.directory ADDRESS --forget``."""
    if not records:
        return
    child.ask("directory", address, "--forget", *(f"{sid}={node}" for sid, node in records[:500]),
              what="dropping lost records from the cluster's directory",
              timeout=FORGET_TIMEOUT_S)


class ClusterWatch:
    """The daemon's background task (see the module)."""

    def __init__(self, paths: Paths, live: LiveSandboxes, placed: PlacedHere,
                 directory: DirectoryCache | None = None) -> None:
        self.paths = paths
        self.live = live
        self.placed = placed
        #: Forwarding's cache, kept warm with each reading (a head outage serves the last).
        self.directory = directory
        self.fence: Fence | None = None
        self._last_read = -1e9
        self._was_ok = True
        #: The watch's own threads: requests that wait on a cut-off cluster (their reads
        #: of it) may hold the loop's default ones, and fencing must not wait behind them.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ember-watch")

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def status(self) -> dict[str, Any] | None:
        """What ``GET /v1/health`` says of it (None: this home is in no cluster)."""
        f = self.fence
        if f is None:
            return None
        return {"phase": f.phase.value, "silent_s": round(f.silent_s, 1),
                "threshold_s": f.threshold_s, "reason": f.reason or None}

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(LOOK_INTERVAL_S)
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception:  # the watch goes on; the next look retries
                    log.exception("cluster watch: a step failed")
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def step(self) -> None:
        try:
            rec = await self._io(load_record, self.paths)
        except HostError:
            rec = None
        if rec is None or rec.daemon is None:
            self.fence = None
            return
        if self.fence is None or self.fence.node_id != rec.node_id:  # joined (again)
            self.fence = Fence(rec.node_id, threshold_s=fence_threshold())
            self._last_read = -1e9
        reach = await look(rec.address)
        now = time.monotonic()
        before = self.fence.phase
        decision = self.fence.observe_reach(now, reach)
        if self.fence.phase is not before:
            log.info("cluster watch: %s -> %s (the head's GCS: %s, silent %.0f s)",
                     before.value, self.fence.phase.value, reach.value, self.fence.silent_s)
        if decision is not None:
            await self.fence_placed(rec, decision.reason)
        healed = reach is Reach.OK and not self._was_ok
        self._was_ok = reach is Reach.OK
        if reach is not Reach.OK:
            return
        local = await self._io(self._local)
        every = READ_EVERY_S if any(st in KILLABLE for st in local.values()) \
            else IDLE_READ_EVERY_S
        confirming = self.fence.dead_seen_at is not None \
            and now - self.fence.dead_seen_at >= self.fence.confirm_s
        if healed or confirming or now - self._last_read >= every:
            self._last_read = now
            await self.reconcile(rec, local, now)

    def _local(self) -> dict[str, str]:
        return {r.id: r.state for r in self.live.mgr.store.list_sandboxes()}

    async def reconcile(self, rec: ClusterRecord, local: dict[str, str], now: float) -> None:
        """One reading of the directory, and what follows from it."""
        try:
            directory = await self._io(read_directory, rec.address)
        except EmberError as err:
            log.info("cluster watch: no reading of the directory: %s", err)
            return
        if self.directory is not None:
            self.directory.put(directory)
        if (await self._io(load_record, self.paths)) != rec:
            return  # left or joined again meanwhile: the next step sees the new record
        assert self.fence is not None
        self.placed.update(directory, rec.node_id, local)
        own = directory.nodes.get(rec.node_id)
        decision = self.fence.observe_self(now, None if own is None else own.alive,
                                           own.death_reason if own else "")
        if decision is not None:
            await self.fence_placed(rec, decision.reason)
        plan = reconcile(directory, rec.node_id, local, own_dead=self.fence.dead_fenced)
        for sid in plan.kill:
            node = directory.node_of(sid)
            why = reason(node) if node is not None else "its node is gone"
            log.warning("sandbox %s was reported lost (%s): killing it", sid, why)
            await self.kill(sid, f"lost: the cluster reported it lost ({why})")
        forget = list(plan.forget) + [r for r in expired(directory, time.time(),
                                                          lost_retention())
                                      if r not in plan.forget]
        if forget:
            try:
                await self._io(forget_records, rec.address, forget)
                log.info("cluster watch: dropped %d lost record(s) from the directory",
                         len(forget))
            except (EmberError, ValueError, IndexError) as err:
                log.warning("cluster watch: cannot drop lost records: %s", err)

    async def fence_placed(self, rec: ClusterRecord, why: str) -> None:
        """Kill every sandbox Ray placed on this node that still holds anything."""
        local = await self._io(self._local)
        doomed = sorted(s for s in self.placed.ids() if local.get(s) in KILLABLE)
        log.warning("fencing node %s: %s; killing its %d placed sandbox(es)",
                    rec.node_id[:12], why, len(doomed))
        for sid in doomed:
            await self.kill(sid, f"fenced: {why}")

    async def kill(self, sid: str, why: str) -> None:
        """Kill a sandbox here and keep its row ``failed`` with ``why`` (its info says
        so); a paused one, whose agent need not answer, is destroyed."""
        live = self.live
        with contextlib.suppress(Exception):
            await asyncio.wait_for(live.ports.close(sid), CLOSE_TIMEOUT_S)
        with contextlib.suppress(EmberError):
            await self._io(live.mgr.store.delete_exposed_ports, sid)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(live.forget(sid), CLOSE_TIMEOUT_S)
        try:
            await self._io(live.mgr.fail, sid, why)
            rec = await self._io(live.mgr.get, sid)
            if rec.state in KILLABLE:
                await self._io(live.mgr.destroy, sid)
            elif rec.error != why:  # a look at it meanwhile saw the VM gone: say why
                await self._io(live.mgr.set_state, sid, "failed", error=why)
        except SandboxNotFoundError:
            pass
        except EmberError as err:
            log.error("sandbox %s: cannot kill it (%s): %s", sid, why, err)
