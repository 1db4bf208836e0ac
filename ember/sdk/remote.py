"""The SDK as a client of a daemon: the same AsyncSandbox API over the daemon's HTTP API.

A :class:`Transport` speaks to one daemon, on a Unix socket (``unix:///path``) or a URL
(``http://host:8700``), with httpx. :class:`RemoteSandbox`, :class:`RemoteProcess` and
:class:`RemoteFiles` are the SDK's classes with every operation sent over it; errors come
back as the same exception classes as in-process (the wire carries their stable codes).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlsplit

import httpx

from ember import protocol as P
from ember.errors import BadRequestError, EmberError, GuestError
from ember.net.policy import NetworkPolicy
from ember.net.stats import NetworkStats
from ember.sdk import wire
from ember.sdk.async_sandbox import DEFAULT_EXEC_TIMEOUT_S, AsyncSandbox
from ember.sdk.files import AsyncFiles
from ember.sdk.network import AsyncNetwork
from ember.sdk.process import AsyncProcess, OutputCallback, check_cmd, check_size
from ember.sdk.pty import AsyncPty
from ember.sdk.results import (
    EntryInfo,
    ExecResult,
    ExposedPort,
    OutputChunk,
    ProcessInfo,
    SandboxInfo,
    SnapshotInfo,
)
from ember.sdk.watch import AsyncWatch, watch_response
from ember.uds_http import async_uds_transport

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

#: Creates boot guests: under TCG that takes minutes, so no read deadline on the socket
#: beyond this.
SLOW_S = 900.0
#: Bigger stdin than this goes through spawn + stdin writes instead of the exec body.
INLINE_STDIN = 256 * 1024


class Transport:
    """One daemon: a Unix socket path or an http(s) URL, and an optional API key."""

    def __init__(self, url: str, api_key: str | None = None, *,
                 revive: Callable[[], None] | None = None) -> None:
        parts = urlsplit(url)
        self.api_key = api_key
        self._revive = revive  # starts the home's daemon again when it is found gone
        headers = {"user-agent": "ember-sdk"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        timeout = httpx.Timeout(30.0, read=SLOW_S)
        if parts.scheme == "unix":
            self.url = url
            # A connection per request (a Unix socket connects in microseconds): a daemon
            # that died or idled out is then a refused connection, which is safe to send
            # again once it is back, never a stale pooled one that fails mid-request.
            transport = async_uds_transport(parts.path, keepalive=False)
            self._http = httpx.AsyncClient(transport=transport, base_url="http://emberd",
                                           headers=headers, timeout=timeout)
        elif parts.scheme in ("http", "https") and parts.netloc:
            self.url = url
            self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers,
                                           timeout=timeout)
        else:
            raise BadRequestError(f"daemon URL must be unix:///path or http(s)://host:port, "
                                  f"not {url!r}")

    def clone(self) -> Transport:
        """Another connection pool to the same daemon (each sandbox owns its own)."""
        return Transport(self.url, self.api_key, revive=self._revive)

    async def _send(self, req: httpx.Request, *, stream: bool) -> httpx.Response:
        """Send ``req``. A daemon that is not there (killed, restarting) is started again
        when this transport may (the home's own daemon): after a refused connection, which
        carried nothing, the request is sent again; after one lost mid-request, which may
        have been done, it is not (the error says so) but the next call finds a daemon."""
        try:
            return await self._http.send(req, stream=stream)
        except httpx.HTTPError as err:
            if self._revive is None or not isinstance(err, (httpx.ConnectError, *_LOST)):
                raise _unreachable(self.url, err, req) from None
            await asyncio.to_thread(self._revive)
            if not isinstance(err, httpx.ConnectError):
                raise _unreachable(self.url, err, req, revived=True) from None
        try:
            return await self._http.send(req, stream=stream)
        except httpx.HTTPError as err:
            raise _unreachable(self.url, err, req) from None

    async def close(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, *, json: Any = None,
                   params: Mapping[str, Any] | None = None) -> Any:
        """One request; the JSON answer (None for 204), or the error it stands for."""
        r = await self._send(self._http.build_request(method, "/v1" + path, json=json,
                                                      params=params), stream=False)
        if r.status_code >= 400:
            raise wire.error_from_body(_json_or_text(r), r.status_code)
        if r.status_code == 204 or not r.content:
            return None
        if r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r.text

    async def stream(self, method: str, path: str, *, json: Any = None,
                     params: Mapping[str, Any] | None = None,
                     content: Any = None) -> httpx.Response:
        """A request whose answer is read as it comes; the caller closes it."""
        req = self._http.build_request(method, "/v1" + path, json=json, params=params,
                                       content=content)
        r = await self._send(req, stream=True)
        if r.status_code >= 400:
            await r.aread()
            await r.aclose()
            raise wire.error_from_body(_json_or_text(r), r.status_code)
        return r


def _json_or_text(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text[:500]


#: Transport errors after the connection was made: the daemon went away mid-request.
_LOST = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


def _unreachable(url: str, err: httpx.HTTPError, req: httpx.Request | None = None, *,
                 revived: bool = False) -> EmberError:
    """The SDK's error for a transport failure talking to the daemon at ``url``."""
    if isinstance(err, httpx.TimeoutException):
        from ember.errors import EmberTimeoutError

        return EmberTimeoutError(f"the ember daemon at {url} did not answer in time: {err}")
    if isinstance(err, _LOST):
        during = f" during {req.method} {req.url.path}" if req is not None else ""
        return GuestError(f"lost the ember daemon at {url}{during} ({type(err).__name__}); "
                          "it may or may not have been done"
                          + ("; the daemon was started again" if revived else ""))
    return _host(url, err)


def _host(url: str, err: httpx.HTTPError) -> EmberError:
    from ember.errors import HostError

    return HostError(f"cannot reach the ember daemon at {url}: {err} "
                     "(is it running? `ember daemon status`)")


class RemoteProcess(AsyncProcess):
    """A command in a sandbox served by a daemon; same API as :class:`AsyncProcess`."""

    def __init__(self, t: Transport, sandbox_id: str, pid: int, timeout: float | None,
                 label: str, events: _Events | None = None) -> None:
        self._t = t
        self._base = f"/sandboxes/{sandbox_id}/processes/{pid}"
        self._track(pid, timeout, label, keep_output=True)
        self._events = events  # an exec's own answer, already open

    async def write_stdin(self, data: bytes | str) -> None:
        payload = data.encode() if isinstance(data, str) else bytes(data)
        if payload:
            r = await self._t.stream("POST", self._base + "/stdin", content=payload)
            await r.aclose()

    async def close_stdin(self) -> None:
        await self._t.call("POST", self._base + "/close-stdin")

    async def signal(self, signum: int) -> None:
        await self._t.call("POST", self._base + "/signal", json={"signal": int(signum)})

    async def output(self) -> AsyncIterator[OutputChunk]:
        async with self._lock:
            if self._result is not None:
                return
            events = self._events
            self._events = None
            if events is None:
                events = _Events(await self._t.stream("GET", self._base + "/output"))
            try:
                async for line in events.lines:
                    if not line:
                        continue
                    chunk = self._event(wire.parse_event(line.encode()))
                    if chunk is not None:
                        yield chunk
                    if self._result is not None:
                        return
            except httpx.HTTPError as err:
                raise _unreachable(self._t.url, err) from None
            finally:
                await events.response.aclose()
            if self._result is None:
                raise GuestError(f"the daemon ended the output of {self._label!r} "
                                 "before its exit")

    def _event(self, ev: dict[str, Any]) -> OutputChunk | None:
        kind = ev["event"]
        if kind in ("stdout", "stderr"):
            stream: Literal["stdout", "stderr"] = "stdout" if kind == "stdout" else "stderr"
            return self._keep_chunk(stream, ev["data"])
        if kind == "exit":
            sig = ev.get("signal")
            self._conclude(int(ev.get("exit_code", -1)), sig if isinstance(sig, int) else None,
                           timed_out=ev.get("timed_out") is True,
                           dropped=ev.get("truncated") is True)
            return None
        if kind == "error":
            raise wire.error_for_event(ev)
        return None  # "started", or an event a newer daemon sends


class RemoteFiles(AsyncFiles):
    """``sandbox.files`` of a sandbox served by a daemon."""

    def __init__(self, t: Transport, sandbox_id: str) -> None:
        self._t = t
        self._base = f"/sandboxes/{sandbox_id}/files"

    async def read_chunks(self, path: str, *, limit: int | None = None) -> AsyncIterator[bytes]:
        r = await self._t.stream("GET", self._base + "/content", params={"path": path})
        got = 0
        try:
            async for chunk in r.aiter_bytes():
                got += len(chunk)
                if limit is not None and got > limit:
                    raise BadRequestError(
                        f"{path} is larger than {limit} bytes: use download() instead")
                yield chunk
        except httpx.HTTPError as err:
            raise _unreachable(self._t.url, err) from None
        finally:
            await r.aclose()

    async def write_chunks(self, path: str, chunks: AsyncIterator[bytes], *, mode: int = 0o644,
                           append: bool = False) -> int:
        if append:
            raise BadRequestError("append is not served by the daemon's API")
        if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise BadRequestError(f"invalid file mode {mode!r}")
        r = await self._t.stream("PUT", self._base + "/content",
                                 params={"path": path, "mode": mode}, content=chunks)
        try:
            body = await r.aread()
        finally:
            await r.aclose()
        return int(json.loads(body)["size"])

    async def list(self, path: str) -> builtins.list[EntryInfo]:
        raw = await self._t.call("GET", self._base + "/list", params={"path": path})
        return [wire.entry_info(e) for e in raw]

    async def stat(self, path: str) -> EntryInfo:
        return wire.entry_info(await self._t.call("GET", self._base + "/stat",
                                                  params={"path": path}))

    async def mkdir(self, path: str, *, parents: bool = True) -> None:
        await self._t.call("POST", self._base + "/mkdir", json={"path": path,
                                                                 "parents": parents})

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._t.call("POST", self._base + "/remove", json={"path": path,
                                                                  "recursive": recursive})

    async def rename(self, src: str, dst: str) -> None:
        await self._t.call("POST", self._base + "/rename", json={"src": src, "dst": dst})

    async def watch(self, path: str, *, recursive: bool = False) -> AsyncWatch:
        if not isinstance(recursive, bool):
            raise BadRequestError(f"recursive must be a boolean, not {recursive!r}")
        r = await self._t.stream("GET", self._base + "/watch",
                                 params={"path": path, "recursive": str(recursive).lower()})
        return await watch_response(path, r)


class RemotePty(AsyncPty):
    """A terminal in a sandbox served by a daemon, over its WebSocket."""

    def __init__(self, ws: ClientConnection, pid: int) -> None:
        self._ws = ws
        self.pid = pid
        self._code: int | None = None

    @classmethod
    async def open(cls, t: Transport, sandbox_id: str, request: dict[str, Any]) -> RemotePty:
        from websockets.asyncio.client import connect, unix_connect
        from websockets.exceptions import WebSocketException

        parts = urlsplit(t.url)
        path = f"/v1/sandboxes/{quote(sandbox_id, safe='')}/pty"
        headers = {"authorization": f"Bearer {t.api_key}"} if t.api_key else {}
        try:
            if parts.scheme == "unix":
                ws = await unix_connect(parts.path, f"ws://emberd{path}",
                                        additional_headers=headers, max_size=1 << 20)
            else:
                scheme = "wss" if parts.scheme == "https" else "ws"
                ws = await connect(f"{scheme}://{parts.netloc}{path}",
                                   additional_headers=headers, max_size=1 << 20)
        except (OSError, WebSocketException) as err:
            raise _host(t.url, httpx.ConnectError(str(err))) from None
        try:
            await ws.send(json.dumps(request))
            first = json.loads(await ws.recv())
            if first.get("event") == "error":
                raise wire.error_for_event(first)
            if first.get("event") != "started":
                raise GuestError(f"unexpected first pty message from the daemon: {first!r:.200}")
        except BaseException:
            await ws.close()
            raise
        return cls(ws, int(first.get("pid", 0)))

    async def write(self, data: bytes | str) -> None:
        await self._ws.send(data.encode() if isinstance(data, str) else bytes(data))

    async def resize(self, rows: int, cols: int) -> None:
        rows, cols = check_size(rows, cols)
        await self._ws.send(json.dumps({"resize": {"rows": rows, "cols": cols}}))

    async def signal(self, signum: int) -> None:
        await self._ws.send(json.dumps({"signal": int(signum)}))

    async def kill(self) -> None:
        await self.signal(9)

    async def output(self) -> AsyncIterator[bytes]:
        from websockets.exceptions import ConnectionClosed

        try:
            async for msg in self._ws:
                if isinstance(msg, bytes):
                    yield msg
                    continue
                ev = json.loads(msg)
                if ev.get("event") == "exit":
                    self._code = int(ev.get("exit_code", -1))
                elif ev.get("event") == "error":
                    raise wire.error_for_event(ev)
        except ConnectionClosed:
            pass
        if self._code is None:
            raise GuestError("the daemon closed the terminal before its command ended")

    async def wait(self) -> int:
        if self._code is None:
            async for _ in self.output():
                pass
        assert self._code is not None
        return self._code

    async def close(self) -> None:
        await self._ws.close()


class RemoteSandbox(AsyncSandbox):
    """A sandbox served by a daemon; the same API as :class:`AsyncSandbox`."""

    def __init__(self, t: Transport, info: SandboxInfo, *, owns_transport: bool) -> None:
        self._t = t
        self._info = info
        self._owns = owns_transport
        self._killed = False
        self._closed = False
        self._base = f"/sandboxes/{quote(info.id, safe='')}"
        self.files = RemoteFiles(t, info.id)
        self.network = AsyncNetwork(self)

    @property
    def id(self) -> str:
        return self._info.id

    @property
    def sandbox_id(self) -> str:
        return self._info.id

    async def info(self) -> SandboxInfo:
        self._info = wire.sandbox_info(await self._t.call("GET", self._base))
        return self._info

    async def _logs_self(self) -> str:
        return str(await self._t.call("GET", self._base + "/logs") or "")

    async def spawn(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, user: str | int | None = None,
                    stdin: bool = False,
                    timeout: float | None = DEFAULT_EXEC_TIMEOUT_S) -> AsyncProcess:
        body = _command(cmd, env, cwd, user, timeout)
        body["stdin"] = stdin
        got = await self._t.call("POST", self._base + "/processes", json=body)
        return RemoteProcess(self._t, self.id, int(got["pid"]), timeout, _label(cmd))

    async def exec(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | int | None = None,
                   stdin: bytes | str | None = None,
                   timeout: float | None = DEFAULT_EXEC_TIMEOUT_S,
                   on_stdout: OutputCallback | None = None,
                   on_stderr: OutputCallback | None = None) -> ExecResult:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        if data is not None and len(data) > INLINE_STDIN:
            p = await self.spawn(cmd, env=env, cwd=cwd, user=user, stdin=True, timeout=timeout)
            for i in range(0, len(data), 1 << 20):
                await p.write_stdin(data[i:i + (1 << 20)])
            await p.close_stdin()
            return await p.wait(on_stdout, on_stderr)
        body = _command(cmd, env, cwd, user, timeout)
        if data is not None:
            body["stdin"] = base64.b64encode(data).decode()
        events = _Events(await self._t.stream("POST", self._base + "/exec", json=body))
        try:
            first = await events.first()
            proc = RemoteProcess(self._t, self.id, int(first.get("pid", 0)), timeout,
                                 _label(cmd), events=events)
            return await proc.wait(on_stdout, on_stderr)
        finally:
            await events.response.aclose()

    async def pty(self, cmd: str | Sequence[str] | None = None, *, rows: int = 24,
                  cols: int = 80, env: Mapping[str, str] | None = None, cwd: str | None = None,
                  user: str | int | None = None) -> AsyncPty:
        rows, cols = check_size(rows, cols)
        c: str | builtins.list[str] | None = cmd if cmd is None or isinstance(cmd, str) \
            else builtins.list(cmd)
        return await RemotePty.open(self._t, self.id, {
            "cmd": c, "rows": rows, "cols": cols, "env": dict(env or {}), "cwd": cwd,
            "user": user})

    async def processes(self) -> builtins.list[ProcessInfo]:
        raw = await self._t.call("GET", self._base + "/processes")
        return [wire.process_info(p) for p in raw]

    async def ping(self, timeout: float = 10.0) -> float:
        t0 = time.monotonic()
        await self._t.call("GET", self._base + "/ping", params={"timeout": timeout})
        return time.monotonic() - t0

    async def _pause_self(self) -> None:
        self._info = wire.sandbox_info(await self._t.call("POST", self._base + "/pause"))

    async def _resume_self(self) -> None:
        self._info = wire.sandbox_info(await self._t.call("POST", self._base + "/resume"))

    async def snapshot(self, name: str | None = None) -> SnapshotInfo:
        return wire.snapshot_info(await self._t.call("POST", self._base + "/snapshots",
                                                     json={"name": name}))

    async def fork(self, n: int = 1) -> builtins.list[AsyncSandbox]:
        if isinstance(n, bool) or not isinstance(n, int):
            raise BadRequestError(f"n must be an integer, not {n!r}")
        raw = await self._t.call("POST", self._base + "/fork", json={"n": n})
        return [RemoteSandbox(self._t.clone(), wire.sandbox_info(i), owns_transport=True)
                for i in raw]

    async def network_stats(self) -> NetworkStats | None:
        raw = (await self._t.call("GET", self._base + "/network")).get("stats")
        return None if raw is None else wire.from_json(NetworkStats, raw)

    async def expose(self, port: int, *, pause_after_idle: float | None = None) -> ExposedPort:
        return wire.exposed_port(await self._t.call(
            "POST", self._base + "/ports",
            json={"port": port, "pause_after_idle_s": pause_after_idle}))

    async def unexpose(self, port: int) -> None:
        if isinstance(port, bool) or not isinstance(port, int):
            raise BadRequestError(f"port must be an integer, not {port!r}")
        await self._t.call("DELETE", f"{self._base}/ports/{port}")

    async def ports(self) -> builtins.list[ExposedPort]:
        return [wire.exposed_port(p) for p in await self._t.call("GET", self._base + "/ports")]

    async def set_network(self, policy: NetworkPolicy | Mapping[str, Any]) -> SandboxInfo:
        self._info = wire.sandbox_info(await self._t.call(
            "PUT", self._base + "/network", json=NetworkPolicy.from_json(policy).to_json()))
        return self._info

    async def set_timeout(self, timeout: float | None) -> None:
        self._info = wire.sandbox_info(await self._t.call("POST", self._base + "/timeout",
                                                          json={"timeout": timeout}))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._owns:
                await self._t.close()

    async def _kill_self(self) -> None:
        if self._killed:
            return
        self._killed = True
        t = self._t.clone() if self._closed else self._t  # kill() after close() works too
        try:
            await t.call("DELETE", self._base)
        except EmberError as err:
            if err.code != "sandbox_not_found":
                raise
        finally:
            if t is not self._t:
                await t.close()
            await self.close()

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} template={self._info.template} via {self._t.url}>"


class _Events:
    """An NDJSON answer being read: its response and one iterator over its lines."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines: AsyncIterator[str] = response.aiter_lines()

    async def first(self) -> dict[str, Any]:
        """The ``started`` event every exec answer begins with (or the error it carries)."""
        async for line in self.lines:
            if line:
                ev = wire.parse_event(line.encode())
                if ev["event"] == "error":
                    raise wire.error_for_event(ev)
                return ev
        raise GuestError("the daemon ended an exec answer before it started")


def _command(cmd: str | Sequence[str], env: Mapping[str, str] | None, cwd: str | None,
             user: str | int | None, timeout: float | None) -> dict[str, Any]:
    body: dict[str, Any] = {"cmd": check_cmd(cmd), "env": dict(env or {}), "timeout": timeout}
    if cwd is not None:
        body["cwd"] = cwd
    if user is not None:
        body["user"] = user
    return body


def _label(cmd: str | Sequence[str]) -> str:
    return (cmd if isinstance(cmd, str) else " ".join(cmd))[:200]


__all__ = ["P", "RemoteFiles", "RemoteProcess", "RemoteSandbox", "Transport"]
