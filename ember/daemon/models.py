"""Request bodies of the daemon's API: pydantic models that refuse unknown fields.

Everything here arrives from a socket: every string and number is bounded, and the
runtime's own validation (SandboxSpec, exec_request, guest paths) runs again behind it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ember.store.records import RESERVED_PREFIX

Name = Annotated[str, Field(min_length=1, max_length=128)]
Env = dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=32768)]]


def _not_reserved(meta: dict[str, str]) -> dict[str, str]:
    bad = [k for k in meta if k.startswith(RESERVED_PREFIX)]
    if bad:
        raise ValueError(f"metadata keys starting with 'ember.' are the daemon's: {bad[:3]}")
    return meta


Meta = Annotated[dict[Annotated[str, Field(max_length=256)],
                      Annotated[str, Field(max_length=4096)]], AfterValidator(_not_reserved)]
GuestPath = Annotated[str, Field(min_length=1, max_length=4096)]
Seconds = Annotated[float, Field(gt=0, le=86400 * 30)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NetEntry = Annotated[str, Field(min_length=1, max_length=253)]


class NetworkRequest(Strict):
    """An egress policy (docs/networking.md): ``internet`` on or off, and ``allow`` and
    ``deny`` lists of IPv4 CIDRs and domain names (``example.com``, ``*.example.com``);
    deny wins; private, link-local, metadata and host ranges stay denied unless allowed
    by CIDR."""

    internet: bool = True
    allow: list[NetEntry] = Field(default_factory=list, max_length=1000)
    deny: list[NetEntry] = Field(default_factory=list, max_length=1000)
    #: Bandwidth from and to the guest, Mbit/s (null: no limit).
    rate_out_mbit: Annotated[float, Field(ge=0.1, le=100_000)] | None = None
    rate_in_mbit: Annotated[float, Field(ge=0.1, le=100_000)] | None = None
    #: Connections the guest may have open at once (null: no limit).
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] | None = None


class CreateRequest(Strict):
    template: Name = "debian-python"
    vcpus: Annotated[int, Field(ge=1, le=64)] | None = None
    memory_mib: Annotated[int, Field(ge=64, le=1 << 20)] | None = None
    disk_mib: Annotated[int, Field(ge=1, le=1 << 24)] | None = None
    timeout: Seconds | None = 300.0
    env: Env = Field(default_factory=dict, max_length=256)
    metadata: Meta = Field(default_factory=dict, max_length=64)
    boot_timeout: Seconds | None = None
    on_timeout: Literal["destroy", "pause"] = "destroy"
    isolation: Literal["microvm", "gvisor", "container"] = "microvm"
    boot: Literal["auto", "cold"] = "auto"
    #: null: no NIC at all.
    network: NetworkRequest | None = None


class RestoreRequest(Strict):
    timeout: Seconds | None = 300.0
    env: Env = Field(default_factory=dict, max_length=256)
    metadata: Meta = Field(default_factory=dict, max_length=64)
    boot_timeout: Seconds | None = None
    on_timeout: Literal["destroy", "pause"] = "destroy"


Cmd = Annotated[str, Field(min_length=1, max_length=131072)] | Annotated[
    list[Annotated[str, Field(max_length=131072)]], Field(min_length=1, max_length=4096)]
User = Annotated[str, Field(min_length=1, max_length=64)] | Annotated[int, Field(ge=0, le=1 << 31)]


class _Command(Strict):
    """A command: ``cmd`` a string (run by /bin/sh -c) or an argv list."""

    cmd: Cmd
    env: Env = Field(default_factory=dict, max_length=256)
    cwd: GuestPath | None = None
    user: User | None = None
    timeout: Seconds | None = 60.0


class ExecRequest(_Command):
    """Run to completion, output streamed back. ``stdin``: base64 of what the command reads
    (then closed); bigger input: spawn it and send stdin in chunks."""

    stdin: Annotated[str, Field(max_length=1 << 20)] | None = None


class SpawnRequest(_Command):
    """Start in the background; ``stdin``: keep its stdin open for later writes."""

    stdin: bool = False


class PoolRequest(Strict):
    """A warm pool's template, shape and size (0 removes it)."""

    template: Name = "debian-python"
    size: Annotated[int, Field(ge=0, le=256)]
    vcpus: Annotated[int, Field(ge=1, le=64)] | None = None
    memory_mib: Annotated[int, Field(ge=64, le=1 << 20)] | None = None
    disk_mib: Annotated[int, Field(ge=1, le=1 << 24)] | None = None


class DockerfileBuildOptions(Strict):
    """The options of a build from ``dockerfile:PATH`` (docs/dockerfile.md)."""

    file: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    build_args: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")],
                     Annotated[str, Field(max_length=65536)]] = Field(
        default_factory=dict, max_length=256)
    target: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    no_cache: bool = False
    network: dict[str, Any] | None = None  # a NetworkPolicy's JSON, checked by the build
    vcpus: Annotated[int, Field(ge=1, le=64)] | None = None
    memory_mib: Annotated[int, Field(ge=64, le=1 << 20)] | None = None


class TemplateBuildRequest(Strict):
    """``ember image build``: a template from a source, with the image build's options."""

    name: Annotated[str, Field(min_length=1, max_length=63)]  # checked again by the build
    source: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    packages: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.+-]{0,127}$")]] = Field(
        default_factory=list, max_length=256)
    force: bool = False
    rebuild: bool = False
    free_mib: Annotated[int, Field(ge=0, le=1 << 20)] = 1024
    dockerfile: DockerfileBuildOptions | None = None


class TimeoutRequest(Strict):
    timeout: Seconds | None



class SignalRequest(Strict):
    signal: Annotated[int, Field(ge=1, le=64)]


class SnapshotRequest(Strict):
    name: Name | None = None


class ForkRequest(Strict):
    n: Annotated[int, Field(ge=1, le=64)] = 1


class MkdirRequest(Strict):
    path: GuestPath
    parents: bool = True


class RemoveRequest(Strict):
    path: GuestPath
    recursive: bool = False


class RenameRequest(Strict):
    src: GuestPath
    dst: GuestPath


class PtySize(Strict):
    rows: Annotated[int, Field(ge=1, le=1000)]
    cols: Annotated[int, Field(ge=1, le=1000)]


class PtyRequest(Strict):
    """The first message of a PTY WebSocket: what to run, on a terminal of what size."""

    cmd: Cmd | None = None
    rows: Annotated[int, Field(ge=1, le=1000)] = 24
    cols: Annotated[int, Field(ge=1, le=1000)] = 80
    env: Env = Field(default_factory=dict, max_length=256)
    cwd: GuestPath | None = None
    user: User | None = None


class PtyControl(Strict):
    resize: PtySize | None = None
    signal: Annotated[int, Field(ge=1, le=64)] | None = None
