"""Frozen result types returned by the SDK."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ember.errors import BadRequestError, EmberError
from ember.kinds import Isolation, SandboxState
from ember.net.policy import NetworkPolicy


class CommandFailedError(EmberError):
    """Raised by :meth:`ExecResult.check` when a command exited non-zero."""

    def __init__(self, result: ExecResult) -> None:
        super().__init__(
            f"command exited with {result.exit_code}: {result.stderr[-500:].strip()}"
        )
        self.result = result


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a finished command."""

    exit_code: int  # 128 + signal number when killed by a signal
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float  # seconds, host-measured
    pid: int = 0
    signal: int | None = None
    timed_out: bool = False
    truncated: bool = False  # output beyond the SDK's bound was dropped

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self) -> ExecResult:
        """Return self, or raise CommandFailedError if the command did not exit 0."""
        if self.exit_code != 0:
            raise CommandFailedError(self)
        return self


@dataclass(frozen=True)
class OutputChunk:
    """A piece of a running command's output, as produced."""

    stream: Literal["stdout", "stderr"]
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class EntryInfo:
    """A file, directory or link in the guest."""

    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    mtime: float

    @classmethod
    def from_msg(cls, msg: dict[str, Any], path: str) -> EntryInfo:
        kind = msg.get("type")
        return cls(
            name=str(msg.get("name", ""))[:4096],
            path=path,
            type=kind if kind in ("file", "dir", "symlink", "other") else "other",
            size=_int(msg.get("size")),
            mode=_int(msg.get("mode")),
            mtime=float(msg["mtime"]) if isinstance(msg.get("mtime"), int | float) else 0.0,
        )


@dataclass(frozen=True)
class ProcessInfo:
    """A process started through the agent."""

    stream: int
    pid: int
    argv: tuple[str, ...]
    running: bool


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the registry knows it."""

    id: str
    template: str
    state: SandboxState
    vcpus: int
    memory_mib: int
    disk_mib: int
    created_at: float
    expires_at: float | None
    accel: str
    metadata: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    snapshot: str | None = None  # restored from this snapshot id
    isolation: Isolation = "microvm"
    tenant: str | None = None  # the daemon tenant it belongs to (None: made outside one)
    network: NetworkPolicy | None = None  # its egress policy; None: no network at all
    node: str | None = None  # the cluster node that holds it (cluster-wide lists only)


@dataclass(frozen=True)
class ExposedPort:
    """A guest TCP port reachable from outside: connect to ``host``:``host_port``; or, for
    HTTP, through the daemon's own listener (its credentials needed): a request with
    ``Host: <http_host>``, or to the path ``http_path`` + ``/...`` (docs/networking.md)."""

    port: int  # in the guest
    host: str
    host_port: int
    http_host: str | None = None  # e.g. 8000-sb-1234abcd.localhost
    http_path: str | None = None  # e.g. /v1/sandboxes/sb-1234abcd/ports/8000/http

    @property
    def address(self) -> str:
        return f"{self.host}:{self.host_port}"


@dataclass(frozen=True)
class SnapshotInfo:
    """A stored snapshot (content-addressed: ``id`` is the digest of its manifest)."""

    id: str
    name: str | None
    template: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    size_bytes: int  # on disk
    created_at: float
    source: str  # the sandbox it was taken from
    ram_file: bool  # restores map its RAM copy-on-write (shared between clones)
    pause_s: float | None = None  # how long the source was paused (when just taken)


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def snapshot_ref(snapshot: object) -> str:
    """The name or id to look a snapshot up by: a string as given, or the id of a
    :class:`SnapshotInfo` (what ``snapshot()`` returns). Anything else is refused."""
    if isinstance(snapshot, SnapshotInfo):
        return snapshot.id
    if isinstance(snapshot, str) and snapshot:
        return snapshot
    raise BadRequestError(f"snapshot must be a name, an id or a SnapshotInfo, not "
                          f"{type(snapshot).__name__} {snapshot!r:.80}")


@dataclass(frozen=True)
class PoolInfo:
    """A warm pool: ``size`` ready sandboxes of a template and shape, kept by the daemon."""

    key: str  # template/vcpus/memory_mib/disk_mib
    template: str
    vcpus: int
    memory_mib: int
    disk_mib: int | None
    size: int  # asked for
    created_at: float
    ready: int = 0  # members waiting to be handed out
    starting: int = 0  # members being started
    idle_pss_bytes: int = 0  # host memory (PSS) of the ready members' VMMs


@dataclass(frozen=True)
class SandboxUsage:
    """What a sandbox costs the host at one moment (``ember top`` shows the difference of
    two samples as CPU use)."""

    id: str
    state: SandboxState
    vcpus: int
    memory_mib: int  # its memory limit
    cpu_seconds: float  # host CPU time used since it started
    memory_bytes: int  # host memory it holds now (its cgroup's charge, or its VMM's RSS)
    sampled_at: float  # seconds since the epoch


@dataclass(frozen=True)
class TemplateSnapshotInfo:
    """A template snapshot: the booted, idle guest of a template and size that plain
    creates restore (``ember image snapshot ls``)."""

    id: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    size_bytes: int  # on disk
    created_at: float
    #: False once its template, kernel, agent or QEMU changed: no create restores it any
    #: more, and it is removed when the last sandbox restored from it is gone.
    current: bool = True


@dataclass(frozen=True)
class TemplateInfo:
    """A template sandboxes can be created from (``ember image ls``)."""

    name: str
    source: str
    digest: str  # content digest of its root filesystem
    size_bytes: int  # its image
    created_at: float
    config: dict[str, Any] = field(default_factory=dict)  # image config, bake and snapshot
    snapshots: list[TemplateSnapshotInfo] = field(default_factory=list)



@dataclass(frozen=True)
class DockerfileOptions:
    """The options of a build ``--from dockerfile:PATH`` (docs/dockerfile.md)."""

    file: str | None = None  # the Dockerfile, if not PATH/Dockerfile (relative: to PATH)
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None  # the stage to build (default: the last)
    no_cache: bool = False
    network: dict[str, Any] | None = None  # the RUN steps' NetworkPolicy (JSON); None: no NIC
    vcpus: int | None = None  # the build VM's (None: the FROM template's default)
    memory_mib: int | None = None


@dataclass(frozen=True)
class PruneInfo:
    """What ``ember image prune`` freed: step cache entries (snapshot ids), their bytes, and
    build sandboxes whose builder had died."""

    removed: list[str]
    freed_bytes: int
    sandboxes: list[str] = field(default_factory=list)
