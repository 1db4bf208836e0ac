"""The daemon's wire format for results: the SDK's frozen result types to and from JSON,
and the NDJSON events of a command's output. Both halves (``ember.daemon`` serving,
``ember.sdk.remote`` calling) use only this module, so that the wire is their one contract.

Decoding treats the peer as untrusted: fields are type-checked and bounded, unknown fields
are ignored (a newer daemon may send more).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from typing import Any, TypeVar

from ember.errors import BadRequestError, EmberError, ProtocolError, error_for_code
from ember.net.policy import NetworkPolicy
from ember.sdk.results import (
    EntryInfo,
    ExposedPort,
    PoolInfo,
    ProcessInfo,
    SandboxInfo,
    SandboxUsage,
    SnapshotInfo,
    TemplateInfo,
    TemplateSnapshotInfo,
)

T = TypeVar("T")
#: The longest NDJSON line either side accepts (a 64 KiB chunk of output in base64, with
#: room to spare).
MAX_EVENT_LINE = 256 * 1024
#: Output bytes per ``stdout``/``stderr`` event.
EVENT_CHUNK = 64 * 1024


def to_json(value: Any) -> dict[str, Any]:
    """A result dataclass as a JSON object."""
    out: dict[str, Any] = dataclasses.asdict(value)
    return out


def from_json(cls: type[T], raw: object) -> T:
    """Build ``cls`` (a result dataclass) from what a peer sent; ProtocolError if it does
    not fit."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"expected a {cls.__name__} object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in raw.items() if k in names}
    if cls is ProcessInfo and isinstance(kwargs.get("argv"), list):
        kwargs["argv"] = tuple(str(a) for a in kwargs["argv"])
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ProtocolError(f"malformed {cls.__name__} from the daemon: {err}") from None


def sandbox_info(raw: object) -> SandboxInfo:
    info = from_json(SandboxInfo, raw)
    if info.network is not None and not isinstance(info.network, NetworkPolicy):
        try:
            return dataclasses.replace(info, network=NetworkPolicy.from_json(info.network))
        except BadRequestError as err:
            raise ProtocolError(f"malformed network policy from the daemon: {err}") from None
    return info


def exposed_port(raw: object) -> ExposedPort:
    return from_json(ExposedPort, raw)


def snapshot_info(raw: object) -> SnapshotInfo:
    return from_json(SnapshotInfo, raw)


def entry_info(raw: object) -> EntryInfo:
    return from_json(EntryInfo, raw)


def process_info(raw: object) -> ProcessInfo:
    return from_json(ProcessInfo, raw)


def pool_info(raw: object) -> PoolInfo:
    return from_json(PoolInfo, raw)


def sandbox_usage(raw: object) -> SandboxUsage:
    return from_json(SandboxUsage, raw)


def template_info(raw: object) -> TemplateInfo:
    info = from_json(TemplateInfo, raw)
    snaps = info.snapshots
    if not isinstance(snaps, list):
        raise ProtocolError("malformed TemplateInfo from the daemon: snapshots is not a list")
    return dataclasses.replace(info, snapshots=[from_json(TemplateSnapshotInfo, s)
                                                for s in snaps])


# --- errors ------------------------------------------------------------------------------
def error_body(err: EmberError) -> dict[str, Any]:
    return {"error": {"code": err.code, "message": str(err)[:8192]}}


def error_from_body(raw: object, status: int) -> EmberError:
    """The exception an error answer stands for (the same class as it would be locally)."""
    err = raw.get("error") if isinstance(raw, dict) else None
    if isinstance(err, dict) and isinstance(err.get("code"), str):
        return error_for_code(err["code"][:64], str(err.get("message", ""))[:8192])
    return EmberError(f"the daemon answered HTTP {status} without an ember error: "
                      f"{str(raw)[:300]}")


def error_for_event(ev: dict[str, Any]) -> EmberError:
    """The exception an ``error`` event in an output stream stands for."""
    return error_for_code(str(ev.get("code", "internal"))[:64], str(ev.get("message", ""))[:8192])


# --- command output events -----------------------------------------------------------------
def event_line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def output_event(stream: str, data: bytes) -> bytes:
    return event_line({"event": stream, "data": base64.b64encode(data).decode()})


def parse_event(line: bytes) -> dict[str, Any]:
    """One NDJSON event from the daemon, checked for shape."""
    if len(line) > MAX_EVENT_LINE:
        raise ProtocolError(f"an output event of {len(line)} bytes from the daemon")
    try:
        ev = json.loads(line)
    except ValueError:
        raise ProtocolError(f"not JSON from the daemon: {line[:100]!r}") from None
    if not isinstance(ev, dict) or not isinstance(ev.get("event"), str):
        raise ProtocolError(f"not an output event: {line[:100]!r}")
    if ev["event"] in ("stdout", "stderr"):
        try:
            ev["data"] = base64.b64decode(str(ev.get("data", "")), validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("output event with invalid base64 data") from None
    return ev


__all__ = [
    "EVENT_CHUNK",
    "entry_info",
    "error_body",
    "error_for_event",
    "error_from_body",
    "event_line",
    "from_json",
    "output_event",
    "parse_event",
    "pool_info",
    "process_info",
    "sandbox_info",
    "sandbox_usage",
    "snapshot_info",
    "template_info",
    "to_json",
]
