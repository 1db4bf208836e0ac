"""Sandbox cgroups on the real host (root, and cpu + memory + pids controllers usable).

Every test gets its own home key (a hash of its tmp dir), so runs never collide; the fixture
kills and removes everything it made even when a test fails, then checks that no cgroup of
that key is left in any hierarchy.
"""

from __future__ import annotations

import glob
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from ember.host import (
    CgroupLimits,
    CgroupSupport,
    SandboxCgroup,
    detect_cgroups,
    home_key,
    prune,
    sweep,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20
SLEEPER = "/bin/sleep"


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(") ", 1)[1][0] != "Z"


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class Harness:
    def __init__(self, support: CgroupSupport, key: str) -> None:
        self.support, self.key = support, key
        self.made: list[SandboxCgroup] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def cgroup(self, sandbox_id: str = "sb-1", limits: CgroupLimits | None = None
               ) -> SandboxCgroup:
        cg = SandboxCgroup(self.support, self.key, sandbox_id)
        self.made.append(cg)
        cg.create()
        if limits is not None:
            cg.apply(limits)
        return cg

    def start(self, argv: list[str], *, stdout: int | IO[bytes] | None = None,
              stderr: int | None = None) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        self.procs.append(p)
        return p

    def leftovers(self) -> list[str]:
        parents = {c.parent for c in self.support.controllers if c.parent is not None}
        return sorted(str(p / self.key) for p in parents if (p / self.key).exists())


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Harness]:
    support = detect_cgroups()
    if os.geteuid() != 0:
        pytest.skip("cgroup tests need root")
    if not support.usable:
        pytest.skip(f"cgroups not usable here: {support.summary()}")
    h = Harness(support, home_key(tmp_path))
    try:
        yield h
    finally:
        errors = []
        for cg in h.made:
            try:
                cg.destroy()
            except Exception as err:
                errors.append(err)
        sweep(support, h.key, set())
        prune(support, h.key)
        for p in h.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=5)
        left = h.leftovers()
        assert not errors, errors
        assert not left, f"cgroups left behind: {left}"


def read(cg: SandboxCgroup, controller: str, name: str) -> str:
    path = cg.path(controller)
    assert path is not None
    return (path / name).read_text().strip()


def cgroup_lines(pid: int) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controllers: path}."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        out[ctrls] = path
    return out


def test_host_offers_cpu_memory_and_pids(host: Harness) -> None:
    s = host.support
    assert s.mode in ("v1", "hybrid", "v2")
    for c in s.controllers:
        assert c.usable and c.parent is not None and c.parent.name == "ember", c
        assert c.parent.parent.is_dir()


def test_limits_read_back_and_the_program_starts_inside(host: Harness) -> None:
    cg = host.cgroup(limits=CgroupLimits(cpus=0.5, memory_bytes=64 * MiB, pids_max=32))
    v1 = host.support.controller("cpu").version == 1
    if v1:
        assert read(cg, "cpu", "cpu.cfs_period_us") == "100000"
        assert read(cg, "cpu", "cpu.cfs_quota_us") == "50000"
        assert read(cg, "memory", "memory.limit_in_bytes") == str(64 * MiB)
    else:
        assert read(cg, "cpu", "cpu.max") == "50000 100000"
        assert read(cg, "memory", "memory.max") == str(64 * MiB)
    assert read(cg, "pids", "pids.max") == "32"

    # The exec'd program's very first action reads its own cgroup: it is already inside.
    out = subprocess.run(cg.wrap_argv(["/bin/cat", "/proc/self/cgroup"]), check=True,
                         capture_output=True, text=True).stdout
    rel = f"/ember/{host.key}/sb-1"
    mine = [line for line in out.splitlines() if line.endswith(rel)]
    assert len(mine) == len(cg.paths), out


def test_a_forking_program_and_its_child_are_inside(host: Harness) -> None:
    cg = host.cgroup(limits=CgroupLimits(pids_max=16))
    p = host.start(cg.wrap_argv(["/bin/sh", "-c", f"{SLEEPER} 30 & exec {SLEEPER} 31"]))
    assert wait_for(lambda: len(cg.pids()) == 2), cg.pids()
    assert p.pid in cg.pids()
    for pid in cg.pids():
        assert sum(v.endswith(f"/ember/{host.key}/sb-1")
                   for v in cgroup_lines(pid).values()) == len(cg.paths)
        assert all(str(pid) in (path / "cgroup.procs").read_text().split() for path in cg.paths)
    child = next(pid for pid in cg.pids() if pid != p.pid)
    cg.destroy()
    assert p.wait(timeout=5) == -9
    assert wait_for(lambda: not _alive(child))
    assert not cg.exists()


def test_a_daemonized_grandchild_stays_inside_and_dies_with_the_cgroup(host: Harness) -> None:
    """What QEMU's -daemonize does: fork, setsid, fork again, the launcher exits."""
    cg = host.cgroup()
    daemon = ("import os, time\n"
              "if os.fork(): os._exit(0)\n"
              "os.setsid()\n"
              "if os.fork(): os._exit(0)\n"
              "time.sleep(30)\n")
    p = host.start(cg.wrap_argv(["/usr/bin/python3", "-c", daemon]),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert p.wait(timeout=10) == 0
    assert wait_for(lambda: len(cg.pids()) == 1), cg.pids()
    (daemon_pid,) = cg.pids()
    assert daemon_pid != p.pid and _alive(daemon_pid)
    cg.destroy()
    assert wait_for(lambda: not _alive(daemon_pid))


def test_add_pid_moves_a_running_process(host: Harness) -> None:
    cg = host.cgroup()
    p = host.start([SLEEPER, "30"])
    cg.add_pid(p.pid)
    assert cg.pids() == [p.pid]
    assert sum(v.endswith(f"/ember/{host.key}/sb-1")
               for v in cgroup_lines(p.pid).values()) == len(cg.paths)


def test_memory_hog_is_oom_killed_and_reported(host: Harness) -> None:
    cg = host.cgroup(limits=CgroupLimits(memory_bytes=32 * MiB))
    assert cg.oom_kills() == 0 and not cg.oom_killed()
    hog = "chunks = []\nwhile True:\n    chunks.append(b'\\x01' * (1 << 20))\n"
    p = host.start(cg.wrap_argv(["/usr/bin/python3", "-c", hog]), stderr=subprocess.DEVNULL)
    assert p.wait(timeout=15) == -9
    assert cg.oom_killed()
    assert (cg.oom_kills() or 0) >= 1
    peak = cg.memory_peak()
    assert peak is not None and peak <= 32 * MiB


def test_pids_max_stops_a_fork_loop(host: Harness, tmp_path: Path) -> None:
    cg = host.cgroup(limits=CgroupLimits(pids_max=8))
    forker = ("import errno, os, time\n"
              "n, err = 0, None\n"
              "for _ in range(40):\n"
              "    try:\n"
              "        pid = os.fork()\n"
              "    except OSError as e:\n"
              "        err = errno.errorcode[e.errno]\n"
              "        break\n"
              "    if pid == 0:\n"
              "        time.sleep(30)\n"
              "        os._exit(0)\n"
              "    n += 1\n"
              "print(n, err, flush=True)\n")
    out = tmp_path / "forker.out"
    with out.open("wb") as f:
        p = host.start(cg.wrap_argv(["/usr/bin/python3", "-c", forker]), stdout=f)
        assert p.wait(timeout=10) == 0
    forked, err = out.read_text().split()
    assert err == "EAGAIN"
    assert int(forked) == 7  # pids.max counts the parent: 1 + 7 = 8
    children = cg.pids()
    assert len(children) == 7
    cg.destroy()
    assert wait_for(lambda: not any(_alive(pid) for pid in children))


def test_cpu_quota_throttles_a_busy_loop(host: Harness) -> None:
    cg = host.cgroup(limits=CgroupLimits(cpus=0.1))
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.1: pass\n"
    p = host.start(cg.wrap_argv(["/usr/bin/python3", "-c", busy]))
    assert p.wait(timeout=15) == 0
    assert (cg.cpu_throttled_periods() or 0) > 0


def test_destroy_kills_everything_and_leaves_no_directories(host: Harness) -> None:
    cg = host.cgroup(limits=CgroupLimits(pids_max=64))
    script = f"for i in 1 2 3 4 5; do {SLEEPER} 30 & done; exec {SLEEPER} 30"
    host.start(cg.wrap_argv(["/bin/sh", "-c", script]))
    assert wait_for(lambda: len(cg.pids()) == 6), cg.pids()
    pids = cg.pids()
    cg.destroy()
    assert wait_for(lambda: not any(_alive(pid) for pid in pids))
    assert not any(p.exists() for p in cg.paths)
    cg.destroy()  # idempotent
    prune(host.support, host.key)
    assert glob.glob(f"/sys/fs/cgroup/*/ember/{host.key}") == []
    assert glob.glob(f"/sys/fs/cgroup/ember/{host.key}") == []


def test_sweep_recovers_leaked_cgroups(host: Harness) -> None:
    keep = host.cgroup("sb-keep")
    leaked = [host.cgroup(f"sb-leak{i}") for i in range(2)]
    for cg in (keep, *leaked):
        host.start(cg.wrap_argv([SLEEPER, "30"]))
    assert wait_for(lambda: all(len(cg.pids()) == 1 for cg in (keep, *leaked)))
    victims = [pid for cg in leaked for pid in cg.pids()]
    assert sweep(host.support, host.key, {"sb-keep"}) == ["sb-leak0", "sb-leak1"]
    assert wait_for(lambda: not any(_alive(pid) for pid in victims))
    assert not any(cg.exists() for cg in leaked)
    assert keep.exists() and len(keep.pids()) == 1
