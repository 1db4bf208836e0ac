"""``ember daemon stop`` says what it did: stopped a daemon (which pid) or found none."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ember.cli.main import cli
from ember.daemon import control
from ember.daemon.control import DaemonStatus
from ember.paths import Paths


def fake_daemon(monkeypatch: pytest.MonkeyPatch, pid: int | None) -> list[str]:
    """A daemon at ``pid`` (None: none runs) that stops when asked; returns the calls."""
    calls: list[str] = []
    running = [pid is not None]

    def status(paths: Paths) -> DaemonStatus:
        calls.append("status")
        return DaemonStatus(running=running[0], pid=pid if running[0] else None,
                            socket=str(paths.home / "emberd.sock"))

    def stop(paths: Paths, *, wait: float = 30.0) -> DaemonStatus:
        calls.append("stop")
        running[0] = False
        return status(paths)

    monkeypatch.setattr(control, "status", status)
    monkeypatch.setattr(control, "stop", stop)
    return calls


def test_stopping_a_running_daemon_names_it(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    calls = fake_daemon(monkeypatch, 4242)
    r = CliRunner().invoke(cli, ["daemon", "stop"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("emberd stopped (was pid 4242, socket ")
    assert "stop" in calls


def test_stopping_when_none_runs_says_so(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    fake_daemon(monkeypatch, None)
    r = CliRunner().invoke(cli, ["daemon", "stop"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("emberd not running (socket ")
    r = CliRunner().invoke(cli, ["daemon", "stop", "--json"])
    assert '"running": false' in r.output
