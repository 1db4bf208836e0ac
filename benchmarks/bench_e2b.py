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
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import e2b
import httpx

from benchmarks._common import daemon_on_tcp, home_with_default_template
from ember import NetworkPolicy, Sandbox
from ember.daemon import control


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


SERVE = "python3 -m http.server 8000 --bind 127.0.0.1"
PORT = 8000


def _ready(get: Callable[[], httpx.Response]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if get().status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the guest's HTTP server did not come up")
        time.sleep(0.2)


def port_requests(opts: dict[str, str], url: str, key: str, reps: int
                  ) -> tuple[list[float], list[float]]:
    """GET / of one guest server, through ``get_host`` (carried by ember's agent) and, for
    the same server in an ember sandbox with a NIC, through its exposed port (the network
    path), interleaved; seconds each."""
    box = e2b.Sandbox.create("base", **opts)  # type: ignore[arg-type]
    sb = Sandbox.create("debian-python", url=url, api_key=key,
                        network=NetworkPolicy(internet=False))
    try:
        box.commands.run(SERVE, background=True)
        sb.spawn(SERVE.replace("127.0.0.1", "0.0.0.0"))  # the NIC's address too
        exposed = sb.network.expose(PORT)
        carried = {"host": box.get_host(PORT)}
        with httpx.Client(timeout=30) as c:
            def via_agent() -> httpx.Response:
                return c.get(url + "/", headers=carried)

            def via_nic() -> httpx.Response:
                return c.get(f"http://{exposed.address}/")

            _ready(via_agent)
            _ready(via_nic)
            agent_s: list[float] = []
            nic_s: list[float] = []
            for _ in range(reps):
                for get, into in ((via_agent, agent_s), (via_nic, nic_s)):
                    t0 = time.perf_counter()
                    get().raise_for_status()
                    into.append(time.perf_counter() - t0)
        return agent_s, nic_s
    finally:
        box.kill()
        sb.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    paths, store = home_with_default_template()
    url, key = daemon_on_tcp(paths, store)
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
        agent_s, nic_s = port_requests(opts, url, key, max(args.reps, 20))
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
    a, n = statistics.median(agent_s) * 1000, statistics.median(nic_s) * 1000
    print(f"GET / of a guest http.server, {len(agent_s)} interleaved reps:")
    print(f"  get_host, carried by the agent (no NIC): median {a:7.2f} ms")
    print(f"  ember exposed port through the NIC:      median {n:7.2f} ms  "
          f"(ratio {a / n:.2f})")


if __name__ == "__main__":
    main()
