"""Install ember's guest side under the reserved path ``/.ember`` of a root filesystem.

``/.ember/runtime``  self-contained CPython (own loader and libc; see runtime_bundle)
``/.ember/lib/ember`` the agent and the protocol (stdlib-only Python)
``/.ember/init``     PID 1 (the kernel runs it with ``init=/.ember/init``)
``/.ember/image.json`` template digest and metadata, written last by the image builder
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from ember import proc
from ember.errors import UnsafeLayerError

RESERVED = ".ember"
INIT_PATH = "/.ember/init"
_GUEST_PACKAGES = ("protocol", "agent")
HOST_PYTHON = "/usr/bin/python3.11"


def _init_script() -> str:
    from ember.agent import INIT_SCRIPT

    return INIT_SCRIPT


def inject(rootfs: Path, runtime_dir: Path) -> None:
    """Copy the runtime and the agent into ``rootfs/.ember`` (which must not exist yet)."""
    target = rootfs / RESERVED
    if target.is_symlink() or target.exists():
        raise UnsafeLayerError(
            f"the image already has /{RESERVED}: that path is reserved for ember's guest agent"
        )
    target.mkdir(mode=0o755)
    proc.run(["cp", "-a", f"{runtime_dir}/.", str(target / "runtime")], what="copy agent runtime")
    pkg_root = Path(__file__).resolve().parent.parent  # .../ember
    lib = target / "lib" / "ember"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text('"""ember guest side."""\n')
    for name in _GUEST_PACKAGES:
        shutil.copytree(pkg_root / name, lib / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    init = target / "init"
    init.write_text(_init_script())
    init.chmod(0o755)
    # precompile so that a slow (TCG) guest does not compile on every boot
    # (the runtime is Debian's python3.11, so the host's python3.11 writes matching .pyc)
    proc.run([HOST_PYTHON, "-I", "-S", "-m", "compileall", "-q", "--invalidation-mode",
              "unchecked-hash", "-s", str(target / "lib"), "-p", "/.ember/lib",
              str(target / "lib")],
             what="precompile the guest agent", env={"PATH": "/usr/bin:/bin"})
    _chown_root(target)


def _agent_sources() -> list[Path]:
    pkg_root = Path(__file__).resolve().parent.parent
    return sorted(f for name in _GUEST_PACKAGES for f in (pkg_root / name).rglob("*.py"))


def staged_agent_lib(root: Path) -> Path:
    """This ember's agent and protocol as a ``/.ember/lib`` tree under ``root`` (made once
    per content, precompiled), for the container tiers: they bind it over the image's copy,
    so that a template built by an older ember still runs this ember's agent."""
    import hashlib

    pkg_root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for f in _agent_sources():
        digest.update(str(f.relative_to(pkg_root)).encode() + b"\0" + f.read_bytes())
    dest = root / digest.hexdigest()[:16]
    if (dest / "ember" / "__init__.py").is_file():
        return dest
    # Unique per call: threads of one process may stage at once.
    tmp = root / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}"
    lib = tmp / "ember"
    lib.mkdir(parents=True)
    for name in _GUEST_PACKAGES:
        shutil.copytree(pkg_root / name, lib / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc.run([HOST_PYTHON, "-I", "-S", "-m", "compileall", "-q", "--invalidation-mode",
              "unchecked-hash", "-s", str(tmp), "-p", "/.ember/lib", str(tmp)],
             what="precompile the agent for containers", env={"PATH": "/usr/bin:/bin"})
    (lib / "__init__.py").write_text('"""ember guest side."""\n')  # last: marks it complete
    for d in [tmp, *tmp.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o644)
    try:
        tmp.rename(dest)
    except OSError:  # another process staged it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_image_json(rootfs: Path, meta: dict[str, Any]) -> None:
    path = rootfs / RESERVED / "image.json"
    path.write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n")
    path.chmod(0o444)


def _chown_root(top: Path) -> None:
    if os.geteuid() != 0:
        return
    for dirpath, dirnames, filenames in os.walk(top):
        for n in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, n), 0, 0)
    os.lchown(top, 0, 0)
