"""Issue 4 figures, measured side by side in one run (medians; repetitions interleaved):

- cold `ember run -- true` end to end next to a raw QEMU boot of the same kernel and image
  to the guest's init: the image's /bin/sh as PID 1 answering on the console, and ember's
  own init (run by the raw command in check mode) printing its line;
- exec round trip of `true` in a running sandbox (and the agent's ping) next to a raw
  ping-pong over the same virtio-serial channel (cat as PID 1 echoing the port);
- host memory per idle sandbox beyond the guest's own RAM (PSS; ember runs no per-sandbox
  process besides QEMU);
- N sandboxes running at once, all answering.

    .venv/bin/python benchmarks/bench_sandbox.py [--reps 7] [--rtt 200] [--many 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    RawEcho,
    fmt_ms,
    guest_ram_pss_kib,
    median,
    pct,
    pss_kib,
    raw_boot_to_line,
    raw_boot_to_shell,
)
from ember import AsyncSandbox, Sandbox
from ember.agent import INIT_PATH
from ember.guest.kernel import require_kernel
from ember.paths import Paths
from ember.sdk.async_sandbox import manager
from ember.store import Store

TEMPLATE = "debian-python"


def cold_run(reps: int, kernel: Path, image: Path) -> None:
    ember_s, sdk_s, raw_s, raw_init_s = [], [], [], []
    cli = [sys.executable, "-m", "ember.cli", "run", "--template", TEMPLATE, "--", "true"]
    for _ in range(reps):
        t0 = time.monotonic()
        subprocess.run(cli, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ember_s.append(time.monotonic() - t0)
        t0 = time.monotonic()
        with Sandbox.create(TEMPLATE) as sb:
            sb.exec(["true"])
        sdk_s.append(time.monotonic() - t0)
        raw_s.append(raw_boot_to_shell(kernel, image))
        raw_init_s.append(raw_boot_to_line(kernel, image, f"init={INIT_PATH} ember.mode=check",
                                           b"EMBER-CHECK"))
    m_e, m_s, m_r, m_i = median(ember_s), median(sdk_s), median(raw_s), median(raw_init_s)
    print(f"cold start, medians of {reps} (ratios: to raw /bin/sh | to raw ember init):")
    print(f"  ember run -- true (CLI, end to end)   {fmt_ms(m_e)}   {m_e / m_r:.2f} | "
          f"{m_e / m_i:.2f}")
    print(f"  SDK create + exec true + kill         {fmt_ms(m_s)}   {m_s / m_r:.2f} | "
          f"{m_s / m_i:.2f}")
    print(f"  raw QEMU boot to /bin/sh answering    {fmt_ms(m_r)}")
    print(f"  raw QEMU boot to ember's init line    {fmt_ms(m_i)}")


def round_trips(n: int, kernel: Path, image: Path) -> None:
    echo = RawEcho(kernel, image)
    sb = Sandbox.create(TEMPLATE)
    try:
        for _ in range(10):  # warm up both
            echo.ping()
            sb.exec(["true"])
        raw, ping, exe = [], [], []
        for _ in range(n):
            raw.append(echo.ping())
            ping.append(sb.ping())
            t0 = time.perf_counter()
            sb.exec(["true"])
            exe.append(time.perf_counter() - t0)
        m_raw = median(raw)
        print(f"round trips, medians of {n} (p99 in brackets):")
        print(f"  raw ping-pong over virtio-serial       {fmt_ms(m_raw)} [{fmt_ms(pct(raw, .99))}]")
        print(f"  agent ping                             {fmt_ms(median(ping))} "
              f"[{fmt_ms(pct(ping, .99))}]  ratio {median(ping) / m_raw:.2f}")
        print(f"  exec true                              {fmt_ms(median(exe))} "
              f"[{fmt_ms(pct(exe, .99))}]  ratio {median(exe) / m_raw:.2f}")
        memory(sb)
    finally:
        sb.kill()
        echo.close()


def memory(sb: Sandbox) -> None:
    time.sleep(3)  # idle
    rec = manager().store.get_sandbox(sb.id)
    assert rec.pid is not None
    total = pss_kib(rec.pid)
    ram = guest_ram_pss_kib(rec.pid, rec.memory_mib)
    print(f"idle sandbox ({rec.memory_mib} MiB guest): QEMU PSS {total / 1024:.1f} MiB, of which "
          f"guest RAM {ram / 1024:.1f} MiB; beyond guest RAM {(total - ram) / 1024:.1f} MiB "
          f"(per-sandbox ember processes: none)")


async def many(n: int) -> None:
    t0 = time.monotonic()
    sbs = await asyncio.gather(*(AsyncSandbox.create(TEMPLATE) for _ in range(n)))
    boot = time.monotonic() - t0
    try:
        t1 = time.monotonic()
        results = await asyncio.gather(*(sb.exec(["cat", "/etc/hostname"]) for sb in sbs))
        answered = sum(r.stdout.strip() == sb.id for r, sb in zip(results, sbs, strict=True))
        rtts = []
        for _ in range(5):
            for sb in sbs:
                rtts.append(await sb.ping())
        pss = sum(pss_kib(manager().store.get_sandbox(sb.id).pid or 0) for sb in sbs)
        print(f"{n} sandboxes at once: created in parallel in {boot:.1f} s; {answered}/{n} "
              f"answered exec (all in {time.monotonic() - t1:.2f} s); ping median "
              f"{fmt_ms(median(rtts))}, p99 {fmt_ms(pct(rtts, .99))}; total QEMU PSS "
              f"{pss / 1024:.0f} MiB")
    finally:
        await asyncio.gather(*(sb.kill() for sb in sbs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rtt", type=int, default=200)
    ap.add_argument("--many", type=int, default=10)
    args = ap.parse_args()
    paths = Paths.from_env()
    kernel = require_kernel(paths).bzimage
    image = Path(Store(paths.db).get_template(TEMPLATE).image_path)
    print(f"host: {os.cpu_count()} CPUs; accelerator {manager().accel.accel}")
    cold_run(args.reps, kernel, image)
    round_trips(args.rtt, kernel, image)
    asyncio.run(many(args.many))


if __name__ == "__main__":
    main()
