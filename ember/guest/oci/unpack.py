"""Turn a resolved manifest into a root filesystem: read the config, apply each layer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ember.errors import ImageSourceError
from ember.guest.oci.blobs import read_small
from ember.guest.oci.config import PulledImage, parse_image_config
from ember.guest.oci.layers import apply_layer_diff_id
from ember.guest.oci.limits import MAX_JSON_BYTES, MAX_LAYERS
from ember.guest.oci.manifest import GUEST_ARCH, GUEST_OS, Descriptor, Manifest

Progress = Callable[[str], None]
#: Returns the path of a blob already checked against its descriptor.
FetchBlob = Callable[[Descriptor], Path]


def unpack_image(
    *,
    digest: str,
    manifest: Manifest,
    fetch: FetchBlob,
    dest: Path,
    what: str,
    progress: Progress,
    discard: bool = False,
) -> PulledImage:
    """Apply ``manifest``'s layers onto ``dest`` in order and return what was pulled.

    Each layer's uncompressed digest is checked against the config's ``rootfs.diff_ids``.
    With ``discard`` each layer file is deleted once applied (it was only a copy).
    """
    layers = manifest.layers
    if len(layers) > MAX_LAYERS:
        raise ImageSourceError(f"{what}: {len(layers)} layers (at most {MAX_LAYERS} allowed)")
    with open(fetch(manifest.config), "rb") as f:
        raw = read_small(f, MAX_JSON_BYTES, f"{what}: image config")
    config = parse_image_config(raw, f"{what}: image config {manifest.config.digest}")
    if (config.os, config.architecture) not in (("", ""), (GUEST_OS, GUEST_ARCH)):
        raise ImageSourceError(
            f"{what}: image is for {config.os}/{config.architecture}, "
            f"guests run {GUEST_OS}/{GUEST_ARCH}"
        )
    if config.diff_ids and len(config.diff_ids) != len(layers):
        raise ImageSourceError(
            f"{what}: config lists {len(config.diff_ids)} diff ids for {len(layers)} layers"
        )
    for i, layer in enumerate(layers):
        path = fetch(layer)
        progress(f"applying layer {i + 1}/{len(layers)} {layer.digest[:19]}")
        diff_id = apply_layer_diff_id(path, dest, name=layer.digest)
        if discard:
            path.unlink()
        want = config.diff_ids[i] if config.diff_ids else ""
        if want.startswith("sha256:") and diff_id != want:
            raise ImageSourceError(
                f"{what}: layer {layer.digest} unpacks to {diff_id}, but "
                f"the config says {want} (corrupt or mismatched layer)"
            )
    return PulledImage(config=config.image, digest=digest, layers=tuple(d.digest for d in layers))
