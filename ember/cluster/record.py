"""Which cluster a home belongs to: ``$EMBER_HOME/cluster.json``, written by
``ember cluster start-head`` / ``join`` and removed by ``leave``.

Not a membership list (Ray's node table is that): only what this home did, so that its
daemon (``GET /v1/health``, ``ember daemon status``) and ``ember cluster nodes`` know the
cluster's address without asking the user again. Read back as untrusted input: a file that
does not parse is reported as such, never half-used.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ember.errors import HostError
from ember.paths import Paths

Role = Literal["head", "worker"]
ROLES: tuple[Role, ...] = ("head", "worker")
FILENAME = "cluster.json"
#: The cluster's shared secret (:mod:`ember.cluster.vouch`), apart from the record, which
#: the daemon shows in ``GET /v1/health``.
SECRET_FILENAME = "cluster.secret"


@dataclass(frozen=True)
class ClusterRecord:
    #: The head's GCS address, ``host:port`` (what ``ember cluster join`` takes).
    address: str
    role: Role
    #: This node's address in the cluster (Ray's ``--node-ip-address``).
    node_ip: str
    #: Ray's id for this node, as its node table names it.
    node_id: str
    #: The Ray resources this node advertised when it joined.
    resources: dict[str, float] = field(default_factory=dict)
    #: Where Ray keeps this node's sessions, sockets and logs.
    ray_temp_dir: str = ""
    joined_at: float = 0.0
    #: The head's Redis (``host:port``) that keeps the GCS state; head only.
    redis: str | None = None
    #: This node's daemon on TCP (``ip:port``), where other nodes' daemons forward to.
    daemon: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> ClusterRecord:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        role = data.get("role")
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        resources = data.get("resources", {})
        if not isinstance(resources, dict) or not all(
                isinstance(k, str) and isinstance(v, int | float) for k, v in resources.items()):
            raise ValueError("resources must map names to numbers")
        strings = {k: data.get(k) for k in ("address", "node_ip", "node_id")}
        for key, value in strings.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key} must be a non-empty string")
        redis = data.get("redis")
        if redis is not None and not isinstance(redis, str):
            raise ValueError("redis must be a string")
        daemon = data.get("daemon")
        if daemon is not None and not isinstance(daemon, str):
            raise ValueError("daemon must be a string")
        temp = data.get("ray_temp_dir", "")
        joined = data.get("joined_at", 0.0)
        if not isinstance(temp, str) or not isinstance(joined, int | float):
            raise ValueError("ray_temp_dir must be a string and joined_at a number")
        return cls(address=str(strings["address"]), role=role, node_ip=str(strings["node_ip"]),
                   node_id=str(strings["node_id"]),
                   resources={k: float(v) for k, v in resources.items()},
                   ray_temp_dir=temp, joined_at=float(joined), redis=redis, daemon=daemon)


def load_record(paths: Paths) -> ClusterRecord | None:
    """The cluster this home joined, or None when it joined none."""
    path = paths.home / FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise HostError(f"cannot read {path}: {err.strerror}") from err
    try:
        return ClusterRecord.from_json(json.loads(text))
    except ValueError as err:
        raise HostError(f"{path} is not a valid cluster record ({err}); "
                        "`ember cluster leave` removes it") from err


def save_record(paths: Paths, rec: ClusterRecord) -> None:
    """Write the record atomically (a reader sees the old one or the new one)."""
    paths.home.mkdir(parents=True, exist_ok=True)
    path = paths.home / FILENAME
    tmp = path.with_name(f".{FILENAME}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(rec.to_json(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise HostError(f"cannot write {path}: {err.strerror}") from err


def save_secret(paths: Paths, secret: str) -> None:
    """Keep the cluster's secret in the home, readable by its owner only."""
    path = paths.home / SECRET_FILENAME
    tmp = path.with_name(f".{SECRET_FILENAME}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise HostError(f"cannot write {path}: {err.strerror}") from err


def load_secret(paths: Paths) -> str | None:
    """The cluster's secret, or None when this home has none."""
    try:
        return (paths.home / SECRET_FILENAME).read_text().strip() or None
    except OSError:
        return None


def clear_record(paths: Paths) -> bool:
    """Forget the cluster; True when there was a record."""
    (paths.home / SECRET_FILENAME).unlink(missing_ok=True)
    path = paths.home / FILENAME
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as err:
        raise HostError(f"cannot remove {path}: {err.strerror}") from err
    return True


def summary(paths: Paths) -> dict[str, Any] | None:
    """What the daemon says about its cluster (``GET /v1/health``): the record, or None;
    a broken record is reported, never raised."""
    try:
        rec = load_record(paths)
    except HostError as err:
        return {"error": str(err)}
    return rec.to_json() if rec else None
