"""Per-sandbox copy-on-write disks, made by copying a cached empty overlay.

An empty qcow2 overlay depends only on its backing file's path and format and on its
virtual size, and holds no unique identifier: ``qemu-img create`` runs once per such
triple (its output is cached under ``$EMBER_HOME/overlays``) and every sandbox gets a
copy of it, a ~200 KiB file copy instead of a process start.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path

from ember import proc
from ember.paths import Paths


def make_overlay(paths: Paths, backing: Path, backing_format: str, size_mib: int,
                 dest: Path) -> None:
    """Create ``dest``: an empty qcow2 of ``size_mib`` MiB over ``backing``."""
    key = hashlib.sha256(f"{backing}\0{backing_format}\0{size_mib}".encode()).hexdigest()[:24]
    cache = paths.home / "overlays"
    cached = cache / f"{key}.qcow2"
    if not cached.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        staging = cache / f".{key}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            proc.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b",
                      str(backing), str(staging), f"{size_mib}M"],
                     what="create the sandbox disk overlay", timeout=60)
            staging.rename(cached)  # atomic: readers see a complete file or none
        finally:
            staging.unlink(missing_ok=True)
    shutil.copyfile(cached, dest)

