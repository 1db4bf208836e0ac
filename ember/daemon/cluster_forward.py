"""Reaching a sandbox on another node of the cluster (docs/cluster.md): requests under
``/v1/sandboxes/{id}`` for a sandbox this home does not hold are forwarded to the daemon of
the node that holds it, streamed both ways (exec output, file contents, uploads); and
``GET /v1/sandboxes`` lists the whole cluster, each sandbox with its ``node``.

Ray is asked only *where* (:mod:`ember.cluster.directory`, read in a child process that is
killed past :data:`LOOKUP_TIMEOUT_S` and cached :data:`DIRECTORY_TTL_S`; a sandbox it does
not know, created on its node without placement, is found by asking the other nodes'
daemons, :func:`ClusterForward._probe`); the bytes go
from daemon to daemon over the TCP listener each node published when it joined. The
caller is authenticated here, as any request, and the owning daemon is told the tenant
with a vouch signed by the cluster's secret (:mod:`ember.cluster.vouch`). A node whose
daemon does not answer gives a 503 ``node_unavailable`` within :data:`CONNECT_TIMEOUT_S`;
a WebSocket (the PTY) is not forwarded yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.cluster import child
from ember.cluster.directory import Directory, NodeEntry
from ember.cluster.lost import LOST_STATUS, listed_lost, lost_error, lost_info
from ember.cluster.placement import PLACEMENT_HEADER
from ember.cluster.record import ClusterRecord, load_record, load_secret
from ember.cluster.vouch import FORWARDED_HEADER, VOUCH_HEADER, sign
from ember.daemon.auth import Principal, principal_of
from ember.errors import EmberError, HostError, NodeUnavailableError, SandboxNotFoundError
from ember.paths import Paths

log = logging.getLogger("ember.daemon")

#: A reading of the directory is trusted this long.
DIRECTORY_TTL_S = 5.0
#: A sandbox the directory does not know makes it be read again, at most this often.
MISS_REFRESH_S = 1.0
#: Reading the directory (a child process: Python, Ray's GCS client, the reads).
LOOKUP_TIMEOUT_S = 10.0
#: Reaching another node's daemon; past it the node counts as unavailable.
CONNECT_TIMEOUT_S = 3.0
#: A forwarded request's answer must start within this (its body may then stream on).
HEADERS_TIMEOUT_S = 120.0
#: Each other node's part of a cluster-wide list.
LIST_TIMEOUT_S = 5.0
#: Asking the other nodes whether they hold a sandbox the directory does not know; how
#: long a found one and a miss are remembered; how many are remembered at most.
PROBE_TIMEOUT_S = 3.0
PROBE_HIT_S = 60.0
PROBE_MISS_S = 2.0
PROBE_MEMORY = 10_000
#: The error code (and HTTP status) of a sandbox whose node does not answer.
UNAVAILABLE_CODE = NodeUnavailableError.code
UNAVAILABLE_STATUS = 503
#: Sandbox paths this middleware looks at: ``/v1/sandboxes/<id>[/...]``.
SANDBOX_PATH = re.compile(r"^/v1/sandboxes/([A-Za-z0-9_.-]{1,64})(?:/.*)?$")
LIST_PATH = "/v1/sandboxes"
#: Headers never passed on (hop by hop, the caller's credentials, ember's own).
DROPPED = frozenset({b"host", b"authorization", b"connection", b"keep-alive",
                     b"transfer-encoding", b"te", b"upgrade", b"proxy-authorization",
                     VOUCH_HEADER.encode(), FORWARDED_HEADER.encode(),
                     b"x-ember-placement", b"x-ember-tenant"})
DROPPED_BACK = frozenset({b"connection", b"keep-alive", b"transfer-encoding",
                          b"x-request-id"})


def sandbox_of(path: str) -> str | None:
    """The sandbox id a path is about, or None (pure)."""
    m = SANDBOX_PATH.match(path)
    return m.group(1) if m else None


def forward_headers(raw: list[tuple[bytes, bytes]], vouch: str,
                    own_node: str) -> list[tuple[bytes, bytes]]:
    """The headers a forwarded request carries (pure)."""
    out = [(k, v) for k, v in raw if k.lower() not in DROPPED]
    return [*out, (VOUCH_HEADER.encode(), vouch.encode()),
            (FORWARDED_HEADER.encode(), own_node.encode())]


def unavailable(sandbox_id: str, node: NodeEntry, why: str) -> dict[str, Any]:
    """The error body for a sandbox whose node does not answer (pure)."""
    state = "" if node.alive else "; Ray reports the node dead"
    return {"error": {"code": UNAVAILABLE_CODE, "message": (
        f"sandbox {sandbox_id} lives on node {node.node_id[:12]} ({node.daemon or node.ip}), "
        f"whose daemon does not answer: {why}{state}")[:2000]}}


def merge_lists(own: str, local: list[dict[str, Any]],
                others: list[tuple[NodeEntry, list[dict[str, Any]] | str]],
                directory: Directory) -> list[dict[str, Any]]:
    """One cluster-wide list (pure): each sandbox with its ``node``; for a node that did
    not answer (its part a string: why), each sandbox the directory places there, in state
    ``unknown`` with the reason as its error."""
    out = [{**i, "node": own} for i in local]
    for node, part in others:
        if isinstance(part, str) and not node.alive:  # Ray reports it dead: lost, for good
            out += listed_lost(directory, node)
        elif isinstance(part, str):
            for sid, where in sorted(directory.sandboxes.items()):
                if where == node.node_id:
                    out.append({"id": sid, "template": "", "state": "unknown", "vcpus": 0,
                                "memory_mib": 0, "disk_mib": 0, "created_at": 0.0,
                                "expires_at": None, "accel": "", "node": node.node_id,
                                "error": f"node {node.node_id[:12]} ({node.daemon}) "
                                         f"does not answer: {part}"[:500]})
        else:
            out += [{**i, "node": node.node_id} for i in part if isinstance(i, dict)]
    return out


class DirectoryCache:
    """The cluster's directory, read in a child process, cached, one reading at a time;
    when a reading fails the last good one serves (the head may be restarting)."""

    def __init__(self) -> None:
        self._dir: Directory | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    def put(self, directory: Directory) -> None:
        """A reading made elsewhere (the daemon's cluster watch keeps this one warm)."""
        self._dir = directory
        self._at = time.monotonic()

    async def get(self, address: str, *, max_age: float = DIRECTORY_TTL_S) -> Directory:
        if self._dir is not None and time.monotonic() - self._at < max_age:
            return self._dir
        async with self._lock:
            if self._dir is not None and time.monotonic() - self._at < max_age:
                return self._dir
            try:
                self._dir = await asyncio.to_thread(read_directory, address)
            except EmberError as err:
                if self._dir is None:
                    raise
                log.warning("cluster directory: %s (using the reading of %.0f s ago)", err,
                            time.monotonic() - self._at)
            self._at = time.monotonic()
            return self._dir


def read_directory(address: str) -> Directory:
    """One reading, by ``python -m ember.cluster.directory`` (killed past the bound)."""
    answer = child.ask("directory", address, what="reading the cluster's directory",
                       timeout=LOOKUP_TIMEOUT_S)
    try:
        return Directory.from_json(answer["directory"])
    except (ValueError, KeyError, TypeError) as err:
        raise HostError(f"reading the cluster's directory failed: {err}") from err


class ClusterForward:
    """ASGI middleware: forwards what belongs to another node (see the module)."""

    def __init__(self, app: ASGIApp, paths: Paths,
                 directory: DirectoryCache | None = None) -> None:
        self.app = app
        self.paths = paths
        self.directory = directory or DirectoryCache()
        #: sandbox id -> (node id or "" for nowhere, until when): what probes found
        self._probed: dict[str, tuple[str, float]] = {}
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # no keep-alive: a pooled connection to a dead node lies
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S, write=60.0),
                limits=httpx.Limits(max_keepalive_connections=0))
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") \
                or _header(scope, FORWARDED_HEADER) is not None:
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        sid = sandbox_of(path)
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send, sid)
            return
        if sid is None and not (path == LIST_PATH and scope.get("method") == "GET"):
            await self.app(scope, receive, _noting_placed(scope, send))
            return
        rec = await _record(self.paths)
        if rec is None or rec.daemon is None:
            await self.app(scope, receive, send)
            return
        if sid is None:
            await self._list(scope, receive, send, rec)
            return
        node = await self._elsewhere(scope, sid, rec)
        if node is None:
            await self.app(scope, receive, send)
            return
        if not node.alive:  # Ray reports its node dead: the sandbox is lost (Failures)
            await self._lost(scope, receive, send, sid, node)
            return
        try:
            who = await asyncio.to_thread(_principal, scope)
        except EmberError as err:
            await self.app(scope, receive, send)  # the app answers it as it always does
            log.debug("not forwarding for an unknown caller: %s", err)
            return
        await self._forward(scope, receive, send, rec, node, sid, who)

    async def _lost(self, scope: Scope, receive: Receive, send: Send, sid: str,
                    node: NodeEntry) -> None:
        """A lost sandbox, for a caller who may know of it: its info says ``lost`` and
        why; anything else is a 410 ``sandbox_lost``."""
        try:
            await asyncio.to_thread(_principal, scope)
        except EmberError:
            await self.app(scope, receive, send)  # the app answers an unknown caller
            return
        if scope.get("method") == "GET" and scope.get("path") == f"{LIST_PATH}/{sid}":
            await _answer(send, 200, lost_info(sid, node))
        else:
            await _answer(send, LOST_STATUS, lost_error(sid, node))

    async def _elsewhere(self, scope: Scope, sid: str, rec: ClusterRecord) -> NodeEntry | None:
        """The other node that holds ``sid``, or None (this home's, or unknown)."""
        live = scope["app"].state.live
        try:
            await asyncio.to_thread(live.mgr.store.get_sandbox, sid)
            return None  # ours, in whatever state
        except SandboxNotFoundError:
            pass
        try:
            directory = await self.directory.get(rec.address)
            found = directory.node_of(sid)
            if found is None:  # perhaps placed a moment ago
                directory = await self.directory.get(rec.address, max_age=MISS_REFRESH_S)
                found = directory.node_of(sid)
        except EmberError as err:
            log.warning("cannot tell where sandbox %s lives: %s", sid, err)
            return None
        if found is None:  # not placed by Ray (a local create): the nodes are asked
            found = await self._probe(scope, sid, rec, directory)
        if found is None or found.node_id == rec.node_id:
            return None
        return found

    async def _probe(self, scope: Scope, sid: str, rec: ClusterRecord,
                     directory: Directory) -> NodeEntry | None:
        """Ask every other live node, at once, whether it holds ``sid`` for this caller
        (a sandbox created there without placement: the directory does not know it);
        answers are remembered a while, a miss for :data:`PROBE_MISS_S`."""
        now = time.monotonic()
        known = self._probed.get(sid)
        if known is not None and known[1] > now:
            return directory.nodes.get(known[0]) if known[0] else None
        secret = await asyncio.to_thread(load_secret, self.paths)
        try:
            who = await asyncio.to_thread(_principal, scope)
        except EmberError:
            return None
        peers = [p for p in directory.peers(rec.node_id) if p.alive]
        if secret is None or not peers:
            return None
        path = f"{LIST_PATH}/{sid}"
        headers = {VOUCH_HEADER: sign(secret, who.tenant, "GET", path),
                   FORWARDED_HEADER: rec.node_id}

        async def holds(node: NodeEntry) -> bool:
            try:
                r = await asyncio.wait_for(
                    self.client().get(f"http://{node.daemon}{path}", headers=headers),
                    PROBE_TIMEOUT_S)
            except (httpx.HTTPError, TimeoutError, OSError):
                return False
            return r.status_code == 200

        answers = await asyncio.gather(*(holds(p) for p in peers))
        found = next((p for p, yes in zip(peers, answers, strict=True) if yes), None)
        if len(self._probed) > PROBE_MEMORY:
            self._probed.clear()
        self._probed[sid] = (found.node_id, now + PROBE_HIT_S) if found else \
            ("", now + PROBE_MISS_S)
        return found

    async def _forward(self, scope: Scope, receive: Receive, send: Send, rec: ClusterRecord,
                       node: NodeEntry, sid: str, who: Principal | None,
                       headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Carry the request to ``node`` (``headers``: the ones it carries, as made for
        E2B's requests by :mod:`ember.daemon.cluster_e2b`; else the caller's, vouched)."""
        secret = await asyncio.to_thread(load_secret, self.paths)
        if node.daemon is None or secret is None:
            why = "it published no daemon address" if node.daemon is None else \
                "this node has no cluster secret (join again)"
            await _answer(send, UNAVAILABLE_STATUS, unavailable(sid, node, why))
            return
        path: str = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"http://{node.daemon}{path}" + (f"?{query}" if query else "")
        if headers is None:
            assert who is not None
            headers = forward_headers(list(scope.get("headers") or []),
                                      sign(secret, who.tenant, scope["method"], path),
                                      rec.node_id)
        body_done = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    break
                chunk = msg.get("body", b"")
                if chunk:
                    yield chunk
                if not msg.get("more_body", False):
                    break
            body_done.set()

        method = scope["method"]
        has_body = method in ("POST", "PUT", "PATCH") or _header(scope, "content-length")
        req = self.client().build_request(method, url, headers=headers,
                                          content=body() if has_body else None)
        if not has_body:
            body_done.set()
        try:
            resp = await asyncio.wait_for(self.client().send(req, stream=True),
                                          HEADERS_TIMEOUT_S)
        except (httpx.ConnectError, httpx.ConnectTimeout, OSError) as err:
            # Silent, refused or unreachable: perhaps its host died, or it was cut off long
            # enough for Ray to declare it dead (a fresher reading says; at most one a second).
            dead = await self._now_dead(rec, sid)
            if dead is not None:
                await self._lost(scope, receive, send, sid, dead)
                return
            await _answer(send, UNAVAILABLE_STATUS, unavailable(sid, node, _why(err)))
            return
        except (httpx.HTTPError, TimeoutError) as err:
            await _answer(send, 502, unavailable(sid, node, f"no answer: {_why(err)}"))
            return
        try:
            await send({"type": "http.response.start", "status": resp.status_code,
                        "headers": [(k, v) for k, v in resp.headers.raw
                                    if k.lower() not in DROPPED_BACK]})
            pump = asyncio.ensure_future(_pump(resp, send))
            gone = asyncio.ensure_future(_disconnected(receive, body_done))
            done, _ = await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            for task in (pump, gone):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if pump in done and pump.exception() is None:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await resp.aclose()

    async def _now_dead(self, rec: ClusterRecord, sid: str) -> NodeEntry | None:
        """After a node did not answer: a fresher reading, which may say Ray has declared
        it dead meanwhile (then the sandbox is lost, not merely unavailable)."""
        try:
            directory = await self.directory.get(rec.address, max_age=MISS_REFRESH_S)
        except EmberError:
            return None
        node = directory.node_of(sid)
        return node if node is not None and not node.alive else None

    async def _websocket(self, scope: Scope, receive: Receive, send: Send,
                         sid: str | None) -> None:
        """A terminal (``.../pty``) of another node's sandbox: both directions carried,
        message by message, to that node's daemon."""
        rec = await _record(self.paths) if sid is not None else None
        node = await self._elsewhere(scope, sid, rec) if rec and rec.daemon and sid else None
        secret = await asyncio.to_thread(load_secret, self.paths) if node else None
        who = None
        if node is not None and secret is not None:
            with contextlib.suppress(EmberError):  # the app answers an unknown caller
                who = await asyncio.to_thread(_principal, scope)
        if rec is None or node is None or sid is None or secret is None or who is None:
            await self.app(scope, receive, send)
            return
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, WebSocketException

        path: str = scope["path"]
        headers = {VOUCH_HEADER: sign(secret, who.tenant, "WS", path),
                   FORWARDED_HEADER: rec.node_id}
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        if not node.alive:  # lost: said once, then closed
            await send({"type": "websocket.send", "text": json.dumps(
                {"event": "error", **lost_error(sid, node)["error"]})})
            await send({"type": "websocket.close", "code": 1011})
            return
        try:
            upstream = await asyncio.wait_for(
                connect(f"ws://{node.daemon}{path}", additional_headers=headers,
                        max_size=1 << 20, open_timeout=CONNECT_TIMEOUT_S),
                CONNECT_TIMEOUT_S + 1)
        except (OSError, TimeoutError, WebSocketException) as err:
            err_body = unavailable(sid, node, _why(err))["error"]
            await send({"type": "websocket.send",
                        "text": json.dumps({"event": "error", **err_body})})
            await send({"type": "websocket.close", "code": 1011})
            return

        async def down() -> None:  # the owning node to the caller
            try:
                async for msg in upstream:
                    key = "bytes" if isinstance(msg, bytes) else "text"
                    await send({"type": "websocket.send", key: msg})
            except ConnectionClosed:
                pass
            code = upstream.close_code or 1000
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": code})

        async def up() -> None:  # the caller to the owning node
            while True:
                msg = await receive()
                if msg["type"] == "websocket.disconnect":
                    return
                data = msg.get("bytes") if msg.get("bytes") is not None else msg.get("text")
                if data is not None:
                    await upstream.send(data)

        tasks = [asyncio.ensure_future(down()), asyncio.ensure_future(up())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await upstream.close()

    async def _list(self, scope: Scope, receive: Receive, send: Send,
                    rec: ClusterRecord) -> None:
        """The whole cluster's list: this home's (the app's answer) and every other
        node's, each asked for at most :data:`LIST_TIMEOUT_S`."""
        status, headers, data = await _capture(self.app, scope, receive)
        try:
            who = await asyncio.to_thread(_principal, scope)
            local = json.loads(data) if status == 200 else None
        except (EmberError, ValueError):
            local = None
        if not isinstance(local, list):
            await _replay(send, status, headers, data)
            return
        try:
            directory = await self.directory.get(rec.address)
        except EmberError as err:
            log.warning("listing this node's sandboxes only: %s", err)
            directory = Directory()
        secret = await asyncio.to_thread(load_secret, self.paths)
        peers = directory.peers(rec.node_id) if secret else []
        parts = await asyncio.gather(*(self._list_one(scope, p, str(secret), who, rec)
                                       for p in peers))
        merged = merge_lists(rec.node_id, local, list(zip(peers, parts, strict=True)),
                             directory)
        missing = [f"{p.node_id[:12]}={part}"[:200] for p, part in zip(peers, parts, strict=True)
                   if isinstance(part, str)]
        extra = [(b"x-ember-unreachable-nodes", "; ".join(missing).encode()[:4000])] \
            if missing else []
        await _answer(send, 200, merged, extra)

    async def _list_one(self, scope: Scope, node: NodeEntry, secret: str, who: Principal,
                        rec: ClusterRecord) -> list[dict[str, Any]] | str:
        """One other node's own sandboxes, or why not."""
        if not node.alive:
            return "Ray reports the node dead"
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"http://{node.daemon}{LIST_PATH}" + (f"?{query}" if query else "")
        headers = {VOUCH_HEADER: sign(secret, who.tenant, "GET", LIST_PATH),
                   FORWARDED_HEADER: rec.node_id}
        try:
            r = await asyncio.wait_for(self.client().get(url, headers=headers),
                                       LIST_TIMEOUT_S)
            got = r.json()
        except (httpx.HTTPError, TimeoutError, ValueError, OSError) as err:
            return _why(err)
        if r.status_code != 200 or not isinstance(got, list):
            return f"answered {r.status_code}"
        return got


def _noting_placed(scope: Scope, send: Send) -> Send:
    """``send``, or for a placement actor's create on this node (``POST /v1/sandboxes``
    marked by its header) one that notes the new sandbox as placed here, which fencing
    kills (:mod:`ember.daemon.cluster_watch`)."""
    placed = getattr(scope["app"].state, "placed", None) if "app" in scope else None
    if placed is None or scope.get("method") != "POST" or scope.get("path") != LIST_PATH \
            or _header(scope, PLACEMENT_HEADER) is None:
        return send
    noting: Send = placed.noting(send)
    return noting


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _header(scope: Scope, name: str) -> str | None:
    key = name.encode()
    for k, v in scope.get("headers") or []:
        if k.lower() == key:
            return bytes(v).decode("latin-1")
    return None


def _principal(scope: Scope) -> Principal:
    live = scope["app"].state.live
    return principal_of(live.mgr.store, scope.get("client"), _header(scope, "authorization"))


async def _record(paths: Paths) -> ClusterRecord | None:
    try:
        return await asyncio.to_thread(load_record, paths)
    except HostError:
        return None


async def _pump(resp: httpx.Response, send: Send) -> None:
    async for chunk in resp.aiter_raw():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _disconnected(receive: Receive, body_done: asyncio.Event) -> None:
    """Returns once the caller has gone (read only after its body was passed on)."""
    await body_done.wait()
    while (await receive())["type"] != "http.disconnect":
        pass


async def _capture(app: ASGIApp, scope: Scope,
                   receive: Receive) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    status: list[int] = [500]
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def keep(msg: Message) -> None:
        if msg["type"] == "http.response.start":
            status[0] = msg["status"]
            headers.extend(msg.get("headers") or [])
        elif msg["type"] == "http.response.body":
            chunks.append(msg.get("body", b""))

    await app(scope, receive, keep)
    return status[0], headers, b"".join(chunks)


async def _replay(send: Send, status: int, headers: list[tuple[bytes, bytes]],
                  data: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _answer(send: Send, status: int, doc: object,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(doc, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": data})

