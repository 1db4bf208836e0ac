"""A container sandbox's root filesystem: the template's ext4 image mounted read-only
through a loop device (``lower/``), under an overlay whose writable layer is the sandbox's
own (``disk/upper``); the overlay is mounted at ``rootfs/``.

``disk/`` is itself a small filesystem of the sandbox's disk size (a sparse ext4 file,
``disk.img``, loop-mounted), so that what the sandbox writes cannot grow past its disk
limit on the host (ENOSPC inside, as in a microVM), and takes host space only as written.

The loop device is attached by ``mount -o loop`` with autoclear: unmounting ``lower/``
frees it. :func:`unmount` is idempotent and safe on a half-made sandbox.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EngineError, HostCommandError
from ember.proc import run

log = logging.getLogger("ember.engine.container")


@dataclass(frozen=True)
class RootfsDirs:
    root: Path

    @property
    def lower(self) -> Path:
        return self.root / "lower"

    @property
    def disk(self) -> Path:
        return self.root / "disk"

    @property
    def disk_image(self) -> Path:
        return self.root / "disk.img"

    @property
    def upper(self) -> Path:
        return self.root / "disk" / "upper"

    @property
    def work(self) -> Path:
        return self.root / "disk" / "work"

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"


def mount_points() -> set[str]:
    """Mount points of this mount namespace (octal escapes decoded)."""
    points = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                points.add(fields[4].encode().decode("unicode_escape"))
    return points


def mount(image: Path, dirs: RootfsDirs, disk_mib: int | None = None) -> None:
    """Mount ``image`` read-only at ``lower/`` and the overlay at ``rootfs/``; with
    ``disk_mib``, the writable layer lives in a filesystem of that size."""
    if not image.is_file():
        raise EngineError(f"template image {image} does not exist")
    for d in (dirs.lower, dirs.disk, dirs.rootfs):
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        if disk_mib is not None:
            _mount_disk(dirs, disk_mib)
        for d in (dirs.upper, dirs.work):
            d.mkdir(mode=0o755, exist_ok=True)
        # noload: never replay the journal of a shared, read-only image.
        run(["mount", "-t", "ext4", "-o", "ro,loop,noload,nodev,nosuid", str(image),
             str(dirs.lower)], what="mount the template image read-only", timeout=60)
        opts = f"lowerdir={dirs.lower},upperdir={dirs.upper},workdir={dirs.work}"
        run(["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs.rootfs)],
            what="mount the sandbox's overlay", timeout=60)
    except BaseException:
        unmount(dirs)
        raise


def _mount_disk(dirs: RootfsDirs, disk_mib: int) -> None:
    with open(dirs.disk_image, "wb") as f:
        f.truncate(disk_mib << 20)  # sparse: host space only as the sandbox writes
    # No journal and no reserved blocks: a scratch layer that dies with the sandbox.
    run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
         "-E", "nodiscard,lazy_itable_init=1", str(dirs.disk_image)],
        what="make the sandbox's disk", timeout=60)
    run(["mount", "-t", "ext4", "-o", "loop,nodev,nosuid", str(dirs.disk_image),
         str(dirs.disk)], what="mount the sandbox's disk", timeout=60)


def unmount(dirs: RootfsDirs, timeout: float = 10.0) -> None:
    """Unmount the overlay and the image (freeing the loop device); idempotent."""
    for target in (dirs.rootfs, dirs.lower, dirs.disk):
        deadline = time.monotonic() + timeout
        while str(target) in mount_points():
            try:
                run(["umount", str(target)], what=f"unmount {target}", timeout=30)
            except HostCommandError as err:
                if time.monotonic() > deadline:  # busy: detach it, the kernel finishes
                    log.warning("%s is busy (%s); detaching it lazily", target, err)
                    run(["umount", "-l", str(target)], what=f"detach {target}", timeout=30)
                else:
                    time.sleep(0.05)
    for d in (dirs.rootfs, dirs.lower, dirs.disk, dirs.disk_image):
        if str(d) not in mount_points():
            with contextlib.suppress(FileNotFoundError):
                if d.is_dir() and not d.is_symlink():
                    shutil.rmtree(d)
                else:
                    os.unlink(d)
