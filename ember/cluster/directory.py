"""Where things live in the cluster: a small record per node and per placed sandbox in
Ray's GCS key-value store (namespace ``ember``), so that any node's daemon can find the
node that holds a sandbox and talk to that node's daemon directly (Ray stays off the
data path: it is asked where, never carries a byte of the sandbox's traffic).

Keys (values are UTF-8):

* ``node/<ray node id>``: JSON ``{"daemon": "ip:port"}``, the daemon's TCP listener that
  the node advertised when it joined (:func:`publish_node`).
* ``sandbox/<sandbox id>``: the Ray node id that holds it, written by the placement driver
  once the sandbox exists and removed by its placement actor when the sandbox is gone.
* ``secret``: the cluster's shared secret (daemons vouch for callers with it:
  :mod:`ember.cluster.vouch`), made once by the first node that asks for it.
* ``template/<name>/<ray node id>``: the digest that node holds under that name
  (:mod:`ember.cluster.templates`, which reads and writes them).

Ray's GCS client blocks for 40 s or more when the head is down and cannot be cancelled, so
a daemon reads the directory in a short-lived child process (``python -m
ember.cluster.directory``, JSON out) that it kills past a bound; the CLI's join does its
writes in a bounded thread (:func:`ember.cluster.nodes.bounded`). Everything that parses
what comes back is pure and tested without Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ember.cluster import child
from ember.errors import HostError

KV_NAMESPACE = b"ember"
NODE_KEY = "node/"
SANDBOX_KEY = "sandbox/"
SECRET_KEY = "secret"
#: One GCS call of the child (the child as a whole is bounded by its parent).
RPC_TIMEOUT_S = 5.0
#: Sandbox ids and node ids as the directory accepts them (anything else is dropped).
MAX_ID = 128


def _ok_id(s: str) -> bool:
    return 0 < len(s) <= MAX_ID and all(c.isalnum() or c in "-_." for c in s)


def _ok_address(s: str) -> bool:
    host, sep, port = s.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536
                and len(s) <= 300 and all(c.isalnum() or c in ".:-[]" for c in host))


@dataclass(frozen=True)
class NodeEntry:
    node_id: str
    ip: str
    alive: bool
    #: Its daemon's TCP listener, ``ip:port``; None: the node published none.
    daemon: str | None
    #: When Ray's node table says it died (epoch seconds; None: alive, or not dated) and
    #: why (Ray's words).
    died_at: float | None = None
    death_reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "ip": self.ip, "alive": self.alive,
                "daemon": self.daemon, "died_at": self.died_at,
                "death_reason": self.death_reason}


@dataclass(frozen=True)
class Directory:
    """One reading of the cluster's directory."""

    nodes: dict[str, NodeEntry] = field(default_factory=dict)
    #: sandbox id -> Ray node id
    sandboxes: dict[str, str] = field(default_factory=dict)

    def node_of(self, sandbox_id: str) -> NodeEntry | None:
        """The node that holds ``sandbox_id`` as placement recorded it (alive or not), or
        None when no placement recorded it."""
        node_id = self.sandboxes.get(sandbox_id)
        if node_id is None:
            return None
        return self.nodes.get(node_id) or NodeEntry(node_id, "", False, None)

    def peers(self, own_node_id: str) -> list[NodeEntry]:
        """Every other node that published a daemon (dead ones too: they are reported)."""
        return sorted((n for n in self.nodes.values()
                       if n.node_id != own_node_id and n.daemon is not None),
                      key=lambda n: (not n.alive, n.ip, n.node_id))

    def to_json(self) -> dict[str, Any]:
        return {"nodes": [n.to_json() for n in self.nodes.values()],
                "sandboxes": dict(self.sandboxes)}

    @classmethod
    def from_json(cls, raw: object) -> Directory:
        """Parse the child's answer (untrusted: what does not fit is dropped)."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        raw_nodes, raw_sandboxes = raw.get("nodes") or [], raw.get("sandboxes") or {}
        if not isinstance(raw_nodes, list) or not isinstance(raw_sandboxes, dict):
            raise ValueError("nodes must be a list and sandboxes an object")
        nodes: dict[str, NodeEntry] = {}
        for n in raw_nodes:
            if not isinstance(n, dict):
                continue
            node_id, ip, daemon = n.get("node_id"), n.get("ip"), n.get("daemon")
            if not isinstance(node_id, str) or not _ok_id(node_id):
                continue
            ok_daemon = daemon if isinstance(daemon, str) and _ok_address(daemon) else None
            died, why = n.get("died_at"), n.get("death_reason")
            nodes[node_id] = NodeEntry(
                node_id, ip if isinstance(ip, str) else "", n.get("alive") is True, ok_daemon,
                float(died) if isinstance(died, int | float) and not isinstance(died, bool)
                and died > 0 else None, why[:500] if isinstance(why, str) else "")
        sandboxes = {k: v for k, v in raw_sandboxes.items()
                     if isinstance(k, str) and isinstance(v, str) and _ok_id(k) and _ok_id(v)}
        return cls(nodes=nodes, sandboxes=sandboxes)


def build(node_infos: Mapping[str, tuple[str, bool]], kv: Mapping[bytes, bytes],
          deaths: Mapping[str, tuple[float | None, str]] | None = None) -> Directory:
    """A :class:`Directory` from Ray's node table (node id -> (ip, alive); ``deaths``: node
    id -> (when, why) of the dead ones) and the KV records under ``node/`` and
    ``sandbox/`` (pure)."""
    daemons: dict[str, str] = {}
    sandboxes: dict[str, str] = {}
    for raw_key, raw_value in kv.items():
        key, value = raw_key.decode(errors="replace"), raw_value.decode(errors="replace")
        if key.startswith(NODE_KEY):
            try:
                daemon = json.loads(value).get("daemon")
            except (ValueError, AttributeError):
                continue
            if isinstance(daemon, str) and _ok_address(daemon):
                daemons[key[len(NODE_KEY):]] = daemon
        elif key.startswith(SANDBOX_KEY) and _ok_id(value) \
                and _ok_id(key[len(SANDBOX_KEY):]):
            sandboxes[key[len(SANDBOX_KEY):]] = value
    deaths = deaths or {}
    nodes = {nid: NodeEntry(nid, ip, alive, daemons.get(nid),
                            *(deaths.get(nid, (None, "")) if not alive else (None, "")))
             for nid, (ip, alive) in node_infos.items() if _ok_id(nid)}
    for nid, daemon in daemons.items():  # a node Ray forgot: known, not alive
        if nid not in nodes and _ok_id(nid):
            nodes[nid] = NodeEntry(nid, daemon.rpartition(":")[0], False, daemon)
    return Directory(nodes=nodes, sandboxes=sandboxes)


# --- Ray's side (imported only in the child process and in the CLI's join) -----------------
def _client(address: str) -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # no driver, no worker

    return GcsClient(address=address)


def read(address: str) -> Directory:
    """Read the directory from the GCS at ``address`` (blocks while the head is down:
    call it in a process or thread that can be abandoned)."""
    from ray.core.generated import gcs_pb2

    gcs = _client(address)
    table = gcs.get_all_node_info(timeout=RPC_TIMEOUT_S)
    infos = {nid.hex(): (str(info.node_manager_address),
                         info.state == gcs_pb2.GcsNodeInfo.ALIVE)  # type: ignore[attr-defined]
             for nid, info in table.items()}
    deaths = {nid.hex(): _death(info) for nid, info in table.items()}
    keys = [k for prefix in (NODE_KEY, SANDBOX_KEY)
            for k in gcs.internal_kv_keys(prefix.encode(), KV_NAMESPACE,
                                          timeout=RPC_TIMEOUT_S)]
    kv = gcs.internal_kv_multi_get(keys, KV_NAMESPACE, timeout=RPC_TIMEOUT_S) if keys else {}
    return build(infos, kv, deaths)


def _death(info: Any) -> tuple[float | None, str]:
    """When and why Ray's node table says a node died (its fields as Ray fills them)."""
    end_ms = getattr(info, "end_time_ms", 0) or 0
    why = str(getattr(getattr(info, "death_info", None), "reason_message", "") or "")
    return (end_ms / 1000.0 if end_ms > 0 else None), why[:500]


def forget_records(address: str, records: list[tuple[str, str]]) -> int:
    """Drop ``sandbox/<id>`` records, each only while it still names the node given with
    it (lost records: :mod:`ember.cluster.lost`); answers how many were dropped."""
    gcs = _client(address)
    dropped = 0
    for sid, node_id in records:
        key = f"{SANDBOX_KEY}{sid}".encode()
        got = gcs.internal_kv_get(key, KV_NAMESPACE, timeout=RPC_TIMEOUT_S)
        if got is not None and bytes(got).decode(errors="replace") == node_id:
            gcs.internal_kv_del(key, False, KV_NAMESPACE, timeout=RPC_TIMEOUT_S)
            dropped += 1
    return dropped


def publish_node(address: str, node_id: str, daemon: str) -> str:
    """Record this node's daemon address; answer the cluster's secret (made here when it
    is the first node to ask)."""
    gcs = _client(address)
    gcs.internal_kv_put(f"{NODE_KEY}{node_id}".encode(), json.dumps({"daemon": daemon}).encode(),
                        True, KV_NAMESPACE, timeout=RPC_TIMEOUT_S)
    gcs.internal_kv_put(SECRET_KEY.encode(), secrets.token_hex(32).encode(), False,
                        KV_NAMESPACE, timeout=RPC_TIMEOUT_S)
    got = gcs.internal_kv_get(SECRET_KEY.encode(), KV_NAMESPACE, timeout=RPC_TIMEOUT_S)
    if not got:
        raise HostError(f"the cluster at {address} keeps no secret")
    return bytes(got).decode()


def record_sandbox(sandbox_id: str, node_id: str) -> None:
    """Record where a placed sandbox lives (in a Ray driver or worker: its GCS client)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(f"{SANDBOX_KEY}{sandbox_id}", node_id, True, namespace=KV_NAMESPACE)


def forget_sandbox(sandbox_id: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(f"{SANDBOX_KEY}{sandbox_id}", namespace=KV_NAMESPACE)


def main() -> None:
    """``python -m ember.cluster.directory ADDRESS``: the directory as JSON on stdout;
    ``ADDRESS --forget ID=NODE...``: drop those lost records (:func:`forget_records`)."""
    def compute() -> dict[str, Any]:
        if sys.argv[2:3] == ["--forget"]:
            pairs = [tuple(a.split("=", 1)) for a in sys.argv[3:] if "=" in a]
            ok = [(sid, nid) for sid, nid in pairs if _ok_id(sid) and _ok_id(nid)]
            return {"forgotten": forget_records(sys.argv[1], ok)}
        return {"directory": read(sys.argv[1]).to_json()}

    child.answer(compute)


if __name__ == "__main__":
    main()
