"""Issue 17 figures: ember's KVM path next to raw ``qemu-system-x86_64 -accel kvm``, one run.

- create to first exec (``Sandbox.create`` + ``exec true``) next to a raw QEMU boot of the
  same kernel and image to ember's init line (check mode), to ``/bin/sh`` answering, and
  to a first exec through ember's own agent (hand-built argv, unjailed, no registry: what
  the guest side costs, so that the difference is ember's host-side work);
- restore to first exec next to raw ``-incoming`` of the same snapshot files;
- QEMU's host memory beyond guest RAM for an idle sandbox (PSS), under KVM.

Repetitions are interleaved and medians printed with their ratios. Where this host's KVM is
usable the script measures here; elsewhere (these kvm-pvm development hosts) it boots the
nested outer VM of ``tests/nested/outer.py`` (TCG emulating AMD SVM) and measures inside,
where every figure is nested under TCG: read the ratios, not the absolute times.

    .venv/bin/python benchmarks/bench_kvm.py [--reps 5] [--nested|--here]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    agent_exec_true,
    fmt_ms,
    guest_ram_pss_kib,
    pss_kib,
    raw_boot_to_line,
    raw_boot_to_shell,
)
from benchmarks.bench_snapshots import ember_restore_first_exec, raw_restore_first_exec
from ember import Sandbox
from ember.agent import INIT_PATH
from ember.engine import detect_accel
from ember.engine.base import VMSpec
from ember.engine.qemu.argv import build_argv
from ember.engine.qemu.vm import QemuVMHandle
from ember.guest.image import build_image
from ember.guest.kernel import require_kernel
from ember.paths import Paths
from ember.runtime.manager import boot_cmdline
from ember.sdk.async_sandbox import manager
from ember.store import Store

TEMPLATE = "debian-python"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def create_first_exec() -> float:
    t0 = time.monotonic()
    sb = Sandbox.create(TEMPLATE, timeout=600)
    try:
        sb.exec("true")
        return time.monotonic() - t0
    finally:
        sb.kill()


def raw_agent_first_exec(kernel: Path, image: Path) -> float:
    """QEMU started by hand (ember's argv, unjailed, no cgroup, no registry) on an overlay
    of the image, booting ember's init and agent; then the same agent client runs
    ``true``: the guest-side floor of ``Sandbox.create`` + exec."""
    work = Path(tempfile.mkdtemp(prefix="raw-", dir="/tmp"))
    name = f"raw-{os.getpid()}"
    ram = Path("/dev/shm") / f"{name}.ram"
    try:
        overlay = work / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(image), str(overlay)], check=True)
        ram.touch()
        spec = VMSpec(name=name, kernel=kernel, disk=overlay, disk_format="qcow2",
                      disk_readonly=False, vcpus=1, memory_mib=256,
                      cmdline=boot_cmdline(name), console_log=work / "console.log",
                      qmp_socket=work / "qmp.sock", agent_socket=work / "agent.sock",
                      pidfile=work / "pid", accel=detect_accel(), memory_file=ram,
                      memory_shared=True)
        t0 = time.monotonic()
        subprocess.run(build_argv(spec, sandbox=False), check=True)
        handle = QemuVMHandle(spec, int((work / "pid").read_text()))
        try:
            asyncio.run(agent_exec_true(spec.agent_socket, timeout=120))
            return time.monotonic() - t0
        finally:
            handle.kill()
    finally:
        ram.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def bench_create(reps: int, kernel: Path, image: Path) -> None:
    ember_s, raw_init, raw_sh, raw_agent = [], [], [], []
    for _ in range(reps):
        raw_init.append(raw_boot_to_line(kernel, image, f"init={INIT_PATH} ember.mode=check",
                                         b"EMBER-CHECK"))
        raw_sh.append(raw_boot_to_shell(kernel, image))
        raw_agent.append(raw_agent_first_exec(kernel, image))
        ember_s.append(create_first_exec())
    print(f"create to first exec, medians of {reps} (interleaved):")
    print(f"  raw QEMU -accel kvm boot to ember's init line  {fmt_ms(med(raw_init))}")
    print(f"  raw QEMU -accel kvm boot to /bin/sh answering  {fmt_ms(med(raw_sh))}")
    print(f"  raw QEMU boot + ember's agent, exec true       {fmt_ms(med(raw_agent))}")
    print(f"  ember Sandbox.create + exec true               {fmt_ms(med(ember_s))}   ratio "
          f"to raw init {med(ember_s) / med(raw_init):.2f} (target <= 1.2), to raw sh "
          f"{med(ember_s) / med(raw_sh):.2f}, to raw with ember's agent "
          f"{med(ember_s) / med(raw_agent):.2f}")


def bench_restore(reps: int) -> None:
    with Sandbox.create(TEMPLATE, timeout=None) as sb:
        sb.exec("true")
        snap = sb.snapshot("bench-kvm-restore")
    raw, raw_id, ember_ = [], [], []
    try:
        for _ in range(reps):
            raw.append(raw_restore_first_exec(snap.id))
            raw_id.append(raw_restore_first_exec(snap.id, identity=True))
            ember_.append(ember_restore_first_exec(snap.id))
    finally:
        Sandbox.delete_snapshot("bench-kvm-restore")
    print(f"restore to first exec, medians of {reps} (interleaved):")
    print(f"  raw QEMU -incoming + agent        {fmt_ms(med(raw))}")
    print(f"  raw, guest renamed as ember does  {fmt_ms(med(raw_id))}")
    print(f"  ember Sandbox.restore + exec true {fmt_ms(med(ember_))}   ratio to raw "
          f"{med(ember_) / med(raw):.2f}, to raw with the same guest work "
          f"{med(ember_) / med(raw_id):.2f} (target <= 1.2)")


def bench_memory(memory_mib: int = 256) -> None:
    with Sandbox.create(TEMPLATE, memory_mib=memory_mib, timeout=600) as sb:
        sb.exec("true")
        time.sleep(3)  # idle
        rec = manager().store.get_sandbox(sb.id)
        assert rec.pid is not None
        total, ram = pss_kib(rec.pid), guest_ram_pss_kib(rec.pid, rec.memory_mib)
        rss = next(int(ln.split()[1]) for ln in Path(f"/proc/{rec.pid}/status").read_text()
                   .splitlines() if ln.startswith("VmRSS:"))
    beyond = (total - ram) / 1024
    print(f"idle sandbox, {memory_mib} MiB guest, {rec.accel}: QEMU PSS {total / 1024:.1f} MiB "
          f"(RSS {rss / 1024:.1f} MiB), guest RAM {ram / 1024:.1f} MiB; beyond guest RAM "
          f"{beyond:.1f} MiB (the cgroup allows {rec.accel} overhead: see "
          "ember/runtime/confinement.py OVERHEAD_MIB)")


def here(reps: int) -> None:
    decision = detect_accel()
    if decision.accel != "kvm":
        sys.exit(f"KVM is not usable here ({decision.reason}); run with --nested")
    paths = Paths.from_env().ensure()
    store = Store(paths.db)
    build_image(paths, store, TEMPLATE)  # a cache hit where the template was built
    kernel = require_kernel(paths).bzimage
    image = Path(store.get_template(TEMPLATE).image_path)
    print(f"accelerator: {decision.accel} ({decision.reason}); {os.cpu_count()} CPUs; "
          f"kernel {os.uname().release}")
    bench_create(reps, kernel, image)
    bench_restore(reps)
    bench_memory()


def nested(reps: int) -> int:
    from tests.nested import outer

    results = Path(tempfile.mkdtemp(prefix="bench-kvm-", dir="/var/tmp"))
    print(f"booting the nested outer VM (TCG emulating AMD SVM); results in {results}",
          file=sys.stderr)
    home = "/root/bench-home"
    command = (f"EMBER_HOME={home} .venv/bin/python benchmarks/bench_kvm.py --here "
               f"--reps {shlex.quote(str(reps))}")
    t0 = time.monotonic()
    try:
        outer.run(command, results, timeout=3000)
    except subprocess.TimeoutExpired:
        print("the outer VM did not finish in time", file=sys.stderr)
    status = outer.inside_status(results)
    print(f"(nested KVM inside a TCG VM, {time.monotonic() - t0:.0f} s in all)")
    print((results / "output.log").read_text(errors="replace") if (results / "output.log")
          .is_file() else "(no output)")
    return status if status is not None else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--here", action="store_true", help="measure on this host's KVM")
    where.add_argument("--nested", action="store_true", help="measure in the nested VM")
    a = ap.parse_args()
    if a.here or (not a.nested and detect_accel().accel == "kvm"):
        here(a.reps)
    else:
        sys.exit(nested(a.reps))


if __name__ == "__main__":
    main()
