"""Issue 5 figures, side by side in one run (repetitions interleaved):

* restore to first exec: ember (Sandbox.restore + exec) next to raw QEMU ``-incoming`` of
  the same snapshot files (hand-built argv, the same agent client) and next to a cold boot;
* Sandbox.create() from a warm pool (of a pre-baked template): p50 / p99 over N creates;
* fork of 10 clones: total time, host memory (PSS) per clone next to a cold-booted sandbox.

Run: .venv/bin/python benchmarks/bench_snapshots.py [--reps 5] [--creates 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import agent_exec_true
from ember import Sandbox
from ember.engine.qemu.argv import build_argv
from ember.engine.qemu.migration import load_state
from ember.engine.qemu.vm import QemuVMHandle
from ember.runtime import pools, snapshots
from ember.runtime.pools import pss_bytes
from ember.sdk.async_sandbox import manager
from ember.sdk.bake import bake_template_sync


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:8.1f} ms"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def cold_first_exec() -> float:
    t0 = time.monotonic()
    with Sandbox.create() as sb:
        sb.exec("true")
        return time.monotonic() - t0


def ember_restore_first_exec(snap: str) -> float:
    t0 = time.monotonic()
    with Sandbox.restore(snap) as sb:
        sb.exec("true")
        return time.monotonic() - t0


def raw_restore_first_exec(snap_id: str, identity: bool = False) -> float:
    """QEMU started by hand on the snapshot's files (unjailed, no cgroup, no registry),
    state loaded, then the same agent client runs ``true``: what any tool would pay
    without ember's bookkeeping. ``identity``: the hello also gives the guest a new
    hostname, as ember must for a restored clone (the guest then rewrites its UTS name,
    /etc/hostname and /etc/hosts); without it the guest keeps the snapshot's name."""
    mgr = manager()
    snap = mgr.store.get_snapshot(snap_id)
    plan = snapshots.plan_restore(mgr.paths, mgr.store, snap, vmm_version=mgr.engine.version(),
                                  accel=mgr.accel.accel, template=mgr.store.get_template(
                                      snap.template))
    work = Path(tempfile.mkdtemp(prefix="raw-", dir="/tmp"))
    try:
        overlay = work / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(plan.disk), str(overlay), f"{snap.disk_mib}M"], check=True)
        from ember.engine.base import VMSpec

        spec = VMSpec(name="raw", kernel=plan.kernel.bzimage, disk=overlay, disk_format="qcow2",
                      disk_readonly=False, vcpus=snap.vcpus, memory_mib=snap.memory_mib,
                      cmdline=plan.cmdline, console_log=work / "console.log",
                      qmp_socket=work / "qmp.sock", agent_socket=work / "agent.sock",
                      pidfile=work / "pid", accel=mgr.accel, memory_file=plan.ram,
                      incoming=True)
        argv = build_argv(spec, sandbox=False)
        t0 = time.monotonic()
        subprocess.run(argv, check=True)
        handle = QemuVMHandle(spec, int((work / "pid").read_text()))
        try:
            async def go() -> None:
                while not spec.qmp_socket.exists():
                    await asyncio.sleep(0.001)
                await load_state(spec.qmp_socket, plan.state, who="raw", timeout=30,
                                 alive=handle.is_alive)
                await agent_exec_true(
                    spec.agent_socket, timeout=30,
                    hostname=f"raw-{os.getpid()}-{time.monotonic_ns()}" if identity else None)

            asyncio.run(go())
            return time.monotonic() - t0
        finally:
            handle.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_restore(reps: int) -> None:
    with Sandbox.create(timeout=None) as sb:
        sb.exec("true")
        snap = sb.snapshot("bench-restore")
    cold, ember_, raw, raw_id = [], [], [], []
    try:
        for _ in range(reps):
            raw.append(raw_restore_first_exec(snap.id))
            raw_id.append(raw_restore_first_exec(snap.id, identity=True))
            ember_.append(ember_restore_first_exec(snap.id))
            cold.append(cold_first_exec())
    finally:
        Sandbox.delete_snapshot("bench-restore")
    print(f"restore to first exec, median of {reps} (interleaved):")
    print(f"  raw QEMU -incoming + agent  {ms(raw)}")
    print(f"  raw, guest renamed as ember {ms(raw_id)}")
    print(f"  ember Sandbox.restore       {ms(ember_)}   ratio to raw "
          f"{statistics.median(ember_) / statistics.median(raw):.2f}, to raw with the same "
          f"guest work {statistics.median(ember_) / statistics.median(raw_id):.2f} "
          "(target <= 1.2)")
    print(f"  ember cold boot             {ms(cold)}   cold / restore "
          f"{statistics.median(cold) / statistics.median(ember_):.1f}x (target >= 15)")


def bench_pool(creates: int) -> None:
    bake_template_sync("bench-baked", "debian-python", "true", replace=True)
    mgr = manager()
    rec = pools.set_pool(mgr, "bench-baked", 4)
    times: list[float] = []
    try:
        for _ in range(creates):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(
                    r.state == "pooled" for r in pools.members(mgr, rec.key)):
                time.sleep(0.05)
            t0 = time.monotonic()
            sb = Sandbox.create("bench-baked")
            times.append(time.monotonic() - t0)
            sb.kill()
    finally:
        pools.remove_pool(mgr, rec.key)
        subprocess.run([".venv/bin/ember", "image", "rm", "bench-baked"], check=False,
                       capture_output=True)
    print(f"Sandbox.create() from a warm pool, {creates} creates: p50 "
          f"{pct(times, 0.5) * 1000:.1f} ms, p99 {pct(times, 0.99) * 1000:.1f} ms "
          f"(targets 15 / 50 ms)")


def bench_fork(n: int) -> None:
    with Sandbox.create(timeout=None) as cold:
        cold.exec("true")
        time.sleep(1)
        cold_pss = _pss(cold.id)
        t0 = time.monotonic()
        clones = cold.fork(n)
        total = time.monotonic() - t0
        for c in clones:
            c.exec("true")
        time.sleep(1)
        per = [_pss(c.id) for c in clones]
        for c in clones:
            c.kill()
    print(f"fork of {n}: {total:.2f} s total ({total / n * 1000:.0f} ms per clone)")
    print(f"  host PSS per clone {statistics.median(per) / 2**20:.0f} MiB vs cold-booted "
          f"sandbox {cold_pss / 2**20:.0f} MiB (ratio "
          f"{statistics.median(per) / max(cold_pss, 1):.2f})")


def _pss(sandbox_id: str) -> int:
    rec = manager().store.get_sandbox(sandbox_id)
    return pss_bytes(rec.pid) if rec.pid else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--creates", type=int, default=100)
    ap.add_argument("--fork", type=int, default=10)
    a = ap.parse_args()
    os.environ.setdefault("EMBER_HOME", "/var/lib/ember")
    bench_restore(a.reps)
    bench_fork(a.fork)
    bench_pool(a.creates)


if __name__ == "__main__":
    main()
