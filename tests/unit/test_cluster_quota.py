"""Tenants, API keys and quotas across the cluster, without Ray: the quota keeper's book
(serial admissions, placements that end stop counting), the KV records of keys and limits
(hostile values included), how a node merges its own key records with the cluster's, and
the daemon's key check and quota limits through a cluster view."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.cluster.keys import (
    KEY_PREFIX,
    TENANT_PREFIX,
    Registry,
    key_value,
    merged_key,
    parse_key,
    parse_limits,
    tenant_value,
)
from ember.cluster.quota import (
    BOOK_PREFIX,
    Book,
    Held,
    Limits,
    book_from_kv,
    held_value,
    over_limit,
    quota_error,
)
from ember.daemon import auth
from ember.daemon.auth import Principal, Quotas, check_key, new_key, use_cluster_view
from ember.errors import QuotaExceededError, UnauthorizedError
from ember.store import Store
from ember.store.records import ApiKeyRecord, TenantRecord

ACME = Limits(max_sandboxes=2)


def test_admissions_count_a_tenants_placements_across_the_cluster() -> None:
    book = Book()
    alive: set[str] = set()

    def live() -> set[str]:
        return set(alive)

    assert book.admit("p1", Held("acme", 1, 256), ACME, live) is None
    alive.add("p1")
    assert book.admit("p2", Held("acme", 1, 256), ACME, live) is None
    alive.add("p2")
    refused = book.admit("p3", Held("acme", 1, 256), ACME, live)
    assert refused is not None and "tenant acme" in refused and "limit 2" in refused
    assert "p3" not in book.entries
    # Another tenant is not counted against acme.
    assert book.admit("q1", Held("bob", 8, 8192), None, live) is None
    # A placement actor that ended (its sandbox gone, or its create failed) stops counting.
    alive.discard("p1")
    assert book.admit("p4", Held("acme", 1, 256), ACME, live) is None
    assert set(book.entries) == {"p2", "p4", "q1"}


def test_two_admissions_at_the_limit_let_one_in() -> None:
    """The keeper admits one at a time; the driver names its placement actor before it
    asks, so the first admission's actor is listed when the second is checked."""
    book = Book()
    one = Limits(max_sandboxes=1)
    assert book.admit("p1", Held("acme", 1, 256), one, set) is None
    assert book.admit("p2", Held("acme", 1, 256), one, lambda: {"p1"}) is not None
    assert set(book.entries) == {"p1"}


def test_vcpus_and_memory_limits_and_the_answer() -> None:
    held = [Held("acme", 2, 1024), Held("acme", 1, 512), Held("bob", 16, 1 << 16)]
    assert over_limit("acme", held, Held("acme", 1, 512), Limits(max_vcpus=4)) is None
    msg = over_limit("acme", held, Held("acme", 2, 512), Limits(max_vcpus=4))
    assert msg is not None and "5 vCPUs" in msg and "limit 4" in msg and "3 in use" in msg
    msg = over_limit("acme", held, Held("acme", 1, 1024), Limits(max_memory_mib=2048))
    assert msg is not None and "MiB of memory" in msg
    assert over_limit("acme", held, Held("acme", 99, 1 << 20), None) is None
    answer = quota_error("full")
    assert answer == {"status": 429, "error": {"code": "quota_exceeded", "message": "full"}}


def test_a_sweep_drops_every_tenants_dead_entries() -> None:
    from ember.cluster.quota import SWEEP_EVERY

    book = Book()
    for i in range(SWEEP_EVERY - 1):
        book.admit(f"x{i}", Held(f"t{i}", 1, 1), None, set)
    assert len(book.entries) == SWEEP_EVERY - 1  # no limits: nobody asked who is alive
    book.admit("last", Held("z", 1, 1), None, set)
    assert set(book.entries) == {"last"}


def test_the_book_as_the_kv_keeps_it() -> None:
    """A keeper started again reads its book back; what does not parse is left out."""
    kv = {f"{BOOK_PREFIX}p1".encode(): held_value(Held("acme", 2, 512)),
          f"{BOOK_PREFIX}p2".encode(): b"not json",
          f"{BOOK_PREFIX}p3".encode(): b'{"tenant": "acme", "vcpus": "2", "memory_mib": 1}',
          BOOK_PREFIX.encode(): held_value(Held("acme", 1, 1))}
    assert book_from_kv(kv).entries == {"p1": Held("acme", 2, 512)}


@given(st.dictionaries(st.binary(max_size=40), st.binary(max_size=200), max_size=8))
def test_a_hostile_book_never_crashes(kv: dict[bytes, bytes]) -> None:
    book_from_kv(kv)


def test_limits_parse_and_refuse_hostile_values() -> None:
    assert Limits.from_json({"max_sandboxes": 2}) == Limits(2, None, None)
    for bad in ([], "x", {"max_vcpus": -1}, {"max_vcpus": True}, {"max_vcpus": 1.5},
                {"max_memory_mib": 1 << 50}, {"max_sandboxes": "2"}):
        assert Limits.from_json(bad) is None
    rec = TenantRecord("acme", 3, 4, 1024)
    assert parse_limits(tenant_value(rec)) == Limits(3, 4, 1024)
    assert parse_limits(b"\xff{") is None and parse_limits(b"null") is None


def _key(key_id: str = "abc123", revoked: float | None = None,
         secret: str = "s") -> ApiKeyRecord:
    return ApiKeyRecord(id=key_id, tenant="acme",
                        secret_sha256=hashlib.sha256(secret.encode()).hexdigest(),
                        created_at=1.0, revoked_at=revoked)


def test_key_records_round_trip_and_never_carry_the_secret() -> None:
    rec = _key()
    raw = key_value(rec)
    assert b'"s"' not in raw and "secret_sha256" in json.loads(raw)
    assert parse_key(rec.id, raw) == rec
    assert parse_key("ABC!", raw) is None  # not an id ember makes
    assert parse_key(rec.id, json.dumps({**json.loads(raw), "secret_sha256": "x"})) is None
    assert parse_key(rec.id, json.dumps({**json.loads(raw), "tenant": "a b"})) is None
    reg = Registry.from_kv({f"{KEY_PREFIX}{rec.id}".encode(): raw,
                            f"{TENANT_PREFIX}acme".encode(): b'{"max_sandboxes": 2}',
                            f"{TENANT_PREFIX}bad name".encode(): b'{"max_sandboxes": 2}',
                            b"node/x": b"{}", b"apikey/zz": b"garbage"})
    assert reg.keys == {rec.id: rec} and reg.tenants == {"acme": ACME}
    assert Registry.from_json(json.loads(json.dumps(reg.to_json()))) == reg


@given(st.dictionaries(st.binary(max_size=40), st.binary(max_size=200), max_size=8))
def test_hostile_kv_records_never_crash(kv: dict[bytes, bytes]) -> None:
    Registry.from_kv(kv)
    Registry.from_kv({KEY_PREFIX.encode() + k: v for k, v in kv.items()})


@given(st.recursive(st.none() | st.integers() | st.text(max_size=10),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                        c, max_size=3),
                    max_leaves=12))
def test_hostile_child_answers_parse_or_raise_value_error(raw: Any) -> None:
    with contextlib.suppress(ValueError):
        Registry.from_json(raw)


def test_a_revocation_anywhere_wins() -> None:
    local, cluster = _key(), _key(revoked=5.0)
    assert merged_key(local, None) == local
    assert merged_key(None, cluster) == cluster
    assert merged_key(local, cluster) == _key(revoked=5.0)
    assert merged_key(_key(revoked=3.0), cluster) == _key(revoked=3.0)
    # The same id with another secret (made twice): this node's own record is the key.
    assert merged_key(local, _key(secret="other", revoked=9.0)) == local
    assert merged_key(None, None) is None


class View:
    """The I/O edge of a cluster view (what the daemon reads in a child process)."""

    def __init__(self) -> None:
        self.keys: dict[str, ApiKeyRecord] = {}
        self.tenants: dict[str, Limits] = {}
        self.asked: list[tuple[str, bool]] = []

    def key(self, key_id: str, *, unknown_here: bool) -> ApiKeyRecord | None:
        self.asked.append((key_id, unknown_here))
        return self.keys.get(key_id)

    def limits(self, tenant: str) -> Limits | None:
        return self.tenants.get(tenant)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(tmp_path / "ember.db")
    yield s
    auth._cluster_views.pop(str(s.path), None)
    s.close()


def test_a_key_made_on_another_node_is_accepted_and_its_revocation_holds(
        store: Store) -> None:
    view = View()
    use_cluster_view(store, view)
    other = Store(store.path.parent / "other.db")  # another node's home
    try:
        rec, token = new_key(other, "acme")
    finally:
        other.close()
    with pytest.raises(UnauthorizedError, match="unknown"):
        check_key(store, token)
    assert view.asked[-1] == (rec.id, True)  # unknown here: the cluster is asked afresh
    view.keys[rec.id] = rec
    assert check_key(store, token).tenant == "acme"
    view.keys[rec.id] = ApiKeyRecord(rec.id, rec.tenant, rec.secret_sha256, rec.created_at,
                                     revoked_at=2.0)
    with pytest.raises(UnauthorizedError, match="revoked"):
        check_key(store, token)
    # A key of this node, revoked on another one: refused here too.
    mine, my_token = new_key(store, "acme")
    assert check_key(store, my_token).id == mine.id
    assert view.asked[-1] == (mine.id, False)
    view.keys[mine.id] = ApiKeyRecord(mine.id, mine.tenant, mine.secret_sha256,
                                      mine.created_at, revoked_at=3.0)
    with pytest.raises(UnauthorizedError, match="revoked"):
        check_key(store, my_token)
    # A wrong secret for a key the cluster knows: refused.
    with pytest.raises(UnauthorizedError):
        check_key(store, token.rsplit("_", 1)[0] + "_wrong")


def test_the_clusters_limits_win_over_a_nodes_own(store: Store) -> None:
    quotas = Quotas(store)
    who = Principal("acme", False)
    store.put_tenant(TenantRecord("acme", max_sandboxes=0))
    with pytest.raises(QuotaExceededError):
        quotas.check(who, sandboxes=1, vcpus=1, memory_mib=256)
    view = View()
    use_cluster_view(store, view)
    with pytest.raises(QuotaExceededError):  # the cluster has none for acme: the node's
        quotas.check(who, sandboxes=1, vcpus=1, memory_mib=256)
    view.tenants["acme"] = Limits(max_sandboxes=5)
    quotas.check(who, sandboxes=1, vcpus=1, memory_mib=256)


def test_a_nodes_reading_of_the_clusters_keys(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a cluster nothing is read; a fresh reading serves; a stale one serves a
    while longer as the next is read in the background; an older one is waited for; a key
    id nobody knows makes it be read again; a failed reading keeps the last good one."""
    import threading

    from ember.cluster.record import ClusterRecord, save_record
    from ember.daemon import cluster_keys
    from ember.daemon.cluster_keys import GRACE_S, TTL_S, ClusterKeys
    from ember.errors import HostError
    from ember.paths import Paths

    paths = Paths(home=tmp_path, cache=tmp_path / "cache")
    reads: list[float] = []
    answers: list[Registry | Exception] = []
    done = threading.Event()

    def read(address: str) -> Registry:
        reads.append(time.monotonic())
        done.set()
        got = answers.pop(0) if answers else Registry()
        if isinstance(got, Exception):
            raise got
        return got

    monkeypatch.setattr(cluster_keys, "read_registry", read)
    view = ClusterKeys(paths)
    assert view.key("abc", unknown_here=True) is None and view.limits("acme") is None
    assert reads == []  # no cluster.json: nothing read
    save_record(paths, ClusterRecord(address="127.0.0.1:1", role="worker",
                                     node_ip="127.0.0.1", node_id="a" * 56))
    answers.append(Registry(keys={"abc": _key()}, tenants={"acme": ACME}))
    assert view.key("abc", unknown_here=False) == _key() and len(reads) == 1
    assert view.limits("acme") == ACME and len(reads) == 1  # fresh: no reading
    view._at -= TTL_S + 0.1  # stale, within the grace: served, renewed in the background
    done.clear()
    answers.append(Registry(keys={"abc": _key(revoked=2.0)}))
    assert view.key("abc", unknown_here=False) == _key()
    assert done.wait(10)
    for _ in range(100):  # the background reading lands
        if view.key("abc", unknown_here=False) == _key(revoked=2.0):
            break
        time.sleep(0.01)
    assert view.key("abc", unknown_here=False) == _key(revoked=2.0)
    view._at -= TTL_S + GRACE_S + 0.1  # too old: the request waits for a reading
    n = len(reads)
    answers.append(HostError("the head is down"))
    assert view.key("abc", unknown_here=False) == _key(revoked=2.0)  # the last good one
    assert len(reads) == n + 1
    view._at -= 1.1  # a key id nobody knows: read again (at most once a second)
    assert view.key("new", unknown_here=True) is None and len(reads) == n + 2
