"""Issue 13 figures, side by side in one run, against the tests' fake host and fake
internet (tests/integration/networld.py: no packet leaves this machine):

* create to first exec without a network, and with one (both restored from their template
  snapshots), in-process: what networking adds to a create;
* the host side alone: setting up and tearing down one sandbox's network, with an empty
  policy and with 900 CIDRs and 100 domains;
* from inside a guest: TCP connect time and 64 MiB transfers to and from the fake
  internet, with an empty policy and with the 1,000-entry one; the same from a gVisor and
  a container sandbox (empty policy); the same connects from the fake host itself, for
  scale;
* web requests (HTTP GET on port 80, connect to answer) from a guest, straight out and
  through the sandbox's transparent proxy (a policy with a domain rule), and the proxy's
  share of network setup (a policy with one domain);
* through the daemon: time to first byte of an HTTP answer from an exposed port of a
  running sandbox, next to one that idleness paused (scale to zero: resumed by the
  connection).

Run: .venv/bin/python benchmarks/bench_network.py [--reps 5] [--mib 64] [--tiers gvisor container]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ember import NetworkPolicy, Sandbox
from ember.net.manager import NetworkManager
from ember.net.nsutil import in_netns, netns_path
from ember.paths import Paths
from tests.integration.networld import INET_IP, accept_each, fake_world

BULK_PORT = 9100
ECHO_PORT = 9101
BIG = NetworkPolicy(allow=tuple(f"203.{i // 256}.{i % 256}.0/24" for i in range(800))
                    + tuple(f"name{i}.example" for i in range(100)),
                    deny=tuple(f"192.0.2.{i}" for i in range(100)))

GUEST = """
import socket, sys, time
host, mib, connects = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def conn(port):
    return socket.create_connection((host, port), timeout=30)
t = []
for _ in range(connects):
    t0 = time.perf_counter(); c = conn(ECHO); t.append(time.perf_counter() - t0); c.close()
t.sort(); print('connect_ms', t[len(t) // 2] * 1000)
s = conn(BULK); s.sendall(b'D'); t0 = time.perf_counter(); got = 0
while got < mib << 20:
    b = s.recv(1 << 20)
    if not b: break
    got += len(b)
print('down_mib_s', got / (1 << 20) / (time.perf_counter() - t0)); s.close()
s = conn(BULK); s.sendall(b'U'); buf = b'x' * (1 << 20); t0 = time.perf_counter()
for _ in range(mib): s.sendall(buf)
s.shutdown(socket.SHUT_WR); s.recv(1)
print('up_mib_s', mib / (time.perf_counter() - t0))
""".replace("ECHO", str(ECHO_PORT)).replace("BULK", str(BULK_PORT))

WEBREQ = """
import socket, sys, time
t = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    with socket.create_connection((sys.argv[1], 80), timeout=30) as s:
        s.sendall(b'GET / HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n')
        assert b'hello from' in s.recv(4096)
    t.append(time.perf_counter() - t0)
t.sort(); print(t[len(t) // 2] * 1000)
"""
ONE_DOMAIN = NetworkPolicy(deny=("other.test",))


def serve(listener: socket.socket, mib: int) -> None:
    def one(c: socket.socket) -> None:
        with c:
            mode = c.recv(1)
            if mode == b"D":
                buf = b"y" * (1 << 20)
                for _ in range(mib):
                    c.sendall(buf)
            elif mode == b"U":
                while c.recv(1 << 20):
                    pass
                c.sendall(b"k")

    accept_each(listener, one)


def echo(listener: socket.socket) -> None:
    while True:
        try:
            c, _ = listener.accept()
        except OSError:
            return
        c.close()


def scale_to_zero(paths: Paths, reps: int) -> dict[str, list[float]]:
    """First byte through an exposed port (the daemon's): running, and idle-paused."""
    from ember.daemon.control import stop as stop_daemon

    os.environ.pop("EMBER_LOCAL", None)  # ports are served by the daemon
    out: dict[str, list[float]] = {"running": [], "paused": []}
    sb = Sandbox.create(paths=paths, network={"internet": False})
    try:
        sb.spawn(["python3", "-m", "http.server", "8000"])
        exposed = None
        for _ in range(600):
            if "200" in sb.exec("python3 -c \"import urllib.request as u; print(u.urlopen("
                                "'http://127.0.0.1:8000/').status)\"").stdout:
                exposed = sb.expose(8000, pause_after_idle=1)
                break
            time.sleep(0.1)
        assert exposed is not None, "the guest's server never answered"

        def first_byte() -> float:
            t0 = time.perf_counter()
            with socket.create_connection((exposed.host, exposed.host_port), timeout=60) as c:
                c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                c.recv(1)
            return time.perf_counter() - t0

        for _ in range(reps):
            out["running"].append(first_byte())
            deadline = time.monotonic() + 30
            while Sandbox.get_info(sb.id, paths=paths).state != "paused":
                assert time.monotonic() < deadline, "never paused"
                time.sleep(0.1)
            out["paused"].append(first_byte())
    finally:
        sb.kill()
        os.environ["EMBER_LOCAL"] = "1"
        stop_daemon(paths)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--connects", type=int, default=20)
    ap.add_argument("--tiers", nargs="*", default=["gvisor", "container"],
                    choices=["gvisor", "container"],
                    help="weaker tiers measured next to the microVM (default: both)")
    args = ap.parse_args()
    from ember.guest.image import build_image
    from ember.store import Store

    root = Path(tempfile.mkdtemp(prefix="bnet-", dir="/tmp"))
    paths = Paths(home=root, cache=Paths.from_env().cache,
                  ram=Path(f"/dev/shm/ember-bench-{root.name}")).ensure()
    store = Store(paths.db)
    build_image(paths, store, "debian-python", force=True)
    store.close()
    os.environ.update(EMBER_HOME=str(root), EMBER_LOCAL="1")
    with fake_world() as world:
        os.environ["EMBER_NET_HOST_NS"] = world.host
        inet = netns_path(world.inet)
        bulk = in_netns(inet, lambda: socket.create_server(("0.0.0.0", BULK_PORT)))
        ech = in_netns(inet, lambda: socket.create_server(("0.0.0.0", ECHO_PORT), backlog=64))
        threading.Thread(target=serve, args=(bulk, args.mib), daemon=True).start()
        threading.Thread(target=echo, args=(ech,), daemon=True).start()
        try:
            run(paths, world.host, args)
        finally:
            for sb in Sandbox.list(paths=paths):
                with contextlib.suppress(Exception):
                    Sandbox.kill(sb.id, paths=paths)
            bulk.close()
            ech.close()
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(paths.ram, ignore_errors=True)


def run(paths: Paths, host_ns: str, args: argparse.Namespace) -> None:
    # Make both template snapshots first (the first create of each kind boots).
    for net in (None, NetworkPolicy()):
        Sandbox.create(paths=paths, network=net).kill()
    creates: dict[str, list[float]] = {"none": [], "network": []}
    for _ in range(args.reps):
        for label, net in (("none", None), ("network", NetworkPolicy())):
            t0 = time.perf_counter()
            sb = Sandbox.create(paths=paths, network=net)
            sb.exec("true").check()
            creates[label].append(time.perf_counter() - t0)
            sb.kill()
    mgr = NetworkManager(paths.home)
    setup: dict[str, list[float]] = {"empty": [], "1 domain": [], "1000 entries": []}
    teardown: dict[str, list[float]] = {k: [] for k in setup}
    for _ in range(args.reps):
        for label, pol in (("empty", NetworkPolicy()), ("1 domain", ONE_DOMAIN),
                           ("1000 entries", BIG)):
            sid = "sb-" + secrets.token_hex(6)
            t0 = time.perf_counter()
            att = mgr.attach(sid, pol)
            setup[label].append(time.perf_counter() - t0)
            os.close(att.tap_fd)
            t0 = time.perf_counter()
            mgr.detach(sid)
            teardown[label].append(time.perf_counter() - t0)
    host_connects = []
    for _ in range(args.connects):
        t0 = time.perf_counter()
        in_netns(netns_path(host_ns), lambda: socket.create_connection(
            (INET_IP, ECHO_PORT), timeout=10).close())
        host_connects.append(time.perf_counter() - t0)
    guest: dict[str, dict[str, list[float]]] = {"empty": {}, "1000 entries": {}}
    sb = Sandbox.create(paths=paths, network=NetworkPolicy())
    try:
        for _ in range(args.reps):
            for label, pol in (("empty", NetworkPolicy()), ("1000 entries", BIG)):
                sb.set_network(pol)
                out = sb.exec(["python3", "-c", GUEST, INET_IP, str(args.mib),
                               str(args.connects)], timeout=900).check().stdout
                for line in out.splitlines():
                    k, v = line.split()
                    guest[label].setdefault(k, []).append(float(v))
        web: dict[str, list[float]] = {"direct": [], "proxied": []}
        for _ in range(args.reps):
            for label, pol in (("direct", NetworkPolicy()), ("proxied", ONE_DOMAIN)):
                sb.set_network(pol)
                out = sb.exec(["python3", "-c", WEBREQ, INET_IP, str(args.connects)],
                              timeout=900).check().stdout
                web[label].append(float(out))
    finally:
        sb.kill()
    tiers: dict[str, dict[str, list[float]]] = {}
    for tier in args.tiers:  # the weaker tiers, empty policy (the microVM's is "empty")
        tsb = Sandbox.create(paths=paths, network=NetworkPolicy(), isolation=tier)
        try:
            for _ in range(args.reps):
                out = tsb.exec(["python3", "-c", GUEST, INET_IP, str(args.mib),
                                str(args.connects)], timeout=900).check().stdout
                for line in out.splitlines():
                    k, v = line.split()
                    tiers.setdefault(tier, {}).setdefault(k, []).append(float(v))
        finally:
            tsb.kill()
    ttfb = scale_to_zero(paths, args.reps)
    print(f"# network figures ({args.reps} reps, medians; {args.mib} MiB transfers)")
    a, b = med(creates["none"]), med(creates["network"])
    print(f"create->first exec, no network:     {a * 1000:8.1f} ms")
    print(f"create->first exec, network:        {b * 1000:8.1f} ms  ({b / a:.2f}x, "
          f"+{(b - a) * 1000:.1f} ms)")
    for label in setup:
        print(f"network setup, {label:13s}:      {med(setup[label]) * 1000:8.1f} ms   "
              f"teardown {med(teardown[label]) * 1000:.1f} ms")
    print(f"TCP connect from the fake host:     {med(host_connects) * 1000:8.2f} ms "
          "(includes a thread's setns)")
    for label, figs in guest.items():
        print(f"guest, policy {label:13s}: connect {med(figs['connect_ms']):.2f} ms, "
              f"down {med(figs['down_mib_s']):.1f} MiB/s, up {med(figs['up_mib_s']):.1f} MiB/s")
    e, big = guest["empty"], guest["1000 entries"]
    for tier, figs in tiers.items():
        print(f"{tier:9s} (empty policy):   connect {med(figs['connect_ms']):.2f} ms, "
              f"down {med(figs['down_mib_s']):.1f} MiB/s, up {med(figs['up_mib_s']):.1f} MiB/s")
    d, p = med(web["direct"]), med(web["proxied"])
    print(f"web request (port 80): direct {d:.2f} ms, through the proxy {p:.2f} ms "
          f"({p / d:.2f}x)")
    run_ms, paused_ms = med(ttfb["running"]) * 1000, med(ttfb["paused"]) * 1000
    print(f"exposed port, first byte: running {run_ms:.1f} ms, idle-paused {paused_ms:.1f} ms "
          f"({paused_ms / run_ms:.1f}x)")
    ratio = med(big["connect_ms"]) / med(e["connect_ms"])
    print(f"1000-entry policy / empty: connect {ratio:.2f}x,"
          f" down {med(big['down_mib_s']) / med(e['down_mib_s']):.2f}x, "
          f"up {med(big['up_mib_s']) / med(e['up_mib_s']):.2f}x")


if __name__ == "__main__":
    main()
