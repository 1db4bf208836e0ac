"""Shared fixtures.

Integration tests run in an isolated ember home (a short temp dir: Unix socket paths are
limited to 108 bytes) but share the heavy-artifact cache (kernel, images) with the
installation, ``/var/lib/ember/cache`` unless ``EMBER_CACHE`` says otherwise, so that the
kernel is built once per host, not once per run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from ember.paths import Paths

# Property tests check behaviour, not speed: on these shared 2-core hosts, with guests
# booting beside them, hypothesis's default 200 ms deadline per example fails at random.
settings.register_profile("ember", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ember")

DEFAULT_TEST_CACHE = "/var/lib/ember/cache"


def qemu_pids_under(root: Path) -> list[int]:
    """PIDs of live processes whose command line mentions ``root`` (leak detection)."""
    out = []
    needle = str(root).encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if needle in cmd and b"qemu" in cmd and state != "Z":
            out.append(int(d.name))
    return out


def _cgroup_pids_of_home(paths: Paths) -> list[int]:
    """Processes still in any sandbox cgroup of this home (containers, VMMs), after a last
    reconcile (which also removes the home's empty cgroup directories)."""
    if os.geteuid() != 0 or not paths.db.exists():
        return []
    from ember.host.cgroups import home_key
    from ember.runtime.manager import SandboxManager

    mgr = SandboxManager(paths)
    try:
        mgr.list()
    finally:
        mgr.close()
    key = home_key(paths.home)
    pids: list[int] = []
    for procs in Path("/sys/fs/cgroup").glob(f"*/ember/{key}/*/cgroup.procs"):
        pids += [int(p) for p in procs.read_text().split()]
    return sorted(set(pids))


@pytest.fixture(scope="session")
def ember_paths() -> Iterator[Paths]:
    home = Path(tempfile.mkdtemp(prefix="et-", dir="/tmp"))
    cache = Path(os.environ.get("EMBER_CACHE") or DEFAULT_TEST_CACHE)
    old = {k: os.environ.get(k) for k in ("EMBER_HOME", "EMBER_CACHE")}
    os.environ["EMBER_HOME"] = str(home)
    os.environ["EMBER_CACHE"] = str(cache)
    paths = Paths(home=home, cache=cache).ensure()
    yield paths
    from ember.daemon.control import stop as stop_daemon

    stop_daemon(paths)  # the SDK started it on first use; its sandboxes are gone by now
    leaked_cgroup_pids = _cgroup_pids_of_home(paths)
    leaked = qemu_pids_under(home)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        leaked_mounts = [ln.split()[4] for ln in f if str(home) in ln]
    leaked_ram = sorted(paths.ram.glob("*.ram")) if paths.ram.is_dir() else []
    keep = os.environ.get("EMBER_TEST_KEEP_LOG")  # the nested KVM layer brings it back
    if keep and (home / "logs/ember.log").is_file():
        shutil.copyfile(home / "logs/ember.log", keep)
    shutil.rmtree(paths.ram, ignore_errors=True)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(home, ignore_errors=True)
    assert not leaked, f"QEMU processes leaked by the test session: {leaked}"
    assert not leaked_ram, f"guest RAM files leaked by the test session: {leaked_ram}"
    assert not leaked_mounts, f"mounts leaked by the test session: {leaked_mounts}"
    assert not leaked_cgroup_pids, (
        f"processes left in the test home's cgroups: {leaked_cgroup_pids}")


@pytest.fixture(scope="session")
def kernel(ember_paths: Paths):  # type: ignore[no-untyped-def]
    from ember.guest.kernel import build_kernel

    return build_kernel(ember_paths)


@pytest.fixture(scope="session")
def store(ember_paths: Paths):  # type: ignore[no-untyped-def]
    from ember.store import Store

    return Store(ember_paths.db)


@pytest.fixture(scope="session")
def debian_template(ember_paths: Paths, kernel, store):  # type: ignore[no-untyped-def]
    """The default template, built (or reused from the recipe cache) and registered."""
    from ember.guest.image import build_image

    return build_image(ember_paths, store, "debian-python", force=True)


@pytest.fixture(scope="session")
def busybox_template(ember_paths: Paths, kernel, store, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A template from a busybox OCI image layout (no Python, no libc of its own)."""
    from ember.guest.image import build_image
    from tests.oci_fixtures import make_busybox_oci_layout

    layout = make_busybox_oci_layout(tmp_path_factory.mktemp("busybox-oci"))
    return build_image(ember_paths, store, "busybox", f"oci-layout:{layout}", force=True)


@pytest.fixture(scope="session", params=["booted", "template-snapshot"])
def shared_sandbox(request, ember_paths: Paths, debian_template):  # type: ignore[no-untyped-def]
    """One running debian-python sandbox shared by tests that do not need isolation; every
    such test runs on a cold-booted sandbox and again on one created the default way,
    restored from the template snapshot (which a first create makes if need be)."""
    from ember import Sandbox
    from ember.runtime.template_snapshots import KEY_META
    from ember.store import Store

    if request.param == "booted":
        sb = Sandbox.create("debian-python", timeout=3600, paths=ember_paths, boot="cold")
        assert sb.info().snapshot is None
    else:
        Sandbox.create("debian-python", timeout=600, paths=ember_paths).kill()
        sb = Sandbox.create("debian-python", timeout=3600, paths=ember_paths)
        for _ in range(2):  # a first create's snapshot may fail (a loaded host): make again
            if sb.info().snapshot is not None:
                break
            sb.kill()
            sb = Sandbox.create("debian-python", timeout=3600, paths=ember_paths)
        snap = sb.info().snapshot
        assert snap is not None, "a default create did not restore the template snapshot"
        store = Store(ember_paths.db)
        assert KEY_META in store.get_snapshot(snap).metadata
        store.close()
    yield sb
    sb.kill()
