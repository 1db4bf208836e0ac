"""Which node holds which template, in the cluster's directory (Ray's GCS key-value store,
namespace ``ember``; see :mod:`ember.cluster.directory`), so that a template built on one
node can be created from anywhere: the node that must create it fetches it from a holder
(:mod:`ember.daemon.cluster_templates`), and placement prefers the holders.

Keys: ``template/<name>/<ray node id>`` -> the digest that node holds under that name.
One key per node and template, so that nodes never rewrite each other's entries; a node
writes its own (:func:`sync`) when it joins, when its daemon starts, and after every
build, removal and pull, so a template built after joining counts at once (Ray's
resources are fixed when a node starts: the directory, not the resources, says who holds
what).

The daemon never imports Ray: it runs ``python -m ember.cluster.templates read|sync
ADDRESS ...`` (JSON out) in a child process that it kills past a bound. Deciding holders
and the preferred node is pure and tested without Ray.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ember.cluster import child
from ember.cluster.directory import (
    KV_NAMESPACE,
    RPC_TIMEOUT_S,
    Directory,
    NodeEntry,
    _client,
    _ok_id,
    read,
)
from ember.cluster.transfer import DIGEST_RE, NAME_RE
from ember.paths import Paths

if TYPE_CHECKING:
    from ember.store import Store

TEMPLATE_KEY = "template/"
#: node id -> digest, per template name
Holders = dict[str, dict[str, str]]


def key(name: str, node_id: str) -> str:
    return f"{TEMPLATE_KEY}{name}/{node_id}"


def holders_from_kv(kv: Mapping[bytes, bytes]) -> Holders:
    """Template name -> {node id: digest} from the KV records under ``template/`` (pure;
    what does not fit is dropped)."""
    out: Holders = {}
    for raw_key, raw_value in kv.items():
        k, v = raw_key.decode(errors="replace"), raw_value.decode(errors="replace")
        if not k.startswith(TEMPLATE_KEY):
            continue
        name, sep, node_id = k[len(TEMPLATE_KEY):].partition("/")
        if sep and NAME_RE.match(name) and _ok_id(node_id) and DIGEST_RE.match(v):
            out.setdefault(name, {})[node_id] = v
    return out


def parse_holders(raw: object) -> Holders:
    """The child's answer's ``templates`` (untrusted: what does not fit is dropped)."""
    out: Holders = {}
    if not isinstance(raw, dict):
        return out
    for name, nodes in raw.items():
        if not isinstance(name, str) or not NAME_RE.match(name) or not isinstance(nodes, dict):
            continue
        ok = {n: d for n, d in nodes.items() if isinstance(n, str) and _ok_id(n)
              and isinstance(d, str) and DIGEST_RE.match(d)}
        if ok:
            out[name] = ok
    return out


def wanted_digest(holders: Holders, name: str, own_node: str) -> str | None:
    """The digest a node should fetch for ``name``: the one most live holders have (the
    newest build spreads as nodes pull it; ties go to the larger digest, so that every
    node picks the same), None when no node holds it (pure)."""
    counts: dict[str, int] = {}
    for node_id, digest in holders.get(name, {}).items():
        if node_id != own_node:
            counts[digest] = counts.get(digest, 0) + 1
    if not counts:
        return None
    return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]


def sources(directory: Directory, holders: Holders, name: str, digest: str,
            own_node: str) -> list[NodeEntry]:
    """The other live nodes that hold ``name`` at ``digest`` and published a daemon, in
    the order to try them (shuffled, so that pulls spread over the holders; pure but for
    the shuffle)."""
    out = [n for nid, d in holders.get(name, {}).items()
           if d == digest and nid != own_node
           and (n := directory.nodes.get(nid)) is not None and n.alive and n.daemon]
    random.shuffle(out)
    return out


def preferred_node(asker: str | None, holders: Mapping[str, str],
                   alive: Iterable[str]) -> str | None:
    """The node a placement prefers (a soft affinity: Ray goes elsewhere when it has no
    room) for a template whose holders are ``holders`` (node id -> digest): the asking
    node when it holds the template, else a live holder (chosen at random: creates spread
    over the holders), else the asking node (it will fetch the template). Pure but for the
    random choice."""
    live = set(alive)
    if asker is not None and asker in holders:
        return asker
    found = sorted(n for n in holders if n in live)
    if found:
        return random.choice(found)
    return asker


def home_held(paths: Paths) -> dict[str, str]:
    """The templates a home holds that can travel (name -> digest): not pre-baked ones
    (their snapshot is that node's)."""
    if not paths.db.exists():
        return {}
    from ember.store import Store

    store = Store(paths.db)
    try:
        return held(store)
    finally:
        store.close()


def held(store: Store) -> dict[str, str]:
    return {t.name: t.digest for t in store.list_templates() if "snapshot" not in t.config}


# --- Ray's side (the child process, the placement driver) --------------------------------
def read_holders(gcs: Any) -> Holders:
    keys = gcs.internal_kv_keys(TEMPLATE_KEY.encode(), KV_NAMESPACE, timeout=RPC_TIMEOUT_S)
    kv = gcs.internal_kv_multi_get(keys, KV_NAMESPACE, timeout=RPC_TIMEOUT_S) if keys else {}
    return holders_from_kv(kv)


def placement_preference(address: str, asker: str | None, template: str | None) -> str | None:
    """The node a placement of ``template`` prefers (in the placement's driver): see
    :func:`preferred_node`. Any failure to read the directory keeps the asking node."""
    if not template:
        return asker
    try:
        from ray.core.generated import gcs_pb2

        gcs = _client(address)
        alive = [nid.hex() for nid, info in gcs.get_all_node_info(timeout=RPC_TIMEOUT_S).items()
                 if info.state == gcs_pb2.GcsNodeInfo.ALIVE]  # type: ignore[attr-defined]
        return preferred_node(asker, read_holders(gcs).get(template, {}), alive)
    except Exception:
        return asker


def read_all(address: str) -> dict[str, Any]:
    """The directory and the template holders, as the child answers them."""
    directory = read(address)
    return {"directory": directory.to_json(), "templates": read_holders(_client(address))}


def sync(address: str, node_id: str, held: Mapping[str, str]) -> dict[str, Any]:
    """Make this node's ``template/*/<node_id>`` entries say exactly ``held`` (name ->
    digest): written where new or changed, removed where the node no longer holds it."""
    gcs = _client(address)
    mine = {name: nodes[node_id] for name, nodes in read_holders(gcs).items()
            if node_id in nodes}
    put = {n: d for n, d in held.items()
           if NAME_RE.match(n) and DIGEST_RE.match(d) and mine.get(n) != d}
    gone = [n for n in mine if n not in held]
    for name, digest in put.items():
        gcs.internal_kv_put(key(name, node_id).encode(), digest.encode(), True, KV_NAMESPACE,
                            timeout=RPC_TIMEOUT_S)
    for name in gone:
        gcs.internal_kv_del(key(name, node_id).encode(), False, KV_NAMESPACE,
                            timeout=RPC_TIMEOUT_S)
    return {"written": sorted(put), "removed": sorted(gone)}


def main() -> None:
    """``python -m ember.cluster.templates read ADDRESS`` (the directory and the template
    holders) or ``sync ADDRESS NODE_ID`` (stdin: ``{name: digest}`` this node holds): JSON
    on stdout."""
    def compute() -> dict[str, Any]:
        cmd, address = sys.argv[1], sys.argv[2]
        if cmd == "read":
            return read_all(address)
        if cmd == "sync":
            held = json.load(sys.stdin)
            if not isinstance(held, dict):
                raise ValueError("sync reads {name: digest} on stdin")
            return sync(address, sys.argv[3], {str(k): str(v) for k, v in held.items()})
        raise ValueError(f"unknown command {cmd!r}")

    child.answer(compute)


if __name__ == "__main__":
    main()
