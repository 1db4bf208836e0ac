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
    state: str  # creating | booting | running | paused | pooled | failed
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
    snapshot: str | None = None  # restored from this snapshot (which it depends on)
    pool: str | None = None  # waiting in this warm pool (state ``pooled``)
    on_timeout: str = "destroy"  # when the lifetime ends: "destroy" or "pause"
    isolation: str = "microvm"  # microvm | gvisor | container
    #: The egress policy (NetworkPolicy.to_json()); None: no network at all.
    network: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "isolation": self.isolation,
            "template": self.template,
            "state": self.state,
            "snapshot": self.snapshot,
            "pool": self.pool,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "disk_mib": self.disk_mib,
            "timeout_s": self.timeout_s,
            "on_timeout": self.on_timeout,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "dir": self.dir,
            "pid": self.pid,
            "accel": self.accel,
            "env": self.env,
            "metadata": self.metadata,
            "error": self.error,
            "network": self.network,
        }


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class SnapshotRecord:
    id: str  # sha256 of the snapshot's manifest (content address)
    name: str | None
    template: str
    template_digest: str
    kernel_key: str
    vmm_version: str
    accel: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    ram_file: bool  # guest RAM is a file (mapped copy-on-write by restores), not in the stream
    size_bytes: int  # bytes on disk
    created_at: float
    source: str  # the sandbox it was taken from
    env: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    verified: str | None = None  # stat signature of the files when last fully verified

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "template": self.template,
            "template_digest": self.template_digest,
            "kernel_key": self.kernel_key,
            "vmm_version": self.vmm_version,
            "accel": self.accel,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "disk_mib": self.disk_mib,
            "ram_file": self.ram_file,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "source": self.source,
            "env": self.env,
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class PoolRecord:
    key: str  # template/vcpus/memory_mib/disk_mib
    template: str
    vcpus: int
    memory_mib: int
    disk_mib: int | None
    size: int
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "template": self.template, "vcpus": self.vcpus,
                "memory_mib": self.memory_mib, "disk_mib": self.disk_mib, "size": self.size,
                "created_at": self.created_at}


#: Metadata keys that start with this are ember's own: refused from users, not shown back.
RESERVED_PREFIX = "ember."
#: The metadata key that names a sandbox's (and a snapshot's) tenant, set by the daemon.
TENANT_KEY = RESERVED_PREFIX + "tenant"
#: A snapshot's: the egress policy (JSON) of the networked sandbox it was taken from.
NETWORK_META = RESERVED_PREFIX + "network"


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key of the daemon: its public id, its tenant, and a SHA-256 of its secret
    (the secret itself is shown once, at creation, and stored nowhere)."""

    id: str
    tenant: str
    secret_sha256: str
    created_at: float
    revoked_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "created_at": self.created_at,
                "revoked_at": self.revoked_at}


@dataclass(frozen=True)
class TenantRecord:
    """A tenant's limits (None: no limit)."""

    name: str
    max_sandboxes: int | None = None
    max_vcpus: int | None = None
    max_memory_mib: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "max_sandboxes": self.max_sandboxes,
                "max_vcpus": self.max_vcpus, "max_memory_mib": self.max_memory_mib}


@dataclass(frozen=True)
class ExposedPortRecord:
    """An exposed guest port, kept so that a restarted daemon exposes it again (at the
    same host port when it is free)."""

    sandbox_id: str
    port: int  # in the guest
    host_port: int
    #: Scale to zero: the sandbox's idle period (seconds), None: never paused for idleness.
    pause_after_idle_s: float | None = None
