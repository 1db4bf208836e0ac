"""Parse an image source string and hand it to the reader for its kind.

Forms: ``oci-layout:/dir[:tag]``, ``docker-archive:/file.tar[:ref]``, ``oci-archive:/file.tar``,
``registry:HOST[:PORT]/repo[:tag|@digest]`` or ``docker://...``, or a bare path to a layout
directory (with ``index.json``) or to a tarball.
"""

from __future__ import annotations

import errno
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.errors import BadRequestError, BuildError, ImageSourceError
from ember.guest.oci.config import PulledImage
from ember.guest.oci.docker_archive import extract_docker_archive
from ember.guest.oci.layout import extract_layout
from ember.guest.oci.registry import extract_registry
from ember.guest.oci.unpack import Progress

SCHEMES = ("oci-layout:", "docker-archive:", "oci-archive:", "registry:", "docker://")
_KIND = {
    "oci-layout:": "layout",
    "docker-archive:": "archive",
    "oci-archive:": "archive",
    "registry:": "registry",
    "docker://": "registry",
}


@dataclass(frozen=True)
class Source:
    kind: str  # "layout" | "archive" | "registry"
    target: str  # a path (maybe with ":tag") or a registry reference


def parse_source(source: str) -> Source:
    """Classify ``source``; a bare path is recognised by what is on disk."""
    for prefix in SCHEMES:
        if source.startswith(prefix):
            return Source(_KIND[prefix], source[len(prefix) :])
    path, _ref = split_path_ref(source)
    if path.is_dir() and (path / "index.json").is_file():
        return Source("layout", source)
    if path.is_file() and _is_tar(path):
        return Source("archive", source)
    scheme, sep, _rest = source.partition(":")
    if sep and scheme and "/" not in scheme:
        raise ImageSourceError(
            f"unknown image source scheme {scheme + ':'!r} in {source!r}: "
            f"use one of {', '.join(SCHEMES)}"
        )
    raise ImageSourceError(
        f"unknown image source {source!r}: not one of "
        f"{', '.join(SCHEMES)} and not an OCI layout directory or tarball"
    )


def split_path_ref(text: str) -> tuple[Path, str | None]:
    """``/a/b:tag`` -> (``/a/b``, ``tag``), unless a file named ``/a/b:tag`` exists.

    The first ``:`` after which the prefix names an existing file or directory splits;
    the rest is the tag or name (which may itself hold ``:``, as in ``busybox:1.36``).
    """
    if Path(text).exists() or ":" not in text:
        return Path(text), None
    start = 0
    while (i := text.find(":", start)) != -1:
        if Path(text[:i]).exists():
            return Path(text[:i]), text[i + 1 :] or None
        start = i + 1
    return Path(text), None


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def extract_oci(
    source: str, dest: Path, *, work: Path, progress: Callable[[str], None] | None = None
) -> PulledImage:
    """Unpack the image ``source`` names into the empty directory ``dest``.

    ``work`` is scratch space for downloads and copies (created if missing; the caller
    removes it). On failure ``dest`` holds a partial tree that the caller discards.
    Raises :class:`~ember.errors.ImageSourceError` (or its
    :class:`~ember.errors.UnsafeLayerError`) for a bad, unreachable or unsafe image, and
    :class:`~ember.errors.BuildError` when the disk is full or another host I/O error
    occurs; :class:`~ember.errors.BadRequestError` if ``dest`` is not an empty directory.
    """
    if not dest.is_dir() or any(dest.iterdir()):
        raise BadRequestError(f"image destination {dest} must be an existing empty directory")
    try:
        work.mkdir(parents=True, exist_ok=True)
        return _extract(parse_source(source), dest, work, progress or (lambda _message: None))
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BuildError(f"the disk is full while extracting {source}: {err}") from err
        raise BuildError(f"extracting image {source} failed: {err}") from err


def _extract(src: Source, dest: Path, work: Path, report: Progress) -> PulledImage:
    if src.kind == "registry":
        return extract_registry(src.target, dest, work=work, progress=report)
    path, ref = split_path_ref(src.target)
    if src.kind == "layout":
        if not path.is_dir():
            raise ImageSourceError(f"OCI layout directory {path} does not exist")
        return extract_layout(path, ref, dest, progress=report)
    if not path.is_file():
        raise ImageSourceError(f"image archive {path} does not exist")
    return extract_docker_archive(path, ref, dest, work=work, progress=report)
