"""OCI image layouts: ``index.json`` plus ``blobs/<alg>/<hex>``, in a directory or a tar.

:func:`resolve_layout` works on any :class:`BlobStore`, so a layout directory and a tarball
holding one (the newer ``docker save`` format, ``oci-archive``) share the same logic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ember.errors import ImageSourceError
from ember.guest.oci.blobs import open_regular, read_small, verify_file
from ember.guest.oci.config import PulledImage
from ember.guest.oci.limits import MAX_JSON_BYTES
from ember.guest.oci.manifest import (
    CONTAINERD_NAME,
    REF_NAME,
    Descriptor,
    Manifest,
    follow_to_manifest,
    parse_index,
    pick_platform,
)
from ember.guest.oci.unpack import Progress, unpack_image


class BlobStore(Protocol):
    #: Where the layout is, for messages.
    where: str

    def index(self) -> bytes:
        """The bytes of ``index.json``."""
        ...

    def blob(self, desc: Descriptor) -> Path:
        """A file holding the blob, checked against ``desc``."""
        ...


class LayoutDir:
    """An OCI image layout directory on disk; blobs are verified in place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    def index(self) -> bytes:
        try:
            with open_regular(self.root / "index.json") as f:
                return read_small(f, MAX_JSON_BYTES, f"{self.where}/index.json")
        except FileNotFoundError as err:
            raise ImageSourceError(
                f"{self.where} is not an OCI image layout: it has no index.json"
            ) from err
        except OSError as err:
            raise ImageSourceError(f"cannot read {self.where}/index.json: {err}") from err

    def blob(self, desc: Descriptor) -> Path:
        alg, _, hexpart = desc.digest.partition(":")
        path = self.root / "blobs" / alg / hexpart
        verify_file(path, desc, where=self.where)
        return path


def read_document(store: BlobStore, desc: Descriptor) -> bytes:
    """A manifest or index blob's bytes (checked and bounded)."""
    if desc.size is not None and desc.size > MAX_JSON_BYTES:
        raise ImageSourceError(
            f"{store.where}: manifest {desc.digest} is {desc.size} bytes "
            f"(at most {MAX_JSON_BYTES} allowed)"
        )
    with open(store.blob(desc), "rb") as f:
        return read_small(f, MAX_JSON_BYTES, f"{store.where}: manifest {desc.digest}")


def _names(entries: tuple[Descriptor, ...]) -> str:
    names = sorted({n for d in entries for n in (d.annotation(REF_NAME),) if n})
    return ", ".join(names) or "none"


def names_match(wanted: str, names: tuple[str | None, ...]) -> bool:
    """``wanted`` is one of ``names``, or one ends with ``/wanted`` (``busybox:1`` matches
    ``docker.io/library/busybox:1``)."""
    return any(n and (n == wanted or n.endswith("/" + wanted)) for n in names)


def select_entry(entries: tuple[Descriptor, ...], tag: str | None, where: str) -> Descriptor:
    """The index entry named ``tag`` (ref.name annotation), else the only (or linux/amd64) one."""
    if tag:
        hits = tuple(
            d
            for d in entries
            if names_match(tag, (d.annotation(REF_NAME), d.annotation(CONTAINERD_NAME)))
        )
        if not hits:
            raise ImageSourceError(f"{where}: no image tagged {tag!r} (tags: {_names(entries)})")
        entries = hits
    if len(entries) == 1:
        return entries[0]
    if not entries:
        raise ImageSourceError(f"{where}: index.json lists no images")
    if all(d.platform is not None for d in entries):
        return pick_platform(entries, where)
    raise ImageSourceError(
        f"{where}: holds {len(entries)} images; name one with :TAG (tags: {_names(entries)})"
    )


def resolve_layout(store: BlobStore, tag: str | None) -> tuple[str, Manifest]:
    """Pick the image in a layout and return its manifest digest and manifest."""
    entries = parse_index(store.index(), f"{store.where}/index.json")
    chosen = select_entry(entries, tag, store.where)
    return follow_to_manifest(
        read_document(store, chosen),
        chosen.media_type,
        chosen.digest,
        f"{store.where}: manifest {chosen.digest}",
        lambda d: read_document(store, d),
    )


def extract_layout(root: Path, tag: str | None, dest: Path, *, progress: Progress) -> PulledImage:
    store = LayoutDir(root)
    digest, manifest = resolve_layout(store, tag)
    return unpack_image(
        digest=digest,
        manifest=manifest,
        fetch=store.blob,
        dest=dest,
        what=f"{root}",
        progress=progress,
    )
