"""Issue 15, tenants and keys across the cluster: what they add to a request, side by side
in one run, on the tests' world (tests/integration/cluster_world.py: namespaces, no packet
leaves this machine):

* a quota admission (``ember.cluster.quota.admit``, the call every placed create makes to
  the cluster's keeper actor), from a Ray driver on the head: the first (the keeper
  started), then each for a tenant without limits (recorded only) and for a tenant with
  limits (Ray's named-actor table read each time);
* an API-key check: ``GET /v1/health`` with a key over TCP on a node of a cluster (its
  key records read in a child process: the first request waits for a reading, later ones
  are served while the next is read in the background), back to back and one every 0.5 s
  (readings renewed meanwhile), next to the same on a node in no cluster.

Run (as root): .venv/bin/python benchmarks/bench_cluster_quota.py [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ember.cluster.node import DEFAULT_DAEMON_PORT
from tests.conftest import DEFAULT_TEST_CACHE
from tests.integration.cluster_world import VENV_BIN, Node, cluster_world

ADMIT = """
import json, sys, time, ray
from ember.cluster.quota import admit
ray.init(address=sys.argv[1], namespace="ember", logging_level="ERROR", log_to_driver=False,
         configure_logging=False)
reps = int(sys.argv[2])
out = {}
for tenant in ("first", "free", "limited"):
    times = []
    for i in range(1 if tenant == "first" else reps):
        t0 = time.perf_counter()
        got = admit(f"bench-{tenant}-{i}", tenant, 1, 256, None)
        times.append(time.perf_counter() - t0)
        assert got is None, got
    out[tenant] = times
print(json.dumps(out))
"""
HEALTH = """
import json, sys, time, httpx
url, key, reps, pace = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
times = []
with httpx.Client(timeout=60) as c:
    for _ in range(reps):
        time.sleep(pace)
        t0 = time.perf_counter()
        r = c.get(url + "/v1/health", headers={"authorization": "Bearer " + key})
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
print(json.dumps(times))
"""


def py(node: Node, code: str, *args: str) -> object:
    return json.loads(node.run(str(VENV_BIN / "python"), "-c", code, *args,
                               timeout=600).stdout.splitlines()[-1])


def ms(xs: list[float]) -> str:
    s = sorted(xs)
    return f"{s[len(s) // 2] * 1000:7.1f} ms (min {s[0] * 1000:.1f}, max {s[-1] * 1000:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ecl-bench-", dir="/tmp"))
    cache = Path(os.environ.get("EMBER_CACHE") or DEFAULT_TEST_CACHE)
    try:
        with cluster_world(root, n=2, cache=cache) as w:
            head, alone = w.nodes
            address = w.start_head()["address"]
            alone.ember("daemon", "start", "--listen", f"{alone.ip}:{DEFAULT_DAEMON_PORT}")
            try:
                head.ember("tenant", "set", "limited", "--max-sandboxes", "100000")
                admits = py(head, ADMIT, address, str(args.reps))
                assert isinstance(admits, dict)
                keys = {n.name: json.loads(n.ember("apikey", "create", "--tenant", "bench",
                                                   "--json").stdout)["key"]
                        for n in (head, alone)}
                head_url = f"http://{head.ip}:{DEFAULT_DAEMON_PORT}"
                in_cluster = py(head, HEALTH, head_url, keys[head.name], str(args.reps), "0")
                paced = py(head, HEALTH, head_url, keys[head.name], str(args.reps), "0.5")
                no_cluster = py(alone, HEALTH, f"http://{alone.ip}:{DEFAULT_DAEMON_PORT}",
                                keys[alone.name], str(args.reps), "0")
                assert isinstance(in_cluster, list) and isinstance(no_cluster, list)
                assert isinstance(paced, list)
            finally:
                for n in w.nodes:
                    n.ember("daemon", "stop", check=False, timeout=60)
        print(f"\n(a head at {address} and a node in no cluster; n={args.reps} each; "
              "median (min, max))")
        print(f"quota admission, the first (keeper started) {admits['first'][0] * 1000:9.1f} ms")
        print(f"quota admission, tenant without limits      {ms(admits['free'])}")
        print(f"quota admission, tenant with limits         {ms(admits['limited'])}")
        print(f"GET /v1/health with a key, node of a cluster {ms(in_cluster)}")
        print(f"the same, one every 0.5 s for {args.reps / 2:.0f} s  {ms(paced)}")
        print(f"GET /v1/health with a key, node in no cluster {ms(no_cluster)}")
        mid_in, mid_none = sorted(in_cluster), sorted(no_cluster)
        print(f"ratio (cluster / none, medians)              "
              f"{mid_in[len(mid_in) // 2] / mid_none[len(mid_none) // 2]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
