"""Issue 12 figures, side by side in one run (repetitions interleaved):

* ``Sandbox.create()`` to first exec, default template, no pool (so: restored from the
  template snapshot), through the home's daemon and in-process (``EMBER_LOCAL=1``), next to
  a raw QEMU ``-incoming`` restore of the same template snapshot to its first agent answer
  (hand-built argv, the same agent client, the guest renamed as ember does) and next to a
  cold-boot create (``boot="cold"``);
* host memory (PSS) per idle sandbox created the default way next to a cold-booted one, and
  QEMU's own share: everything but the guest RAM mapping;
* PSS per fork clone of a default-created sandbox next to one of a cold-booted sandbox;
* optionally (``--density``) ``ember bench``'s density of the microvm tier under a memory
  budget.

Run: .venv/bin/python benchmarks/bench_template_snapshots.py [--reps 10] [--idle 5]
     [--density --memory-budget-mib 600]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_snapshots import raw_restore_first_exec
from ember import Sandbox
from ember.runtime import template_snapshots
from ember.sdk.async_sandbox import manager

TEMPLATE = "debian-python"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


@contextlib.contextmanager
def local(on: bool) -> Iterator[None]:
    old = os.environ.get("EMBER_LOCAL")
    if on:
        os.environ["EMBER_LOCAL"] = "1"
    else:
        os.environ.pop("EMBER_LOCAL", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("EMBER_LOCAL", None)
        else:
            os.environ["EMBER_LOCAL"] = old


def create_first_exec(*, boot: str = "auto", in_process: bool = False) -> tuple[float, str | None]:
    """Seconds from ``Sandbox.create()`` to the end of the first ``exec("true")``, and the
    snapshot the sandbox was restored from (None: it booted)."""
    with local(in_process):
        t0 = time.monotonic()
        sb = Sandbox.create(TEMPLATE, boot=boot)  # type: ignore[arg-type]
        sb.exec("true")
        took = time.monotonic() - t0
        snap = sb.info().snapshot
        sb.kill()
    return took, snap


def template_snapshot_id() -> str:
    """The default template's template snapshot at the default size (made if need be)."""
    Sandbox.create(TEMPLATE).kill()
    mgr = manager()
    tpl = mgr.store.get_template(TEMPLATE)
    key = template_snapshots.key_for(mgr, tpl, 1, 256, template_snapshots.DEFAULT_DISK)
    snap = template_snapshots.find(mgr, key)
    if snap is None:
        raise SystemExit("no template snapshot was made: see $EMBER_HOME/logs/ember.log")
    return snap.id


def bench_create(reps: int) -> None:
    snap_id = template_snapshot_id()
    raw, daemon, inproc, cold = [], [], [], []
    for _ in range(reps):
        raw.append(raw_restore_first_exec(snap_id, identity=True))
        t, used = create_first_exec()
        assert used == snap_id, f"a default create did not restore the template snapshot: {used}"
        daemon.append(t)
        inproc.append(create_first_exec(in_process=True)[0])
        cold.append(create_first_exec(boot="cold")[0])
    print(f"create to first exec, {TEMPLATE}, no pool, median of {reps} (interleaved):")
    print(f"  raw QEMU -incoming of the template snapshot + agent (renamed) "
          f"{med(raw) * 1000:7.1f} ms")
    print(f"  Sandbox.create() through the daemon (the default)   {med(daemon) * 1000:7.1f} ms"
          f"   {med(daemon) / med(raw):.2f}x raw (target <= 1.2)")
    print(f"  Sandbox.create() in-process (EMBER_LOCAL=1)          {med(inproc) * 1000:7.1f} ms"
          f"   {med(inproc) / med(raw):.2f}x raw")
    print(f"  Sandbox.create(boot='cold') through the daemon       {med(cold) * 1000:7.1f} ms"
          f"   cold / default {med(cold) / med(daemon):.1f}x (target >= 6)")


def smaps_split(pid: int) -> tuple[int, int]:
    """(PSS of the guest RAM mapping, PSS of everything else) of QEMU ``pid``, in bytes."""
    ram = other = 0
    current_is_ram = False
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's header line
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                current_is_ram = path.endswith(".ram") or path.endswith("/ram")
            elif head == "Pss:":
                kib = int(line.split()[1]) * 1024
                if current_is_ram:
                    ram += kib
                else:
                    other += kib
    return ram, other


def bench_memory(idle: int, settle: float) -> None:
    template_snapshot_id()
    mgr = manager()
    cold = Sandbox.create(TEMPLATE, boot="cold", timeout=1800)
    made = [Sandbox.create(TEMPLATE, timeout=1800) for _ in range(idle)]
    try:
        for sb in (cold, *made):
            sb.exec("true")
        time.sleep(settle)

        def split(sb: Sandbox) -> tuple[int, int]:
            pid = mgr.store.get_sandbox(sb.id).pid
            assert pid is not None
            return smaps_split(pid)

        c_ram, c_other = split(cold)
        parts = [split(sb) for sb in made]
    finally:
        for sb in (cold, *made):
            sb.kill()
    per = [r + o for r, o in parts]
    own = med([o for _, o in parts])
    mib = 2**20
    print(f"host memory (PSS) per idle sandbox, {idle} created the default way, settled "
          f"{settle:g} s:")
    print(f"  cold-booted:   {(c_ram + c_other) / mib:6.1f} MiB (guest RAM {c_ram / mib:.1f}, "
          f"QEMU's own {c_other / mib:.1f})")
    print(f"  default way:   {med(per) / mib:6.1f} MiB median (guest RAM "
          f"{med([r for r, _ in parts]) / mib:.1f}, QEMU's own {own / mib:.1f})"
          f"   {med(per) / (c_ram + c_other):.2f}x cold (target <= 0.35)")
    print(f"  QEMU's overhead beyond guest RAM (TCG target <= 48 MiB): cold {c_other / mib:.1f}"
          f" MiB, default {own / mib:.1f} MiB")


def bench_fork(n: int, settle: float) -> None:
    """PSS per fork clone of a default-created sandbox (its RAM is in the fork's saved
    state) next to clones of a cold-booted one (its RAM file is shared by the clones)."""
    template_snapshot_id()
    mgr = manager()
    out = {}
    for label, boot in (("default-created", "auto"), ("cold-booted", "cold")):
        with Sandbox.create(TEMPLATE, boot=boot, timeout=1800) as src:  # type: ignore[arg-type]
            src.exec("true")
            clones = src.fork(n)
            try:
                for c in clones:
                    c.exec("true")
                time.sleep(settle)
                out[label] = med([float(sum(smaps_split(mgr.store.get_sandbox(c.id).pid or 0)))
                                  for c in clones])
            finally:
                for c in clones:
                    c.kill()
    print(f"fork of {n}, PSS per clone: of a default-created sandbox "
          f"{out['default-created'] / 2**20:.1f} MiB, of a cold-booted one "
          f"{out['cold-booted'] / 2**20:.1f} MiB")


def bench_density(budget_mib: int, max_density: int) -> None:
    cp = subprocess.run([sys.executable, "-m", "ember.cli", "bench", "--tiers", "microvm",
                         "--reps", "1", "--parallel", "1", "--no-syscalls",
                         "--memory-budget-mib", str(budget_mib), "--max-density",
                         str(max_density), "--json", "--out", "/tmp/ember-bench-density"],
                        capture_output=True, text=True, timeout=3600)
    if cp.returncode != 0:
        raise SystemExit(f"ember bench failed:\n{cp.stdout}\n{cp.stderr}")
    tier = json.loads(cp.stdout)["tiers"]["microvm"]
    print(f"ember bench density, microvm tier, --memory-budget-mib {budget_mib}: "
          f"{tier['density']} microVMs (target >= 15)"
          + (f", stopped by: {tier.get('density_stop')}" if tier.get("density_stop") else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--idle", type=int, default=5)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--fork", type=int, default=3)
    ap.add_argument("--density", action="store_true")
    ap.add_argument("--memory-budget-mib", type=int, default=600)
    ap.add_argument("--max-density", type=int, default=40)
    a = ap.parse_args()
    os.environ.setdefault("EMBER_HOME", "/var/lib/ember")
    bench_create(a.reps)
    bench_memory(a.idle, a.settle)
    if a.fork:
        bench_fork(a.fork, a.settle)
    if a.density:
        bench_density(a.memory_budget_mib, a.max_density)


if __name__ == "__main__":
    main()
