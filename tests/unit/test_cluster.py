"""ember.cluster without Ray: advertisements as resource maps and back, the home's cluster
record (hostile files included), ``ray start``'s argv, node-table rows as ember shows them,
and finding this home's raylet in a fake /proc."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.cluster.advertise import Advertisement, home_templates
from ember.cluster.node import (
    JoinOptions,
    ray_env,
    ray_temp_dir,
    running_raylet,
    split_address,
    start_argv,
)
from ember.cluster.nodes import view_of
from ember.cluster.record import ClusterRecord, load_record, save_record, summary
from ember.errors import BadRequestError, HostError
from ember.paths import Paths
from ember.store import Store
from ember.store.records import TemplateRecord

ADV = Advertisement(vcpus=8, memory_mib=16384, tiers=("container", "microvm"), accel="tcg",
                    templates=("debian-python", "py3.12"))


def test_an_advertisement_is_ray_resources_and_back() -> None:
    res = ADV.resources()
    assert res == {"ember:vcpus": 8.0, "ember:memory_mib": 16384.0, "ember:accel:tcg": 1.0,
                   "ember:tier:container": 1.0, "ember:tier:microvm": 1.0,
                   "ember:template:debian-python": 1.0, "ember:template:py3.12": 1.0}
    # Ray adds its own resources to a node's totals; they are not ember's.
    back = Advertisement.from_resources({**res, "memory": 1e9, "node:192.0.2.1": 1.0})
    assert back == ADV


def test_a_ray_node_that_is_no_ember_node_advertises_nothing() -> None:
    assert Advertisement.from_resources({"CPU": 4.0, "memory": 1e9}) is None


@pytest.mark.parametrize("bad", ["", "a b", "x:y", "../t", "-lead", "a" * 200])
def test_names_that_cannot_be_resources_are_refused(bad: str) -> None:
    with pytest.raises(BadRequestError):
        Advertisement(vcpus=1, memory_mib=1, tiers=("microvm",), accel="tcg", templates=(bad,))


def test_nothing_to_give_is_refused() -> None:
    with pytest.raises(BadRequestError):
        Advertisement(vcpus=0, memory_mib=1, tiers=(), accel="tcg")


def test_templates_come_from_the_home(tmp_path: Path) -> None:
    paths = Paths(home=tmp_path / "h", cache=tmp_path / "c")
    assert home_templates(paths) == ()  # no registry yet: none, and none created
    assert not paths.db.exists()
    store = Store(paths.ensure().db)
    try:
        for name in ("zeta", "alpha"):
            store.put_template(TemplateRecord(name, "test", "sha256:0", "/x", 0, 0.0))
    finally:
        store.close()
    assert home_templates(paths) == ("alpha", "zeta")


def _record() -> ClusterRecord:
    return ClusterRecord(address="192.0.2.1:6380", role="worker", node_ip="192.0.2.2",
                         node_id="ab" * 28, resources=ADV.resources(),
                         ray_temp_dir="/tmp/ember-ray-x", joined_at=1.5)


def test_the_record_round_trips_and_is_cleared(tmp_path: Path) -> None:
    from ember.cluster.record import clear_record

    paths = Paths(home=tmp_path, cache=tmp_path / "c")
    assert load_record(paths) is None and summary(paths) is None
    save_record(paths, _record())
    assert load_record(paths) == _record()
    assert summary(paths) == _record().to_json()
    assert clear_record(paths) and not clear_record(paths)
    assert load_record(paths) is None


@pytest.mark.parametrize("text", [
    "", "[]", "{}", '{"role": "king"}', "not json",
    '{"address": "a:1", "role": "head", "node_ip": "x", "node_id": ""}',
    '{"address": "a:1", "role": "head", "node_ip": "x", "node_id": "y", "resources": [1]}',
    '{"address": "a:1", "role": "head", "node_ip": "x", "node_id": "y", "redis": 5}',
])
def test_a_broken_record_is_reported_never_half_used(tmp_path: Path, text: str) -> None:
    paths = Paths(home=tmp_path, cache=tmp_path / "c")
    (tmp_path / "cluster.json").write_text(text)
    with pytest.raises(HostError, match="not a valid cluster record"):
        load_record(paths)
    assert "error" in (summary(paths) or {})  # the daemon reports it, never raises


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                        c, max_size=8)))
def test_any_json_is_a_record_or_a_value_error(data: object) -> None:
    with contextlib.suppress(ValueError):
        ClusterRecord.from_json(data)


def test_ray_start_for_a_head_and_a_worker() -> None:
    head = JoinOptions(node_ip="192.0.2.1", port=6380, redis="192.0.2.254:6379",
                       redis_password="pw")
    argv = start_argv("/v/ray", head, ADV, Path("/tmp/ember-ray-k"))
    assert argv[:2] == ["/v/ray", "start"]
    assert "--head" in argv and argv[argv.index("--port") + 1] == "6380"
    assert argv[argv.index("--redis-password") + 1] == "pw"
    assert argv[argv.index("--num-cpus") + 1] == "0"  # Ray places nothing of its own here
    assert json.loads(argv[argv.index("--resources") + 1]) == ADV.resources()
    assert ray_env(head, {})["RAY_REDIS_ADDRESS"] == "192.0.2.254:6379"
    worker = JoinOptions(node_ip="192.0.2.2", address="192.0.2.1:6380")
    argv = start_argv("/v/ray", worker, ADV, Path("/tmp/ember-ray-k"))
    assert argv[argv.index("--address") + 1] == "192.0.2.1:6380"
    assert "--head" not in argv and "--redis-password" not in argv
    assert "RAY_REDIS_ADDRESS" not in ray_env(worker, {"RAY_REDIS_ADDRESS": "stale:1"})
    assert ray_env(worker, {})["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.parametrize("bad", ["host", "host:", ":80", "h:0", "h:65536", "h:x"])
def test_addresses_are_host_and_port(bad: str) -> None:
    with pytest.raises(BadRequestError):
        split_address(bad)
    assert split_address("192.0.2.1:6380") == ("192.0.2.1", 6380)


def test_each_home_has_its_own_short_ray_dir(tmp_path: Path) -> None:
    a = ray_temp_dir(Paths(home=tmp_path / "a", cache=tmp_path))
    b = ray_temp_dir(Paths(home=tmp_path / "b", cache=tmp_path))
    assert a != b and len(str(a)) < 40


def test_a_node_table_row_as_ember_shows_it() -> None:
    row = {"NodeID": "n1", "Alive": False, "NodeManagerAddress": "192.0.2.3",
           "Resources": {**ADV.resources(), "node:__internal_head__": 1.0, "memory": 5.0},
           "DeathReasonMessage": "health check failed"}
    v = view_of(row)
    assert (v.node_id, v.ip, v.alive, v.state, v.head) == ("n1", "192.0.2.3", False, "DEAD",
                                                           True)
    assert v.advertised == ADV and "memory" not in v.resources
    assert v.to_json()["death_reason"] == "health check failed"
    assert view_of({"NodeID": "r", "Alive": True, "Resources": {"CPU": 1}}).advertised is None


def test_this_homes_raylet_is_found_by_its_session_dir(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, comm, state, cmd in (
            (9, "raylet", "Z", b""),  # a zombie: gone
            (10, "raylet", "S", b"/r\0--session_dir=/tmp/ember-ray-k/s_1\0"),
            (11, "raylet", "S", b"/r\0--session_dir=/tmp/ember-ray-other/s\0"),
            (12, "python", "S", b"x\0/tmp/ember-ray-k/\0")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(comm + "\n")
        (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) {state} 1 1 1\n")
        (proc / str(pid) / "cmdline").write_bytes(cmd)
    (proc / "self").mkdir()
    assert running_raylet(Path("/tmp/ember-ray-k"), proc) == 10
    assert running_raylet(Path("/tmp/ember-ray-none"), proc) is None
    assert running_raylet(None, proc) in (10, 11)  # any live raylet at all
    (proc / "10" / "stat").write_text("10 (raylet) Z 1 1 1\n")
    assert running_raylet(Path("/tmp/ember-ray-k"), proc) is None


def test_ember_imports_no_ray_until_a_cluster_command_asks() -> None:
    code = ("import sys, ember, ember.cluster, ember.cli.main, ember.daemon.app;"
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_a_sandbox_demands_its_shape_and_a_sliver_of_its_tier() -> None:
    from ember.cluster.placement import SLIVER, demand

    # The template is no hard demand: any node fetches it, its holders are preferred.
    assert demand("py", "microvm", 2, 512) == {
        "ember:vcpus": 2.0, "ember:memory_mib": 512.0, "ember:tier:microvm": SLIVER}
    # What a node advertises covers what a sandbox demands, name for name.
    assert set(demand("py3.12", "container", 1, 1)) <= set(ADV.resources())


def _request(headers: dict[str, str]) -> Any:
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": "/v1/sandboxes",
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})


def _decide(tmp_path: Path, headers: dict[str, str], who: Any, env: str = "") -> Any:
    import asyncio
    import os
    from types import SimpleNamespace

    from ember.daemon.cluster_create import ENV_SWITCH, decide
    from ember.daemon.models import CreateRequest

    held = SimpleNamespace(get_template=lambda name: name)  # this node holds every template
    live: Any = SimpleNamespace(paths=Paths(home=tmp_path, cache=tmp_path / "c"),
                                mgr=SimpleNamespace(store=held))
    old = os.environ.pop(ENV_SWITCH, None)
    if env:
        os.environ[ENV_SWITCH] = env
    try:
        return asyncio.run(decide(_request(headers), CreateRequest(), live, who))
    finally:
        os.environ.pop(ENV_SWITCH, None)
        if old is not None:
            os.environ[ENV_SWITCH] = old


def test_creates_stay_local_without_a_cluster_or_when_placed_already(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.cluster.placement import PLACEMENT_HEADER, TENANT_HEADER
    from ember.daemon.auth import Principal

    admin, alice = Principal("admin", True), Principal("alice", False)
    d = _decide(tmp_path, {}, alice)
    assert d.info is None and d.who == alice  # no cluster.json: local
    save_record(Paths(home=tmp_path, cache=tmp_path), _record())
    assert _decide(tmp_path, {}, alice, env="off").info is None  # EMBER_CLUSTER_PLACEMENT
    # A placement actor's create (root on the socket) is for the tenant that asked.
    d = _decide(tmp_path, {PLACEMENT_HEADER: "ember-sandbox-x", TENANT_HEADER: "bob"}, admin)
    assert d.info is None and d.who == Principal("bob", False)
    # Anyone else's marker is ignored (it would skip the cluster's quota): placed by Ray
    # (faked here at the child's edge) for the caller.
    from ember.daemon import cluster_create

    monkeypatch.setattr(cluster_create, "_place", lambda *a, **k: {"info": {"id": "p"}})
    d = _decide(tmp_path, {PLACEMENT_HEADER: "x", TENANT_HEADER: "admin"}, alice)
    assert d.info == {"id": "p"} and d.who == alice
