"""Template snapshots (issue 12): a plain create restores the booted, idle guest of its
template and size; the first create makes it. Real guests, each test in a home of its own
(the image cache is shared, so registering a template there is quick), through that
home's daemon as the SDK does by default unless a test says ``EMBER_LOCAL=1``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import Sandbox
from ember.paths import Paths
from ember.runtime import template_snapshots as ts
from ember.sdk.async_sandbox import manager
from ember.store import SnapshotRecord, Store
from tests.integration.leaks import assert_no_leaks_anywhere

pytestmark = pytest.mark.integration

TEMPLATE = "debian-python"


@pytest.fixture
def home(ember_paths: Paths, debian_template) -> Iterator[Paths]:  # type: ignore[no-untyped-def]
    """A fresh home with the default template registered (no template snapshot yet)."""
    from ember.guest.image import build_image

    root = Path(tempfile.mkdtemp(prefix="ets-", dir="/tmp"))
    paths = Paths(home=root, cache=ember_paths.cache,
                  ram=Path(f"/dev/shm/ember-test-{root.name}")).ensure()
    store = Store(paths.db)
    build_image(paths, store, TEMPLATE, force=True)
    store.close()
    yield paths
    from ember.daemon.control import stop as stop_daemon

    try:
        for info in Sandbox.list(paths=paths):
            Sandbox.kill(info.id, paths=paths)
        stop_daemon(paths)  # started by the first create (the SDK's default)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(paths.ram, ignore_errors=True)


def template_snaps(paths: Paths) -> list[SnapshotRecord]:
    store = Store(paths.db)
    try:
        return [s for s in store.list_snapshots() if ts.is_template_snapshot(s)]
    finally:
        store.close()


def create(paths: Paths, **kw: object) -> Sandbox:
    return Sandbox.create(TEMPLATE, timeout=600, paths=paths, **kw)  # type: ignore[arg-type]


def identity(sb: Sandbox) -> tuple[str, ...]:
    out = sb.exec("hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1; "
                  "date +%s; echo \"secret=$SECRET\"").check().stdout
    lines = out.splitlines()
    return lines[0], lines[1], lines[2].replace(" ", ""), lines[3], lines[4]


def test_first_create_makes_it_and_the_next_ones_restore_it(home: Paths) -> None:
    first = create(home, env={"SECRET": "of-the-first"}, metadata={"owner": "first"})
    assert first.info().snapshot is None  # it booted, and was snapshotted before handover
    [snap] = template_snaps(home)
    assert snap.env == {} and snap.name is None
    assert set(snap.metadata) == {ts.KEY_META, ts.DISK_META}  # no metadata, no tenant
    assert (snap.vcpus, snap.memory_mib) == (1, 256)
    assert identity(first)[4] == "secret=of-the-first"  # the first sandbox goes on as is

    clones = [create(home) for _ in range(2)]
    cold = create(home, boot="cold")
    assert [c.info().snapshot for c in clones] == [snap.id, snap.id]
    assert cold.info().snapshot is None
    # the snapshot was taken after one command: the pages of a program it ran and of bash
    # (the login shell E2B's SDKs run commands in) are in every clone's page cache (and
    # not in a cold-booted guest's)
    for program in ("/usr/bin/true", "/usr/bin/bash"):
        resident = f"fincore --raw --noheadings -o RES {program}"
        assert clones[0].exec(resident).stdout.strip() not in ("", "0B"), program
        assert cold.exec(resident).stdout.strip() == "0B", program
    # every guest's root journal commits every 600 s (argv.ROOT_FLAGS), restored or booted
    for sb in (clones[0], cold):
        root = sb.exec("awk '$2 == \"/\" {print $4}' /proc/mounts").check().stdout
        assert "commit=600" in root.strip().split(","), root
    ids = [identity(s) for s in (first, *clones, cold)]
    for sb, (hostname, _, _, _, _) in zip((first, *clones, cold), ids, strict=True):
        assert hostname == sb.id
    assert len({i[1] for i in ids}) == 4, f"machine-ids repeat: {ids}"
    assert all(len(i[1]) == 32 for i in ids)
    assert len({i[2] for i in ids}) == 4, f"the kernel RNG repeats: {ids}"
    for _, _, _, when, secret in ids[1:3]:
        assert abs(int(when) - time.time()) < 30  # the clock was set from the host's
        assert secret == "secret=", "a clone inherited the first sandbox's env"
    # a restored sandbox forks like any other (its clones carry its RAM in their state)
    clones[0].files.write("/root/mine", "clone 0")
    forks = clones[0].fork(2)
    assert len({f.exec("hostname").stdout for f in forks} | {clones[0].id + "\n"}) == 3
    assert [f.files.read_text("/root/mine") for f in forks] == ["clone 0", "clone 0"]
    for f in forks:
        f.kill()
    # a different shape has its own template snapshot
    big = create(home, memory_mib=320)
    assert big.info().snapshot is None
    assert sorted(s.memory_mib for s in template_snaps(home)) == [256, 320]
    infos = {t.name: t for t in Sandbox.list_templates(paths=home)}
    assert sorted(s.memory_mib for s in infos[TEMPLATE].snapshots) == [256, 320]
    assert all(s.current for s in infos[TEMPLATE].snapshots)
    for sb in (first, *clones, cold, big):
        sb.kill()
    assert_no_leaks_anywhere(home, context="after template-snapshot creates")
    assert len(template_snaps(home)) == 2  # kept for the next creates


@pytest.mark.parametrize("damage", ["corrupt-ram", "truncated-state", "missing-disk"])
def test_a_damaged_template_snapshot_is_never_restored(home: Paths, damage: str) -> None:
    create(home).kill()
    [snap] = template_snaps(home)
    d = home.snapshots / snap.id
    if damage == "corrupt-ram":
        with open(d / "ram", "r+b") as f:
            f.seek(1 << 20)
            f.write(os.urandom(4096))
    elif damage == "truncated-state":
        os.truncate(d / "state", (d / "state").stat().st_size // 2)
    else:
        (d / "disk.qcow2").unlink()
    sb = create(home)
    assert sb.info().snapshot is None  # it booted instead
    assert sb.exec("echo fine").stdout == "fine\n"
    [new] = template_snaps(home)  # the damaged one dropped, a good one made
    assert new.id != snap.id and not (home.snapshots / snap.id).exists()
    sb.kill()
    with create(home) as again:
        assert again.info().snapshot == new.id
    assert_no_leaks_anywhere(home, context=f"after a {damage} template snapshot")


def test_one_maker_at_a_time(home: Paths) -> None:
    mgr = manager(home)
    tpl = mgr.store.get_template(TEMPLATE)
    key = ts.key_for(mgr, tpl, 1, 256, ts.DEFAULT_DISK)
    held = ts.maker_lock(home, key)
    assert held.try_acquire()
    try:  # another process is making it: this create boots and makes nothing
        with create(home) as sb:
            assert sb.info().snapshot is None
        assert template_snaps(home) == []
    finally:
        ts.release_maker(held)
    with create(home) as sb:  # now it is made
        assert sb.info().snapshot is None
    assert len(template_snaps(home)) == 1
    assert_no_leaks_anywhere(home, context="after the maker lock test")


def test_a_full_disk_while_making_costs_only_the_snapshot(home: Paths) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "ember-test-full",
                    str(home.snapshots)], check=True)
    try:
        with create(home) as sb:  # the snapshot cannot be written: the sandbox is fine
            assert sb.info().snapshot is None
            assert sb.exec("echo works").stdout == "works\n"
            assert sb.info().state == "running"
        assert template_snaps(home) == []
        assert list(home.snapshots.iterdir()) == []  # no staging left in the full disk
    finally:
        subprocess.run(["umount", str(home.snapshots)], check=True)
    with create(home) as sb:
        assert sb.info().snapshot is None
    assert len(template_snaps(home)) == 1
    assert_no_leaks_anywhere(home, context="after a full disk")


def test_a_rebuilt_template_gets_a_new_snapshot(home: Paths, tmp_path: Path) -> None:
    from ember.guest.image import build_image
    from tests.oci_fixtures import (
        busybox_config,
        busybox_layer,
        file,
        gz,
        make_oci_layout,
        tar_bytes,
    )

    base = gz(busybox_layer())
    v2 = gz(tar_bytes([file("marker", b"v2\n")]))
    one = make_oci_layout(tmp_path / "one", [base], busybox_config([base]))
    two = make_oci_layout(tmp_path / "two", [base, v2], busybox_config([base, v2]))
    store = Store(home.db)
    build_image(home, store, "bb", f"oci-layout:{one}", force=True)
    Sandbox.create("bb", timeout=600, paths=home).kill()
    [old] = [s for s in template_snaps(home) if s.template == "bb"]
    build_image(home, store, "bb", f"oci-layout:{two}", force=True)
    store.close()
    with Sandbox.create("bb", timeout=600, paths=home) as sb:  # never the old disk
        assert sb.info().snapshot is None
        assert sb.exec("cat /marker").stdout == "v2\n"
    [new] = [s for s in template_snaps(home) if s.template == "bb"]
    assert new.id != old.id and not (home.snapshots / old.id).exists()
    with Sandbox.create("bb", timeout=600, paths=home) as sb:
        assert sb.info().snapshot == new.id
        assert sb.exec("cat /marker").stdout == "v2\n"
    assert Sandbox.drop_template_snapshots("bb", paths=home) == [new.id]
    assert [s for s in template_snaps(home) if s.template == "bb"] == []
    Sandbox.delete_template("bb", paths=home)
    assert_no_leaks_anywhere(home, context="after a template rebuild")


MAKER = """
import sys
from pathlib import Path
from ember import Sandbox
from ember.paths import Paths
paths = Paths(home=Path(sys.argv[1]), cache=Path(sys.argv[2]), ram=Path(sys.argv[3]))
Sandbox.create("debian-python", timeout=600, paths=paths)
"""


def test_kill_9_while_making_leaves_nothing_half_made(home: Paths) -> None:
    """The creating process dies while it writes the template snapshot: no snapshot is
    registered half-written, the next create boots or restores a whole one, nothing
    leaks."""
    proc = subprocess.Popen([sys.executable, "-c", MAKER, str(home.home), str(home.cache),
                             str(home.ram)], env={**os.environ, "EMBER_LOCAL": "1"},
                            cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith(".staging-") for p in home.snapshots.iterdir()):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the maker ended before it wrote its snapshot"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    # What the dead maker left: its sandbox (resumed by the reconcile) and a staging dir.
    for info in Sandbox.list(paths=home):
        Sandbox.kill(info.id, paths=home)
    assert all(ts.is_current(manager(home), s) for s in template_snaps(home))
    with create(home) as sb:  # a whole snapshot, or a boot that makes one
        assert sb.exec("echo ok").stdout == "ok\n"
    with create(home) as sb:
        [snap] = template_snaps(home)
        assert sb.info().snapshot == snap.id
    manager(home).list()  # sweeps what dead processes left
    from ember.runtime.snapshots import sweep_orphans
    from ember.runtime.states import LIVE_STATES

    mgr = manager(home)
    sweep_orphans(home, mgr.store, LIVE_STATES)
    assert_no_leaks_anywhere(home, context="after kill -9 while making")


def test_a_changed_device_model_is_never_restored(home: Paths, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """ember's QEMU devices or options change (here the TCG cache size): the old template
    snapshot's saved state is not loaded into the new device model; a new one is made."""
    import ember.engine.qemu.argv as argv

    monkeypatch.setenv("EMBER_LOCAL", "1")  # in this process, where the change is made
    create(home).kill()
    [old] = template_snaps(home)
    monkeypatch.setattr(argv, "TCG_TB_SIZE_MIB", argv.TCG_TB_SIZE_MIB // 2)
    with create(home) as sb:
        assert sb.info().snapshot is None
    [new] = template_snaps(home)
    assert new.id != old.id
    with create(home) as sb:
        assert sb.info().snapshot == new.id
    assert_no_leaks_anywhere(home, context="after a device model change")


def test_the_cli_shows_makes_and_drops_template_snapshots(home: Paths) -> None:
    def ember(*args: str) -> subprocess.CompletedProcess[str]:
        cp = subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True,
                            text=True, timeout=600,
                            env={**os.environ, "EMBER_HOME": str(home.home),
                                 "EMBER_RAM_DIR": str(home.ram)})
        assert cp.returncode == 0, f"ember {args}: {cp.stdout}\n{cp.stderr}"
        return cp

    assert json.loads(ember("image", "snapshot", "ls", "--json").stdout) == []
    made = json.loads(ember("image", "snapshot", "make", TEMPLATE, "--memory", "288",
                            "--json").stdout)
    assert [(s["memory_mib"], s["current"]) for s in made] == [(288, True)]
    listed = json.loads(ember("image", "snapshot", "ls", "--json").stdout)
    assert [(s["template"], s["id"]) for s in listed] == [(TEMPLATE, made[0]["id"])]
    assert "1 (" in ember("image", "ls").stdout  # the SNAPSHOTS column: count (size)
    doctor = subprocess.run([sys.executable, "-m", "ember.cli", "doctor", "--json"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "EMBER_HOME": str(home.home)})
    [row] = [c for c in json.loads(doctor.stdout) if c["name"] == "template snapshots"]
    assert row["ok"] and TEMPLATE in row["detail"]
    cp = ember("run", "--memory", "288", "--", "sh", "-c", "echo restored")
    assert cp.stdout == "restored\n"
    assert json.loads(ember("image", "snapshot", "rm", "--all", "--json").stdout) == {
        TEMPLATE: [made[0]["id"]]}
    assert template_snaps(home) == []
    assert_no_leaks_anywhere(home, context="after the template snapshot CLI")
