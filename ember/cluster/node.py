"""Joining and leaving: this host's Ray node, started and stopped with Ray's own ``ray
start`` / ``ray stop`` (run through :func:`ember.proc.run`), advertising the home's
:class:`~ember.cluster.advertise.Advertisement` as Ray resources.

The head keeps its GCS state in Redis (``RAY_REDIS_ADDRESS``), so that a head restarted with
the same Redis, address and port finds every node and actor where it left them. Ray finds
a running node by the process list, so a host runs one Ray node (one ember home) at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ember.cluster.advertise import Advertisement
from ember.cluster.directory import publish_node
from ember.cluster.nodes import INSTALL_HINT, QUERY_TIMEOUT_S, bounded, own_node_id
from ember.cluster.record import (
    ClusterRecord,
    Role,
    clear_record,
    load_record,
    save_record,
    save_secret,
)
from ember.cluster.templates import home_held
from ember.cluster.templates import sync as sync_templates
from ember.errors import BadRequestError, HostError, MissingDependencyError
from ember.paths import Paths
from ember.proc import run

log = logging.getLogger("ember.cluster")

#: The head's GCS port unless told (not Ray's 6379: that is Redis's, often on the head).
DEFAULT_PORT = 6380
#: Ray's shared-memory object store per node: ember moves no objects through Ray, and 75
#: MiB is Ray's minimum.
OBJECT_STORE_BYTES = 80 * 2**20
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
#: How long a started node may take to appear alive in the node table.
REGISTER_WAIT_S = 60.0
#: The TCP port of a node's daemon, where other nodes' daemons forward requests to.
DEFAULT_DAEMON_PORT = 7707


@dataclass(frozen=True)
class JoinOptions:
    """What ``ray start`` is told, besides the advertisement."""

    node_ip: str
    address: str | None = None  # the head's GCS (a worker); None: start a head
    port: int = DEFAULT_PORT  # the head's GCS port
    redis: str | None = None  # the head's Redis, host:port
    redis_password: str | None = None
    redis_username: str = "default"
    daemon_port: int = DEFAULT_DAEMON_PORT


def ray_executable() -> str:
    """Ray's CLI of this Python environment (else the one on PATH)."""
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise MissingDependencyError(INSTALL_HINT)
    return found


def ray_temp_dir(paths: Paths) -> Path:
    """Ray's sessions, sockets and logs for this home: short (Unix socket paths under it are
    bounded to 107 bytes) and distinct per home."""
    key = hashlib.sha256(os.fsencode(paths.home)).hexdigest()[:12]
    return Path("/tmp") / f"ember-ray-{key}"


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequestError(f"an address is HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


def source_ip_towards(address: str) -> str:
    """The local address this host reaches ``address`` from (a UDP connect: no packet is
    sent)."""
    host, port = split_address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
        except OSError as err:
            raise HostError(f"no route from this host to {address}: {err.strerror}") from err
        return str(s.getsockname()[0])


def start_argv(ray: str, opts: JoinOptions, adv: Advertisement, temp_dir: Path) -> list[str]:
    """``ray start`` for a head (``opts.address`` None) or a worker (pure)."""
    argv = [ray, "start", "--node-ip-address", opts.node_ip, "--num-cpus", "0",
            "--num-gpus", "0", "--resources", json.dumps(adv.resources(), sort_keys=True),
            "--object-store-memory", str(OBJECT_STORE_BYTES), "--temp-dir", str(temp_dir),
            "--disable-usage-stats"]
    if opts.address is None:
        argv += ["--head", "--port", str(opts.port), "--include-dashboard", "false"]
        if opts.redis_password:
            argv += ["--redis-username", opts.redis_username,
                     "--redis-password", opts.redis_password]
    else:
        argv += ["--address", opts.address]
    return argv


def ray_env(opts: JoinOptions, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_REDIS_ADDRESS", None)  # a worker's ray start must not see one
    if opts.address is None and opts.redis:
        env["RAY_REDIS_ADDRESS"] = opts.redis
    return env


def running_raylet(temp_dir: Path | None, proc: Path = Path("/proc")) -> int | None:
    """The pid of a raylet (in this PID namespace) whose session lives in ``temp_dir``
    (None: any raylet, whoever started it)."""
    needle = os.fsencode(str(temp_dir).rstrip("/") + "/") if temp_dir else b""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_bytes().strip() != b"raylet":
                continue
            if (entry / "stat").read_bytes().rsplit(b") ", 1)[-1][:1] == b"Z":
                continue  # exited, not yet reaped
            if needle in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    return None


def _start(paths: Paths, opts: JoinOptions, adv: Advertisement, role: Role) -> ClusterRecord:
    temp = ray_temp_dir(paths)
    prior = load_record(paths)
    if running_raylet(temp) is not None:
        where = f" (a {prior.role} of {prior.address})" if prior else ""
        raise BadRequestError(f"this home's Ray node runs already{where}: "
                              "`ember cluster leave` first")
    if prior is not None and prior.role != role:
        raise BadRequestError(f"this home was a {prior.role} of {prior.address}: "
                              "`ember cluster leave` first")
    temp.mkdir(mode=0o700, parents=True, exist_ok=True)
    argv = start_argv(ray_executable(), opts, adv, temp)
    log.info("starting Ray's %s node at %s: %s", role, opts.node_ip, adv.resources())
    run(argv, what=f"ray start ({role})", env=ray_env(opts), timeout=START_TIMEOUT_S)
    address = opts.address or f"{opts.node_ip}:{opts.port}"
    deadline = time.monotonic() + REGISTER_WAIT_S
    node_id = None
    while node_id is None:
        node_id = own_node_id(address, str(temp))
        if node_id is None:
            if time.monotonic() > deadline:
                raise HostError(f"Ray's node started but is not alive in the node table of "
                                f"{address} after {REGISTER_WAIT_S:.0f} s (logs: {temp})")
            time.sleep(0.5)
    daemon = f"{opts.node_ip}:{opts.daemon_port}"
    secret = bounded(lambda: publish_node(address, str(node_id), daemon), QUERY_TIMEOUT_S,
                     f"publishing this node's daemon ({daemon}) to {address}")
    save_secret(paths, secret)
    bounded(lambda: sync_templates(address, str(node_id), home_held(paths)), QUERY_TIMEOUT_S,
            f"publishing this node's templates to {address}")  # who holds what: the directory
    rec = ClusterRecord(address=address, role=role, node_ip=opts.node_ip, node_id=node_id,
                        resources=adv.resources(), ray_temp_dir=str(temp),
                        joined_at=time.time(), redis=opts.redis if role == "head" else None,
                        daemon=daemon)
    save_record(paths, rec)
    return rec


def start_head(paths: Paths, adv: Advertisement, *, redis: str, node_ip: str | None = None,
               port: int = DEFAULT_PORT, redis_password: str | None = None,
               redis_username: str = "default",
               daemon_port: int = DEFAULT_DAEMON_PORT) -> ClusterRecord:
    """Start the cluster's head on this host, its GCS state in ``redis``; again after a
    head restart, with the same Redis, address and port: the cluster resumes."""
    split_address(redis)
    opts = JoinOptions(node_ip=node_ip or source_ip_towards(redis), port=port, redis=redis,
                       redis_password=redis_password, redis_username=redis_username,
                       daemon_port=daemon_port)
    return _start(paths, opts, adv, "head")


def join(paths: Paths, adv: Advertisement, address: str, *, node_ip: str | None = None,
         daemon_port: int = DEFAULT_DAEMON_PORT) -> ClusterRecord:
    """Join the cluster whose head's GCS is at ``address`` as a worker node."""
    split_address(address)
    opts = JoinOptions(node_ip=node_ip or source_ip_towards(address), address=address,
                       daemon_port=daemon_port)
    return _start(paths, opts, adv, "worker")


def leave(paths: Paths) -> ClusterRecord | None:
    """Stop this host's Ray node (``ray stop``: Ray marks it dead at once) and forget the
    cluster. Sandboxes are the daemon's and keep running."""
    rec = load_record(paths)
    if running_raylet(ray_temp_dir(paths)) is not None or rec is not None:
        run([ray_executable(), "stop"], what="ray stop", timeout=STOP_TIMEOUT_S,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    clear_record(paths)
    return rec
