"""Which platform gVisor's Sentry runs on, decided by a probe, not by the accelerator alone.

runsc's ``kvm`` platform needs hardware virtualization, but having it is not enough: on
some hosts (nested virtualization, unusual CPU models) a runsc KVM sandbox dies or never
starts. So on a host where ember would use KVM, a probe container runs a shell that exits
with a known status on the ``kvm`` platform; only if that status comes back is ``kvm``
used. Otherwise ``systrap`` (where this runsc has it; it needs no virtualization and is
faster than ``ptrace``), else ``ptrace``, with the probe's failure as the reason.

The probe's result is kept per boot (``/run/ember/probes``, tmpfs), keyed by the runsc
binary and the ``/dev/kvm`` device it was run against, so it costs its few hundred
milliseconds (or its timeout, when the platform hangs) once per host boot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError, EmberTimeoutError
from ember.proc import run

PROBE_DIR = Path("/run/ember/probes")
PROBE_TIMEOUT_S = 20.0
#: The probe container's exit status: seen only if the sandboxed shell really ran.
PROBE_STATUS = 7


@dataclass(frozen=True)
class PlatformChoice:
    platform: str  # kvm | systrap | ptrace
    reason: str


def _key(runsc: str, dev: Path) -> str | None:
    try:
        exe = os.stat(runsc)
        kvm = dev.stat()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    parts = [os.path.realpath(runsc), exe.st_size, exe.st_mtime_ns, boot, kvm.st_ino,
             kvm.st_mode, kvm.st_gid, kvm.st_rdev]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def runsc_platforms(runsc: str) -> set[str]:
    """The platforms this runsc names in its ``-platform`` flag's help."""
    try:
        text = run([runsc, "flags"], what="list runsc's flags", timeout=10).stdout
    except EmberError:
        return {"ptrace"}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("-platform "):
            desc = " ".join(lines[i:i + 2])
            return {p for p in ("kvm", "systrap", "ptrace") if p in desc} | {"ptrace"}
    return {"ptrace"}


def probe_kvm_platform(runsc: str) -> tuple[bool, str]:
    """Run a container on runsc's KVM platform; (it worked, what happened)."""
    state = Path(tempfile.mkdtemp(prefix="ember-runsc-probe-"))
    argv = [runsc, f"--root={state}", "--network=none", "--platform=kvm", "--ignore-cgroups",
            "do", "/bin/sh", "-c", f"exit {PROBE_STATUS}"]
    try:
        done = run(argv, what="probe runsc's KVM platform", timeout=PROBE_TIMEOUT_S,
                   check=False, new_session=True, cwd="/")
    except EmberTimeoutError:
        return False, f"no answer within {PROBE_TIMEOUT_S:g} s"
    except EmberError as err:
        return False, str(err)
    finally:
        _cleanup(runsc, state)
    if done.returncode == PROBE_STATUS:
        return True, "a probe container ran on it"
    said = (done.stderr.strip() or done.stdout.strip()).splitlines()
    status = (f"killed by signal {-done.returncode}" if done.returncode < 0
              else f"exit status {done.returncode}")
    return False, f"the probe container ended with {status}" + (
        f": {said[-1][:300]}" if said else "")


def _cleanup(runsc: str, state: Path) -> None:
    """Delete whatever the probe's runsc left (a sandbox it never finished starting)."""
    if any(state.iterdir()):
        with contextlib.suppress(EmberError):
            out = run([runsc, f"--root={state}", "list", "-quiet"],
                      what="list probe containers", timeout=10, check=False).stdout
            for cid in out.split():
                run([runsc, f"--root={state}", "delete", "-force", cid],
                    what="delete a probe container", timeout=10, check=False)
    shutil.rmtree(state, ignore_errors=True)


def choose_platform(runsc: str | None, kvm_host: bool, host_reason: str,
                    dev: Path = Path("/dev/kvm")) -> PlatformChoice:
    """The platform for ``isolation="gvisor"`` sandboxes, and why."""
    if runsc is None:
        return PlatformChoice("ptrace", "ptrace (runsc is not installed)")
    if not kvm_host:
        fallback = "systrap" if "systrap" in runsc_platforms(runsc) else "ptrace"
        return PlatformChoice(fallback, f"{fallback}: no usable hardware virtualization "
                              f"({host_reason})")
    key = _key(runsc, dev)
    cached = PROBE_DIR / f"gvisor-kvm-{key}.json" if key else None
    result: tuple[bool, str] | None = None
    if cached is not None:
        with contextlib.suppress(OSError, ValueError, TypeError):
            doc = json.loads(cached.read_text())
            result = (bool(doc["ok"]), str(doc["detail"]))
    if result is None:
        result = probe_kvm_platform(runsc)
        if cached is not None:
            with contextlib.suppress(OSError):
                PROBE_DIR.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"ok": result[0], "detail": result[1]}))
                tmp.rename(cached)
    ok, detail = result
    if ok:
        return PlatformChoice("kvm", f"kvm: hardware virtualization, and {detail}")
    fallback = "systrap" if "systrap" in runsc_platforms(runsc) else "ptrace"
    return PlatformChoice(fallback, f"{fallback}: runsc's KVM platform failed its probe "
                          f"({detail})")
