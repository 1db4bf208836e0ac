"""Isolation tiers, the parts that need no container: the OCI bundle, spec validation, tier
detection and its errors, doctor, the registry migration, and the agent serving on a Unix
socket (the container tiers' channel) in a plain subprocess."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.agent import SHUTDOWN_EXIT_CODE
from ember.engine.container import require_tier, tier_status
from ember.engine.container.bundle import CAPABILITIES, oci_config
from ember.engine.doctor import diagnose
from ember.errors import BadRequestError, TierUnavailableError
from ember.paths import Paths
from ember.runtime.agent_client import AgentClient
from ember.runtime.spec import SandboxSpec
from ember.store import SandboxRecord, Store
from ember.store.db import MIGRATIONS


def _config(gvisor: bool = False) -> dict:  # type: ignore[type-arg]
    return oci_config(sandbox_id="sb-0123456789ab", rootfs=Path("/s/rootfs"),
                      run_dir=Path("/s/vm"), agent_lib=Path("/h/lib"), nofile=1024,
                      nproc=256, gvisor=gvisor)


def test_bundle_confines_the_container() -> None:
    c = _config()
    ns = {n["type"] for n in c["linux"]["namespaces"]}
    assert ns == {"pid", "network", "ipc", "uts", "mount"}  # network: empty, no interface
    assert "uidMappings" not in c["linux"]
    proc = c["process"]
    assert proc["noNewPrivileges"] is True and proc["terminal"] is False
    caps = set(proc["capabilities"]["bounding"])
    assert caps == set(CAPABILITIES)
    assert not caps & {"CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_SYS_PTRACE",
                       "CAP_SYS_MODULE", "CAP_MKNOD"}
    assert {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024} in proc["rlimits"]
    assert proc["args"][-1] == "sb-0123456789ab" == c["hostname"]
    seccomp = c["linux"]["seccomp"]
    denied = set(seccomp["syscalls"][0]["names"])
    assert {"mount", "unshare", "setns", "ptrace", "bpf", "keyctl", "kexec_load",
            "init_module", "perf_event_open", "userfaultfd"} <= denied
    assert seccomp["syscalls"][0]["action"] == "SCMP_ACT_ERRNO"
    mounts = {m["destination"]: m for m in c["mounts"]}
    assert mounts["/.ember/lib"]["source"] == "/h/lib" and "ro" in mounts["/.ember/lib"]["options"]
    assert mounts["/.ember/run"]["source"] == "/s/vm" and "rw" in mounts["/.ember/run"]["options"]
    assert "ro" in mounts["/sys"]["options"]
    assert c["root"] == {"path": "/s/rootfs", "readonly": False}


def test_gvisor_bundle_has_an_identity_mapped_user_namespace() -> None:
    c = _config(gvisor=True)
    assert "user" in {n["type"] for n in c["linux"]["namespaces"]}
    assert c["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 0, "size": 4294967295}]
    assert c["linux"]["seccomp"] == _config()["linux"]["seccomp"]


def test_spec_isolation_is_validated() -> None:
    assert SandboxSpec().isolation == "microvm"
    assert SandboxSpec(isolation="gvisor").isolation == "gvisor"
    with pytest.raises(BadRequestError, match="isolation must be one of"):
        SandboxSpec(isolation="docker")
    assert SandboxSpec(isolation="container", on_timeout="pause").on_timeout == "pause"
    assert SandboxSpec(isolation="gvisor", on_timeout="pause").on_timeout == "pause"


@pytest.mark.parametrize(("tier", "package"), [("gvisor", "runsc"), ("container", "crun")])
def test_missing_runtime_names_cause_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            tier: str, package: str) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    st = tier_status(tier)
    assert not st.ok and st.fix == f"apt-get install -y {package}"
    assert "not installed" in st.detail
    with pytest.raises(TierUnavailableError,
                       match=rf"isolation='{tier}'.*not installed.*apt-get install -y {package}"):
        require_tier(tier)
    checks = {c.name: c for c in diagnose(home=tmp_path)}
    assert checks[f"isolation={tier}"].fix == f"apt-get install -y {package}"


def test_microvm_is_always_a_tier() -> None:
    assert tier_status("microvm").ok


def test_migration_4_gives_old_rows_microvm(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    conn = sqlite3.connect(db)
    for script in MIGRATIONS[:3]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version=3")
    conn.execute("INSERT INTO sandboxes (id, template, state, vcpus, memory_mib, disk_mib, "
                 "created_at, dir, accel) VALUES ('sb-old', 't', 'failed', 1, 256, 512, 0, "
                 "'/x', 'tcg')")
    conn.commit()
    conn.close()
    s = Store(db)
    assert s.get_sandbox("sb-old").isolation == "microvm"
    s.add_sandbox(SandboxRecord(id="sb-new", template="t", state="creating", vcpus=1,
                                memory_mib=256, disk_mib=512, timeout_s=None,
                                created_at=time.time(), expires_at=None, dir="/y", pid=None,
                                accel="ptrace", isolation="gvisor"))
    assert s.get_sandbox("sb-new").isolation == "gvisor"
    assert s.get_sandbox("sb-new").to_json()["isolation"] == "gvisor"


def test_agent_serves_sessions_on_a_unix_socket(tmp_path: Path) -> None:
    """The container tiers' channel: one host connection at a time, a disconnect ends
    only that session, a shutdown request ends the agent."""
    sock = tmp_path / "agent.sock"
    repo = Path(__file__).resolve().parents[2]
    agent = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c",
         f"import sys; sys.path.insert(0, {str(repo)!r}); "
         f"from ember.agent.server import main_unix; sys.exit(main_unix({str(sock)!r}))"],
        stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)

        async def session(shutdown: bool) -> str:
            client = await AgentClient.connect(str(sock), timeout=10)
            try:
                reply = await client.request({"op": "ping"})
                if shutdown:
                    await client.request({"op": "shutdown"})
                return str(reply["op"])
            finally:
                await client.close()

        assert asyncio.run(session(False)) == "pong"
        assert asyncio.run(session(False)) == "pong"  # a second session on a new connection
        assert asyncio.run(session(True)) == "pong"
        assert agent.wait(10) == SHUTDOWN_EXIT_CODE
        assert not os.path.exists(sock) or agent.returncode is not None
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_cli_and_sdk_report_an_unavailable_tier(tmp_path: Path) -> None:
    """No runtime on PATH: the SDK raises TierUnavailableError, the CLI prints cause and fix
    and fails; nothing is created (before even looking for the template)."""
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin"),
           "EMBER_HOME": str(tmp_path / "h"), "EMBER_CACHE": str(tmp_path / "c")}
    try:
        _report_unavailable(tmp_path, env)
    finally:  # the CLI and the SDK started the home's daemon: the daemon decides
        from ember.daemon.control import stop

        stop(Paths(home=tmp_path / "h", cache=tmp_path / "c"))


def _report_unavailable(tmp_path: Path, env: dict[str, str]) -> None:
    cp = subprocess.run([sys.executable, "-m", "ember.cli", "create", "--isolation", "gvisor"],
                        capture_output=True, text=True, env=env, timeout=120)
    said = " ".join(cp.stderr.split())  # the CLI wraps long lines
    assert cp.returncode != 0
    assert "TierUnavailableError" in said
    assert "runsc is not installed; fix: apt-get install -y runsc" in said
    code = ("import sys\nfrom ember import Sandbox\nfrom ember.errors import TierUnavailableError\n"
            "try:\n    Sandbox.create(isolation='container')\n"
            "except TierUnavailableError as e:\n    print(e)\n    sys.exit(3)\n")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=120)
    assert cp.returncode == 3, cp.stderr
    assert "crun is not installed; fix: apt-get install -y crun" in cp.stdout
    assert not list((tmp_path / "h" / "sandboxes").glob("*"))
