"""E2B's names and shapes for ember's things: pure functions, no I/O.

Sandboxes become the JSON of E2B's REST API (``Sandbox``, ``SandboxDetail``,
``ListedSandbox``), guest file entries and process events the JSON of envd's protobuf
messages (proto3 JSON mapping: camelCase names, 64-bit integers as strings, bytes as
base64, enums by name, default values left out).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import stat
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from ember.errors import BadRequestError
from ember.runtime.spec import DEFAULT_TEMPLATE
from ember.sdk.results import EntryInfo, ExecResult, SandboxInfo, SandboxUsage
from ember.store.records import RESERVED_PREFIX

#: The envd version ember answers as: the SDK turns features on by it (0.4.0: commands
#: run as the sandbox's default user without a username; 0.5.7: octet-stream uploads).
#: 0.6.2 would add file metadata in xattrs, which ember's agent does not keep.
ENVD_VERSION = "0.5.7"
CLIENT_ID = "ember"
#: The port the SDK addresses envd at (``E2b-Sandbox-Port``).
ENVD_PORT = 49983
#: E2B's default template, and the one ember serves under its name.
TEMPLATE_ALIASES = {"base": DEFAULT_TEMPLATE}
#: How long a sandbox without a limit says it lives (E2B's APIs always name an end).
NO_END_S = 10 * 365 * 86400
#: Where the daemon notes that a sandbox was made through E2B's API, and whether its
#: ports (``<port>-<id>.<domain>``) answer anyone or only its traffic token.
PORTS_KEY = RESERVED_PREFIX + "e2b_ports"
PORTS_PUBLIC = "public"
PORTS_PRIVATE = "private"
FILE_TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY",
              "symlink": "FILE_TYPE_SYMLINK"}


def ember_template(template_id: str) -> str:
    return TEMPLATE_ALIASES.get(template_id, template_id)


def access_token(secret: bytes, sandbox_id: str) -> str:
    """The envd access token of a sandbox: its id and an HMAC of it under the daemon's
    secret, so that it needs no storage, survives daemon restarts, cannot be guessed, and
    names its sandbox (some SDK versions send envd requests without ``E2b-Sandbox-Id``)."""
    digest = hmac.new(secret, f"e2b-envd:{sandbox_id}".encode(), hashlib.sha256).digest()
    return f"{sandbox_id}.{base64.urlsafe_b64encode(digest).decode().rstrip('=')}"


def traffic_token(secret: bytes, sandbox_id: str) -> str:
    """The token that opens a private sandbox's ports (``e2b-traffic-access-token``):
    derived like :func:`access_token`, under another label, so neither gives the other."""
    digest = hmac.new(secret, f"e2b-traffic:{sandbox_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def traffic_token_matches(secret: bytes, sandbox_id: str, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(
        traffic_token(secret, sandbox_id).encode(), token.encode())


def sandbox_of_token(token: str | None) -> str:
    """The sandbox id a token names ("" for none; whether it is genuine is checked by
    :func:`token_matches`)."""
    return (token or "").rpartition(".")[0]


def token_matches(secret: bytes, sandbox_id: str, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(
        access_token(secret, sandbox_id).encode(), token.encode())


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def state_of(info: SandboxInfo) -> str:
    """E2B knows two states: ``paused``, and ``running`` for every other live one."""
    return "paused" if info.state == "paused" else "running"


def user_metadata(info: SandboxInfo) -> dict[str, str]:
    """The metadata its creator gave (the daemon's own ``ember.*`` keys left out)."""
    return {k: v for k, v in info.metadata.items() if not k.startswith(RESERVED_PREFIX)}


def created(sandbox_id: str, *, template_id: str, secret: bytes,
            domain: str) -> dict[str, Any]:
    """The ``Sandbox`` answer of create and connect."""
    return {"templateID": template_id, "sandboxID": sandbox_id, "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION, "envdAccessToken": access_token(secret, sandbox_id),
            "trafficAccessToken": traffic_token(secret, sandbox_id), "domain": domain}


def listed(info: SandboxInfo) -> dict[str, Any]:
    """A ``ListedSandbox``."""
    end = info.expires_at if info.expires_at is not None else info.created_at + NO_END_S
    return {"templateID": info.template, "sandboxID": info.id, "clientID": CLIENT_ID,
            "startedAt": _iso(info.created_at), "endAt": _iso(end),
            "cpuCount": info.vcpus, "memoryMB": info.memory_mib, "diskSizeMB": info.disk_mib,
            "state": state_of(info), "envdVersion": ENVD_VERSION,
            "metadata": user_metadata(info)}


def detail(info: SandboxInfo, *, secret: bytes, domain: str) -> dict[str, Any]:
    """A ``SandboxDetail`` (get info)."""
    return {**listed(info), "envdAccessToken": access_token(secret, info.id),
            "domain": domain, "allowInternetAccess": info.network is not None}


def metric(info: SandboxInfo, usage: SandboxUsage) -> dict[str, Any]:
    """A ``SandboxMetric`` from one usage sample: CPU use is the average since the
    sandbox started (ember samples cumulative CPU time), memory used is what the host
    holds for it (guest RAM touched and the VMM), disk figures are not known (0)."""
    alive = max(usage.sampled_at - info.created_at, 1e-3)
    pct = min(100.0, 100.0 * usage.cpu_seconds / (alive * max(usage.vcpus, 1)))
    return {"timestamp": _iso(usage.sampled_at), "timestampUnix": int(usage.sampled_at),
            "cpuCount": usage.vcpus, "cpuUsedPct": round(pct, 2),
            "memUsed": usage.memory_bytes, "memTotal": usage.memory_mib << 20, "memCache": 0,
            "diskUsed": 0, "diskTotal": info.disk_mib << 20}


# --- list: filters and paging ---------------------------------------------------------------
def metadata_filter(raw: str | None) -> dict[str, str]:
    """The SDK's ``metadata`` query value: ``urlencode`` of percent-quoted keys and values."""
    if not raw:
        return {}
    pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True, max_num_fields=64)
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def states_filter(raw: str | None) -> set[str]:
    """``state=running,paused`` (both when absent)."""
    if not raw:
        return {"running", "paused"}
    states = {s.strip() for s in raw.split(",") if s.strip()}
    bad = states - {"running", "paused"}
    if bad:
        raise BadRequestError(f"state must be running or paused, not {sorted(bad)}")
    return states


def _cursor(info: SandboxInfo) -> tuple[float, str]:
    return (info.created_at, info.id)


def encode_token(info: SandboxInfo) -> str:
    return base64.urlsafe_b64encode(f"{info.created_at!r}|{info.id}".encode()).decode()


def decode_token(token: str) -> tuple[float, str]:
    try:
        at, _, sid = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        return (float(at), sid)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequestError("nextToken is not one this API gave") from None


def page(infos: list[SandboxInfo], *, metadata: dict[str, str], states: set[str],
         template: str | None, started_after: float | None, desc: bool, limit: int,
         next_token: str | None) -> tuple[list[SandboxInfo], str | None]:
    """One page of the filtered list, oldest first (``desc``: newest first), and the
    token of the next page (None: this was the last)."""
    keep = [i for i in infos
            if state_of(i) in states
            and all(i.metadata.get(k) == v for k, v in metadata.items())
            and (template is None or ember_template(template) == i.template)
            and (started_after is None or i.created_at >= started_after)]
    keep.sort(key=_cursor, reverse=desc)
    if next_token is not None:
        after = decode_token(next_token)
        keep = [i for i in keep if (_cursor(i) < after if desc else _cursor(i) > after)]
    out = keep[:limit]
    return out, (encode_token(out[-1]) if len(keep) > limit else None)


# --- envd: files and processes --------------------------------------------------------------
def entry(e: EntryInfo) -> dict[str, Any]:
    """An envd ``EntryInfo``."""
    perm = stat.S_IMODE(e.mode)
    kind = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(e.type, stat.S_IFREG)
    out: dict[str, Any] = {"name": e.name, "type": FILE_TYPES.get(e.type, "FILE_TYPE_UNSPECIFIED"),
                           "path": e.path, "size": str(e.size), "mode": perm,
                           "permissions": stat.filemode(kind | perm)}
    if e.mtime:
        out["modifiedTime"] = _iso(e.mtime)
    return out


def write_info(path: str) -> dict[str, str]:
    """One element of the ``POST /files`` answer."""
    return {"name": path.rsplit("/", 1)[-1], "type": "file", "path": path}


def guest_path(path: str, user: str | None) -> str:
    """An absolute guest path: envd resolves a relative one in the user's home."""
    if path.startswith("/"):
        return path
    home = "/root" if user in (None, "root") else f"/home/{user}"
    return f"{home}/{path}" if path else home


def user_of(authorization: str | None) -> str | None:
    """The user envd's clients name in ``Authorization: Basic base64(user:)``."""
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        user = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise BadRequestError("Authorization: Basic must carry base64 of 'user:'") from None
    name = user.partition(":")[0]
    return name or None


def start_event(pid: int) -> dict[str, Any]:
    return {"event": {"start": {"pid": pid}}}


def data_event(stream: str, data: bytes) -> dict[str, Any]:
    return {"event": {"data": {stream: base64.b64encode(data).decode()}}}


def keepalive_event() -> dict[str, Any]:
    return {"event": {"keepalive": {}}}


def end_event(result: ExecResult) -> dict[str, Any]:
    """envd's end event: a signal is exit code -1 and ``signal: <name>``, as Go says it."""
    if result.signal is not None:
        name = {9: "killed", 15: "terminated", 2: "interrupt", 1: "hangup"}.get(
            result.signal, f"signal {result.signal}")
        return {"event": {"end": {"exitCode": -1, "exited": False,
                                  "status": f"signal: {name}"}}}
    return {"event": {"end": {"exitCode": result.exit_code, "exited": True,
                              "status": f"exit status {result.exit_code}"}}}


def b64_field(msg: dict[str, Any], key: str) -> bytes:
    raw = msg.get(key, "")
    if not isinstance(raw, str):
        raise BadRequestError(f"{key} must be base64")
    try:
        return base64.b64decode(raw, validate=True)
    except binascii.Error:
        raise BadRequestError(f"{key} must be base64") from None
