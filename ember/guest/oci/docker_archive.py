"""``docker save`` tarballs (and OCI layouts packed in a tar, ``oci-archive``).

Two formats exist: the classic one (``manifest.json`` naming a config ``<id>.json`` and
``<id>/layer.tar`` files, which may be symlinks to each other) and, since Docker 25, an OCI
image layout in a tar (``index.json`` + ``blobs/``, plus a ``manifest.json`` for old tools).
A tarball with ``index.json`` is read as a layout; otherwise ``manifest.json`` is used.
Nothing is extracted from the tarball by name: members are looked up in a table and copied
into ``work`` under names we choose.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ember.errors import ImageSourceError
from ember.guest.oci.blobs import copy_bounded, copy_verified, read_small
from ember.guest.oci.compression import decode_errors
from ember.guest.oci.config import PulledImage, parse_image_config
from ember.guest.oci.layout import names_match, resolve_layout
from ember.guest.oci.limits import MAX_ARCHIVE_MEMBERS, MAX_BLOB_BYTES, MAX_JSON_BYTES, MAX_LAYERS
from ember.guest.oci.manifest import Descriptor, Manifest, check_digest, digest_of
from ember.guest.oci.unpack import FetchBlob, Progress, unpack_image

_LEGACY_CONFIG = "application/vnd.docker.container.image.v1+json"
_LEGACY_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
_MAX_LINK_HOPS = 8


class DockerArchive:
    """A ``docker save`` (or OCI layout) tarball opened for lookups by member name."""

    def __init__(self, path: Path, work: Path) -> None:
        self.where = str(path)
        self.work = work
        self._corrupt: tuple[type[BaseException], ...] = (tarfile.TarError, *decode_errors())
        unreadable: tuple[type[BaseException], ...] = (OSError, *self._corrupt)
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 -- closed in __exit__
        except FileNotFoundError as err:
            raise ImageSourceError(f"image archive {path} does not exist") from err
        except unreadable as err:
            raise ImageSourceError(f"{path} is not a readable tar archive: {err}") from err
        try:
            for count, m in enumerate(self._tar, 1):
                if count > MAX_ARCHIVE_MEMBERS:
                    raise ImageSourceError(f"{path}: more than {MAX_ARCHIVE_MEMBERS} members")
                if m.isfile() or m.issym() or m.islnk():
                    self._members[posixpath.normpath(m.name.lstrip("/"))] = m
        except unreadable as err:
            self._tar.close()
            raise ImageSourceError(f"corrupt or truncated image archive {path}: {err}") from err

    def __enter__(self) -> DockerArchive:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._tar.close()

    def has(self, name: str) -> bool:
        return posixpath.normpath(name) in self._members

    def _member(self, name: str) -> tarfile.TarInfo:
        for _ in range(_MAX_LINK_HOPS):
            m = self._members.get(posixpath.normpath(name))
            if m is None:
                raise ImageSourceError(f"{self.where}: {name} is missing from the archive")
            if not m.issym():
                return m
            name = posixpath.join(posixpath.dirname(name), m.linkname)
        raise ImageSourceError(f"{self.where}: {name}: too many symlinks")

    def _open(self, name: str, limit: int) -> IO[bytes]:
        m = self._member(name)
        if m.size > limit:
            raise ImageSourceError(
                f"{self.where}: {name} is {m.size} bytes (at most {limit} allowed)"
            )
        f = self._tar.extractfile(m)
        if f is None:
            raise ImageSourceError(f"{self.where}: {name} is not a file")
        return f

    def read(self, name: str) -> bytes:
        try:
            with self._open(name, MAX_JSON_BYTES) as f:
                return read_small(f, MAX_JSON_BYTES, f"{self.where}: {name}")
        except self._corrupt as err:
            raise ImageSourceError(f"corrupt or truncated {self.where}: {name}: {err}") from err

    def copy(self, name: str, desc: Descriptor | None) -> Path:
        """Copy member ``name`` into ``work`` (checked against ``desc`` if given)."""
        fd, tmp = tempfile.mkstemp(dir=self.work, prefix="blob-")
        os.close(fd)
        dest = Path(tmp)
        try:
            with self._open(name, MAX_BLOB_BYTES) as f:
                if desc is None:
                    copy_bounded(f, dest, MAX_BLOB_BYTES, what=f"{self.where}: {name}")
                else:
                    copy_verified(f, dest, desc, where=self.where)
        except self._corrupt as err:
            dest.unlink()
            raise ImageSourceError(f"corrupt or truncated {self.where}: {name}: {err}") from err
        except BaseException:
            dest.unlink()
            raise
        return dest

    # --- the OCI layout view (BlobStore) ---------------------------------------------
    def index(self) -> bytes:
        return self.read("index.json")

    def blob(self, desc: Descriptor) -> Path:
        alg, _, hexpart = desc.digest.partition(":")
        return self.copy(f"blobs/{alg}/{hexpart}", desc)


def extract_docker_archive(
    path: Path, ref: str | None, dest: Path, *, work: Path, progress: Progress
) -> PulledImage:
    with DockerArchive(path, work) as archive:
        if archive.has("index.json"):
            digest, manifest = resolve_layout(archive, ref)
            fetch: FetchBlob = archive.blob
        elif archive.has("manifest.json"):
            digest, manifest = _legacy_manifest(archive, ref)
            fetch = _legacy_fetch(archive, manifest)
        else:
            raise ImageSourceError(
                f"{path} is neither a docker save archive nor an OCI "
                "layout: it has no manifest.json or index.json"
            )
        return unpack_image(
            digest=digest,
            manifest=manifest,
            fetch=fetch,
            dest=dest,
            what=str(path),
            progress=progress,
            discard=True,
        )


def _legacy_manifest(archive: DockerArchive, ref: str | None) -> tuple[str, Manifest]:
    """Read the classic ``manifest.json``: the digest is the config's (Docker's image id)."""
    where = f"{archive.where}: manifest.json"
    try:
        entries = json.loads(archive.read("manifest.json"))
    except ValueError as err:
        raise ImageSourceError(f"{where}: not valid JSON: {err}") from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ImageSourceError(f"{where}: expected a list of objects")
    entry = _pick_legacy(entries, ref, where)
    config_name, layers = entry.get("Config"), entry.get("Layers")
    if (
        not isinstance(config_name, str)
        or not isinstance(layers, list)
        or not all(isinstance(x, str) for x in layers)
    ):
        raise ImageSourceError(f"{where}: entry needs a Config name and a Layers list")
    if len(layers) > MAX_LAYERS:
        raise ImageSourceError(f"{where}: {len(layers)} layers (at most {MAX_LAYERS} allowed)")
    raw = archive.read(config_name)
    diff_ids = parse_image_config(raw, f"{archive.where}: {config_name}").diff_ids
    if len(diff_ids) != len(layers):
        raise ImageSourceError(
            f"{where}: {len(layers)} layers but the config lists {len(diff_ids)} diff ids"
        )
    config = Descriptor(
        _LEGACY_CONFIG, digest_of(raw), len(raw), annotations=(("name", config_name),)
    )
    descs = tuple(
        Descriptor(_LEGACY_LAYER, check_digest(d, where), None, annotations=(("name", name),))
        for d, name in zip(diff_ids, layers, strict=True)
    )
    return config.digest, Manifest(config, descs)


def _legacy_fetch(archive: DockerArchive, manifest: Manifest) -> FetchBlob:
    def fetch(desc: Descriptor) -> Path:
        name = desc.annotation("name") or ""
        # Layers are checked by their diff id while they are applied.
        return archive.copy(name, desc if desc == manifest.config else None)

    return fetch


def _pick_legacy(entries: list[dict[str, Any]], ref: str | None, where: str) -> dict[str, Any]:
    def tags(e: dict[str, Any]) -> tuple[str | None, ...]:
        t = e.get("RepoTags")
        return tuple(x for x in t if isinstance(x, str)) if isinstance(t, list) else ()

    if ref:
        entries = [e for e in entries if names_match(ref, tags(e))]
        if not entries:
            raise ImageSourceError(f"{where}: no image tagged {ref!r}")
    if len(entries) != 1:
        known = ", ".join(sorted({str(t) for e in entries for t in tags(e)})) or "none"
        raise ImageSourceError(
            f"{where}: holds {len(entries)} images; name one with :TAG (tags: {known})"
        )
    return entries[0]
