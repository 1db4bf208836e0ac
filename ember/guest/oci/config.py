"""What ember keeps of an image: its run config and where it came from (frozen values).

:func:`parse_image_config` reads an OCI / Docker image config blob (bytes in, values out,
no I/O) and keeps only what a sandbox needs: environment, working directory, user and the
command, plus the layer diff ids used to check the layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember.errors import ImageSourceError
from ember.guest.oci.manifest import load_json_object

_FIELDS = ("env", "working_dir", "user", "cmd", "entrypoint")


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image's config that decide how its processes start."""

    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "env": list(self.env),
            "working_dir": self.working_dir,
            "user": self.user,
            "cmd": list(self.cmd),
            "entrypoint": list(self.entrypoint),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageConfig:
        """Inverse of :meth:`to_json`; missing keys take defaults, unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise ImageSourceError(f"image config must be an object, not {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ImageSourceError(f"image config has unknown fields: {', '.join(unknown)}")
        return cls(
            env=_strings(data.get("env"), "env"),
            working_dir=_string(data.get("working_dir"), "working_dir"),
            user=_string(data.get("user"), "user"),
            cmd=_strings(data.get("cmd"), "cmd"),
            entrypoint=_strings(data.get("entrypoint"), "entrypoint"),
        )


@dataclass(frozen=True)
class PulledImage:
    """What :func:`extract_oci` unpacked."""

    config: ImageConfig
    #: Manifest digest ``sha256:...`` (for an old-style ``docker save`` tarball, which has no
    #: manifest, the digest of the image config, i.e. Docker's image id).
    digest: str
    #: Layer digests in order: blob digests, or diff ids for an old-style ``docker save``.
    layers: tuple[str, ...]


@dataclass(frozen=True)
class ParsedConfig:
    image: ImageConfig
    diff_ids: tuple[str, ...]
    os: str
    architecture: str


def parse_image_config(raw: bytes, what: str) -> ParsedConfig:
    """Parse an OCI or Docker image config blob; ``what`` names it in errors."""
    doc = load_json_object(raw, what)
    run = doc.get("config")
    if run is None:
        run = {}
    if not isinstance(run, dict):
        raise ImageSourceError(f"{what}: 'config' must be an object")
    rootfs = doc.get("rootfs")
    diff_ids: tuple[str, ...] = ()
    if isinstance(rootfs, dict):
        diff_ids = _strings(rootfs.get("diff_ids"), "rootfs.diff_ids", what)
    elif rootfs is not None:
        raise ImageSourceError(f"{what}: 'rootfs' must be an object")
    image = ImageConfig(
        env=_strings(run.get("Env"), "Env", what),
        working_dir=_string(run.get("WorkingDir"), "WorkingDir", what),
        user=_string(run.get("User"), "User", what),
        cmd=_strings(run.get("Cmd"), "Cmd", what),
        entrypoint=_strings(run.get("Entrypoint"), "Entrypoint", what),
    )
    return ParsedConfig(
        image=image,
        diff_ids=diff_ids,
        os=_string(doc.get("os"), "os", what),
        architecture=_string(doc.get("architecture"), "architecture", what),
    )


def _string(value: object, field: str, what: str = "image config") -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ImageSourceError(f"{what}: {field} must be a string")
    if "\0" in value:
        raise ImageSourceError(f"{what}: {field} contains a NUL byte")
    return value


def _strings(value: object, field: str, what: str = "image config") -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ImageSourceError(f"{what}: {field} must be a list of strings")
    return tuple(_string(v, field, what) for v in value)
