"""The code interpreter's wire, without I/O: what E2B's ``e2b-code-interpreter`` SDK sends
to port 49999 (``/execute`` and ``/contexts`` bodies), the lines it reads back, and the
JSON lines ember's kernel bridge (:mod:`ember.e2b.kernel_bridge`, in the guest) writes.

The guest is not trusted: every line from the bridge is parsed with bounded sizes and
re-encoded from checked fields only, so that what reaches the SDK's parser always has
the shape it expects (a hostile guest can make a run's output wrong, never crash the
client or grow the daemon).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ember.errors import BadRequestError

#: The port E2B's SDK names for the code interpreter (``E2b-Sandbox-Port``).
JUPYTER_PORT = 49999
#: The code of one run, in UTF-8 bytes.
MAX_CODE_BYTES = 1 << 20
#: An ``/execute`` or ``/contexts`` request body (code, plus environment variables).
MAX_BODY_BYTES = MAX_CODE_BYTES + (256 << 10)
MAX_ENV_VARS = 256
MAX_ENV_BYTES = 128 << 10
#: One line from the bridge (a PNG of a large figure is one line).
MAX_LINE_BYTES = 16 << 20
#: Everything one run sends back; past it the run is interrupted and says so.
MAX_RUN_OUTPUT_BYTES = 64 << 20
MAX_CWD = 4096
LANGUAGES = ("python", "python3")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
_CONTEXT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Result fields that are strings, and those that are JSON objects (not ``chart``: E2B's
#: charts come from formatters of its own template, which ember's does not have).
_RESULT_TEXT = ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "javascript")
_RESULT_OBJECTS = ("json", "data", "extra")


class TooLargeError(BadRequestError):
    """A request over one of the bounds above (HTTP 413)."""


@dataclass(frozen=True)
class RunRequest:
    """A checked ``POST /execute`` body."""

    code: str
    context_id: str | None
    env: dict[str, str] | None


@dataclass(frozen=True)
class ContextRequest:
    """A checked ``POST /contexts`` body."""

    cwd: str | None


def _object(body: bytes, what: str) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise TooLargeError(f"{what}: the body is over {MAX_BODY_BYTES} bytes")
    try:
        obj = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequestError(f"{what}: the body is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise BadRequestError(f"{what}: the body must be a JSON object")
    return obj


def _language(value: Any) -> None:
    if value is not None and value not in LANGUAGES:
        raise BadRequestError(
            f"language {str(value)[:40]!r} is not served: ember's code interpreter runs "
            "Python only (docs/e2b.md)")


def context_id_ok(value: str) -> bool:
    return _CONTEXT_ID.match(value) is not None


def parse_run(body: bytes) -> RunRequest:
    obj = _object(body, "execute")
    code = obj.get("code")
    if not isinstance(code, str):
        raise BadRequestError("execute: code (a string) is required")
    if len(code.encode("utf-8", "surrogatepass")) > MAX_CODE_BYTES:
        raise TooLargeError(f"execute: the code is over {MAX_CODE_BYTES} bytes")
    ctx = obj.get("context_id")
    if ctx is not None and not (isinstance(ctx, str) and context_id_ok(ctx)):
        raise BadRequestError("execute: context_id is not a context's id")
    if ctx is not None and obj.get("language") is not None:
        raise BadRequestError("execute: give context_id or language, not both")
    _language(obj.get("language"))
    env = obj.get("env_vars")
    if env is not None:
        if not isinstance(env, dict) or len(env) > MAX_ENV_VARS:
            raise BadRequestError(f"execute: env_vars maps at most {MAX_ENV_VARS} names to "
                                  "strings")
        size = 0
        for k, v in env.items():
            if not _ENV_NAME.match(k) or not isinstance(v, str) or "\0" in v:
                raise BadRequestError(f"execute: env_vars: {k[:60]!r} is not a name with a "
                                      "string value")
            size += len(k) + len(v)
        if size > MAX_ENV_BYTES:
            raise TooLargeError(f"execute: env_vars are over {MAX_ENV_BYTES} bytes")
    return RunRequest(code, ctx, dict(env) if env else None)


def parse_context(body: bytes) -> ContextRequest:
    obj = _object(body, "create context")
    _language(obj.get("language"))
    cwd = obj.get("cwd")
    if cwd is not None and not (isinstance(cwd, str) and cwd.startswith("/")
                                and len(cwd) <= MAX_CWD and "\0" not in cwd):
        raise BadRequestError("create context: cwd must be an absolute path")
    return ContextRequest(cwd or None)


def context_json(context_id: str, cwd: str) -> dict[str, str]:
    """E2B's ``Context``."""
    return {"id": context_id, "language": "python", "cwd": cwd}


def run_request(run_id: int, req: RunRequest) -> bytes:
    """The bridge's ``execute`` request line."""
    return _line({"op": "execute", "id": run_id, "code": req.code, "env": req.env})


def cancel_request(run_id: int) -> bytes:
    return _line({"op": "cancel", "id": run_id})


RESTART_REQUEST = b'{"op":"restart"}\n'


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass") + b"\n"


def sdk_line(obj: dict[str, Any]) -> bytes:
    """One line of the ``/execute`` stream."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def error_line(name: str, value: str) -> bytes:
    return sdk_line({"type": "error", "name": name, "value": value,
                     "traceback": f"{name}: {value}"})


# --- from the guest -------------------------------------------------------------------------
class LineSplitter:
    """Bytes in, complete lines out; a line over ``limit`` is dropped (counted in
    ``overlong``) rather than buffered."""

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skipping = False
        self.overlong = 0

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if not self._skipping:
                self._buf += data[start:nl]
                if len(self._buf) <= self.limit:
                    lines.append(bytes(self._buf))
                else:
                    self.overlong += 1
            self._buf.clear()
            self._skipping = False
            start = nl + 1
        if not self._skipping:
            self._buf += data[start:]
            if len(self._buf) > self.limit:
                self._buf.clear()
                self._skipping = True
                self.overlong += 1
        return lines


@dataclass(frozen=True)
class Event:
    """A checked line of the bridge: ``kind`` is ready, out, done or fatal; ``line`` the
    re-encoded SDK line of an ``out``."""

    kind: str
    run_id: int = -1
    line: bytes = b""
    message: str = ""


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _clean_result(obj: dict[str, Any]) -> dict[str, Any] | None:
    out: dict[str, Any] = {"type": "result", "is_main_result": obj.get("is_main_result") is True}
    for k in _RESULT_TEXT:
        if isinstance(obj.get(k), str):
            out[k] = obj[k]
    for k in _RESULT_OBJECTS:
        if isinstance(obj.get(k), dict):
            out[k] = obj[k]
    return out


def clean_line(obj: Any) -> dict[str, Any] | None:
    """What the SDK's parser is given of a line from the guest, or None to drop it."""
    if not isinstance(obj, dict):
        return None
    kind = obj.get("type")
    if kind in ("stdout", "stderr"):
        if not isinstance(obj.get("text"), str):
            return None
        ts = obj.get("timestamp")
        return {"type": kind, "text": obj["text"], "timestamp": ts if _int(ts) else 0}
    if kind == "result":
        return _clean_result(obj)
    if kind == "error":
        fields = {k: obj.get(k) for k in ("name", "value", "traceback")}
        return {"type": "error", **{k: v if isinstance(v, str) else "" for k, v in
                                    fields.items()}}
    if kind == "number_of_executions":
        count = obj.get("execution_count")
        return {"type": kind, "execution_count": count} if _int(count) else None
    if kind in ("end_of_execution", "unexpected_end_of_execution"):
        return {"type": kind}
    return None


def parse_event(raw: bytes) -> Event | None:
    """A bridge line, or None when it is not one (a hostile or broken guest)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    kind = obj.get("ev")
    if kind == "ready":
        return Event("ready")
    if kind == "fatal":
        msg = obj.get("message")
        return Event("fatal", message=msg[:2000] if isinstance(msg, str) else "")
    run_id = obj.get("id")
    if not isinstance(run_id, int) or isinstance(run_id, bool):
        return None
    if kind == "done":
        return Event("done", run_id)
    if kind == "out":
        line = clean_line(obj.get("line"))
        return None if line is None else Event("out", run_id, sdk_line(line))
    return None


__all__ = [
    "JUPYTER_PORT", "MAX_CODE_BYTES", "ContextRequest", "Event", "LineSplitter",
    "RunRequest", "TooLargeError", "clean_line", "context_json", "parse_context",
    "parse_event", "parse_run",
]
