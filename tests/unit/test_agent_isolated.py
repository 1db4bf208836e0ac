"""The guest copies only ember/{__init__.py,protocol,agent} and runs them with -I -S:
check that this subset imports and serves with the stdlib alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ember
from ember.protocol import Kind

from .test_agent_harness import AgentHarness


@pytest.fixture(scope="module")
def guest_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lib = tmp_path_factory.mktemp("lib")
    source = Path(ember.__file__).parent
    (lib / "ember").mkdir()
    (lib / "ember" / "__init__.py").write_text("")
    for package in ("protocol", "agent"):
        shutil.copytree(source / package, lib / "ember" / package)
    return lib


def _python(lib: Path, code: str) -> list[str]:
    prelude = f"import sys; sys.path.insert(0, {str(lib)!r}); "
    return [sys.executable, "-I", "-S", "-c", prelude + code]


def test_imports_with_stdlib_only(guest_lib: Path) -> None:
    code = (
        "import ember.agent.init, ember.agent.server; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names "
        "and m.split('.')[0] not in ('ember', '__main__')); "
        "print(ember.agent.server.__file__); print(bad)"
    )
    out = subprocess.run(_python(guest_lib, code), capture_output=True, text=True, check=True)
    path, bad = out.stdout.splitlines()
    assert path.startswith(str(guest_lib)) and bad == "[]"


# Each costs a guest under TCG (software emulation) tens of milliseconds to import at boot;
# the guest side needs none of them until a rare operation (traceback, shutil) asks.
SLOW_IMPORTS = {"dataclasses", "inspect", "typing", "pathlib", "socket", "shutil", "traceback"}
AGENT_ONLY = {"json", "threading", "subprocess", "ember.protocol"}


def _imported_after(guest_lib: Path, modules: str) -> set[str]:
    code = f"import {modules}; print(' '.join(sys.modules))"
    out = subprocess.run(_python(guest_lib, code), capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_boot_imports_stay_light(guest_lib: Path) -> None:
    assert not _imported_after(guest_lib, "ember.agent.init, ember.agent.server") & SLOW_IMPORTS
    # Init imports only what it needs before it forks the agent.
    assert not _imported_after(guest_lib, "ember.agent.init") & (SLOW_IMPORTS | AGENT_ONLY)


def test_serves_from_the_guest_lib(guest_lib: Path) -> None:
    code = "from ember.agent.server import serve; serve({fd})"
    harness = AgentHarness(process=_python(guest_lib, code))
    try:
        harness.handshake(5)
        result = harness.run({"argv": ["sh", "-c", "echo $0", "isolated"]})
        assert result.stdout == b"isolated\n"
        stream = harness.new_stream()
        harness.send_msg(stream, {"op": "read", "path": "/etc/hostname"})
        frames = harness.collect(stream)
        assert frames[-1].msg()["op"] in ("eof", "error")
        assert all(f.kind in (Kind.MSG, Kind.FILEDATA) for f in frames)
    finally:
        harness.close()


def test_init_script_runs_main(guest_lib: Path) -> None:
    from ember.agent import INIT_SCRIPT

    script = INIT_SCRIPT.replace("/.ember/lib", str(guest_lib)).split("\n", 1)[1]
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, check=True
    )
    assert "must be PID 1" in out.stderr  # not PID 1 here: init refuses and returns
