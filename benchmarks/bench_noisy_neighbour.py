"""Noisy neighbour: how much a hostile sandbox A slows down sandbox B on the same host.

B's exec round trip (`sb.exec("true")`, median of --reps calls) is measured side by side in
one run: while a freshly booted A sits idle, then while A runs a hostile workload, for each
workload in turn (A destroyed after each, a fresh A for the next; the idle baselines
bracket every workload, and the ratio is loaded / mean of the idle medians around it):

- fork bomb: bash's `:(){ :|:& };:` as root, bounded only by the guest kernel (pid_max,
  memory);
- memory hog: Python allocating and touching memory until the guest OOM-kills it, restarted
  in a loop (oom_score_adj 1000, so the guest kills the hog and not the agent);
- disk filler: `dd` of zeros with O_DIRECT until ENOSPC, then remove and refill, in a loop;
- CPU spinner: one shell busy loop per guest vCPU.

Before B is measured under load, A's workload must be seen running from the host: A's QEMU
process burns CPU time (and, for the memory hog, A's guest RAM file on /dev/shm fills up;
for the disk filler, A's overlay grows). The target is loaded / idle <= 2.0.

Runs in a private ember home (temp dir) that shares the kernel/image cache of EMBER_HOME,
so that no warm pool is used and nothing is left behind.

    .venv/bin/python benchmarks/bench_noisy_neighbour.py [--reps 20] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ember import Sandbox
from ember.paths import Paths
from ember.sdk.async_sandbox import manager
from ember.store import Store

TEMPLATE = "debian-python"
TARGET_RATIO = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

FORK_BOMB = ["bash", "-c", "exec >/dev/null 2>&1; :(){ :|:& };:; exec sleep 1000000"]

MEMORY_HOG_PY = """
try:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
except OSError:
    pass
CHUNK, PAGE = 16 << 20, 4096
pages = len(range(0, CHUNK, PAGE))
chunks = []
while True:
    try:
        b = bytearray(CHUNK)
    except MemoryError:
        break
    b[::PAGE] = b"\\x01" * pages
    chunks.append(b)
n = 0
while True:
    n = (n + 1) & 255
    v = bytes([n]) * pages
    for b in chunks:
        b[::PAGE] = v
"""
MEMORY_HOG = ["sh", "-c", 'while :; do python3 -c "$0"; done', MEMORY_HOG_PY]

DISK_FILLER = ["sh", "-c", "while :; do dd if=/dev/zero of=/fill bs=1M oflag=direct "
               "2>/dev/null; sync; rm -f /fill; sync; done"]

CPU_SPINNER = ["sh", "-c", "for i in $(seq $(nproc)); do sh -c 'while :; do :; done' & done; "
               "wait"]

WORKLOADS: dict[str, list[str]] = {
    "fork bomb": FORK_BOMB,
    "memory hog": MEMORY_HOG,
    "disk filler": DISK_FILLER,
    "cpu spinner": CPU_SPINNER,
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- host-side observation of a sandbox's QEMU -------------------------------------------


@dataclass
class Probe:
    """Host-side view of one sandbox: its QEMU process, guest RAM file and disk overlay."""

    pid: int
    ram_file: Path
    overlay: Path

    @classmethod
    def of(cls, paths: Paths, sb: Sandbox) -> Probe:
        mgr = manager(paths)
        rec = mgr.store.get_sandbox(sb.id)
        return cls(pid=qemu_pid(sb.id, rec.pid), ram_file=mgr.ram_file(sb.id),
                   overlay=Path(rec.dir) / "overlay.qcow2")

    def confinement(self) -> str:
        """Who A's QEMU runs as and in which CPU cgroup (host-side limits, if any)."""
        uid, cgroup = "?", "?"
        with contextlib.suppress(OSError, IndexError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("Uid:"):
                    uid = line.split()[1]
            for line in Path(f"/proc/{self.pid}/cgroup").read_text().splitlines():
                _, controllers, path = line.split(":", 2)
                if "cpu" in controllers.split(",") or controllers == "":
                    cgroup = path
                    if controllers:
                        break
        return f"uid {uid}, cpu cgroup {cgroup}"

    def cpu_s(self) -> float:
        """User + system CPU seconds of the QEMU process (all its threads)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def alive(self) -> bool:
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(") ", 1)[1][0]
        except OSError:
            return False
        return state != "Z"

    def ram_mib(self) -> float:
        """Guest RAM the guest has touched (allocated pages of its tmpfs RAM file)."""
        try:
            return self.ram_file.stat().st_blocks * 512 / (1 << 20)
        except OSError:
            return 0.0

    def overlay_mib(self) -> float:
        try:
            return self.overlay.stat().st_blocks * 512 / (1 << 20)
        except OSError:
            return 0.0


def _argv(pid: int | str) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def qemu_pid(sandbox_id: str, recorded: int | None) -> int:
    """The sandbox's QEMU process: the registry's pid, or (should it record a wrapper such
    as a jailer) the one QEMU process named after the sandbox."""
    def is_it(argv: list[bytes]) -> bool:
        return bool(argv) and os.path.basename(argv[0]).startswith(b"qemu-system") and \
            f"guest={sandbox_id}".encode() in argv

    if recorded is not None and is_it(_argv(recorded)):
        return recorded
    found = [int(d.name) for d in Path("/proc").iterdir()
             if d.name.isdigit() and is_it(_argv(d.name))]
    if len(found) != 1:
        raise RuntimeError(f"{sandbox_id}: QEMU process not found (recorded pid {recorded}, "
                           f"candidates {found})")
    return found[0]


def cpu_rate(probe: Probe, seconds: float) -> float:
    """CPUs' worth of time A's QEMU uses over ``seconds``."""
    c0, t0 = probe.cpu_s(), time.monotonic()
    time.sleep(seconds)
    return (probe.cpu_s() - c0) / (time.monotonic() - t0)


# --- measurements -------------------------------------------------------------------------


@dataclass
class Window:
    label: str
    latencies_ms: list[float]
    median_ms: float
    p90_ms: float
    a_cpu: float | None  # CPUs' worth of time A's QEMU used during the window (None: gone)
    a_ram_mib: float
    a_overlay_mib: float


def fmt_cpu(cpus: float | None) -> str:
    return "gone" if cpus is None else f"{cpus:.2f} CPUs"


def measure_b(b: Sandbox, reps: int, a: Probe, label: str) -> Window:
    for _ in range(3):  # warm-up, not counted
        b.exec("true", timeout=300)
    c0, t0 = a.cpu_s(), time.monotonic()
    lat = []
    for _ in range(reps):
        s = time.perf_counter()
        r = b.exec("true", timeout=300)
        lat.append((time.perf_counter() - s) * 1000)
        if r.exit_code != 0:
            raise RuntimeError(f"B: exec true failed: {r}")
    a_cpu = (a.cpu_s() - c0) / (time.monotonic() - t0) if a.alive() else None
    q = sorted(lat)
    return Window(label=label, latencies_ms=[round(x, 2) for x in lat],
                  median_ms=statistics.median(lat),
                  p90_ms=q[min(len(q) - 1, round(0.9 * (len(q) - 1)))], a_cpu=a_cpu,
                  a_ram_mib=a.ram_mib(), a_overlay_mib=a.overlay_mib())


def wait_running(name: str, a: Probe, a_vcpus: int, memory_mib: int, overlay0: float,
                 deadline_s: float) -> tuple[bool, str]:
    """Wait until the host sees A's workload running; the evidence as text."""
    checks: dict[str, Callable[[float], bool]] = {
        "fork bomb": lambda rate: rate >= 0.5,
        "memory hog": lambda rate: rate >= 0.3 and a.ram_mib() >= 0.85 * memory_mib,
        "disk filler": lambda rate: rate >= 0.3 and a.overlay_mib() - overlay0 >= 64,
        "cpu spinner": lambda rate: rate >= 0.8 * a_vcpus,
    }
    t0 = time.monotonic()
    evidence = ""
    while time.monotonic() - t0 < deadline_s:
        if not a.alive():
            return False, "A's QEMU is gone"
        rate = cpu_rate(a, 2.0)
        evidence = (f"A's QEMU {rate:.2f} CPUs, guest RAM touched {a.ram_mib():.0f}/"
                    f"{memory_mib} MiB, overlay +{a.overlay_mib() - overlay0:.0f} MiB, "
                    f"after {time.monotonic() - t0:.0f} s; {a.confinement()}")
        if checks[name](rate):
            return True, evidence
    return False, "not seen running: " + evidence


# --- the run ------------------------------------------------------------------------------


@dataclass
class Result:
    workload: str
    running: bool
    evidence: str
    loaded: Window | None
    idle_before: Window
    idle_after: Window | None = None
    ratio: float | None = None
    passed: bool | None = None
    stopped: str = ""


@dataclass
class Run:
    host: dict[str, Any]
    config: dict[str, Any]
    idle: list[Window] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    host_at_end: dict[str, Any] = field(default_factory=dict)


def host_details(paths: Paths) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    accel = manager(paths).accel
    others = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes()
                if b"qemu-system" in cmd and str(paths.home).encode() not in cmd:
                    others += 1
    return {"cpus": os.cpu_count(), "cpu_model": model, "accel": accel.accel,
            "accel_reason": accel.reason, "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "other_qemu_processes": others}


def boot_a(paths: Paths, vcpus: int, memory_mib: int) -> tuple[Sandbox, Probe]:
    a = Sandbox.create(TEMPLATE, vcpus=vcpus, memory_mib=memory_mib, timeout=900, paths=paths)
    a.exec("true").check()
    return a, Probe.of(paths, a)


def destroy_a(a: Sandbox, probe: Probe) -> str:
    t0 = time.monotonic()
    a.kill()
    for _ in range(100):
        if not probe.alive():
            return f"A destroyed in {time.monotonic() - t0:.2f} s"
        time.sleep(0.05)
    return "A's QEMU STILL RUNNING after kill"


def settle(a: Probe) -> None:
    """Let a freshly booted A go quiet (its boot-time work done) before an idle window."""
    for _ in range(10):
        if cpu_rate(a, 1.0) < 0.2:
            return


def run(args: argparse.Namespace, paths: Paths) -> Run:
    names = [w.strip() for w in args.workloads.split(",")] if args.workloads else list(WORKLOADS)
    for n in names:
        if n not in WORKLOADS:
            raise SystemExit(f"unknown workload {n!r}; choose from {', '.join(WORKLOADS)}")
    out = Run(host=host_details(paths),
              config={"reps": args.reps, "a_vcpus": args.a_vcpus, "b_vcpus": 1,
                      "memory_mib": args.memory, "template": TEMPLATE,
                      "target_ratio": TARGET_RATIO, "workloads": names})
    h = out.host
    log(f"host: {h['cpus']} CPUs ({h['cpu_model']}); accelerator {h['accel']} "
        f"({h['accel_reason']}); load average {' '.join(h['loadavg'])}; "
        f"{h['other_qemu_processes']} other QEMU processes running on the host")
    b = Sandbox.create(TEMPLATE, vcpus=1, memory_mib=args.memory, timeout=3600, paths=paths)
    try:
        for name in [*names, None]:  # a last idle window closes the bracket
            a, probe = boot_a(paths, args.a_vcpus, args.memory)
            try:
                settle(probe)
                idle = measure_b(b, args.reps, probe, "idle (A idle)")
                out.idle.append(idle)
                log(f"  idle, A idle: B median {idle.median_ms:.1f} ms "
                    f"(A's QEMU {fmt_cpu(idle.a_cpu)})")
                if out.results:
                    done = out.results[-1]
                    done.idle_after = idle
                    if done.loaded is not None:
                        done.ratio = done.loaded.median_ms / statistics.mean(
                            [done.idle_before.median_ms, idle.median_ms])
                        done.passed = done.ratio <= TARGET_RATIO
                if name is None:
                    break
                overlay0 = probe.overlay_mib()
                a.spawn(WORKLOADS[name], timeout=None)
                ok, evidence = wait_running(name, probe, args.a_vcpus, args.memory, overlay0,
                                            args.start_timeout)
                log(f"  {name}: {'running' if ok else 'NOT RUNNING'} ({evidence})")
                loaded = measure_b(b, args.reps, probe, name) if ok else None
                if loaded is not None:
                    log(f"  {name}: B median {loaded.median_ms:.1f} ms "
                        f"(A's QEMU {fmt_cpu(loaded.a_cpu)} during the window)")
                out.results.append(Result(workload=name, running=ok, evidence=evidence,
                                          loaded=loaded, idle_before=idle))
            finally:
                stopped = destroy_a(a, probe)
            if name is not None:
                out.results[-1].stopped = stopped
                log(f"  {name}: {stopped}; B still answers: {b.ping() * 1000:.1f} ms ping")
    finally:
        b.kill()
    out.host_at_end = host_details(paths)  # did anything else start on the host meanwhile?
    return out


def report(r: Run) -> None:
    h, c = r.host, r.config
    print(f"host: {h['cpus']} CPUs ({h['cpu_model']}); accelerator {h['accel']} "
          f"({h['accel_reason']})")
    print(f"      load average at start {' '.join(h['loadavg'])}; other QEMU processes "
          f"on the host at start: {h['other_qemu_processes']}")
    if r.host_at_end:
        e = r.host_at_end
        print(f"      load average at end {' '.join(e['loadavg'])}; other QEMU processes "
              f"on the host at end: {e['other_qemu_processes']}")
    print(f"B: 1 vCPU, {c['memory_mib']} MiB; A: {c['a_vcpus']} vCPU(s), {c['memory_mib']} MiB, "
          f"a fresh A per workload; B latency = sb.exec('true') round trip, median and "
          f"p90 of {c['reps']}")
    print()
    print(f"{'window':<22}{'B median':>12}{'B p90':>12}{'A QEMU CPU':>13}"
          f"{'A RAM touched':>15}{'A overlay':>12}")
    windows: list[Window] = []
    for i, idle in enumerate(r.idle):
        windows.append(idle)
        if i < len(r.results) and r.results[i].loaded is not None:
            loaded = r.results[i].loaded
            assert loaded is not None
            windows.append(loaded)
    for w in windows:
        print(f"{w.label:<22}{w.median_ms:>9.1f} ms{w.p90_ms:>9.1f} ms{fmt_cpu(w.a_cpu):>13}"
              f"{w.a_ram_mib:>11.0f} MiB{w.a_overlay_mib:>8.0f} MiB")
    print()
    print(f"{'workload':<14}{'idle before':>13}{'idle after':>12}{'loaded':>11}"
          f"{'ratio':>8}  target <= {TARGET_RATIO:.1f}")
    for res in r.results:
        if res.loaded is None or res.idle_after is None or res.ratio is None:
            print(f"{res.workload:<14}  not measured: {res.evidence}")
            continue
        verdict = "ok" if res.passed else "OVER TARGET"
        print(f"{res.workload:<14}{res.idle_before.median_ms:>10.1f} ms"
              f"{res.idle_after.median_ms:>9.1f} ms{res.loaded.median_ms:>8.1f} ms"
              f"{res.ratio:>8.2f}  {verdict}")
    print()
    for res in r.results:
        print(f"{res.workload}: seen running before measuring: {res.evidence}; {res.stopped}")


def isolated_paths() -> tuple[Paths, Path]:
    """A private ember home sharing the installation's cache, with the template registered."""
    src = Paths.from_env()
    home = Path(tempfile.mkdtemp(prefix="nn-", dir="/tmp"))
    os.environ["EMBER_HOME"] = str(home)
    os.environ["EMBER_CACHE"] = str(src.cache)
    paths = Paths(home=home, cache=src.cache).ensure()
    Store(paths.db).put_template(Store(src.db).get_template(TEMPLATE))
    return paths, home


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20,
                    help="exec round trips per window (default 20)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--a-vcpus", type=int, default=1, help="vCPUs of the hostile sandbox A")
    ap.add_argument("--memory", type=int, default=256, help="memory of A and B in MiB")
    ap.add_argument("--workloads", default="",
                    help=f"comma-separated subset of: {', '.join(WORKLOADS)}")
    ap.add_argument("--start-timeout", type=float, default=90.0,
                    help="seconds to wait for a workload to be seen running")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    paths, home = isolated_paths()
    try:
        result = run(args, paths)
    finally:
        shutil.rmtree(paths.ram, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
