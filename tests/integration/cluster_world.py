"""Three ember hosts on one machine, for the cluster tests: each node a network namespace
on a bridge and a PID namespace of its own (Ray finds a running node by the process list),
with its own EMBER_HOME. Nothing in the world touches the machine's own network: the bridge
lives in a "switch" namespace, which also holds the Redis that keeps the head's GCS state.

    switch ns:  br0 192.0.2.254/24 (TEST-NET-1), redis-server on it
    node ns i:  eth0 192.0.2.i/24 (veth to br0); PID 1 a reaper, every command entered
                with nsenter into its PID, mount and network namespaces

Killing a node's PID 1 kills everything in its PID namespace (the kernel's rule), which is
how a test kills a whole host and how teardown leaves nothing behind, whatever failed.
Every wait here is bounded.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ember.cluster.node import ray_temp_dir
from ember.net.nsutil import in_netns, netns_path, remove_netns
from ember.paths import Paths

#: The marks of every test module that runs a cluster world.
MARKS = [
    pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root"),
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not installed (scripts/install.sh)"),
]
SUBNET = "192.0.2"
SWITCH_IP = f"{SUBNET}.254"
REDIS_PORT = 6379
VENV_BIN = Path(sys.executable).parent
#: PID 1 of a node: reaps whatever is orphaned to it (Ray's daemons once ``ray start``
#: exits), and ends (taking the namespace with it) on SIGTERM.
INIT = ("import os, signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "while True:\n"
        "    try:\n"
        "        os.wait()\n"
        "    except ChildProcessError:\n"
        "        signal.pause()\n")
CMD_TIMEOUT_S = 240.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def wait_for(what: str, check: Callable[[], Any], timeout: float,
             interval: float = 0.5) -> Any:
    """Poll ``check`` until it returns something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


@dataclass
class Node:
    name: str
    netns: str
    ip: str
    home: Path
    cache: Path
    holder: subprocess.Popen[bytes] | None = None
    init_pid: int = 0

    @property
    def paths(self) -> Paths:
        return Paths(home=self.home, cache=self.cache)

    def boot(self) -> None:
        """A fresh PID namespace (and mount namespace with its own /proc) in the node's
        network namespace: a host that just booted."""
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--mount-proc",
             sys.executable, "-c", INIT],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        children = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children")

        def child() -> int:
            with suppress(OSError, ValueError, IndexError):
                return int(children.read_text().split()[0])
            return 0

        self.init_pid = wait_for(f"{self.name}'s PID 1", child, 10, 0.05)

    def pid_ns(self) -> str:
        return os.readlink(f"/proc/{self.init_pid}/ns/pid")

    def pids(self) -> dict[int, str]:
        """Live processes of this node's PID namespace (host pids) and their names."""
        ns = self.pid_ns()
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            with suppress(OSError, IndexError):
                if os.readlink(d / "ns/pid") != ns:
                    continue
                stat = (d / "stat").read_text()
                if stat.rsplit(") ", 1)[1][0] != "Z":
                    out[int(d.name)] = (d / "comm").read_text().strip()
        return out

    def pid_of(self, comm: str) -> int | None:
        found = [p for p, c in self.pids().items() if c == comm]
        return found[0] if found else None

    def env(self) -> dict[str, str]:
        return {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                "EMBER_HOME": str(self.home), "EMBER_CACHE": str(self.cache),
                "RAY_USAGE_STATS_ENABLED": "0", "LANG": "C.UTF-8"}

    def run(self, *argv: str, timeout: float = CMD_TIMEOUT_S,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """``argv`` on this node (in its PID, mount and network namespaces)."""
        cp = subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-p", "-m", "-n", "--", *argv],
            env=self.env(), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL)
        if check and cp.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(argv)} exited {cp.returncode}:\n"
                                 f"{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}")
        return cp

    def ember(self, *args: str, timeout: float = CMD_TIMEOUT_S,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(str(VENV_BIN / "ember"), *args, timeout=timeout, check=check)

    def nodes(self, *extra: str) -> list[dict[str, Any]]:
        """``ember cluster nodes --json`` as this node sees the cluster."""
        out: list[dict[str, Any]] = json.loads(
            self.ember("cluster", "nodes", "--json", *extra).stdout)
        return out

    def kill(self) -> None:
        """The whole host dies at once: its PID 1 is killed, so is every process in its
        PID namespace (Ray's GCS, raylet, workers, ember's daemon)."""
        if self.holder is None:
            return
        if self.init_pid > 1:  # never 0: kill(0) is this whole process group
            with suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
        try:
            self.holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.holder.kill()
            self.holder.wait(timeout=10)
        self.holder = None


@dataclass
class ClusterWorld:
    tag: str
    switch: str
    root: Path
    redis_password: str
    nodes: list[Node] = field(default_factory=list)
    redis: subprocess.Popen[bytes] | None = None

    @property
    def redis_address(self) -> str:
        return f"{SWITCH_IP}:{REDIS_PORT}"

    @property
    def head(self) -> Node:
        return self.nodes[0]

    def start_head(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.head.ember(
            "cluster", "start-head", "--redis", self.redis_address,
            "--redis-password", self.redis_password, "--vcpus", "2", "--memory-mib", "2048",
            "--json").stdout)
        return out


def _redis_answers(switch: str, password: str) -> bool:
    def ping() -> bool:
        try:
            with socket.create_connection((SWITCH_IP, REDIS_PORT), timeout=2) as s:
                s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
                got = b""
                while b"PONG" not in got:
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    got += chunk
                return b"PONG" in got
        except OSError:
            return False

    return bool(in_netns(netns_path(switch), ping))


@contextmanager
def cluster_world(root: Path, n: int = 3, cache: Path | None = None) -> Iterator[ClusterWorld]:
    """The switch, its Redis and ``n`` booted (not yet joined) nodes, sharing ``cache`` (the
    heavy artifacts; default an empty one under ``root``); everything removed on the way
    out, whatever happened."""
    tag = f"{os.getpid() % 100000}"
    world = ClusterWorld(tag=tag, switch=f"ecl-sw-{tag}", root=root,
                         redis_password=secrets.token_hex(16))
    cache = cache or root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    names = [f"ecl-n{i}-{tag}" for i in range(1, n + 1)]
    with ExitStack() as cleanup:
        for ns in (world.switch, *names):
            remove_netns(netns_path(ns))
            cleanup.callback(remove_netns, netns_path(ns))
            cleanup.callback(shutil.rmtree, Path("/etc/netns") / ns, True)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            # Name lookups stay in the world: nothing answers there, so they fail at once.
            (etc / "resolv.conf").write_text(f"nameserver {SWITCH_IP}\n")
        _ip("-n", world.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", world.switch, "addr", "add", f"{SWITCH_IP}/24", "dev", "br0")
        _ip("-n", world.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(names, start=1):
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"v{i}",
                "netns", world.switch)
            _ip("-n", world.switch, "link", "set", f"v{i}", "master", "br0")
            _ip("-n", world.switch, "link", "set", f"v{i}", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        redis_dir = root / "redis"
        redis_dir.mkdir()
        world.redis = subprocess.Popen(
            ["ip", "netns", "exec", world.switch, "redis-server", "--port", str(REDIS_PORT),
             "--bind", SWITCH_IP, "--requirepass", world.redis_password, "--save", "",
             "--appendonly", "no", "--dir", str(redis_dir), "--daemonize", "no",
             "--logfile", str(redis_dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cleanup.callback(_stop, world.redis)
        wait_for("redis answers",
                 lambda: _redis_answers(world.switch, world.redis_password), 30)
        for i, ns in enumerate(names, start=1):
            home = root / f"n{i}"
            home.mkdir()
            node = Node(name=f"n{i}", netns=ns, ip=f"{SUBNET}.{i}", home=home, cache=cache)
            world.nodes.append(node)
            cleanup.callback(shutil.rmtree, ray_temp_dir(node.paths), True)
            cleanup.callback(_ram_dir_gone, node.paths)
            cleanup.callback(node.kill)
            node.boot()
        yield world


@contextmanager
def checked_world(root: Path, cache: Path | None = None) -> Iterator[ClusterWorld]:
    """:func:`cluster_world` for a test module: the nodes' daemons stopped on the way out,
    ``root`` removed, and then no process of the world may be left (an assertion)."""
    try:
        with cluster_world(root, cache=cache) as w:
            try:
                yield w
            finally:
                for node in w.nodes:
                    if node.holder is not None:
                        node.ember("daemon", "stop", check=False, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    left = leftover_processes(w)
    assert not left, f"processes left behind by the cluster world: {left}"


def leftover_processes(world: ClusterWorld) -> list[str]:
    """Live processes of a world that should be gone: any naming its root or one of its
    nodes' Ray directories (checked after :func:`cluster_world` has ended)."""
    needles = [str(world.root).encode()]
    needles += [str(ray_temp_dir(node.paths)).encode() for node in world.nodes]
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(n in cmd for n in needles):
            out.append(f"{d.name}: {cmd[:120]!r}")
    return out


def _stop(child: subprocess.Popen[bytes]) -> None:
    child.terminate()
    try:
        child.wait(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=10)


def _ram_dir_gone(paths: Paths) -> None:
    shutil.rmtree(paths.ram, ignore_errors=True)
