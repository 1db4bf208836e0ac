"""Issue 14 figure: a sandbox's whole life through E2B's official SDK next to ember's own,
in one run: ``Sandbox.create()`` + ``commands.run("true")`` + ``kill()`` (e2b) against
``Sandbox.create()`` + ``exec("true")`` + ``kill()`` (ember), both over the daemon's TCP
listener with an API key, interleaved; medians and their ratio (target: within 1.3x).

Run (as root, in a scratch home so that the daemon is this script's own):
  EMBER_HOME=$(mktemp -d) EMBER_CACHE=/var/lib/ember/cache \
      .venv/bin/python benchmarks/bench_e2b.py [--reps 20]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import e2b

from benchmarks._common import home_with_default_template
from ember import Sandbox
from ember.daemon import control
from ember.daemon.auth import new_key


def via_e2b(opts: dict[str, str]) -> float:
    t0 = time.perf_counter()
    sb = e2b.Sandbox.create("base", **opts)  # type: ignore[arg-type]
    sb.commands.run("true")
    sb.kill()
    return time.perf_counter() - t0


def via_ember(url: str, key: str, cmd: str | list[str] = "true") -> float:
    t0 = time.perf_counter()
    sb = Sandbox.create("debian-python", url=url, api_key=key)
    sb.exec(cmd).check()
    sb.kill()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    paths, store = home_with_default_template()
    with socket.socket() as probe:  # a free port for the daemon's listener
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    control.stop(paths)
    control.start(paths, listen=url.removeprefix("http://"))
    _, key = new_key(store, "bench")
    opts = {"api_key": key, "api_url": url, "sandbox_url": url}
    try:
        via_e2b(opts), via_ember(url, key)  # warm-up: template snapshot, connections
        e2b_s: list[float] = []
        ember_s: list[float] = []
        login_s: list[float] = []  # what e2b's commands.run runs: a login bash
        for _ in range(args.reps):
            e2b_s.append(via_e2b(opts))
            ember_s.append(via_ember(url, key))
            login_s.append(via_ember(url, key, ["/bin/bash", "-l", "-c", "true"]))
    finally:
        control.stop(paths)
    e, m = statistics.median(e2b_s) * 1000, statistics.median(ember_s) * 1000
    print(f"e2b {version('e2b')} SDK vs ember SDK, "
          f"{args.reps} interleaved reps, create + run 'true' + kill")
    print(f"  e2b SDK:   median {e:8.1f} ms  (min {min(e2b_s) * 1000:.1f}, "
          f"max {max(e2b_s) * 1000:.1f})")
    print(f"  ember SDK: median {m:8.1f} ms  (min {min(ember_s) * 1000:.1f}, "
          f"max {max(ember_s) * 1000:.1f})")
    b = statistics.median(login_s) * 1000
    print(f"  ember SDK, exec(['/bin/bash', '-l', '-c', 'true']) as e2b runs it: median "
          f"{b:8.1f} ms")
    print(f"  ratio e2b/ember: {e / m:.2f} (target <= 1.3); with the same guest command: "
          f"{e / b:.2f}")


if __name__ == "__main__":
    main()
