"""kill -9 at every step of create, exec, file transfer, snapshot, fork and destroy: after a
user's reconcile (``Sandbox.list``) and destroy, nothing may leak (see ``leaks.py``).

Each operation runs in a child Python process that runs the runtime itself
(``EMBER_LOCAL=1``: what the daemon does in production; so does this module) and is killed
with SIGKILL at several points: after delays spread over the operation's duration (measured
by a first run that is killed just after it completes), and when an observable step is
reached (a directory, a registry state, a QEMU or qemu-img process, a staging file). The
QEMU process itself is also killed in the middle of an exec, a file transfer and a snapshot.

Killing a client of the daemon is a different matter (the daemon finishes or undoes the
operation): ``test_daemon_kill.py`` covers that, and kill -9 of the daemon itself.

A kill point that leaks does not stop the test: every kill point runs, each reports only
leaks not seen before, and the test fails at its end listing them all. Run with ``-s`` to
see the list of failure paths covered.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ember import EmberError, GuestError, Sandbox, SandboxNotFoundError
from ember.paths import Paths
from ember.runtime.snapshots import STAGING_PREFIX
from ember.runtime.states import LIVE_STATES
from ember.sdk.async_sandbox import manager
from ember.store import SandboxRecord, Store
from tests.integration.leaks import assert_no_leaks_anywhere, home_pids, leaks

pytestmark = pytest.mark.integration

BIG = 50 << 20  # bytes moved by the file-transfer operations
KILL_FRACTIONS = (0.1, 0.4, 0.7, 0.95)  # of the measured duration, after the operation began
SETTLE_S = 3.0  # a killed process takes a moment to exit and release its files
CHILD_TIMEOUT_S = 120.0

# The user's program: one operation through the public SDK, announced on stdout ("GO" just
# before it starts, "DONE <seconds>" when it returns), then it idles, still connected, until
# it is killed. EMBER_HOME comes from the environment: no path of the home on its command
# line, so the leak check never mistakes it for a process of the home.
CHILD = r"""
import os, sys, time
from ember import Sandbox

op, sid, arg = sys.argv[1:4]

def say(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()

if op == "create":
    say("GO")
    t = time.monotonic()
    sb = Sandbox.create("debian-python", timeout=900)
    say("DONE", time.monotonic() - t, sb.id)
else:
    sb = Sandbox.connect(sid, wait=30)
    payload = os.urandom(int(arg)) if op == "write" else b""
    say("GO")
    t = time.monotonic()
    if op == "exec":
        r = sb.exec(arg, on_stdout=lambda s: say("OUT"), timeout=None)
        assert r.exit_code == 0, r
    elif op == "write":
        sb.files.write("/root/kr-write", payload)
    elif op == "read":
        assert len(sb.files.read(arg)) > 0
    elif op == "snapshot":
        sb.snapshot(arg)
    elif op == "fork":
        say("CLONES", *[c.id for c in sb.fork(int(arg))])
    elif op == "destroy":
        sb.kill()
    else:
        raise SystemExit(f"unknown op {op}")
    say("DONE", time.monotonic() - t)
time.sleep(900)
"""

#: Every failure path exercised (printed at the end of the module; see ``-s``).
COVERED: list[str] = []
#: Leaks reported already, by kind: a later kill point reports only new ones.
KNOWN: dict[str, list[str]] = {}


# --- the killed client --------------------------------------------------------------------


#: seconds after GO, a step reached (polled), a line the child printed, or None: DONE
Trigger = float | Callable[[], bool] | str | None


@dataclass
class Killed:
    label: str
    finished: bool  # the operation had returned when the kill came
    at: float  # seconds after GO
    duration: float | None  # the operation's own duration, when it finished
    lines: list[str] = field(default_factory=list)

    @property
    def created(self) -> str | None:
        return next((ln.split()[2] for ln in self.lines if ln.startswith("DONE ")
                     and len(ln.split()) > 2), None)


def run_and_kill(paths: Paths, op: str, label: str, trigger: Trigger, *, sid: str = "-",
                 arg: str = "-") -> Killed:
    """Run ``op`` in a child process and SIGKILL it at ``trigger``."""
    env = {**os.environ, "EMBER_HOME": str(paths.home), "EMBER_CACHE": str(paths.cache),
           "EMBER_LOCAL": "1"}
    lines: queue.Queue[str | None] = queue.Queue()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen([sys.executable, "-c", CHILD, op, sid, arg], env=env,
                                 stdout=subprocess.PIPE, stderr=err, text=True)
        assert child.stdout is not None
        out = child.stdout

        def pump() -> None:
            for ln in out:
                lines.put(ln.strip())
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        seen: list[str] = []
        eof = False

        def drain(block: float = 0.0) -> None:
            nonlocal eof
            try:
                while True:
                    ln = lines.get(timeout=block) if block else lines.get_nowait()
                    block = 0.0
                    if ln is None:
                        eof = True
                        return
                    seen.append(ln)
            except queue.Empty:
                pass

        def done() -> bool:
            return any(ln.startswith("DONE") for ln in seen)

        def failed_child(why: str) -> AssertionError:
            child.kill()
            child.wait()
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            return AssertionError(f"{op} [{label}]: {why}; child said {seen}\n{tail}")

        try:
            deadline = time.monotonic() + CHILD_TIMEOUT_S
            while "GO" not in seen:
                drain(0.05)
                if eof or time.monotonic() > deadline:
                    raise failed_child("the child never started the operation")
            go = time.monotonic()
            while True:
                drain()
                if done() or eof:
                    break
                now = time.monotonic()
                if isinstance(trigger, float | int) and now - go >= trigger:
                    break
                if callable(trigger) and trigger():
                    break
                if isinstance(trigger, str) and any(ln.startswith(trigger) for ln in seen):
                    break
                if now > deadline:
                    raise failed_child("the operation did not end")
                time.sleep(0.0002)  # some windows are a few milliseconds wide
            if eof and not done():
                raise failed_child("the child exited before it was killed")
            at = time.monotonic() - go
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        reader.join(5)
        drain()
    duration = next((float(ln.split()[1]) for ln in seen if ln.startswith("DONE")), None)
    k = Killed(label, done(), at, duration, seen)
    state = "after it returned" if k.finished else "mid-operation"
    COVERED.append(f"{op}: client killed {label} ({state}, {at:.3f} s after start)")
    return k


def delays(duration: float) -> list[tuple[str, Trigger]]:
    return [(f"at {f:.0%} of {duration:.2f} s", duration * f) for f in KILL_FRACTIONS]


# --- looking at the home -------------------------------------------------------------------


def rows(paths: Paths) -> dict[str, SandboxRecord]:
    store = Store(paths.db)
    try:
        return {r.id: r for r in store.list_sandboxes()}
    finally:
        store.close()


def snapshot_ids(paths: Paths) -> dict[str, str | None]:
    """Registered snapshots: id -> name."""
    store = Store(paths.db)
    try:
        return {s.id: s.name for s in store.list_snapshots()}
    finally:
        store.close()


def qemu_img_running(paths: Paths, verb: str = "") -> bool:
    """A ``qemu-img [verb]`` of this home runs (``convert``: a snapshot copies a disk;
    ``create``: a new disk overlay is made)."""
    for argv in home_pids(paths).values():
        args = argv.split(b"\0")
        if b"qemu-img" in args[0] and (not verb or verb.encode() in args[1:2]):
            return True
    return False


def check_leaks(paths: Paths, label: str, problems: list[str], keep: set[str],
                keep_snapshots: set[str], *, allow_failed_rows: bool = False) -> None:
    """Record the leaks not reported before (after up to SETTLE_S seconds)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        found = leaks(paths, keep=keep, keep_snapshots=keep_snapshots,
                      allow_failed_rows=allow_failed_rows)
        new = {k: [i for i in v if i not in KNOWN.get(k, [])] for k, v in found.items()}
        new = {k: v for k, v in new.items() if v}
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if new:
        problems.append(f"{label}:\n" + "\n".join(f"    {k}: {i}" for k, v in new.items()
                                                   for i in v))
        for k, v in new.items():
            KNOWN.setdefault(k, []).extend(v)


def destroy_all_new(paths: Paths, before: set[str], problems: list[str], label: str) -> None:
    """What a user does after a crash: ``ember ls`` (reconcile), then remove every sandbox
    that is not theirs any more: ``Sandbox.connect(...).kill()`` for a running one, ``ember
    rm`` (the manager's destroy) for a failed one."""
    for info in Sandbox.list(paths=paths):
        if info.id in before:
            continue
        if info.state in ("creating", "booting", "snapshotting"):
            problems.append(f"{label}: sandbox {info.id} still {info.state} after ember ls")
        if info.state == "running":
            try:
                Sandbox.connect(info.id, wait=10, paths=paths).kill()
                continue
            except EmberError as err:
                problems.append(f"{label}: cannot connect to running {info.id} to kill it: "
                                f"{err}")
        with contextlib.suppress(SandboxNotFoundError):
            manager(paths).destroy(info.id)


def finish(problems: list[str]) -> None:
    assert not problems, "failure paths that leaked or misbehaved:\n" + "\n".join(problems)


# --- fixtures ----------------------------------------------------------------------------------


@dataclass
class Home:
    paths: Paths
    baseline: set[str]  # live sandboxes that existed before this module (other tests')
    baseline_snaps: frozenset[str]  # snapshots that existed before this module
    snapshots: set[str]  # those, and the ones this module keeps while it runs

    def keep(self, *ids: str) -> set[str]:
        return self.baseline | set(ids)


@pytest.fixture(scope="module")
def home(ember_paths: Paths, debian_template) -> Iterator[Home]:  # type: ignore[no-untyped-def]
    os.environ["EMBER_LOCAL"] = "1"  # this process and its children run the runtime
    try:
        yield from _home(ember_paths)
    finally:
        os.environ.pop("EMBER_LOCAL", None)


def _home(ember_paths: Paths) -> Iterator[Home]:
    before = rows(ember_paths)
    baseline = {i for i, r in before.items() if r.state in LIVE_STATES}
    snaps = set(snapshot_ids(ember_paths))
    yield Home(ember_paths, baseline, frozenset(snaps), set(snaps))
    print(f"\n{len(COVERED)} failure paths covered by {Path(__file__).name}:")
    for line in COVERED:
        print(f"  - {line}")


@dataclass
class Target:
    """A running sandbox shared by the kill points of operations on an existing sandbox; it
    must survive each killed client (state running, answering)."""

    home: Home
    id: str

    def check_usable(self, label: str, problems: list[str]) -> bool:
        info = {i.id: i for i in Sandbox.list(paths=self.home.paths)}.get(self.id)
        if info is None or info.state != "running":
            state = "gone" if info is None else f"{info.state}: {info.error}"
            problems.append(f"{label}: the sandbox did not survive its killed client ({state})")
            return False
        try:
            sb = Sandbox.connect(self.id, wait=10, paths=self.home.paths)
            try:
                assert sb.exec("echo alive").stdout == "alive\n"
            finally:
                sb.close()
        except (EmberError, AssertionError) as err:
            problems.append(f"{label}: the sandbox is running but unusable: {err!r}")
            return False
        return True


@pytest.fixture(scope="module")
def target(home: Home) -> Iterator[Target]:
    # booted: its RAM is a file of its own, which its snapshots copy (the kill points wait
    # for that copy); ``restored`` sandboxes cover the other kind
    sb = Sandbox.create("debian-python", timeout=3600, paths=home.paths, boot="cold")
    # a named snapshot to restore throw-away sandboxes from (faster than booting them)
    home.snapshots.add(sb.snapshot("kr-base").id)
    sb.close()
    yield Target(home, sb.id)
    with contextlib.suppress(EmberError):
        Sandbox.connect(sb.id, paths=home.paths).kill()
    with contextlib.suppress(EmberError):
        Sandbox.delete_snapshot("kr-base", paths=home.paths)


def restored(home: Home) -> Sandbox:
    return Sandbox.restore("kr-base", timeout=900, paths=home.paths)


# --- the creator killed ----------------------------------------------------------------------


class Before:
    """What the home held before the current kill point's run, so that a step trigger looks
    only at what that run makes (an earlier point's leak must not fire it at once)."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.take()

    def take(self) -> None:
        self.dirs = {d.name for d in self.paths.sandboxes.iterdir()}
        self.rows = set(rows(self.paths))
        self.entries = {d.name for d in self.paths.snapshots.iterdir()}
        self.snaps = set(snapshot_ids(self.paths))

    def new_dir(self) -> bool:
        return any(d.name not in self.dirs for d in self.paths.sandboxes.iterdir())

    def new_row(self, state: str | None = None) -> Callable[[], bool]:
        return lambda: any(i not in self.rows and state in (None, r.state)
                           for i, r in rows(self.paths).items())

    def new_snapshot(self) -> bool:
        return any(i not in self.snaps for i in snapshot_ids(self.paths))

    def new_staging(self, file: str = "") -> Callable[[], bool]:
        def reached() -> bool:
            return any(d.name.startswith(STAGING_PREFIX) and d.name not in self.entries
                       and (not file or (d / file).exists())
                       for d in self.paths.snapshots.iterdir())
        return reached

    def published(self) -> bool:
        return any(not d.name.startswith(STAGING_PREFIX) and d.name not in self.entries
                   for d in self.paths.snapshots.iterdir())


def test_kill_creator_during_create(home: Home, target: Target) -> None:
    paths = home.paths
    problems: list[str] = []
    base = set(rows(paths))
    before = Before(paths)
    cal = run_and_kill(paths, "create", "right after create returned", None)
    assert cal.finished and cal.duration and cal.created, cal
    COVERED[-1] += "; the sandbox it made stays running (" + (
        rows(paths)[cal.created].state if cal.created in rows(paths) else "gone") + ")"
    destroy_all_new(paths, base, problems, "create [right after create returned]")
    check_leaks(paths, "create [right after create returned]", problems,
                home.keep(target.id), home.snapshots)

    def qemu_up() -> bool:  # a QEMU of a sandbox directory this run made
        fresh = [os.fsencode(paths.sandboxes / d) + b"/" for d in
                 {d.name for d in paths.sandboxes.iterdir()} - before.dirs]
        return any(b"qemu-system" in a and any(f in a for f in fresh)
                   for a in home_pids(paths).values())

    points: list[tuple[str, Trigger]] = [
        *delays(cal.duration),
        ("when its sandbox directory appears", before.new_dir),
        ("when the row is 'creating'", before.new_row("creating")),
        ("when QEMU appears", qemu_up),
        ("when the row is 'booting'", before.new_row("booting")),
    ]
    for label, trigger in points:
        before.take()
        k = run_and_kill(paths, "create", label, trigger)
        where = f"create [{label}{'' if k.finished else ', mid-operation'}]"
        made = set(rows(paths)) - before.rows
        # ember ls reconciles: a sandbox whose creator died before it was ready is failed,
        # with the reason, and holds nothing but its console log
        infos = {i.id: i for i in Sandbox.list(paths=paths)}
        states = {i: f"{infos[i].state}" for i in made if i in infos}
        COVERED[-1] += f"; ember ls then says {states or 'nothing'}"
        for sid in made:
            info = infos.get(sid)
            if info is not None and info.state == "failed" and "died" not in (info.error or ""):
                problems.append(f"{where}: {sid} failed without naming why: {info.error}")
        check_leaks(paths, f"{where}, after ember ls", problems,
                    home.keep(target.id, *(i for i in made if states.get(i) == "running")),
                    home.snapshots, allow_failed_rows=True)
        destroy_all_new(paths, base, problems, where)
        check_leaks(paths, where, problems, home.keep(target.id), home.snapshots)
    finish(problems)


# --- clients of an existing sandbox killed ------------------------------------------------------


def _kill_points_on_target(home: Home, target: Target, op: str, arg: str | Callable[[], str],
                           steps: list[tuple[str, Trigger]], before: Before | None = None,
                           after: Callable[[str, Killed, list[str]], None] | None = None
                           ) -> list[str]:
    """Calibrate ``op`` on the target, then kill its client at spread delays and at
    ``steps``; after each kill the target must be running and answering, and nothing of
    the home may leak. ``arg`` may change per kill point (a callable)."""
    paths = home.paths
    problems: list[str] = []
    base = set(rows(paths))

    def argument() -> str:
        return arg() if callable(arg) else arg

    cal = run_and_kill(paths, op, "right after it returned", None, sid=target.id,
                       arg=argument())
    assert cal.finished and cal.duration is not None, cal
    for label, trigger in [("right after it returned", None), *delays(cal.duration), *steps]:
        if trigger is None:
            k = cal
        else:
            if before is not None:
                before.take()
            k = run_and_kill(paths, op, label, trigger, sid=target.id, arg=argument())
        where = f"{op} [{label}{'' if k.finished else ', mid-operation'}]"
        if after is not None:
            after(where, k, problems)
        destroy_all_new(paths, base, problems, where)
        if target.check_usable(where, problems):
            check_leaks(paths, where, problems, home.keep(target.id), home.snapshots)
        else:
            break
    return problems


def test_kill_client_during_exec(home: Home, target: Target) -> None:
    cmd = "for i in $(seq 1 30); do echo line $i; sleep 0.1; done"
    finish(_kill_points_on_target(home, target, "exec", cmd, [
        ("when its first output line arrived", "OUT"),
    ]))


def test_kill_client_during_file_write(home: Home, target: Target) -> None:
    def after(where: str, k: Killed, problems: list[str]) -> None:
        # the write is in place, not atomic: a killed writer leaves a shorter file
        t0 = time.monotonic()
        try:
            sb = Sandbox.connect(target.id, wait=10, paths=home.paths)
        except EmberError as err:
            problems.append(f"{where}: reconnecting at once failed after "
                            f"{time.monotonic() - t0:.1f} s: {err!r}")
            COVERED[-1] += "; reconnecting at once failed"
            return
        try:
            size = sb.files.stat("/root/kr-write").size
        finally:
            sb.close()
        if k.finished and size != BIG:
            problems.append(f"{where}: the completed write left {size} bytes, not {BIG}")
        COVERED[-1] += f"; guest file left with {size} of {BIG} bytes"

    finish(_kill_points_on_target(home, target, "write", str(BIG), [], after=after))


def test_kill_client_during_file_read(home: Home, target: Target) -> None:
    sb = Sandbox.connect(target.id, paths=home.paths)
    try:
        sb.exec(f"head -c {BIG} /dev/urandom > /root/kr-read").check()
    finally:
        sb.close()
    finish(_kill_points_on_target(home, target, "read", "/root/kr-read", []))


def test_kill_client_during_snapshot(home: Home, target: Target) -> None:
    paths = home.paths
    before = Before(paths)
    names = (f"kr-snap-{i}" for i in range(1000))
    name = next(names)

    def snapshotting() -> bool:
        return rows(paths)[target.id].state == "snapshotting"

    def after(where: str, k: Killed, problems: list[str]) -> None:
        nonlocal name
        snap = name in snapshot_ids(paths).values()
        COVERED[-1] += "; snapshot " + ("registered" if snap else "not registered")
        if k.finished and not snap:
            problems.append(f"{where}: snapshot() returned but {name} is not registered")
        if snap:  # a complete snapshot is the user's: they remove it
            Sandbox.delete_snapshot(name, paths=paths)
        name = next(names)  # a fresh name per kill point

    finish(_kill_points_on_target(home, target, "snapshot", lambda: name, [
        ("when the row is 'snapshotting'", snapshotting),
        ("when the staging directory appears", before.new_staging()),
        ("when the device state is being written", before.new_staging("state")),
        ("when the RAM copy appears", before.new_staging("ram")),
        ("when qemu-img copies the disk", lambda: qemu_img_running(paths, "convert")),
        ("when the manifest is written", before.new_staging("manifest.json")),
        ("when the snapshot directory is published", before.published),
    ], before, after))


def test_kill_client_while_a_restored_sandbox_saves_its_ram(home: Home, target: Target) -> None:
    """A restored sandbox's snapshot carries its RAM in the state stream, so the migration
    runs long enough for a dead client's sandbox to be found mid-migration: the guest must
    then run again (the migration cancelled first, or a resumed guest would be stopped
    again when it completes), not stay paused while the registry says running."""
    from ember.engine.base import MIGRATING
    from ember.runtime.manager import SandboxDir
    from ember.sdk.async_sandbox import manager

    paths = home.paths
    problems: list[str] = []
    sb = restored(home)
    try:
        sid = sb.id
        # 120 MiB of guest RAM that is not zero: the migration takes a while to write it
        sb.exec("head -c 120M /dev/urandom > /dev/shm/fill", timeout=120).check()
        sb.close()
        mgr = manager(paths)
        rec = mgr.store.get_sandbox(sid)
        vm = mgr.microvm.attach(rec, SandboxDir(Path(rec.dir)))
        for attempt in range(5):
            before = Before(paths)

            def writing(before: Before = before) -> bool:  # the migration has begun
                return any(d.name.startswith(STAGING_PREFIX) and d.name not in before.entries
                           and (d / "state").is_file() and (d / "state").stat().st_size > 0
                           for d in paths.snapshots.iterdir())

            k = run_and_kill(paths, "snapshot", "when the RAM is being written", writing,
                             sid=sid, arg=f"kr-restored-{attempt}")
            # keep the dead client's migration going while the registry is looked at
            vm.qmp("migrate-set-parameters", **{"max-bandwidth": 32 << 20})
            if not k.finished and vm.qmp("query-migrate").get("status") == "active":
                break
            Sandbox.list(paths=paths)  # the migration ended first: resume, try again
        else:
            pytest.fail("no kill point caught the migration in flight")
        [info] = [i for i in Sandbox.list(paths=paths) if i.id == sid]  # reconciles
        assert info.state == "running", info
        deadline = time.monotonic() + 120  # the dead client's migration ends one way or other
        while vm.qmp("query-migrate").get("status") in MIGRATING:
            assert time.monotonic() < deadline, "the migration never ended"
            time.sleep(0.1)
        assert vm.status() == "running", "the guest was left stopped by the old migration"
        with Sandbox.connect(sid, wait=10, paths=paths) as again:
            assert again.exec("echo alive", timeout=30).stdout == "alive\n"
        check_leaks(paths, "snapshot of a restored sandbox, mid-migration", problems,
                    home.keep(target.id, sid), home.snapshots)
    finally:
        with contextlib.suppress(EmberError):
            Sandbox.kill(sb.id, paths=paths)
    finish(problems)


def test_kill_client_during_fork(home: Home, target: Target) -> None:
    paths = home.paths
    before = Before(paths)

    def after(where: str, k: Killed, problems: list[str]) -> None:
        now = {i: r.state for i, r in rows(paths).items() if i not in before.rows}
        COVERED[-1] += f"; clones after the kill: {now or 'none'}"

    finish(_kill_points_on_target(home, target, "fork", "2", [
        ("when the fork's snapshot is registered", before.new_snapshot),
        ("when the first clone's row appears", before.new_row()),
        ("when qemu-img makes a clone's disk overlay", lambda: qemu_img_running(paths, "create")),
        ("when a clone is 'booting'", before.new_row("booting")),
        ("when a clone is 'running'", before.new_row("running")),
    ], before, after))


# --- destroy killed -----------------------------------------------------------------------------


def test_kill_client_during_destroy(home: Home, target: Target) -> None:
    paths = home.paths
    problems: list[str] = []
    base = set(rows(paths))

    def fresh(boot: bool) -> str:
        sb = (Sandbox.create("debian-python", timeout=900, paths=paths, boot="cold") if boot
              else restored(home))
        sb.close()
        return sb.id

    def qemu_gone(sid: str) -> Callable[[], bool]:
        return lambda: not any(f"/{sid}/".encode() in a for a in home_pids(paths).values())

    def dir_gone(sid: str) -> Callable[[], bool]:
        return lambda: not (paths.sandboxes / sid).exists()

    sid = fresh(boot=True)
    cal = run_and_kill(paths, "destroy", "right after it returned", None, sid=sid)
    assert cal.finished and cal.duration is not None, cal
    check_leaks(paths, "destroy [calibration]", problems, home.keep(target.id), home.snapshots)
    plan: list[tuple[str, Callable[[str], Trigger], bool]] = [
        ("at once", lambda s: 0.0, True),
        (f"after {cal.duration / 2:.3f} s", lambda s: cal.duration / 2 if cal.duration else 0.0,
         False),
        ("when its QEMU is gone (booted)", qemu_gone, True),
        ("when its QEMU is gone (restored)", qemu_gone, False),
        ("when its directory is gone", dir_gone, False),
    ]
    for label, make, boot in plan:
        sid = fresh(boot)
        k = run_and_kill(paths, "destroy", label, make(sid), sid=sid)
        where = f"destroy [{label}{'' if k.finished else ', mid-operation'}]"
        info = {i.id: i for i in Sandbox.list(paths=paths)}.get(sid)
        COVERED[-1] += f"; then ember ls says {info.state if info else 'gone'}"
        if info is not None and info.state == "failed" and not info.error:
            problems.append(f"{where}: failed without an error")
        destroy_all_new(paths, base, problems, where)
        check_leaks(paths, where, problems, home.keep(target.id), home.snapshots)
    finish(problems)


# --- QEMU killed under a client ------------------------------------------------------------------


def _qemu_pid(paths: Paths, sid: str) -> int:
    pid = rows(paths)[sid].pid
    assert pid is not None
    return pid


def _expect_failed(home: Home, target: Target, sb: Sandbox, where: str,
                   err: BaseException | None, problems: list[str]) -> None:
    """The operation raised a clear error, the sandbox is reported failed with its reason,
    it holds nothing but its console log, and removing it leaves nothing."""
    paths = home.paths
    if not isinstance(err, GuestError | EmberError):
        problems.append(f"{where}: the operation ended with {err!r}, not a GuestError")
    info = {i.id: i for i in Sandbox.list(paths=paths)}.get(sb.id)
    state = f"{info.state}: {info.error}" if info else "gone"
    COVERED.append(f"{where}: raised {type(err).__name__}: {str(err)[:120]!r}; "
                   f"ember ls: {state}")
    if info is None or info.state != "failed" or not info.error:
        problems.append(f"{where}: the sandbox is not reported failed with a reason ({state})")
    elif not any(w in info.error for w in ("VM", "died", "killed", "exited")):
        problems.append(f"{where}: unclear failure reason {info.error!r}")
    check_leaks(paths, f"{where}, failed sandbox", problems, home.keep(target.id),
                home.snapshots, allow_failed_rows=True)
    sb.kill()
    check_leaks(paths, f"{where}, after kill()", problems, home.keep(target.id),
                home.snapshots)


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def test_kill_qemu_during_exec(home: Home, target: Target) -> None:
    problems: list[str] = []
    for kind in ("booted", "restored"):
        sb = (Sandbox.create("debian-python", timeout=900, paths=home.paths, boot="cold")
              if kind == "booted" else restored(home))
        got: list[str] = []
        p = sb.spawn("for i in $(seq 1 100); do echo line $i; sleep 0.05; done", timeout=None)
        err: BaseException | None = None
        try:
            for chunk in p.output():
                got.append(chunk.text)
                if len(got) == 3:
                    os.kill(_qemu_pid(home.paths, sb.id), signal.SIGKILL)
            p.wait()
        except Exception as e:
            err = e
        _expect_failed(home, target, sb, f"QEMU killed during a streaming exec ({kind})", err,
                       problems)
    finish(problems)


def test_kill_qemu_during_file_write(home: Home, target: Target) -> None:
    problems: list[str] = []
    sb = restored(home)
    data = os.urandom(BIG)
    t, errors = _in_thread(lambda: sb.files.write("/root/big", data))
    time.sleep(0.5)
    os.kill(_qemu_pid(home.paths, sb.id), signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "the write did not end after its VM was killed"
    _expect_failed(home, target, sb, "QEMU killed during a 50 MiB file write",
                   errors[0] if errors else None, problems)
    finish(problems)


def test_kill_qemu_during_file_read(home: Home, target: Target, tmp_path: Path) -> None:
    problems: list[str] = []
    sb = restored(home)
    sb.exec(f"head -c {BIG} /dev/urandom > /root/big").check()
    local = tmp_path / "big"
    partial = tmp_path / ".big.ember-partial"
    t, errors = _in_thread(lambda: sb.files.download("/root/big", local))
    deadline = time.monotonic() + 30
    while not (partial.exists() and partial.stat().st_size > BIG // 8):
        assert t.is_alive() and time.monotonic() < deadline, "the download never progressed"
        time.sleep(0.001)
    os.kill(_qemu_pid(home.paths, sb.id), signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "the download did not end after its VM was killed"
    if partial.exists() or local.exists():
        problems.append("a download cut by the VM's death left a local file behind")
    _expect_failed(home, target, sb, "QEMU killed during a 50 MiB file download",
                   errors[0] if errors else None, problems)
    finish(problems)


def test_kill_qemu_during_snapshot(home: Home, target: Target) -> None:
    paths = home.paths
    problems: list[str] = []
    plan = [(kind, step) for kind in ("booted", "restored")
            for step in ("its staging directory appears", "its device state is being saved")]
    for n, (kind, step) in enumerate(plan):
        sb = (Sandbox.create("debian-python", timeout=900, paths=paths, boot="cold")
              if kind == "booted" else restored(home))
        pid = _qemu_pid(paths, sb.id)
        name = f"kr-qemu-{n}"
        reached = Before(paths).new_staging("state" if "state" in step else "")
        t, errors = _in_thread(functools.partial(sb.snapshot, name))
        deadline = time.monotonic() + 30
        while not reached() and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        assert not t.is_alive(), "the snapshot did not end after its VM was killed"
        where = f"QEMU killed during a snapshot ({kind}) when {step}"
        if not errors:
            problems.append(f"{where}: the snapshot completed before the kill landed")
            with contextlib.suppress(EmberError):
                Sandbox.delete_snapshot(name, paths=paths)
        elif name in snapshot_ids(paths).values():
            problems.append(f"{where}: the failed snapshot {name} was registered")
        _expect_failed(home, target, sb, where, errors[0] if errors else None, problems)
    finish(problems)


# --- the end -------------------------------------------------------------------------------------


def test_nothing_left_at_the_end(home: Home, target: Target) -> None:
    """With the shared sandbox and its snapshot removed, the home holds nothing of this
    module (leaks reported by earlier tests are listed again)."""
    Sandbox.connect(target.id, paths=home.paths).kill()
    Sandbox.delete_snapshot("kr-base", paths=home.paths)
    assert_no_leaks_anywhere(home.paths, keep=home.baseline, keep_snapshots=home.baseline_snaps,
                             settle=8.0, context="the whole module")
