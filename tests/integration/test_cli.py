"""The `ember` command end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
EMBER = [sys.executable, "-m", "ember.cli"]


def ember(*args: str, stdin: str | None = None,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run([*EMBER, *args], capture_output=True, text=True, input=stdin,
                        timeout=600, env=os.environ.copy())
    if check and cp.returncode != 0:
        raise AssertionError(f"ember {' '.join(args)} -> {cp.returncode}\n{cp.stdout}\n{cp.stderr}")
    return cp


def test_run_streams_output_and_exit_code(debian_template) -> None:  # type: ignore[no-untyped-def]
    cp = ember("run", "--", "python3", "-c", "print(6*7)")
    assert cp.stdout == "42\n"
    cp = ember("run", "--", "sh -c 'echo oops >&2; exit 7'", check=False)
    assert (cp.returncode, cp.stderr.splitlines()[-1]) == (7, "oops")
    cp = ember("run", "-i", "--", "wc", "-l", stdin="a\nb\nc\n")
    assert cp.stdout.strip() == "3"
    cp = ember("run", "--", "no-such-program", check=False)
    assert cp.returncode == 127 and "command not found" in cp.stderr
    assert json.loads(ember("ls", "--json").stdout) == []


def test_create_exec_cp_logs_ls_rm(debian_template, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sid = ember("create", "--meta", "owner=test", "-e", "X=1").stdout.strip()
    try:
        assert sid.startswith("sb-")
        listed = json.loads(ember("ls", "--json").stdout)
        assert [(s["id"], s["state"], s["metadata"]) for s in listed] == [
            (sid, "running", {"owner": "test"})]
        assert ember("exec", sid, "--", "sh -c 'echo $X'").stdout == "1\n"
        local = tmp_path / "in.txt"
        local.write_text("payload")
        ember("cp", str(local), f"{sid}:/tmp/in.txt")
        assert ember("exec", sid, "--", "cat", "/tmp/in.txt").stdout == "payload"
        ember("cp", f"{sid}:/etc/hostname", str(tmp_path / "hn"))
        assert (tmp_path / "hn").read_text().strip() == sid
        info = json.loads(ember("inspect", sid, "--json").stdout)
        console = ember("logs", sid).stdout  # the guest console: its boot, or from its restore
        if info["snapshot"] is None:
            assert "ember-agent: serving" in console
        else:
            assert f"ember: restored from template snapshot {info['snapshot'][:12]}" in console
            assert f"ember-agent: this guest is now {sid}" in console
        assert info["accel"] in ("tcg", "kvm")
    finally:
        ember("rm", sid)
    assert json.loads(ember("ls", "--json").stdout) == []


def test_errors_are_clear_and_typed(debian_template) -> None:  # type: ignore[no-untyped-def]
    cp = ember("run", "--template", "nope", "--", "true", check=False)
    assert cp.returncode == 3 and "TemplateNotFoundError" in cp.stderr and "nope" in cp.stderr
    cp = ember("create", "--vcpus", "0", check=False)
    assert cp.returncode == 2 and "vcpus=0" in cp.stderr
    cp = ember("exec", "sb-ffffffffffff", "--", "true", check=False)
    assert cp.returncode == 3 and "sb-ffffffffffff" in cp.stderr
    cp = ember("cp", "/etc/hostname", "/tmp/x", check=False)
    assert cp.returncode == 2


def test_doctor_reports_accelerator_and_reason() -> None:
    cp = ember("doctor", "--json", check=False)
    checks = {c["name"]: c for c in json.loads(cp.stdout)}
    accel = [c for name, c in checks.items() if "accel" in name.lower()]
    assert accel and ("tcg" in accel[0]["detail"].lower() or "kvm" in accel[0]["detail"].lower())


def test_help_is_helpful() -> None:
    out = ember("--help").stdout
    for cmd in ("run", "create", "exec", "cp", "logs", "ls", "rm", "doctor", "image", "kernel"):
        assert cmd in out
    assert "ember run -- python3" in ember("run", "--help").stdout


def test_bake_shows_its_setup_output(debian_template) -> None:  # type: ignore[no-untyped-def]
    """Without --json, the setup command's output streams to stderr as text."""
    cp = ember("image", "bake", "cli-baked", "--run", "echo setting up; echo warn >&2")
    try:
        assert "setting up" in cp.stderr and "warn" in cp.stderr
        assert "cli-baked" in ember("image", "ls", "--json").stdout
    finally:
        ember("image", "rm", "cli-baked")
