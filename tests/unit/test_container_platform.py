"""gVisor's platform: chosen by a probe container on hosts with hardware virtualization.

A stand-in ``runsc`` (a shell script, the I/O edge of the choice) plays each outcome: the
probe container exits with the expected status, dies of SIGILL, or never answers (and
leaves a helper behind, which the timeout must kill with it)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from ember.engine.container import platform
from ember.engine.container.platform import choose_platform

FLAGS_HELP = ('  -platform string\n    \tspecifies which platform to use: ptrace (default), '
              'kvm. (default "ptrace")\n')


def fake_runsc(tmp_path: Path, do: str, platforms: str = FLAGS_HELP) -> str:
    script = tmp_path / "runsc"
    (tmp_path / "flags.txt").write_text(platforms)
    script.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *" flags"*|flags) cat {tmp_path}/flags.txt; exit 0;; esac\n'
        f'case "$*" in *" list "*) exit 0;; esac\n'
        f'echo "$@" >> {tmp_path}/calls\n{do}\n')
    script.chmod(0o755)
    return str(script)


@pytest.fixture(autouse=True)
def probe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "probes"
    monkeypatch.setattr(platform, "PROBE_DIR", d)
    return d


def test_no_hardware_virtualization_means_no_probe(tmp_path: Path) -> None:
    runsc = fake_runsc(tmp_path, "exit 99")
    choice = choose_platform(runsc, False, "kvm-pvm host")
    assert choice.platform == "ptrace" and "kvm-pvm host" in choice.reason
    assert not (tmp_path / "calls").exists()


def test_a_probe_that_runs_chooses_kvm_once_per_boot(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    runsc = fake_runsc(tmp_path, f"exit {platform.PROBE_STATUS}")
    choice = choose_platform(runsc, True, "", dev=dev)
    assert choice.platform == "kvm" and "a probe container ran on it" in choice.reason
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1 and "--platform=kvm" in calls[0] and "--network=none" in calls[0]
    assert choose_platform(runsc, True, "", dev=dev) == choice  # cached: no second probe
    assert len((tmp_path / "calls").read_text().splitlines()) == 1


@pytest.mark.parametrize(("platforms", "fallback"), [
    (FLAGS_HELP, "ptrace"),
    (FLAGS_HELP.replace("ptrace (default)", "systrap (default), ptrace"), "systrap"),
])
def test_a_failing_probe_falls_back_with_the_reason(tmp_path: Path, platforms: str,
                                                    fallback: str) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    runsc = fake_runsc(tmp_path, "echo 'illegal instruction' >&2; exit 132", platforms)
    choice = choose_platform(runsc, True, "", dev=dev)
    assert choice.platform == fallback
    assert "failed its probe" in choice.reason and "exit status 132" in choice.reason
    assert "illegal instruction" in choice.reason


def test_a_hanging_probe_is_killed_with_its_helpers(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "PROBE_TIMEOUT_S", 1.0)
    dev = tmp_path / "kvm"
    dev.write_text("")
    runsc = fake_runsc(tmp_path, f"sleep 300 & echo $! > {tmp_path}/helper; sleep 300")
    t0 = time.monotonic()
    choice = choose_platform(runsc, True, "", dev=dev)
    assert time.monotonic() - t0 < 30
    assert choice.platform == "ptrace" and "no answer within 1 s" in choice.reason
    helper = int((tmp_path / "helper").read_text())
    for _ in range(100):  # killed with the probe's process group (reaped by init)
        try:
            os.kill(helper, 0)
        except ProcessLookupError:
            break
        state = Path(f"/proc/{helper}/stat").read_text().split(") ", 1)[1][0]
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(helper, signal.SIGKILL)
        pytest.fail("the probe's helper outlived its timeout")
