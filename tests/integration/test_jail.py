"""The jail and cgroup of a real sandbox's QEMU, inspected from the host through /proc."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ember import Sandbox
from ember.host.cgroups import home_key
from ember.host.ids import IdRange
from ember.host.jail import Bind, JailError, JailSpec, launch
from ember.host.kvm_access import kvm_access
from ember.paths import Paths
from ember.runtime.confinement import PIDS_MAX, limits_for
from ember.sdk.async_sandbox import manager

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root")


@pytest.fixture(scope="module")
def jailed(ember_paths: Paths, debian_template):  # type: ignore[no-untyped-def]
    sb = Sandbox.create("debian-python", vcpus=2, memory_mib=320, timeout=900, paths=ember_paths)
    yield sb
    sb.kill()


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _pid(ember_paths: Paths, sb: Sandbox) -> int:
    pid = manager(ember_paths).get(sb.id).pid
    assert pid is not None
    return pid


def test_qemu_runs_as_an_unprivileged_uid_of_the_range(ember_paths: Paths, jailed) -> None:  # type: ignore[no-untyped-def]
    st = _status(_pid(ember_paths, jailed))
    uids = {int(x) for x in st["Uid"].split()}
    gids = {int(x) for x in st["Gid"].split()}
    rng = IdRange.from_env()
    assert len(uids) == 1 and rng.first <= min(uids) <= rng.last, st["Uid"]
    assert gids == uids
    # No supplementary group, but under KVM exactly /dev/kvm's group (issue 17).
    kvm = manager(ember_paths).get(jailed.id).accel == "kvm"
    assert st["Groups"].split() == [str(g) for g in (kvm_access().groups if kvm else ())]
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[cap], 16) == 0, (cap, st[cap])
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # QEMU's -sandbox filter
    # no transparent huge pages under TCG (its code cache), the host's choice under KVM
    # (what this process has: 0 on a kernel built without them)
    assert st["THP_enabled"] == (_status(os.getpid())["THP_enabled"] if kvm else "0")


def test_two_sandboxes_get_different_uids(ember_paths: Paths, jailed) -> None:  # type: ignore[no-untyped-def]
    with Sandbox.create("debian-python", timeout=300, paths=ember_paths) as other:
        a = _status(_pid(ember_paths, jailed))["Uid"].split()[0]
        b = _status(_pid(ember_paths, other))["Uid"].split()[0]
        assert a != b


def test_qemu_has_its_own_namespaces(ember_paths: Paths, jailed) -> None:  # type: ignore[no-untyped-def]
    pid = _pid(ember_paths, jailed)
    for ns in ("mnt", "pid", "ipc", "uts", "net", "cgroup"):
        mine = os.readlink(f"/proc/self/ns/{ns}")
        theirs = os.readlink(f"/proc/{pid}/ns/{ns}")
        assert mine != theirs, f"QEMU shares the host's {ns} namespace"
    # pid 1 of its own pid namespace: it sees no other process
    assert _status(pid)["NSpid"].split()[-1] == "1"
    # the network namespace has no interface but loopback
    dev = Path(f"/proc/{pid}/net/dev").read_text()
    ifaces = [ln.split(":")[0].strip() for ln in dev.splitlines()[2:]]
    assert ifaces == ["lo"], ifaces


def test_qemu_root_holds_only_its_own_files(ember_paths: Paths, jailed) -> None:  # type: ignore[no-untyped-def]
    pid = _pid(ember_paths, jailed)
    root = Path(f"/proc/{pid}/root")
    seen = sorted(p.name for p in root.iterdir())
    assert "etc" in seen and "usr" in seen and "proc" not in seen and "home" not in seen
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["ld.so.cache"]
    assert not (root / "root").exists() and not (root / "tmp" / ".X11-unix").exists()
    # the sandbox directory inside shows only what QEMU needs, not the client lock
    sdir = Path(manager(ember_paths).get(jailed.id).dir)
    inside = sorted(p.name for p in (root / str(sdir).lstrip("/")).iterdir())
    assert inside == ["console.log", "overlay.qcow2", "vm"], inside
    # no other sandbox's directory and no other home file is visible
    assert sorted(p.name for p in (root / str(sdir.parent).lstrip("/")).iterdir()) == [sdir.name]
    assert not (root / str(ember_paths.db).lstrip("/")).exists()


def test_qemu_inherits_no_stray_descriptors(ember_paths: Paths, jailed) -> None:  # type: ignore[no-untyped-def]
    pid = _pid(ember_paths, jailed)
    sdir = manager(ember_paths).get(jailed.id).dir
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    files = [t for t in targets if t.startswith("/")]
    allowed = ("/dev/null", "/dev/urandom", sdir, str(ember_paths.ram), "/var/lib/ember/cache",
               os.environ.get("EMBER_CACHE", "/var/lib/ember/cache"))
    stray = [t for t in files if not t.startswith(allowed)]
    assert stray == [], stray
    assert all(t.startswith(("socket:", "anon_inode:", "/", "pipe:")) for t in targets)


def test_rlimits_and_cgroup_limits_match_the_sandbox(ember_paths: Paths, jailed) -> None:  # type: ignore[no-untyped-def]
    pid = _pid(ember_paths, jailed)
    rec = manager(ember_paths).get(jailed.id)
    want = limits_for(rec)
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert "Max core file size        0" in limits
    fsize = next(ln for ln in limits.splitlines() if ln.startswith("Max file size"))
    assert str(want.fsize_mib << 20) in fsize
    cg = Path(f"/proc/{pid}/cgroup").read_text()
    key = home_key(ember_paths.home)
    assert f"/ember/{key}/{rec.id}" in cg, cg
    mgr = manager(ember_paths)
    group = mgr.confinement.cgroup(rec.id)
    assert group is not None and pid in group.pids()
    cpu = group.path("cpu")
    if cpu is not None and (cpu / "cpu.cfs_quota_us").exists():
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 2 * int(
            (cpu / "cpu.cfs_period_us").read_text())
    mem = group.path("memory")
    if mem is not None and (mem / "memory.limit_in_bytes").exists():
        assert int((mem / "memory.limit_in_bytes").read_text()) == want.memory_mib << 20
    pids = group.path("pids")
    if pids is not None:
        assert (pids / "pids.max").read_text().strip() == str(PIDS_MAX)


def test_guest_still_works_under_the_jail(jailed) -> None:  # type: ignore[no-untyped-def]
    r = jailed.exec("nproc; awk '/MemTotal/ {print $2}' /proc/meminfo")
    cpus, mem_kib = r.stdout.split()
    assert int(cpus) == 2
    assert 0.85 * 320 * 1024 < int(mem_kib) <= 320 * 1024


def test_oom_kills_only_that_sandbox_and_is_reported(ember_paths: Paths, debian_template,
                                                    jailed) -> None:  # type: ignore[no-untyped-def]
    victim = Sandbox.create("debian-python", memory_mib=512, timeout=300, paths=ember_paths)
    mgr = manager(ember_paths)
    group = mgr.confinement.cgroup(victim.id)
    mem = group.path("memory") if group else None
    if mem is None or not (mem / "memory.limit_in_bytes").exists():
        victim.kill()
        pytest.skip("no cgroup v1 memory controller on this host")
    # Squeeze the VMM's host memory below what the guest is about to touch.
    usage = int((mem / "memory.usage_in_bytes").read_text())
    limit = usage + (64 << 20)
    memsw = mem / "memory.memsw.limit_in_bytes"
    (mem / "memory.limit_in_bytes").write_text(str(limit))
    if memsw.exists():
        memsw.write_text(str(limit))
    with pytest.raises(Exception):  # noqa: B017 - the guest dies under us: any client error
        victim.exec("python3 -c \"b = bytearray(400 << 20); [b.__setitem__(i, 1) for i in "
                    "range(0, len(b), 4096)]\"", timeout=120)
    deadline = time.monotonic() + 20
    while True:
        rec = mgr.get(victim.id)
        if rec.state == "failed" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rec.state == "failed", rec
    assert "out of memory" in (rec.error or ""), rec.error
    assert jailed.exec("echo alive").stdout == "alive\n"  # the neighbour is untouched
    mgr.destroy(victim.id)
    assert not group.exists()  # type: ignore[union-attr]


def test_a_bind_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    spec = JailSpec(uid=2_000_065_000, gid=2_000_065_000, hostname="t", root=tmp_path / "r",
                    log=tmp_path / "log", binds=(Bind(tmp_path / "missing"),))
    with pytest.raises(JailError, match="missing does not exist"):
        launch(spec, ["/bin/true"])


def test_a_jail_can_turn_transparent_huge_pages_off(tmp_path: Path) -> None:
    host = _status(os.getpid())["THP_enabled"]  # 0 where the kernel has none
    for no_thp, want in ((True, "0"), (False, host)):
        spec = JailSpec(uid=2_000_065_002, gid=2_000_065_002, hostname="t",
                        root=tmp_path / f"r{no_thp}", log=tmp_path / "log", no_thp=no_thp)
        pid = launch(spec, ["/usr/bin/sleep", "5"])
        try:
            assert _status(pid)["THP_enabled"] == want, no_thp
        finally:
            os.kill(pid, 9)


def test_a_failing_jailed_program_leaves_no_process(tmp_path: Path) -> None:
    spec = JailSpec(uid=2_000_065_001, gid=2_000_065_001, hostname="t", root=tmp_path / "r",
                    log=tmp_path / "log")
    with pytest.raises(JailError, match="No such file"):
        launch(spec, ["/usr/bin/does-not-exist"])
    pid = launch(spec, ["/usr/bin/sleep", "0.1"])
    time.sleep(0.5)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
