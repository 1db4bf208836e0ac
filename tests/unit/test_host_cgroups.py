"""ember.host cgroups against a fake kernel: cgroup trees laid out in a temporary directory
(cgroup v1 hybrid like the Debian 12 CI host, and pure cgroup v2).

The fake replaces only the I/O edge (:class:`CgroupFS`): it creates control files on mkdir,
moves pids between ``cgroup.procs`` files, enforces the kernel rules the code depends on
(v1 memory <= memory+swap, v2 subtree_control and no-internal-processes, rmdir of a busy
cgroup) and "kills" a process by removing it from every ``cgroup.procs``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ember.host
from ember.errors import BadRequestError, HostError
from ember.host import (
    CgroupError,
    CgroupFS,
    CgroupLimits,
    SandboxCgroup,
    detect_cgroups,
    enter_argv,
    home_key,
    prune,
    sandbox_ids,
    sweep,
)
from ember.host.cgroup_detect import parse_mountinfo, parse_proc_cgroup, parse_proc_cgroups
from ember.host.cgroups import ENTER_FAILED_EXIT

UNLIMITED_V1 = "9223372036854771712"

# The CI host's cgroup mounts (Debian 12, hybrid), and a pure v2 host's.
HOST_MOUNTINFO = """\
22 27 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PROC_CGROUPS = """\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t3\t1\t1
cpu\t1\t1\t1
cpuacct\t2\t1\t1
memory\t4\t15\t1
pids\t8\t1\t1
hugetlb\t0\t1\t1
"""


class FakeKernel(CgroupFS):
    """cgroupfs semantics over plain directories (see the module docstring)."""

    def __init__(self, tmp: Path, mounts: list[tuple[str, int, str]], *, self_cgroup: str,
                 proc_cgroups: str = PROC_CGROUPS, memsw: bool = True,
                 oom_kill_counter: bool = True, cgroup_kill: bool = True,
                 v2_root_controllers: str = "") -> None:
        super().__init__(proc=tmp / "proc")
        self.memsw, self.oom_kill_counter, self.cgroup_kill = memsw, oom_kill_counter, cgroup_kill
        self.mounts: dict[Path, tuple[int, set[str]]] = {}
        self.writes: list[tuple[str, str]] = []
        self.signalled: list[int] = []
        self.immortal: set[int] = set()
        lines = []
        for i, (name, version, opts) in enumerate(mounts):
            mp = tmp / "sys/fs/cgroup" / name
            mp.mkdir(parents=True)
            ctrls = set(opts.split(",")) - {"rw"} if version == 1 else set()
            ctrls = {c for c in ctrls if "=" not in c}
            self.mounts[mp] = (version, ctrls)
            fstype = "cgroup" if version == 1 else "cgroup2"
            lines.append(f"{40 + i} 31 0:{29 + i} / {mp} rw,relatime - {fstype} {fstype} {opts}")
            self._populate(mp)
            if version == 2:
                (mp / "cgroup.controllers").write_text(v2_root_controllers + "\n")
        (tmp / "proc/self").mkdir(parents=True)
        (tmp / "proc/self/mountinfo").write_text("\n".join(lines) + "\n")
        (tmp / "proc/self/cgroup").write_text(self_cgroup)
        (tmp / "proc/cgroups").write_text(proc_cgroups)

    # -- the fake kernel's bookkeeping --

    def _mount(self, path: Path) -> tuple[Path, int, set[str]]:
        for mp, (version, ctrls) in self.mounts.items():
            if path == mp or mp in path.parents:
                return mp, version, ctrls
        raise AssertionError(f"{path} is outside every fake cgroup mount")

    def _enabled(self, path: Path) -> set[str]:
        """Controllers whose files a cgroup has."""
        mp, version, ctrls = self._mount(path)
        if version == 1:
            return ctrls
        if path == mp:
            return set()
        return set((path.parent / "cgroup.subtree_control").read_text().split())

    def _populate(self, path: Path) -> None:
        files = {"cgroup.procs": ""}
        mp, version, _ = self._mount(path)
        enabled = self._enabled(path)
        if version == 2:
            files["cgroup.subtree_control"] = ""
            if path != mp:
                files["cgroup.controllers"] = " ".join(sorted(enabled))
                files["cgroup.freeze"] = "0"
                files["cgroup.events"] = "populated 0\nfrozen 0\n"
                if self.cgroup_kill:
                    files["cgroup.kill"] = ""
        for c in enabled:
            files.update(self._controller_files(version, c))
        for name, text in files.items():
            if not (path / name).exists():
                (path / name).write_text(text)

    def _controller_files(self, version: int, controller: str) -> dict[str, str]:
        oom = "oom_kill_disable 0\nunder_oom 0\n" + ("oom_kill 0\n" if self.oom_kill_counter
                                                       else "")
        table = {
            (1, "cpu"): {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1",
                         "cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n"},
            (1, "memory"): {"memory.limit_in_bytes": UNLIMITED_V1, "memory.usage_in_bytes": "0",
                            "memory.max_usage_in_bytes": "0", "memory.oom_control": oom},
            (1, "pids"): {"pids.max": "max", "pids.current": "0"},
            (2, "cpu"): {"cpu.max": "max 100000", "cpu.stat": "usage_usec 0\nnr_throttled 0\n"},
            (2, "memory"): {"memory.max": "max", "memory.current": "0", "memory.peak": "0",
                            "memory.swap.max": "max",
                            "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"},
            (2, "pids"): {"pids.max": "max", "pids.current": "0"},
            (1, "freezer"): {"freezer.state": "THAWED"},
        }
        files = dict(table.get((version, controller), {}))
        if version == 1 and controller == "memory" and self.memsw:
            files["memory.memsw.limit_in_bytes"] = UNLIMITED_V1
        return files

    def _tree(self, path: Path) -> list[Path]:
        return [Path(d) for d, _, _ in os.walk(path)]

    def _die(self, pid: int) -> None:
        for mp in self.mounts:
            for d in self._tree(mp):
                procs = d / "cgroup.procs"
                pids = procs.read_text().split()
                if str(pid) in pids:
                    procs.write_text("".join(f"{p}\n" for p in pids if p != str(pid)))

    def members(self, path: Path) -> list[int]:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]

    # -- CgroupFS --

    def mkdir(self, path: Path) -> None:
        if path.is_dir():
            return
        os.mkdir(path)  # FileNotFoundError if the parent is gone, as in the kernel
        self._populate(path)

    def rmdir(self, path: Path) -> None:
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such cgroup", str(path))
        if any(p.is_dir() for p in path.iterdir()) or self.members(path):
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        for f in path.iterdir():
            f.unlink()
        path.rmdir()

    def write(self, path: Path, text: str) -> None:
        if not path.is_file():
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        self.writes.append((path.name, text))
        cg, name = path.parent, path.name
        mp, version, _ = self._mount(cg)
        if name == "cgroup.procs":
            if version == 2 and cg != mp and (cg / "cgroup.subtree_control").read_text().split():
                raise OSError(errno.EBUSY, "internal process", str(path))
            pid = int(text)
            for d in self._tree(mp):
                procs = d / "cgroup.procs"
                procs.write_text("".join(f"{p}\n" for p in procs.read_text().split()
                                         if p != str(pid)))
            with path.open("a") as f:
                f.write(f"{pid}\n")
        elif name == "cgroup.subtree_control":
            self._write_subtree_control(mp, cg, text)
        elif name == "cgroup.freeze":  # the fake kernel freezes at once
            path.write_text(text)
            (cg / "cgroup.events").write_text(f"populated 0\nfrozen {text.strip()}\n")
        elif name == "cgroup.kill":
            for d in self._tree(cg):
                for pid in self.members(d):
                    if pid not in self.immortal:
                        self._die(pid)
        elif name == "memory.limit_in_bytes" and self.memsw:
            if _num(text) > _num((cg / "memory.memsw.limit_in_bytes").read_text()):
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            path.write_text(text)
        elif name == "memory.memsw.limit_in_bytes":
            if _num(text) < _num((cg / "memory.limit_in_bytes").read_text()):
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            path.write_text(text)
        else:
            path.write_text(text)

    def _write_subtree_control(self, mp: Path, cg: Path, text: str) -> None:
        offered = set((cg / "cgroup.controllers").read_text().split())
        current = set((cg / "cgroup.subtree_control").read_text().split())
        for token in text.split():
            if token[1:] not in offered:
                raise OSError(errno.ENOENT, "No such file or directory", str(cg))
            if cg != mp and self.members(cg):
                raise OSError(errno.EBUSY, "Device or resource busy", str(cg))
            (current.add if token[0] == "+" else current.discard)(token[1:])
        (cg / "cgroup.subtree_control").write_text(" ".join(sorted(current)))
        for child in cg.iterdir():
            if child.is_dir():
                (child / "cgroup.controllers").write_text(" ".join(sorted(current)))
                self._populate(child)

    def signal_members(self, procs: Path, sig: int) -> None:
        if not procs.exists():
            return
        for pid in self.members(procs.parent):
            self.signalled.append(pid)
            if pid not in self.immortal:
                self._die(pid)


def _num(text: str) -> int:
    value = int(text)
    return 1 << 63 if value < 0 else value


HYBRID_SELF = ("9:name=systemd:/\n8:pids:/\n4:memory:/process_api/abc\n2:cpuacct:/\n"
               "1:cpu:/\n0::/\n")


def hybrid(tmp: Path, *, memsw: bool = True, oom_kill_counter: bool = True) -> FakeKernel:
    mounts = [("cpu", 1, "rw,cpu"), ("cpuacct", 1, "rw,cpuacct"), ("memory", 1, "rw,memory"),
              ("pids", 1, "rw,pids"), ("freezer", 1, "rw,freezer"),
              ("systemd", 1, "rw,name=systemd"), ("unified", 2, "rw")]
    return FakeKernel(tmp, mounts, self_cgroup=HYBRID_SELF, v2_root_controllers="hugetlb",
                      memsw=memsw, oom_kill_counter=oom_kill_counter)


def v2(tmp: Path, controllers: str = "cpuset cpu io memory hugetlb pids", *,
       self_cgroup: str = "0::/\n") -> FakeKernel:
    return FakeKernel(tmp, [("", 2, "rw,nsdelegate")], self_cgroup=self_cgroup,
                      v2_root_controllers=controllers)


def cg_root(tmp: Path) -> Path:
    return tmp / "sys/fs/cgroup"


# -- parsing ------------------------------------------------------------------------------


def test_parse_mountinfo_finds_v1_and_v2_mounts_only() -> None:
    mounts = parse_mountinfo(HOST_MOUNTINFO)
    assert [m.mount_point.name for m in mounts] == [
        "cpu", "cpuacct", "memory", "pids", "systemd", "unified"]
    cpu, *_, systemd, unified = mounts
    assert (cpu.version, cpu.controllers, cpu.name, cpu.read_only) == (
        1, frozenset({"cpu"}), None, False)
    assert (systemd.controllers, systemd.name) == (frozenset(), "systemd")
    assert systemd.key == frozenset({"name=systemd"})
    assert (unified.version, unified.key) == (2, frozenset())


def test_parse_mountinfo_handles_escapes_optional_fields_ro_and_garbage() -> None:
    text = (
        "50 31 0:40 /docker/x /mnt/cg\\040dir/cpu,cpuacct ro,relatime shared:5 master:2 - "
        "cgroup cgroup rw,cpu,cpuacct,xattr,release_agent=/x\n"
        "garbage line\n"
        "51 31 0:41 / /a rw - cgroup2\n"  # truncated
        "52 31 0:42 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
    )
    combined, unified = parse_mountinfo(text)
    assert combined.mount_point == Path("/mnt/cg dir/cpu,cpuacct")
    assert combined.root == "/docker/x"
    assert combined.controllers == frozenset({"cpu", "cpuacct"})
    assert combined.read_only
    assert unified.version == 2 and unified.mount_point == Path("/sys/fs/cgroup")


def test_parse_proc_cgroup_and_proc_cgroups() -> None:
    parsed = parse_proc_cgroup(HYBRID_SELF + "bad\n3:cpu,cpuacct:/a/b\n")
    assert parsed[frozenset({"memory"})] == "/process_api/abc"
    assert parsed[frozenset({"cpu", "cpuacct"})] == "/a/b"
    assert parsed[frozenset({"name=systemd"})] == "/"
    assert parsed[frozenset()] == "/"
    assert parse_proc_cgroups(PROC_CGROUPS + "memory\t0\t1\t0\n")["memory"] is False
    assert parse_proc_cgroups(PROC_CGROUPS)["pids"] is True


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" -:/,\\0123=\nacgmopru")), max_size=300))
def test_parsers_never_raise_on_odd_text(text: str) -> None:
    for m in parse_mountinfo(text):
        assert m.version in (1, 2)
    parse_proc_cgroup(text)
    parse_proc_cgroups(text)


# -- detection ----------------------------------------------------------------------------


def test_detects_hybrid_v1_controllers_at_the_hierarchy_roots(tmp_path: Path) -> None:
    s = detect_cgroups(hybrid(tmp_path))
    root = cg_root(tmp_path)
    assert s.mode == "hybrid" and s.usable and s.anchor == "root"
    for name in ("cpu", "memory", "pids"):
        c = s.controller(name)
        assert (c.usable, c.version, c.parent) == (True, 1, root / name / "ember")
        assert c.detail == f"v1 hierarchy at {root / name}"
    assert any("swap is accounted" in n for n in s.notes)
    assert any("OOM kills are counted" in n for n in s.notes)
    assert "cgroups hybrid; cpu: ok" in s.summary()


def test_anchor_self_nests_under_embers_own_cgroup(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    (cg_root(tmp_path) / "memory/process_api/abc").mkdir(parents=True)
    s = detect_cgroups(fk, anchor="self")
    assert s.controller("memory").parent == cg_root(tmp_path) / "memory/process_api/abc/ember"
    assert s.controller("cpu").parent == cg_root(tmp_path) / "cpu/ember"


def test_detection_notes_old_kernel_and_missing_swap_accounting(tmp_path: Path) -> None:
    s = detect_cgroups(hybrid(tmp_path, memsw=False, oom_kill_counter=False))
    assert any("no swap accounting" in n for n in s.notes)
    assert any("does not count OOM kills" in n for n in s.notes)


def test_detects_v2_and_says_why_a_controller_is_missing(tmp_path: Path) -> None:
    s = detect_cgroups(v2(tmp_path, controllers="cpu memory io"))
    assert s.mode == "v2" and not s.usable
    assert s.controller("cpu").parent == cg_root(tmp_path) / "ember"
    pids = s.controller("pids")
    assert not pids.usable
    assert "does not offer it (cgroup.controllers: cpu io memory)" in pids.detail


def test_v2_anchor_self_in_a_cgroup_with_processes_is_refused(tmp_path: Path) -> None:
    fk = v2(tmp_path, self_cgroup="0::/svc\n")
    fk.mkdir(cg_root(tmp_path) / "svc")
    fk.write(cg_root(tmp_path) / "cgroup.subtree_control", "+cpu +memory +pids")
    fk.write(cg_root(tmp_path) / "svc/cgroup.procs", "4242")
    s = detect_cgroups(fk, anchor="self")
    assert not s.controller("memory").usable
    assert "no-internal-processes" in s.controller("memory").detail


def test_no_cgroups_mounted_and_disabled_controller(tmp_path: Path) -> None:
    fk = FakeKernel(tmp_path, [], self_cgroup="",
                    proc_cgroups=PROC_CGROUPS.replace("memory\t4\t15\t1", "memory\t0\t1\t0"))
    s = detect_cgroups(fk)
    assert s.mode == "none" and not s.usable
    assert "disabled on the kernel command line" in s.controller("memory").detail
    assert "cgroup2 is not mounted" in s.controller("cpu").detail


def test_read_only_v1_mount_is_unusable(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    mi = tmp_path / "proc/self/mountinfo"
    mi.write_text(mi.read_text().replace("rw,relatime - cgroup cgroup rw,pids",
                                         "ro,relatime - cgroup cgroup rw,pids"))
    s = detect_cgroups(fk)
    assert not s.controller("pids").usable
    assert "read-only" in s.controller("pids").detail


# -- limits -------------------------------------------------------------------------------


def test_limits_convert_cpus_to_a_cfs_quota() -> None:
    assert CgroupLimits(cpus=1.0).cpu_quota_us == 100_000
    assert CgroupLimits(cpus=0.25).cpu_quota_us == 25_000
    assert CgroupLimits(cpus=2, cpu_period_us=50_000).cpu_quota_us == 100_000
    assert CgroupLimits().cpu_quota_us is None


@pytest.mark.parametrize("kw", [
    {"cpus": 0.0}, {"cpus": -1.0}, {"cpus": float("nan")}, {"cpus": float("inf")},
    {"cpus": 0.001}, {"cpus": 5000.0}, {"cpus": True}, {"cpus": "1"},
    {"memory_bytes": 0}, {"memory_bytes": 1000}, {"memory_bytes": 1.5e9},
    {"memory_bytes": True}, {"pids_max": 0}, {"pids_max": -5}, {"pids_max": 10**9},
    {"cpu_period_us": 10}, {"cpu_period_us": 10**7},
])
def test_impossible_limits_are_rejected(kw: dict[str, object]) -> None:
    with pytest.raises(BadRequestError):
        CgroupLimits(**kw)  # type: ignore[arg-type]


# -- a sandbox cgroup on v1 ---------------------------------------------------------------


def test_v1_create_is_idempotent_and_makes_one_dir_per_hierarchy(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk)
    assert not cg.exists()
    cg.create()
    cg.create()
    root = cg_root(tmp_path)
    assert cg.paths == tuple(root / c / "ember/k1/sb-1"
                             for c in ("cpu", "memory", "pids", "freezer"))
    assert all(p.is_dir() for p in cg.paths)
    assert cg.path("memory") == root / "memory/ember/k1/sb-1"
    assert not (root / "cpuacct/ember").exists() and not (root / "unified/ember").exists()


def test_v1_apply_writes_cfs_memory_memsw_and_pids(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    cg.apply(CgroupLimits(cpus=1.5, memory_bytes=256 << 20, pids_max=64))
    cpu, mem, pids, _freezer = cg.paths
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "150000"
    assert (mem / "memory.limit_in_bytes").read_text() == str(256 << 20)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(256 << 20)
    assert (pids / "pids.max").read_text() == "64"


def test_v1_memory_limit_can_be_raised_lowered_and_lifted(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    mem = cg.paths[1]
    for value in (64 << 20, 512 << 20, 32 << 20):
        cg.apply(CgroupLimits(memory_bytes=value))
        assert (mem / "memory.limit_in_bytes").read_text() == str(value)
        assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(value)
    cg.apply(CgroupLimits())
    assert (mem / "memory.limit_in_bytes").read_text() == "-1"
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == "-1"
    assert (cg.paths[0] / "cpu.cfs_quota_us").read_text() == "-1"
    assert (cg.paths[2] / "pids.max").read_text() == "max"


def test_v1_without_swap_accounting_sets_only_the_memory_limit(tmp_path: Path) -> None:
    fk = hybrid(tmp_path, memsw=False)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    cg.apply(CgroupLimits(memory_bytes=64 << 20))
    assert (cg.paths[1] / "memory.limit_in_bytes").read_text() == str(64 << 20)


def test_limit_on_an_unusable_controller_is_a_host_error(tmp_path: Path) -> None:
    fk = v2(tmp_path, controllers="cpu memory")
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    cg.apply(CgroupLimits(cpus=1.0, memory_bytes=64 << 20))  # pids left unlimited: fine
    with pytest.raises(CgroupError, match="cannot limit pids") as info:
        cg.apply(CgroupLimits(pids_max=10))
    assert isinstance(info.value, HostError)


def test_add_pid_pids_and_counters_on_v1(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    assert cg.pids() == [] and cg.oom_kills() == 0 and not cg.oom_killed()
    cg.add_pid(4242)
    cg.add_pid(77)
    assert cg.pids() == [77, 4242]
    assert all(fk.members(p) == [4242, 77] for p in cg.paths)
    mem = cg.paths[1]
    (mem / "memory.usage_in_bytes").write_text("1048576\n")
    (mem / "memory.max_usage_in_bytes").write_text("2097152\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (cg.paths[0] / "cpu.stat").write_text("nr_periods 9\nnr_throttled 4\nthrottled_time 7\n")
    st = cg.stats()
    assert st.pids == (77, 4242)
    assert (st.memory_bytes, st.memory_peak_bytes) == (1 << 20, 2 << 20)
    assert (st.oom_kills, st.cpu_throttled_periods) == (2, 4)
    assert cg.oom_killed()
    with pytest.raises(BadRequestError):
        cg.add_pid(0)


def test_old_kernel_reports_oom_kills_as_unknown(tmp_path: Path) -> None:
    fk = hybrid(tmp_path, oom_kill_counter=False)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    assert cg.oom_kills() is None and not cg.oom_killed()


def test_counters_of_a_missing_cgroup_are_none(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk)
    assert cg.stats().pids == () and cg.memory_usage() is None and cg.oom_kills() is None


def test_add_pid_to_a_missing_cgroup_is_a_cgroup_error(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk)
    with pytest.raises(CgroupError, match="moving pid 5"):
        cg.add_pid(5)


# -- a sandbox cgroup on v2 ---------------------------------------------------------------


def test_v2_create_enables_controllers_down_the_chain_and_applies(tmp_path: Path) -> None:
    fk = v2(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    root = cg_root(tmp_path)
    assert cg.paths == (root / "ember/k1/sb-1",)
    for d in (root, root / "ember", root / "ember/k1"):
        assert (d / "cgroup.subtree_control").read_text().split() == ["cpu", "memory", "pids"]
    cg.create()  # idempotent: nothing re-enabled
    assert [w for w in fk.writes if w[0] == "cgroup.subtree_control"] == [
        ("cgroup.subtree_control", "+cpu +memory +pids")] * 3
    cg.apply(CgroupLimits(cpus=0.5, memory_bytes=128 << 20, pids_max=32))
    leaf = cg.paths[0]
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    assert (leaf / "memory.max").read_text() == str(128 << 20)
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert (leaf / "pids.max").read_text() == "32"
    cg.apply(CgroupLimits())
    assert (leaf / "cpu.max").read_text() == "max 100000"
    assert (leaf / "memory.max").read_text() == "max"
    assert (leaf / "memory.swap.max").read_text() == "max"


def test_v2_counters_and_cgroup_kill(tmp_path: Path) -> None:
    fk = v2(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    cg.add_pid(10)
    leaf = cg.paths[0]
    (leaf / "memory.current").write_text("4096\n")
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.memory_usage() == 4096 and cg.oom_kills() == 1
    cg.destroy()
    assert ("cgroup.kill", "1") in fk.writes
    assert fk.signalled == []  # cgroup.kill emptied it: no per-pid signals needed
    assert not leaf.exists()


# -- destroy, sweep, prune ----------------------------------------------------------------


def test_destroy_kills_members_removes_child_cgroups_and_is_idempotent(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    cg.add_pid(100)
    nested = cg.paths[2] / "inner"
    fk.mkdir(nested)
    fk.write(nested / "cgroup.procs", "101")
    cg.destroy()
    assert set(fk.signalled) == {100, 101}
    assert not cg.exists() and not nested.exists()
    assert (cg_root(tmp_path) / "pids/ember/k1").is_dir()  # parents are prune()'s job
    cg.destroy()
    with cg:
        pass  # __exit__ destroys: still fine


def test_destroy_gives_up_on_an_unkillable_process(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    cg.add_pid(666)
    fk.immortal.add(666)
    with pytest.raises(CgroupError, match=r"processes \[666\] are still in its cgroup"):
        cg.destroy(timeout=0.05)
    assert cg.exists()


def test_destroy_never_leaves_the_sandbox_directory(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    s = detect_cgroups(fk)
    a = SandboxCgroup(s, "k1", "sb-a", fs=fk).create()
    b = SandboxCgroup(s, "k1", "sb-b", fs=fk).create()
    b.add_pid(7)
    a.destroy()
    assert b.pids() == [7] and b.exists() and fk.signalled == []


@pytest.mark.parametrize("bad", ["", "..", ".", "a/b", "../../x", "-x", "x" * 65, "a b"])
def test_names_that_could_escape_are_refused(tmp_path: Path, bad: str) -> None:
    s = detect_cgroups(hybrid(tmp_path))
    with pytest.raises(BadRequestError):
        SandboxCgroup(s, "k1", bad)
    with pytest.raises(BadRequestError):
        SandboxCgroup(s, bad, "sb-1")


def test_sweep_removes_only_stale_sandboxes_of_that_home(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    s = detect_cgroups(fk)
    for sid in ("sb-a", "sb-b", "sb-c"):
        SandboxCgroup(s, "k1", sid, fs=fk).create()
    other = SandboxCgroup(s, "k2", "sb-a", fs=fk).create()
    SandboxCgroup(s, "k1", "sb-c", fs=fk).add_pid(55)
    fk.mkdir(cg_root(tmp_path) / "pids/ember/k1/not ours")
    assert sandbox_ids(s, "k1", fs=fk) == {"sb-a", "sb-b", "sb-c"}
    assert sweep(s, "k1", {"sb-b"}, fs=fk) == ["sb-a", "sb-c"]
    assert fk.signalled == [55]
    assert fk.subdirs(cg_root(tmp_path) / "pids/ember/k1") == ["not ours", "sb-b"]
    assert fk.subdirs(cg_root(tmp_path) / "cpu/ember/k1") == ["sb-b"]
    assert other.exists()
    assert sweep(s, "k3", set(), fs=fk) == []


def test_prune_removes_empty_parents_only(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    s = detect_cgroups(fk)
    keep = SandboxCgroup(s, "k1", "sb-a", fs=fk).create()
    SandboxCgroup(s, "k2", "sb-a", fs=fk).create().destroy()
    prune(s, "k2", fs=fk)
    root = cg_root(tmp_path)
    assert not (root / "cpu/ember/k2").exists() and (root / "cpu/ember").is_dir()
    keep.destroy()
    prune(s, "k1", fs=fk)
    assert not any((root / c / "ember").exists() for c in ("cpu", "memory", "pids"))
    prune(s, "k1", fs=fk)  # nothing left: still fine


def test_create_retries_when_a_concurrent_prune_removes_a_parent(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    s = detect_cgroups(fk)
    real_mkdir = fk.mkdir
    raced: list[Path] = []

    def racing_mkdir(path: Path) -> None:
        if path.name == "sb-1" and not raced:
            raced.append(path)
            fk.rmdir(path.parent)  # another ember pruned ember/k1 just now
        real_mkdir(path)

    fk.mkdir = racing_mkdir  # type: ignore[method-assign]
    cg = SandboxCgroup(s, "k1", "sb-1", fs=fk).create()
    assert raced and all(p.is_dir() for p in cg.paths)


def test_nothing_usable_means_create_fails_with_the_reason(tmp_path: Path) -> None:
    fk = FakeKernel(tmp_path, [], self_cgroup="")
    with pytest.raises(CgroupError, match="no cgroup controller is usable"):
        SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()


# -- entering the cgroup: the wrapper -----------------------------------------------------


def test_enter_argv_shape_keeps_everything_positional() -> None:
    argv = enter_argv([Path("/cg/a/cgroup.procs"), Path("/cg/b/cgroup.procs")],
                      ["/usr/bin/qemu", "-name", "x; rm -rf /"])
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[3:] == ["ember-cgroup-enter", "/cg/a/cgroup.procs", "/cg/b/cgroup.procs",
                        "--", "/usr/bin/qemu", "-name", "x; rm -rf /"]
    assert "qemu" not in argv[2] and "/cg/" not in argv[2]
    with pytest.raises(BadRequestError):
        enter_argv([Path("/cg/cgroup.procs")], [])
    with pytest.raises(BadRequestError):
        enter_argv([Path("relative/cgroup.procs")], ["/bin/true"])


def test_wrapper_writes_its_own_pid_then_execs_with_args_verbatim(tmp_path: Path) -> None:
    """Runs the wrapper for real against plain files standing in for cgroup.procs: the pid
    written must be the pid of the program it then execs (exec keeps the pid)."""
    odd = tmp_path / "we ird $(touch pwned) `x` 'q\"\n"
    odd.mkdir()
    files = [tmp_path / "a.procs", odd / "b.procs"]
    for f in files:
        f.write_text("")
    tricky = ["$(touch pwned)", "a b", "", "--", "'\"\\", "\n;|&", "-c"]
    script = "import json, os, sys; print(json.dumps([os.getpid(), sys.argv[1:]]))"
    out = subprocess.run(enter_argv(files, ["python3", "-c", script, *tricky]),
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    pid, args = json.loads(out.stdout)
    assert args == tricky
    assert [f.read_text() for f in files] == [f"{pid}\n"] * 2
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_wrapper_fails_with_125_and_never_runs_the_program_if_it_cannot_join(
        tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    argv = enter_argv([tmp_path / "missing/cgroup.procs"], ["/usr/bin/touch", str(marker)])
    cp = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert cp.returncode == ENTER_FAILED_EXIT
    assert "ember: cannot join cgroup" in cp.stderr
    assert not marker.exists()


def test_wrap_argv_uses_every_hierarchy(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk)
    argv = cg.wrap_argv(["/bin/true"])
    assert argv[4:-2] == [str(p / "cgroup.procs") for p in cg.paths]


# -- misc ---------------------------------------------------------------------------------


def test_home_key_matches_the_ram_directory_key() -> None:
    home = Path("/var/lib/ember")
    assert home_key(home) == hashlib.sha256(b"/var/lib/ember").hexdigest()[:12]
    assert home_key(Path("/tmp/et-1")) != home_key(home)


def test_host_exports_are_pinned() -> None:
    assert sorted(ember.host.__all__) == [
        "CgroupError", "CgroupFS", "CgroupLimits", "CgroupStats", "CgroupSupport",
        "ControllerStatus", "SandboxCgroup", "detect_cgroups", "enter_argv", "home_key",
        "prune", "sandbox_ids", "sweep",
    ]
    for name in ember.host.__all__:
        assert getattr(ember.host, name) is not None


def test_v1_memory_limit_below_unreclaimable_usage_is_reported_as_such(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    real_write = fk.write

    def busy_write(path: Path, text: str) -> None:
        if path.name == "memory.limit_in_bytes":
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        real_write(path, text)

    fk.write = busy_write  # type: ignore[method-assign]
    with pytest.raises(CgroupError, match=r"memory\.limit_in_bytes.*Device or resource busy"):
        cg.apply(CgroupLimits(memory_bytes=8 << 20))
    assert (cg.paths[1] / "memory.memsw.limit_in_bytes").read_text() == UNLIMITED_V1


# -- the freezer (pause of a crun container) ---------------------------------------------


def test_v1_freezer_freezes_thaws_and_is_thawed_before_a_destroy(tmp_path: Path) -> None:
    fk = hybrid(tmp_path)
    support = detect_cgroups(fk)
    assert support.freezer is not None and support.freezer.version == 1
    cg = SandboxCgroup(support, "k1", "sb-1", fs=fk).create()
    state = cg_root(tmp_path) / "freezer/ember/k1/sb-1/freezer.state"
    assert cg.can_freeze and not cg.frozen()
    cg.freeze()
    assert state.read_text() == "FROZEN" and cg.frozen()
    cg.thaw()
    assert state.read_text() == "THAWED" and not cg.frozen()
    cg.add_pid(4242)
    cg.freeze()
    fk.writes.clear()
    cg.destroy()
    assert fk.writes[0] == ("freezer.state", "THAWED")  # SIGKILL waits for a thaw on v1
    assert not cg.exists()


def test_v2_freezer_is_core_and_never_enabled_as_a_controller(tmp_path: Path) -> None:
    fk = v2(tmp_path)
    support = detect_cgroups(fk)
    assert support.freezer is not None and support.freezer.usable
    assert support.freezer.version == 2 and "cgroup.freeze" in support.freezer.detail
    cg = SandboxCgroup(support, "k1", "sb-1", fs=fk).create()
    assert all("freezer" not in text for name, text in fk.writes
               if name == "cgroup.subtree_control")
    cg.freeze()
    assert ("cgroup.freeze", "1") in fk.writes and cg.frozen()
    cg.thaw()
    assert not cg.frozen()
    cg.destroy()
    assert not cg.exists()


def test_without_a_freezer_freeze_is_a_cgroup_error_naming_why(tmp_path: Path) -> None:
    fk = FakeKernel(tmp_path, [("cpu", 1, "rw,cpu"), ("memory", 1, "rw,memory"),
                               ("pids", 1, "rw,pids")],
                    self_cgroup="8:pids:/\n4:memory:/\n1:cpu:/\n")
    support = detect_cgroups(fk)
    assert support.freezer is not None and not support.freezer.usable
    cg = SandboxCgroup(support, "k1", "sb-1", fs=fk).create()
    assert not cg.can_freeze
    with pytest.raises(CgroupError, match="no usable freezer"):
        cg.freeze()
    cg.destroy()


def test_a_cgroup_going_while_its_members_are_read_has_none(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    fk = hybrid(tmp_path)
    cg = SandboxCgroup(detect_cgroups(fk), "k1", "sb-1", fs=fk).create()
    cg.add_pid(4242)

    def going(path: Path) -> str:  # cgroup v1: the file of a cgroup being removed
        raise OSError(errno.ENODEV, "No such device", str(path))

    monkeypatch.setattr(fk, "read", going)
    assert cg.pids() == []
