"""envd, the in-sandbox API of E2B's SDK, served by the daemon on the guest's behalf (the
guest runs no second daemon): :class:`EnvdRouting` sends every request for envd's paths
that names a sandbox in ``E2b-Sandbox-Id`` or carries an ``X-Access-Token`` (what the SDK
sends when ``E2B_SANDBOX_URL`` points at the daemon; the token names its sandbox too), or
whose ``Host`` is ``49983-<id>.<domain>`` (the SDK's ``E2B_DOMAIN`` form), to
:class:`Envd`, which checks the token and translates:

* ``GET /health``; ``GET /files`` (download, streamed) and ``POST /files`` (multipart or
  octet-stream, gzip allowed, streamed to the guest);
* Connect RPCs (JSON, HTTP/1.1) of ``process.Process`` (Start and Connect, server streams
  of start, data, keep-alive and end events; StreamInput, a client stream; List,
  SendInput, CloseStdin, SendSignal, Update; terminals included) and of
  ``filesystem.Filesystem`` (Stat, ListDir, MakeDir, Move, Remove; WatchDir, a server
  stream, and the watchers of CreateWatcher, GetWatcherEvents, RemoveWatcher).

The ``Authorization: Basic`` header of these requests names a guest user (envd's
convention), never an ember credential: the access token is the credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal as signals
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ember import protocol as P
from ember.daemon.live import LiveSandboxes
from ember.daemon.port_proxy import parse_host
from ember.daemon.routes_files import file_response
from ember.e2b import mapping as M
from ember.e2b.connect import (
    STREAM_CONTENT_TYPE,
    ConnectError,
    EnvelopeReader,
    decode_message,
    end_stream,
    envelope,
    single_message,
    timeout_of,
    unary_error_body,
)
from ember.e2b.jupyter import Jupyter
from ember.e2b.jupyter_wire import JUPYTER_PORT
from ember.e2b.multipart import MultipartReader, boundary_of
from ember.e2b.state import E2bState
from ember.e2b.watchers import Watchers, watch_options, watch_stream
from ember.errors import (
    BadRequestError,
    EmberError,
    EmberTimeoutError,
    NotFoundError,
    SandboxNotFoundError,
    SandboxStateError,
    UnauthorizedError,
)
from ember.sdk.async_sandbox import AsyncSandbox
from ember.sdk.process import AsyncProcess

log = logging.getLogger("ember.daemon")
access = logging.getLogger("ember.daemon.access")
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Processes started through envd that one sandbox may have at once in the table.
MAX_PROCESSES = 1024
MAX_LIST_ENTRIES = 100_000
#: A unary request's JSON body.
MAX_UNARY_BODY = 1 << 20
KEEPALIVE_DEFAULT_S = 50.0


def connect_code(err: EmberError) -> str:
    """The Connect code of an ember error."""
    for cls, code in ((BadRequestError, "invalid_argument"),
                      (UnauthorizedError, "unauthenticated"), (NotFoundError, "not_found"),
                      (SandboxStateError, "failed_precondition"),
                      (EmberTimeoutError, "deadline_exceeded")):
        if isinstance(err, cls):
            return code
    return "internal"


def _http_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


@dataclass
class Tracked:
    """A process started through envd: its handle and what List says of it."""

    proc: AsyncProcess
    config: dict[str, Any]
    tag: str | None
    #: Started on a terminal: its output and input are envd's ``pty`` fields.
    pty: bool = False
    #: SIGKILL was sent: it is gone for every later call, as for envd (its Start stream
    #: still reports its end).
    killed: bool = False


@dataclass
class Call:
    """One envd request, once its sandbox and caller are known."""

    request: Request
    sandbox_id: str
    sb: AsyncSandbox
    user: str | None
    procs: dict[int, Tracked] = field(default_factory=dict)


class EnvdRouting:
    """ASGI layer in front of the application: requests for envd's paths that name a
    sandbox in ``E2b-Sandbox-Id`` go to envd, all others pass."""

    def __init__(self, app: ASGIApp, envd: Envd, domain: str,
                 ports: Mapping[int, ASGIApp] | None = None) -> None:
        self.app = app
        self.envd = envd
        self.domain = domain
        #: Other guest ports the daemon answers itself (49999: the code interpreter).
        self.ports = dict(ports) if ports is not None else {
            JUPYTER_PORT: Jupyter(envd.live, envd.state)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            served = own_port_app(scope, self.ports, self.domain)
            if served is not None:
                await served[0](served[1], receive, send)
                return
        if scope["type"] == "http" and is_envd_path(scope.get("path", "")):
            headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or ())
            names = {k for k, _ in headers}
            if b"e2b-sandbox-id" not in names:  # E2B_DOMAIN's form: 49983-<id>.<domain>
                host = next((v for k, v in headers if k == b"host"), b"")
                named = parse_host(host.decode("latin-1"), self.domain)
                if named is not None and named[1] == M.ENVD_PORT:
                    headers.append((b"e2b-sandbox-id", named[0].encode()))
                    scope = {**scope, "headers": headers}
                    names.add(b"e2b-sandbox-id")
            if names & {b"e2b-sandbox-id", b"x-access-token"}:
                await self.envd(scope, receive, send)
                return
        await self.app(scope, receive, send)


def own_port_app(scope: Scope, ports: Mapping[int, ASGIApp],
                 domain: str) -> tuple[ASGIApp, Scope] | None:
    """The application of a port in ``ports`` that the request names (``E2b-Sandbox-Port``,
    or ``Host: <port>-<id>.<domain>``, which also names the sandbox), with its scope."""
    headers: list[tuple[bytes, bytes]] = list(scope.get("headers") or ())
    raw = next((v for k, v in headers if k == b"e2b-sandbox-port"), None)
    if raw is not None:
        app = ports.get(int(raw)) if raw.isdigit() and len(raw) <= 5 else None
        return None if app is None else (app, scope)
    host = next((v for k, v in headers if k == b"host"), b"")
    named = parse_host(host.decode("latin-1"), domain)
    if named is None or named[1] not in ports:
        return None
    if not any(k == b"e2b-sandbox-id" for k, _ in headers):
        headers.append((b"e2b-sandbox-id", named[0].encode()))
    return ports[named[1]], {**scope, "headers": headers}


def keepalive_every(request: Request) -> float:
    """Seconds between keep-alive events of a stream: the client's
    ``Keepalive-Ping-Interval`` (1 to 3600), else envd's default."""
    raw = request.headers.get("keepalive-ping-interval", "")
    return float(raw) if raw.isdigit() and 0 < int(raw) <= 3600 else KEEPALIVE_DEFAULT_S


def is_envd_path(path: str) -> bool:
    """envd's own paths (the SDK also sends the sandbox headers to E2B's REST API, on
    some calls: those must reach the lifecycle routes)."""
    return path in ("/health", "/files") or path.startswith(
        ("/process.Process/", "/filesystem.Filesystem/"))


class Envd:
    def __init__(self, live: LiveSandboxes, state: E2bState) -> None:
        self.live = live
        self.state = state
        self._procs: dict[str, dict[int, Tracked]] = {}
        self._watchers = Watchers()
        self._unary: dict[str, Callable[[Call, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "/process.Process/List": self._list,
            "/process.Process/SendInput": self._send_input,
            "/process.Process/CloseStdin": self._close_stdin,
            "/process.Process/Update": self._update,
            "/process.Process/SendSignal": self._send_signal,
            "/filesystem.Filesystem/Stat": self._stat,
            "/filesystem.Filesystem/ListDir": self._list_dir,
            "/filesystem.Filesystem/MakeDir": self._make_dir,
            "/filesystem.Filesystem/Move": self._move,
            "/filesystem.Filesystem/Remove": self._remove,
            "/filesystem.Filesystem/CreateWatcher": self._create_watcher,
            "/filesystem.Filesystem/GetWatcherEvents": self._watcher_events,
            "/filesystem.Filesystem/RemoveWatcher": self._remove_watcher,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.monotonic()
        request = Request(scope, receive)
        response = await self._answer(request)
        # Starlette watches for the client going away while it streams only under ASGI
        # spec versions before 2.4 (later ones learn it at the next write, which for a
        # quiet command is the next keep-alive): ask for the watching, so that a stream the
        # SDK closes lets go of its process at once (a Connect may be waiting for it).
        await response({**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.3"}},
                       receive, send)
        access.info("e2b %s %s %s %d %.1fms", request.headers.get("e2b-sandbox-id", "?")[:64],
                    scope.get("method"), scope.get("path"), response.status_code,
                    (time.monotonic() - t0) * 1000)

    async def _answer(self, request: Request) -> Response:
        path = request.url.path
        rpc = path not in ("/health", "/files")
        try:
            call = await self._call(request)
        except UnauthorizedError as err:
            return _http_error(401, str(err))
        except SandboxNotFoundError:
            sid = (request.headers.get("e2b-sandbox-id") or M.sandbox_of_token(
                request.headers.get("x-access-token")))[:64]
            self._procs.pop(sid, None)  # what it ran is gone with it
            return _http_error(502, f"sandbox {sid!r} was not found")
        except EmberError as err:
            return _http_error(502, f"the sandbox cannot be reached: {err}")
        try:
            if rpc:
                return await self._rpc(call, path)
            if path == "/health":
                return Response(status_code=204)
            if request.method == "GET":
                return await self._download(call)
            if request.method == "POST":
                return await self._upload(call)
            return _http_error(405, f"{request.method} {path} is not part of envd's API")
        except EmberError as err:
            status = {"invalid_argument": 400, "not_found": 404, "unauthenticated": 401,
                      "failed_precondition": 409, "deadline_exceeded": 504}.get(
                connect_code(err), 500)
            return _http_error(status, str(err))
        except Exception as err:  # a bug here: an answer all the same, and a trace
            log.exception("envd %s %s failed", request.method, path)
            return _http_error(500, f"{type(err).__name__}: {err}")

    async def _call(self, request: Request) -> Call:
        token = request.headers.get("x-access-token")
        sid = request.headers.get("e2b-sandbox-id") or M.sandbox_of_token(token)
        if not M.token_matches(self.state.secret, sid, token):
            raise UnauthorizedError("a wrong or missing X-Access-Token for this sandbox")
        if not _ID.match(sid):
            raise SandboxNotFoundError(f"not a sandbox id: {sid[:64]!r}")
        port = request.headers.get("e2b-sandbox-port", str(M.ENVD_PORT))
        if port != str(M.ENVD_PORT):
            raise BadRequestError(f"port is not open: only envd's port {M.ENVD_PORT} is "
                                  "served through E2b-Sandbox-Port")
        sb = await self.live.get(sid)
        user = M.user_of(request.headers.get("authorization"))
        return Call(request, sid, sb, user, self._procs.setdefault(sid, {}))

    # --- Connect ---------------------------------------------------------------------------
    async def _rpc(self, call: Call, path: str) -> Response:
        ctype = call.request.headers.get("content-type", "").split(";")[0].strip().lower()
        if path in ("/process.Process/Start", "/process.Process/Connect"):
            return await self._stream(call, ctype, path.rsplit("/", 1)[1])
        if path == "/process.Process/StreamInput":
            return await self._stream_input(call, ctype)
        if path == "/filesystem.Filesystem/WatchDir":
            return await self._watch_dir(call, ctype)
        handler = self._unary.get(path)
        try:
            if call.request.method != "POST":
                raise ConnectError("unimplemented", f"{path} takes POST")
            if handler is None:
                raise ConnectError("unimplemented", f"{path} is not served by ember "
                                   "(docs/e2b.md)")
            if ctype != "application/json":
                raise ConnectError("invalid_argument", f"{path}: expected application/json, "
                                   f"not {ctype!r}")
            body = await _bounded_body(call.request, MAX_UNARY_BODY)
            reply = await handler(call, decode_message(body, path))
        except ConnectError as err:
            return _connect_error(err)
        except EmberError as err:
            return _connect_error(ConnectError(connect_code(err), str(err)))
        return JSONResponse(reply)

    async def _stream(self, call: Call, ctype: str, name: str) -> Response:
        """Start (a new process) or Connect (to one started before): a server stream of
        its events."""
        try:
            if ctype != STREAM_CONTENT_TYPE:
                raise ConnectError("invalid_argument", f"{name}: expected {STREAM_CONTENT_TYPE}")
            msg = single_message(await _bounded_body(call.request, MAX_UNARY_BODY), name)
            if name == "Start":
                tracked = await self._spawn(call, msg)
                call.procs[tracked.proc.pid] = tracked
            else:
                tracked = self._tracked(call, msg)
        except ConnectError as err:
            return _stream_error(err)
        except EmberError as err:
            return _stream_error(ConnectError(connect_code(err), str(err)))
        every = keepalive_every(call.request)
        return StreamingResponse(self._events(call, tracked, every), status_code=200,
                                 media_type=STREAM_CONTENT_TYPE)

    async def _stream_input(self, call: Call, ctype: str) -> Response:
        """StreamInput, a client stream: a start event naming the process, then its input
        as it arrives (passed on message by message), keep-alives; answered at its end."""
        reader = EnvelopeReader()
        tracked: Tracked | None = None
        try:
            if ctype != STREAM_CONTENT_TYPE:
                raise ConnectError("invalid_argument", "StreamInput: expected "
                                   f"{STREAM_CONTENT_TYPE}")
            async for chunk in call.request.stream():
                for raw in reader.feed(chunk):
                    event = decode_message(raw, "StreamInput")
                    if tracked is None:
                        start = event.get("start")
                        if not isinstance(start, dict):
                            raise ConnectError("invalid_argument",
                                               "StreamInput: the first event must be start")
                        tracked = self._tracked(call, start)
                    elif isinstance(event.get("data"), dict):
                        await self._send_input(call, {"process": {"pid": tracked.proc.pid},
                                                      **event["data"]})
            reader.close()
        except ConnectError as err:
            return _stream_error(err)
        except EmberError as err:
            return _stream_error(ConnectError(connect_code(err), str(err)))
        return Response(envelope({}) + end_stream(), media_type=STREAM_CONTENT_TYPE)

    async def _spawn(self, call: Call, msg: dict[str, Any]) -> Tracked:
        pty = _pty_size(msg.get("pty")) if msg.get("pty") is not None else None
        config = msg.get("process")
        if not isinstance(config, dict) or not isinstance(config.get("cmd"), str) \
                or not config["cmd"]:
            raise ConnectError("invalid_argument", "Start: process.cmd is required")
        args = config.get("args", [])
        envs = config.get("envs", {})
        cwd = config.get("cwd")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConnectError("invalid_argument", "Start: process.args must be strings")
        if not isinstance(envs, dict) or not all(isinstance(v, str) for v in envs.values()):
            raise ConnectError("invalid_argument", "Start: process.envs must map to strings")
        if cwd is not None and not isinstance(cwd, str):
            raise ConnectError("invalid_argument", "Start: process.cwd must be a string")
        tag = msg.get("tag") if isinstance(msg.get("tag"), str) else None
        if len(call.procs) >= MAX_PROCESSES:
            for pid in [p for p, t in call.procs.items()
                        if t.proc.result is not None or t.killed]:
                del call.procs[pid]
        if len(call.procs) >= MAX_PROCESSES:
            raise ConnectError("resource_exhausted", f"{MAX_PROCESSES} processes started "
                               "through envd are still running in this sandbox")
        timeout = timeout_of(call.request.headers.get("connect-timeout-ms"))
        proc = await call.sb._spawn([config["cmd"], *args], env=envs,
                                    cwd=M.guest_path(cwd, call.user) if cwd else None,
                                    user=call.user,
                                    stdin=msg.get("stdin") is True or pty is not None,
                                    timeout=timeout, keep_output=False, pty=pty)
        kept = {k: v for k, v in config.items() if k in ("cmd", "args", "envs", "cwd")}
        return Tracked(proc, kept, tag, pty=pty is not None)

    async def _events(self, call: Call, tracked: Tracked,
                      every: float) -> AsyncIterator[bytes]:
        """A process's stream: start, data as produced (keep-alives while quiet), end; then
        the end-stream envelope. A client that goes away leaves the process running (one
        reader at a time: a Connect waits for an earlier stream to end or go away)."""
        proc = tracked.proc
        queue: asyncio.Queue[tuple[str, bytes] | ConnectError | None] = asyncio.Queue(64)
        pump = asyncio.create_task(_pump(proc, queue, "pty" if tracked.pty else None))
        try:
            yield envelope(M.start_event(proc.pid))
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), every)
                except TimeoutError:
                    yield envelope(M.keepalive_event())
                    continue
                if item is None:
                    break
                if isinstance(item, ConnectError):
                    yield end_stream(item)
                    return
                yield envelope(M.data_event(*item))
            result = proc.result
            assert result is not None
            if result.timed_out:
                yield end_stream(ConnectError("deadline_exceeded",
                                              f"the command outlived its timeout and was "
                                              f"killed (pid {proc.pid})"))
                return
            yield envelope(M.end_event(result))
            yield end_stream()
        finally:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            if proc.result is not None:
                call.procs.pop(proc.pid, None)

    def _tracked(self, call: Call, msg: dict[str, Any]) -> Tracked:
        sel = msg.get("process")
        if not isinstance(sel, dict):
            raise ConnectError("invalid_argument", "a process selector (pid or tag) is required")
        pid, tag = sel.get("pid"), sel.get("tag")
        for p, t in call.procs.items():
            if t.killed:
                continue
            if (isinstance(pid, int) and p == pid) or (isinstance(tag, str) and t.tag == tag):
                return t
        raise ConnectError("not_found", f"no process {pid if pid is not None else tag!r} "
                           "started through envd runs in this sandbox")

    async def _list(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        running = {p.pid for p in await call.sb.processes() if p.running}
        out = []
        for pid, t in call.procs.items():
            if t.proc.result is None and not t.killed and pid in running:
                info: dict[str, Any] = {"config": t.config, "pid": pid}
                if t.tag is not None:
                    info["tag"] = t.tag
                out.append(info)
        return {"processes": out}

    async def _send_input(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        t = self._tracked(call, msg)
        given = msg.get("input")
        key = "pty" if t.pty else "stdin"
        if not isinstance(given, dict) or key not in given:
            raise ConnectError("invalid_argument", f"SendInput: input.{key} is required for "
                               "this process")
        data = M.b64_field(given, key)
        for i in range(0, len(data), P.MAX_DATA_PAYLOAD):
            await t.proc.write_stdin(data[i:i + P.MAX_DATA_PAYLOAD])
        return {}

    async def _update(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        t = self._tracked(call, msg)
        if not t.pty:
            raise ConnectError("failed_precondition", "Update: the process has no terminal")
        await t.proc.resize(*_pty_size(msg.get("pty")))
        return {}

    async def _close_stdin(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        await self._tracked(call, msg).proc.close_stdin()
        return {}

    async def _send_signal(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        t = self._tracked(call, msg)
        raw = msg.get("signal")
        named = {"SIGNAL_SIGKILL": 9, "SIGNAL_SIGTERM": 15}
        signum = named.get(raw) if isinstance(raw, str) else raw
        if signum not in (signals.SIGKILL, signals.SIGTERM):
            raise ConnectError("invalid_argument", f"SendSignal: signal {raw!r} is not "
                               "SIGNAL_SIGKILL or SIGNAL_SIGTERM")
        await t.proc.signal(int(signum))
        t.killed = signum == signals.SIGKILL
        return {}

    # --- filesystem ------------------------------------------------------------------------
    def _path(self, call: Call, msg: dict[str, Any], key: str = "path") -> str:
        path = msg.get(key)
        if not isinstance(path, str) or len(path) > 4096:
            raise ConnectError("invalid_argument", f"{key} is required (a string)")
        return M.guest_path(path, call.user)

    async def _stat(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        return {"entry": M.entry(await call.sb.files.stat(self._path(call, msg)))}

    async def _list_dir(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        depth = msg.get("depth", 1)
        if not isinstance(depth, int) or not 0 <= depth <= 64:
            raise ConnectError("invalid_argument", "ListDir: depth is 1 to 64")
        entries: list[dict[str, Any]] = []
        level = [self._path(call, msg)]
        for _ in range(max(depth, 1)):
            below: list[str] = []
            for d in level:
                for e in await call.sb.files.list(d):
                    entries.append(M.entry(e))
                    if e.type == "dir":
                        below.append(e.path)
                if len(entries) > MAX_LIST_ENTRIES:
                    raise ConnectError("resource_exhausted", f"over {MAX_LIST_ENTRIES} "
                                       "entries: list with a smaller depth")
            level = below
        return {"entries": entries}

    async def _make_dir(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        path = self._path(call, msg)
        if await call.sb.files.exists(path):
            raise ConnectError("already_exists", f"{path} already exists")
        await call.sb.files.mkdir(path, parents=True)
        return {"entry": M.entry(await call.sb.files.stat(path))}

    async def _move(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        src, dst = self._path(call, msg, "source"), self._path(call, msg, "destination")
        await call.sb.files.rename(src, dst)
        return {"entry": M.entry(await call.sb.files.stat(dst))}

    async def _remove(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        await call.sb.files.remove(self._path(call, msg), recursive=True)
        return {}

    async def _watch_dir(self, call: Call, ctype: str) -> Response:
        """WatchDir, a server stream: start, then the directory's events (keep-alives while
        quiet) until the client goes, the directory goes, or events are lost."""
        try:
            if ctype != STREAM_CONTENT_TYPE:
                raise ConnectError("invalid_argument", f"WatchDir: expected {STREAM_CONTENT_TYPE}")
            msg = single_message(await _bounded_body(call.request, MAX_UNARY_BODY), "WatchDir")
            recursive = watch_options(msg, "WatchDir")
            timeout = timeout_of(call.request.headers.get("connect-timeout-ms"))
            w = await call.sb.files.watch(self._path(call, msg), recursive=recursive)
        except ConnectError as err:
            return _stream_error(err)
        except EmberError as err:
            return _stream_error(ConnectError(connect_code(err), str(err)))
        every = keepalive_every(call.request)
        deadline = None if not timeout else asyncio.get_running_loop().time() + timeout
        return StreamingResponse(watch_stream(w, every, deadline), status_code=200,
                                 media_type=STREAM_CONTENT_TYPE)

    async def _create_watcher(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        await self._watchers.sweep()
        recursive = watch_options(msg, "CreateWatcher")
        w = await call.sb.files.watch(self._path(call, msg), recursive=recursive)
        return {"watcherId": await self._watchers.add(call.sandbox_id, w)}

    async def _watcher_events(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        await self._watchers.sweep()
        return await self._watchers.events(call.sandbox_id, msg)

    async def _remove_watcher(self, call: Call, msg: dict[str, Any]) -> dict[str, Any]:
        return await self._watchers.remove(call.sandbox_id, msg)

    # --- /files ----------------------------------------------------------------------------
    async def _download(self, call: Call) -> Response:
        path = M.guest_path(call.request.query_params.get("path", ""), call.user)
        return await file_response(call.sb, path)

    async def _upload(self, call: Call) -> Response:
        request = call.request
        ctype = request.headers.get("content-type", "")
        gzip = request.headers.get("content-encoding", "").lower() == "gzip"
        default = request.query_params.get("path")
        if ctype.lower().startswith("multipart/form-data"):
            if gzip:
                raise BadRequestError("gzip applies to octet-stream uploads only")
            written = await self._multipart(call, boundary_of(ctype), default)
        else:
            if not default:
                raise BadRequestError("an octet-stream upload needs ?path=")
            path = M.guest_path(default, call.user)
            await self._write(call, path, _chunks(request, gzip))
            written = [path]
        if not written:
            raise BadRequestError("the upload holds no file")
        return JSONResponse([M.write_info(p) for p in written])

    async def _multipart(self, call: Call, boundary: bytes, default: str | None) -> list[str]:
        reader = MultipartReader(boundary)

        async def events() -> AsyncIterator[tuple[str, str | bytes]]:
            async for chunk in call.request.stream():
                for ev in reader.feed(chunk):
                    yield ev
            reader.close()

        written: list[str] = []
        stream = events()
        async for kind, value in stream:
            if kind != "part":
                continue
            name = str(value) or default
            if not name:
                raise BadRequestError("a multipart part without a file name (its path)")
            path = M.guest_path(name, call.user)

            async def part() -> AsyncIterator[bytes]:
                async for k, v in stream:
                    if k == "end":
                        return
                    if isinstance(v, bytes):
                        for i in range(0, len(v), P.MAX_DATA_PAYLOAD):
                            yield v[i:i + P.MAX_DATA_PAYLOAD]

            await self._write(call, path, part())
            written.append(path)
        return written

    @staticmethod
    async def _write(call: Call, path: str, chunks: AsyncIterator[bytes]) -> None:
        parent = path.rsplit("/", 1)[0]
        if parent:
            await call.sb.files.mkdir(parent, parents=True)  # envd makes them too
        await call.sb.files.write_chunks(path, chunks)


async def _pump(proc: AsyncProcess,
                queue: asyncio.Queue[tuple[str, bytes] | ConnectError | None],
                stream: str | None) -> None:
    """``proc``'s output into ``queue`` (as ``stream`` when given: a terminal's output is
    envd's ``pty``), then None, or the error that ended it."""
    try:
        async for chunk in proc.output():
            for i in range(0, len(chunk.data), 32 * 1024):
                await queue.put((stream or chunk.stream, chunk.data[i:i + 32 * 1024]))
    except EmberError as err:
        code = "unavailable" if not isinstance(err, EmberTimeoutError) else "deadline_exceeded"
        await queue.put(ConnectError(code, f"the command's stream ended: {err}"))
        return
    except Exception as err:  # never leave the stream waiting for an end that won't come
        log.exception("reading the output of pid %d failed", proc.pid)
        await queue.put(ConnectError("internal", f"{type(err).__name__}: {err}"))
        return
    await queue.put(None)


def _pty_size(pty: Any) -> tuple[int, int]:
    """``(rows, cols)`` of envd's ``PTY`` message."""
    size = pty.get("size") if isinstance(pty, dict) else None
    rows = size.get("rows") if isinstance(size, dict) else None
    cols = size.get("cols") if isinstance(size, dict) else None
    if not (isinstance(rows, int) and isinstance(cols, int) and 0 < rows <= 1000
            and 0 < cols <= 1000):
        raise ConnectError("invalid_argument", "pty.size needs rows and cols, 1 to 1000")
    return rows, cols


async def _chunks(request: Request, gzip: bool) -> AsyncIterator[bytes]:
    """The body in pieces the agent takes, gunzipped as it arrives (bounded output per
    step, so that a small bomb cannot fill the daemon's memory)."""
    z = zlib.decompressobj(wbits=31) if gzip else None
    async for c in request.stream():
        pending = c
        while pending:
            if z is None:
                out, pending = pending, b""
            else:
                try:
                    out = z.decompress(pending, P.MAX_DATA_PAYLOAD)
                except zlib.error as err:
                    raise BadRequestError(f"the gzip body is corrupt: {err}") from None
                pending = z.unconsumed_tail
            for i in range(0, len(out), P.MAX_DATA_PAYLOAD):
                yield out[i:i + P.MAX_DATA_PAYLOAD]


async def _bounded_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for c in request.stream():
        body += c
        if len(body) > limit:
            raise ConnectError("resource_exhausted", f"a request over {limit} bytes")
    return bytes(body)


def _connect_error(err: ConnectError) -> Response:
    return Response(unary_error_body(err), status_code=err.http_status,
                    media_type="application/json")


def _stream_error(err: ConnectError) -> Response:
    return Response(end_stream(err), status_code=200, media_type=STREAM_CONTENT_TYPE)


__all__ = ["Envd", "EnvdRouting"]
