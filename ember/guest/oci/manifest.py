"""OCI and Docker v2 manifests, indexes and descriptors: bytes in, frozen values out, no I/O.

Everything here is bounded and validated once: a digest is ``sha256:<64 hex>`` (or sha512),
a size is a non-negative integer, a document is a JSON object of at most
:data:`~ember.guest.oci.limits.MAX_JSON_BYTES`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ember.errors import ImageSourceError
from ember.guest.oci.limits import MAX_INDEX_DEPTH, MAX_JSON_BYTES, MAX_LAYERS

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
CONFIG_TYPES = frozenset(
    {
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    }
)
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

#: The platform ember's guests run.
GUEST_OS = "linux"
GUEST_ARCH = "amd64"

_DIGEST_RE = {"sha256": re.compile(r"[0-9a-f]{64}"), "sha512": re.compile(r"[0-9a-f]{128}")}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """A pointer to a blob: its media type, digest and size (None: not stated)."""

    media_type: str
    digest: str
    size: int | None
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def check_digest(value: object, what: str) -> str:
    """Return ``value`` if it is a well-formed ``algorithm:hex`` digest we can verify."""
    if isinstance(value, str) and ":" in value:
        alg, _, hexpart = value.partition(":")
        pattern = _DIGEST_RE.get(alg)
        if pattern is not None and pattern.fullmatch(hexpart):
            return value
    raise ImageSourceError(f"{what}: bad or unsupported digest {str(value)[:100]!r}")


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def load_json_object(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_JSON_BYTES:
        raise ImageSourceError(f"{what}: document is larger than {MAX_JSON_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ImageSourceError(f"{what}: not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise ImageSourceError(f"{what}: expected a JSON object")
    return doc


def parse_descriptor(obj: object, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ImageSourceError(f"{what}: descriptor must be an object")
    media_type = obj.get("mediaType", "")
    size = obj.get("size")
    if not isinstance(media_type, str):
        raise ImageSourceError(f"{what}: mediaType must be a string")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageSourceError(f"{what}: size must be a non-negative integer")
    platform = None
    plat = obj.get("platform")
    if isinstance(plat, dict):
        parts = [plat.get(k, "") for k in ("os", "architecture", "variant")]
        if all(isinstance(p, str) for p in parts):
            platform = Platform(*parts)
    annotations: tuple[tuple[str, str], ...] = ()
    notes = obj.get("annotations")
    if isinstance(notes, dict):
        annotations = tuple(sorted((k, v) for k, v in notes.items() if isinstance(v, str)))
    return Descriptor(
        media_type, check_digest(obj.get("digest"), what), size, platform, annotations
    )


def document_kind(doc: dict[str, Any], media_type: str, what: str) -> str:
    """``"index"`` or ``"manifest"``, from the document's own mediaType, else the given one."""
    mt = doc.get("mediaType") or media_type
    if mt in INDEX_TYPES:
        return "index"
    if mt in MANIFEST_TYPES:
        return "manifest"
    if not mt:
        if isinstance(doc.get("manifests"), list):
            return "index"
        if isinstance(doc.get("layers"), list):
            return "manifest"
    if doc.get("schemaVersion") == 1:
        raise ImageSourceError(f"{what}: Docker schema 1 manifests are not supported")
    raise ImageSourceError(f"{what}: not an image manifest or index (media type {mt!r})")


def parse_manifest(raw: bytes, what: str) -> Manifest:
    doc = load_json_object(raw, what)
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ImageSourceError(f"{what}: manifest has no 'layers' list")
    if len(layers) > MAX_LAYERS:
        raise ImageSourceError(f"{what}: {len(layers)} layers (at most {MAX_LAYERS} allowed)")
    config = parse_descriptor(doc.get("config"), f"{what} config")
    if config.media_type and config.media_type not in CONFIG_TYPES:
        raise ImageSourceError(
            f"{what}: not a container image (config media type {config.media_type!r})"
        )
    descs = tuple(parse_descriptor(d, f"{what} layer {i}") for i, d in enumerate(layers))
    for d in descs:
        if d.media_type and (d.media_type not in LAYER_TYPES):
            raise ImageSourceError(f"{what}: unsupported layer media type {d.media_type!r}")
    return Manifest(config, descs)


def parse_index(raw: bytes, what: str) -> tuple[Descriptor, ...]:
    doc = load_json_object(raw, what)
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise ImageSourceError(f"{what}: index has no 'manifests' list")
    if len(manifests) > 4 * MAX_LAYERS:
        raise ImageSourceError(f"{what}: index lists {len(manifests)} manifests")
    return tuple(parse_descriptor(d, f"{what} entry {i}") for i, d in enumerate(manifests))


def pick_platform(descs: Sequence[Descriptor], what: str) -> Descriptor:
    """The linux/amd64 entry of an index, preferring the baseline (no or v1) variant."""
    matches = [
        d
        for d in descs
        if d.platform is not None
        and (d.platform.os, d.platform.architecture) == (GUEST_OS, GUEST_ARCH)
    ]
    matches.sort(key=lambda d: d.platform is None or d.platform.variant not in ("", "v1"))
    if not matches:
        have = ", ".join(sorted({str(d.platform) for d in descs if d.platform})) or "none"
        raise ImageSourceError(
            f"{what}: no {GUEST_OS}/{GUEST_ARCH} image in the index (platforms: {have})"
        )
    return matches[0]


def follow_to_manifest(
    raw: bytes,
    media_type: str,
    digest: str,
    what: str,
    fetch: Callable[[Descriptor], bytes],
) -> tuple[str, Manifest]:
    """From a fetched manifest or index, descend indexes (platform pick) to a manifest.

    ``fetch`` returns a child document's bytes, already checked against its descriptor.
    Returns the manifest's digest and the parsed manifest.
    """
    for _ in range(MAX_INDEX_DEPTH + 1):
        kind = document_kind(load_json_object(raw, what), media_type, what)
        if kind == "manifest":
            return digest, parse_manifest(raw, what)
        child = pick_platform(parse_index(raw, what), what)
        raw, media_type, digest = fetch(child), child.media_type, child.digest
        what = f"manifest {child.digest}"
    raise ImageSourceError(f"{what}: indexes nested more than {MAX_INDEX_DEPTH} deep")
