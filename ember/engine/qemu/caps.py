"""What the installed QEMU can do, asked once per binary and remembered."""

from __future__ import annotations

import functools
import json

from ember.engine.qemu.argv import SANDBOX_OPTS
from ember.errors import EmberError
from ember.proc import run

PROBE_TIMEOUT = 20.0


@functools.cache
def qemu_version(qemu: str) -> str:
    """The first line of ``qemu --version`` (``QEMU emulator version 7.2.22 (...)``)."""
    out = run([qemu, "--version"], what="ask QEMU for its version", timeout=PROBE_TIMEOUT)
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


@functools.cache
def machine_types(qemu: str) -> frozenset[str]:
    out = run([qemu, "-machine", "help"], what="list QEMU machine types", timeout=PROBE_TIMEOUT)
    names = (line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip())
    return frozenset(names)


@functools.cache
def seccomp_supported(qemu: str) -> bool:
    """True if ``qemu -sandbox <full options>`` runs (built with seccomp, kernel allows it).

    Starts an empty machine with the filter installed, talks QMP over stdio and quits:
    about 50 ms, once per process.
    """
    qmp_input = b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
    # Under coreutils' timeout: should we be killed before QEMU reads "quit", QEMU would
    # otherwise stay forever (EOF on its QMP stdio does not end it).
    argv = [
        "timeout", "-s", "KILL", f"{PROBE_TIMEOUT:g}",
        qemu,
        "-sandbox",
        SANDBOX_OPTS,
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
        "stdio",
    ]
    try:
        out = run(
            argv,
            what="probe QEMU seccomp sandbox",
            timeout=PROBE_TIMEOUT,
            input=qmp_input,
            check=False,
        )
    except EmberError:
        return False
    if out.returncode != 0:
        return False
    replies = []
    for line in out.stdout.splitlines():
        try:
            replies.append(json.loads(line))
        except ValueError:
            continue
    return any("return" in r for r in replies if isinstance(r, dict))
