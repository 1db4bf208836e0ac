"""Frozen rows of the registry."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TemplateRecord:
    name: str
    source: str
    digest: str  # content digest of the root filesystem tree ("sha256:...")
    image_path: str  # the read-only base ext4 image in the cache
    size_bytes: int
    created_at: float
    config: dict[str, Any] = field(default_factory=dict)  # OCI config: Env, WorkingDir, ...

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "digest": self.digest,
            "image_path": self.image_path,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "config": self.config,
        }


@dataclass(frozen=True)
class SandboxRecord:
    id: str
    template: str
    state: str  # creating | running | failed | stopped
    vcpus: int
    memory_mib: int
    disk_mib: int
    timeout_s: float | None
    created_at: float
    expires_at: float | None
    dir: str
    pid: int | None
    accel: str
    env: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "template": self.template,
            "state": self.state,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "disk_mib": self.disk_mib,
            "timeout_s": self.timeout_s,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "dir": self.dir,
            "pid": self.pid,
            "accel": self.accel,
            "env": self.env,
            "metadata": self.metadata,
            "error": self.error,
        }


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
