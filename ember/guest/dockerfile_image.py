"""A Dockerfile build's result as a template image of its own.

The last step's snapshot holds the build VM's disk as a qcow2 over the FROM template's
image. :func:`flatten` makes it an ordinary template image: ``qemu-img convert`` to a
sparse raw file (the backing chain read through), ``e2fsck`` (the snapshot was taken of a
mounted file system: its journal is replayed and orphan inodes released), and
``/.ember/image.json`` rewritten with ``debugfs`` to carry the new digest (no mount). It is
staged and renamed into ``images/<digest>/`` like every image build, so a killed build
leaves only a staging directory that the next build sweeps.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember import proc
from ember.errors import BuildError, HostCommandError
from ember.guest import image
from ember.paths import Paths

Progress = Callable[[str], None] | None


def flatten(paths: Paths, disk: Path, digest: str, image_json: dict[str, Any],
            meta: dict[str, Any], progress: Progress = None) -> dict[str, Any]:
    """Make ``disk`` (a qcow2 with its backing chain) the image ``digest``; return its
    ``meta`` with ``image_path`` and ``size_bytes`` (reused if that image exists)."""
    final = paths.images / digest.split(":", 1)[1]
    meta = {**meta, "digest": digest, "created_at": time.time()}
    if (final / "rootfs.ext4").is_file():
        return {**meta, "image_path": str(final / "rootfs.ext4"),
                "size_bytes": (final / "rootfs.ext4").stat().st_size}
    paths.ensure()
    with image._staging(paths) as stage:  # the image builder's staging: swept when stale
        out = stage / "image"
        out.mkdir()
        raw = out / "rootfs.ext4"
        if progress:
            progress("writing the template's image (qemu-img convert, sparse)")
        try:
            proc.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)],
                     what="flatten the build's disk into an image", timeout=1800)
            _fsck(raw)
            _write_image_json(raw, image_json, stage)
        except HostCommandError as err:
            raise BuildError(f"making the template's image failed: {err}") from err
        raw.chmod(0o444)
        meta.update(image_path=str(final / "rootfs.ext4"), size_bytes=raw.stat().st_size)
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        image._fsync_tree(out)
        try:
            os.rename(out, final)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise BuildError(f"cannot install the image {final}: {err}") from err
    return meta


def _fsck(raw: Path) -> None:
    """Replay the journal and fix what a live snapshot leaves (exit 1: fixed, fine)."""
    got = proc.run(["e2fsck", "-fy", str(raw)], what="check the build's file system",
                   timeout=900, check=False)
    if got.returncode not in (0, 1):
        raise BuildError(f"e2fsck of the build's file system failed ({got.returncode}): "
                         f"{got.stderr[-1000:]}")


def _write_image_json(raw: Path, doc: dict[str, Any], stage: Path) -> None:
    text = json.dumps(doc, sort_keys=True, indent=1) + "\n"
    with tempfile.NamedTemporaryFile("w", dir=stage, suffix=".json", delete=False) as f:
        f.write(text)
    cmds = stage / "debugfs.cmds"
    cmds.write_text("cd /.ember\nrm image.json\n"
                    f"write {f.name} image.json\n"
                    "set_inode_field image.json mode 0100444\n"
                    "set_inode_field image.json uid 0\n"
                    "set_inode_field image.json gid 0\n")
    proc.run(["debugfs", "-w", "-f", str(cmds), str(raw)],
             what="write /.ember/image.json into the image", timeout=300)
    got = proc.run(["debugfs", "-R", "cat /.ember/image.json", str(raw)],
                   what="read /.ember/image.json back", timeout=300)
    if got.stdout != text:
        raise BuildError("writing /.ember/image.json into the built image did not take")
