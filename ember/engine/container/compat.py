"""A compatibility shim for gVisor sandboxes: ``statx_compat.c`` built once per content.

Debian 12's runsc (20221219) rejects ``statx`` with ``AT_NO_AUTOMOUNT``, which coreutils'
``ls`` and ``stat`` always pass. The shim, preloaded in gVisor sandboxes only, clears the
flag (gVisor has no automounts, so it changes nothing else). It is built with the host's C
compiler into ``<cache>/compat/<hash of source and recipe>/statx.so`` and installed into
each gVisor sandbox's writable layer (``/.ember/compat/statx.so``, listed in
``/etc/ld.so.preload``). Without a compiler gVisor sandboxes run without it, and ``ls -l``
fails there as before (a warning says so).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from pathlib import Path

from ember import proc
from ember.errors import EmberError

log = logging.getLogger("ember.engine.container")

SOURCE = Path(__file__).with_name("statx_compat.c")
CFLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-nostdlib", "-lc")
#: Where the shim appears inside a sandbox, and the preload list naming it.
GUEST_PATH = "/.ember/compat/statx.so"
PRELOAD = "etc/ld.so.preload"


def statx_compat(cache: Path) -> Path | None:
    """The built shim (building it on first use), or None when it cannot be built."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + "\0".join(CFLAGS).encode()).hexdigest()[:16]
    dest = cache / "compat" / key / "statx.so"
    if dest.is_file():
        return dest
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler: gVisor sandboxes run without the statx shim "
                    "(`ls -l` fails in them; apt-get install -y gcc)")
        return None
    tmp = dest.parent.with_name(f".{key}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        proc.run([cc, *CFLAGS[:-1], "-o", str(tmp / "statx.so"), str(SOURCE), CFLAGS[-1]],
                 what="build the gVisor statx shim", timeout=120)
        (tmp / "statx.so").chmod(0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(dest.parent)
        except OSError:  # built by another process meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except EmberError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("gVisor sandboxes run without the statx shim: %s", err)
        return None
    return dest


def install(rootfs: Path, shim: Path) -> None:
    """Put ``shim`` into a sandbox's (writable, mounted) root and preload it, keeping any
    preload list the image has. An image without ``/etc`` (no glibc) is left alone."""
    if not (rootfs / "etc").is_dir() or (rootfs / "etc").is_symlink():
        return
    target = rootfs / GUEST_PATH.lstrip("/")
    # The image's own links must never redirect a host-side write out of its root.
    for p in (target.parent.parent, target.parent, target):
        if p.is_symlink():
            log.warning("image has a link at %s; gVisor statx shim not installed", p)
            return
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    shutil.copyfile(shim, target)
    target.chmod(0o644)
    preload = rootfs / PRELOAD
    if preload.is_symlink():
        return  # never write through a link the image controls
    lines = preload.read_text(errors="replace").split() if preload.is_file() else []
    if GUEST_PATH not in lines:
        preload.write_text("\n".join([*lines, GUEST_PATH]) + "\n")
        preload.chmod(0o644)
