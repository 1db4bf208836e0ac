"""Issue 11 figures, side by side in one run: what the daemon costs a client.

* API overhead: a sandbox ping through the daemon next to an in-process agent ping (the
  daemon's own path to the guest), and ``exec true`` likewise; medians and differences.
* Concurrency: 8 client processes x 50 execs against one sandbox, then spread over 4
  sandboxes: all must succeed; throughput and p99 latency.
* Daemon memory: RSS after warm-up and after N execs plus M MiB of file transfers (target:
  within 1.5x of warm-up).

Run (as root, in a scratch home so that the daemon is this script's own):
  EMBER_HOME=$(mktemp -d) .venv/bin/python benchmarks/bench_daemon.py \
      [--reps 200] [--execs 10000] [--transfer-mib 1024]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import home_with_default_template
from ember import Sandbox
from ember.daemon import control
from ember.daemon.server import socket_path


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def client(url: str, ids: list[str], n: int, k: int, q: multiprocessing.Queue) -> None:
    sb = Sandbox.connect(ids[k % len(ids)], url=url)
    lat, fails = [], 0
    for i in range(n):
        t0 = time.perf_counter()
        try:
            r = sb.exec(f"echo {k}-{i}")
            fails += r.stdout != f"{k}-{i}\n"
        except Exception:
            fails += 1
        lat.append(time.perf_counter() - t0)
    sb.close()
    q.put((lat, fails))


def concurrency(url: str, ids: list[str], procs: int, per: int) -> None:
    mp = multiprocessing.get_context("spawn")  # the SDK's event-loop thread does not fork
    q: multiprocessing.Queue = mp.Queue()
    ctx = [mp.Process(target=client, args=(url, ids, per, k, q))
           for k in range(procs)]
    t0 = time.perf_counter()
    for p in ctx:
        p.start()
    got = [q.get(timeout=900) for _ in ctx]
    wall = time.perf_counter() - t0
    for p in ctx:
        p.join()
    lat = [x for g in got for x in g[0]]
    fails = sum(g[1] for g in got)
    print(f"  {procs} clients x {per} execs on {len(ids)} sandbox(es): "
          f"{len(lat) - fails}/{len(lat)} ok, {len(lat) / wall:7.1f} execs/s, "
          f"p50 {med_ms(lat):6.1f} ms, p99 {pct(lat, 0.99) * 1000:6.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--execs", type=int, default=10000)
    ap.add_argument("--transfer-mib", type=int, default=1024)
    args = ap.parse_args()
    paths, _ = home_with_default_template()
    st = control.start(paths)
    assert st.pid
    url = f"unix://{socket_path(paths)}"
    print(f"daemon pid {st.pid} on {url}")
    remote = Sandbox.create(timeout=3600, url=url)
    os.environ["EMBER_LOCAL"] = "1"  # in-process: what the daemon itself does
    try:
        local = Sandbox.create(timeout=3600)
    finally:
        del os.environ["EMBER_LOCAL"]
    try:
        for sb in (remote, local):
            timed(sb.ping, 20)
            timed(lambda sb=sb: sb.exec("true"), 20)
        rp, lp, rx, lx = [], [], [], []
        for _ in range(args.reps):  # interleaved: both see the same host noise
            rp += timed(remote.ping, 1)
            lp += timed(local.ping, 1)
            rx += timed(lambda: remote.exec("true"), 1)
            lx += timed(lambda: local.exec("true"), 1)
        print(f"API overhead ({args.reps} reps, medians):")
        print(f"  ping       in-process {med_ms(lp):7.2f} ms   via daemon {med_ms(rp):7.2f} ms"
              f"   difference {med_ms(rp) - med_ms(lp):6.2f} ms")
        print(f"  exec true  in-process {med_ms(lx):7.2f} ms   via daemon {med_ms(rx):7.2f} ms"
              f"   difference {med_ms(rx) - med_ms(lx):6.2f} ms")

        more = [Sandbox.create(timeout=3600, url=url) for _ in range(3)]
        try:
            print("concurrency:")
            concurrency(url, [remote.id], 8, 50)
            concurrency(url, [remote.id] + [m.id for m in more], 8, 50)
        finally:
            for m in more:
                m.kill()

        warm = rss_mib(st.pid)
        print(f"daemon memory: RSS after warm-up {warm:.1f} MiB")
        t0 = time.perf_counter()
        for _ in range(args.execs):
            remote.exec("true")
        chunk = 64
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "blob"
            with open(src, "wb") as f:
                f.write(os.urandom(chunk << 20))
            moved = 0
            while moved < args.transfer_mib:
                remote.files.upload(src, "/tmp/blob")
                remote.files.download("/tmp/blob", Path(tmp) / "back")
                moved += 2 * chunk
        after = rss_mib(st.pid)
        print(f"  after {args.execs} execs and {moved} MiB of transfers "
              f"({time.perf_counter() - t0:.0f} s): RSS {after:.1f} MiB, "
              f"ratio {after / warm:.2f} (target <= 1.5)")
    finally:
        remote.kill()
        local.kill()
        control.stop(paths)


if __name__ == "__main__":
    main()
