"""E2B's code interpreter (the ``e2b-code-interpreter`` SDK), served by the daemon for
requests addressed to port 49999 (``E2b-Sandbox-Port: 49999``, or ``Host:
49999-<id>.<domain>``): ``POST /execute`` (a stream of JSON lines), ``GET``/``POST
/contexts``, ``DELETE /contexts/{id}``, ``POST /contexts/{id}/restart``, ``GET /health``.

Each context is a real Jupyter kernel (ipykernel) in the guest, driven by ember's kernel
bridge (:mod:`ember.e2b.kernel_bridge`), which the daemon writes into the guest at first
use and runs with the guest's ``python3`` through the agent's exec, talking JSON lines over
its stdin and stdout (:mod:`ember.e2b.jupyter_wire`). A sandbox's default context starts
with its first run; contexts end with their sandbox.

A run's stream ends when its code does; a client that goes away (its own ``timeout``
included: the SDK's timeout is a client-side deadline) interrupts the kernel, so nothing
is left running for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ember.daemon.live import LiveSandboxes
from ember.e2b import jupyter_wire as W
from ember.e2b import mapping as M
from ember.e2b.state import E2bState
from ember.errors import (
    BadRequestError,
    CommandNotFoundError,
    EmberError,
    GuestError,
    NotFoundError,
    QuotaExceededError,
    SandboxNotFoundError,
)
from ember.sdk.async_sandbox import AsyncSandbox
from ember.sdk.process import AsyncProcess

log = logging.getLogger("ember.daemon")
access = logging.getLogger("ember.daemon.access")

BRIDGE_SOURCE = (Path(__file__).parent / "kernel_bridge.py").read_bytes()
#: Where the bridge goes in the guest (named by its content: an older daemon's copy is
#: never run by a newer one).
BRIDGE_DIR = "/tmp/.ember"
BRIDGE_PATH = f"{BRIDGE_DIR}/kernel_bridge-{hashlib.sha256(BRIDGE_SOURCE).hexdigest()[:16]}.py"
#: A context's working directory unless its creator names one (E2B's default).
DEFAULT_CWD = "/home/user"
#: Contexts one sandbox may have (each is a kernel and a bridge: two Python processes).
MAX_CONTEXTS = 8
#: Runs waiting for one context at once (each holds an open request).
MAX_QUEUED_RUNS = 16
#: How long a kernel may take to start or restart (a cold ipykernel under TCG: seconds).
KERNEL_START_S = 240.0
#: How long a context's kernel may take to shut down when its context is removed.
KERNEL_STOP_S = 10.0


class KernelError(GuestError):
    """A context's kernel could not be started or has gone."""


@dataclass
class Run:
    """One ``/execute`` in flight: its lines as the bridge sends them."""

    run_id: int
    lines: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    size: int = 0
    finished: bool = False
    overflowed: bool = False


class Kernel:
    """One context: its bridge process in the guest and the runs sent to it."""

    def __init__(self, context_id: str, cwd: str, sb: AsyncSandbox) -> None:
        self.context_id = context_id
        self.cwd = cwd
        self.sb = sb
        self.proc: AsyncProcess | None = None
        self.runs: dict[int, Run] = {}
        self.ids = itertools.count(1)
        self.ready = asyncio.Event()
        self.gone: str | None = None
        self.fatal = ""
        self.stderr_tail = b""
        self.bad_lines = 0
        self._pump: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_gone: list[asyncio.Event] = []

    @property
    def alive(self) -> bool:
        return self.gone is None

    async def start(self) -> None:
        await self.sb.files.mkdir(BRIDGE_DIR, parents=True)
        await self.sb.files.write(BRIDGE_PATH, BRIDGE_SOURCE, mode=0o644)
        try:
            self.proc = await self.sb._spawn(["python3", "-u", BRIDGE_PATH, self.cwd],
                                             env=None, cwd=None, user=None, stdin=True,
                                             timeout=None, keep_output=False)
        except CommandNotFoundError as err:
            raise KernelError("the sandbox's template has no python3: use the "
                              "code-interpreter-v1 template (docs/e2b.md)") from err
        self._pump = asyncio.create_task(self._read(self.proc))
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), KERNEL_START_S)
        except TimeoutError:
            await self.close()
            raise KernelError(f"the Jupyter kernel did not start within {KERNEL_START_S:.0f}"
                              " s") from None
        if self.gone is not None:
            raise KernelError(self.gone)

    async def _read(self, proc: AsyncProcess) -> None:
        split = W.LineSplitter()
        why = "the kernel bridge ended"
        try:
            async for chunk in proc.output():
                if chunk.stream == "stderr":
                    self.stderr_tail = (self.stderr_tail + chunk.data)[-2000:]
                    continue
                seen = split.overlong
                for raw in split.feed(chunk.data):
                    self._dispatch(raw)
                if split.overlong > seen:
                    self._to_oldest(W.error_line("OutputTooLarge", "an output over "
                                                 f"{W.MAX_LINE_BYTES} bytes was dropped"))
        except EmberError as err:
            why = f"the kernel bridge's stream ended: {err}"
        except Exception as err:  # never leave a run waiting for an end that won't come
            log.exception("reading the kernel bridge of context %s failed", self.context_id)
            why = f"{type(err).__name__}: {err}"
        finally:
            self._end(why)

    def _end(self, why: str) -> None:
        if self.gone is not None:
            return
        detail = self.fatal or self.stderr_tail.decode("utf-8", "replace").strip()[-600:]
        self.gone = f"{why}{': ' + detail if detail else ''}"
        for run in self.runs.values():
            run.lines.put_nowait(W.error_line("KernelGone", self.gone))
            run.lines.put_nowait(None)
        self.runs.clear()
        self.ready.set()
        for ev in self.on_gone:
            ev.set()

    def _dispatch(self, raw: bytes) -> None:
        ev = W.parse_event(raw)
        if ev is None:
            self.bad_lines += 1
            if self.bad_lines <= 3:  # a guest flooding garbage does not flood the log
                log.warning("context %s: a line that is not the bridge's was dropped",
                            self.context_id)
            return
        if ev.kind == "ready":
            self.ready.set()
            return
        if ev.kind == "fatal":
            self.fatal = ev.message
            return
        run = self.runs.get(ev.run_id)
        if run is None:
            return  # a run whose client went away
        if ev.kind == "done":
            run.finished = True
            del self.runs[ev.run_id]
            run.lines.put_nowait(None)
            return
        if run.overflowed:
            return
        run.size += len(ev.line)
        if run.size > W.MAX_RUN_OUTPUT_BYTES:
            run.overflowed = True
            run.lines.put_nowait(W.error_line(
                "OutputTooLarge", f"the run's output went over {W.MAX_RUN_OUTPUT_BYTES} "
                "bytes: it was interrupted"))
            self._later(W.cancel_request(run.run_id))
            return
        run.lines.put_nowait(ev.line)

    def _to_oldest(self, line: bytes) -> None:
        if self.runs:
            self.runs[min(self.runs)].lines.put_nowait(line)

    def _later(self, data: bytes) -> None:
        """Send ``data`` to the bridge from a task of its own (for callers that cannot
        wait: a stream being torn down, the reader)."""
        async def send() -> None:
            with contextlib.suppress(EmberError):
                await self._send(data)

        self._keep(asyncio.get_running_loop().create_task(send()))

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, data: bytes) -> None:
        if self.proc is None or self.gone is not None:
            raise KernelError(self.gone or "the kernel is not started")
        await self.proc.write_stdin(data)

    async def run(self, req: W.RunRequest) -> Run:
        if self.gone is not None:
            raise KernelError(self.gone)
        if len(self.runs) >= MAX_QUEUED_RUNS:
            raise QuotaExceededError(f"{MAX_QUEUED_RUNS} runs already wait for this context")
        run = Run(next(self.ids))
        self.runs[run.run_id] = run
        try:
            await self._send(W.run_request(run.run_id, req))
        except BaseException:
            self.runs.pop(run.run_id, None)
            raise
        return run

    def abandon(self, run: Run) -> None:
        """Its client went away: interrupt it (or drop it if it has not started)."""
        if run.finished or self.runs.pop(run.run_id, None) is None:
            return
        self._later(W.cancel_request(run.run_id))

    async def restart(self) -> None:
        self.ready.clear()
        await self._send(W.RESTART_REQUEST)
        await self._wait_ready()

    async def close(self) -> None:
        """End the bridge (which shuts its kernel down), killing it if it lingers."""
        proc, pump = self.proc, self._pump
        self._end("the context was removed")
        if proc is None:
            return
        with contextlib.suppress(EmberError):
            await proc.close_stdin()
        if pump is not None:
            done, _ = await asyncio.wait({pump}, timeout=KERNEL_STOP_S)
            if not done:
                with contextlib.suppress(EmberError):
                    await proc.kill()
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump


@dataclass
class Contexts:
    """One sandbox's contexts."""

    sb: AsyncSandbox
    kernels: dict[str, Kernel] = field(default_factory=dict)
    default_id: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Bridges left in the guest by an earlier daemon (or connection) were ended.
    swept: bool = False
    sweep_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Jupyter:
    """The ASGI application for port 49999 (mounted by :class:`~ember.e2b.envd.EnvdRouting`
    in front of everything else)."""

    def __init__(self, live: LiveSandboxes, state: E2bState) -> None:
        self.live = live
        self.state = state
        self._boxes: dict[str, Contexts] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.monotonic()
        request = Request(scope, receive)
        response = await self._answer(request)
        # Ask Starlette to watch for the client going away while it streams (see Envd):
        # a run whose client left is interrupted at once.
        await response({**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.3"}},
                       receive, send)
        access.info("e2b-jupyter %s %s %s %d %.1fms",
                    request.headers.get("e2b-sandbox-id", "?")[:64], scope.get("method"),
                    scope.get("path"), response.status_code, (time.monotonic() - t0) * 1000)

    async def _answer(self, request: Request) -> Response:
        envd_token = request.headers.get("x-access-token")
        sid = request.headers.get("e2b-sandbox-id") or M.sandbox_of_token(envd_token)
        secret = self.state.secret
        if not (M.token_matches(secret, sid, envd_token) or M.traffic_token_matches(
                secret, sid, request.headers.get("e2b-traffic-access-token"))):
            return _error(401, "a wrong or missing access token for this sandbox "
                          "(X-Access-Token or E2B-Traffic-Access-Token)")
        method, path = request.method, request.url.path.rstrip("/") or "/"
        try:
            if (method, path) == ("GET", "/health"):
                return Response(status_code=204)
            box = await self._box(sid)
            if (method, path) == ("POST", "/execute"):
                return await self._execute(request, sid)
            if path == "/contexts" and method == "GET":
                return JSONResponse([] if box is None else [
                    W.context_json(k, v.cwd) for k, v in box.kernels.items() if v.alive])
            if path == "/contexts" and method == "POST":
                req = W.parse_context(await _body(request))
                kernel = await self._new(self._add(sid), req.cwd or DEFAULT_CWD)
                return JSONResponse(W.context_json(kernel.context_id, kernel.cwd))
            parts = path.split("/")
            if len(parts) in (3, 4) and parts[1] == "contexts":
                kernel = self._kernel(box, parts[2])
                if len(parts) == 3 and method == "DELETE":
                    if box is not None:
                        box.kernels.pop(kernel.context_id, None)
                    await kernel.close()
                    return Response(status_code=204)
                if len(parts) == 4 and parts[3] == "restart" and method == "POST":
                    await kernel.restart()
                    return Response(status_code=204)
            return _error(404, f"{method} {path[:200]} is not part of the code interpreter's "
                          "API")
        except SandboxNotFoundError:
            self._drop(sid)
            return _error(502, f"sandbox {sid[:64]!r} was not found")
        except NotFoundError as err:
            return _error(404, str(err))
        except W.TooLargeError as err:
            return _error(413, str(err))
        except BadRequestError as err:
            return _error(400, str(err))
        except QuotaExceededError as err:
            return _error(429, str(err))
        except KernelError as err:
            return _error(500, f"the context's kernel: {err}")
        except EmberError as err:
            return _error(502, f"the sandbox cannot be reached: {err}")
        except Exception as err:  # a bug here: an answer all the same, and a trace
            log.exception("code interpreter %s %s failed", method, path)
            return _error(500, f"{type(err).__name__}: {err}")

    async def _box(self, sid: str) -> Contexts | None:
        """The sandbox's contexts, if it has any (forgotten, with their kernels, when the
        daemon's connection to it is a new one: they ran on the old one). Raises
        SandboxNotFoundError for a sandbox that is gone."""
        sb = await self.live.get(sid)
        box = self._boxes.get(sid)
        if box is not None and box.sb is not sb:
            self._drop(sid)
            box = None
        return box

    def _add(self, sid: str) -> Contexts:
        """The sandbox's table, made for its first context (``_box`` has looked the
        sandbox up; lists, restarts and removals never make one). Called with no wait
        before the context's start takes the table's locks, which keep it."""
        box = self._boxes.get(sid)
        if box is None:
            sb = self.live.peek(sid)
            if sb is None:
                raise SandboxNotFoundError(f"sandbox {sid!r} is not open")
            box = self._boxes[sid] = Contexts(sb)
        return box

    def _drop(self, sid: str) -> None:
        box = self._boxes.pop(sid, None)
        if box is not None:
            for kernel in box.kernels.values():
                kernel._end("the sandbox is gone")

    def _kernel(self, box: Contexts | None, context_id: str) -> Kernel:
        kernel = None if box is None else box.kernels.get(context_id)
        if kernel is None or not kernel.alive:
            if box is not None:
                box.kernels.pop(context_id, None)
            raise NotFoundError(f"context {context_id[:64]!r} was not found")
        return kernel

    async def _new(self, box: Contexts, cwd: str) -> Kernel:
        live = [k for k in box.kernels.values() if k.alive]
        if len(live) >= MAX_CONTEXTS:
            raise QuotaExceededError(f"this sandbox has {MAX_CONTEXTS} contexts: remove one "
                                     "first")
        async with box.sweep_lock:  # before this box starts any bridge of its own
            if not box.swept:
                await _sweep(box.sb)
                box.swept = True
        kernel = Kernel(uuid.uuid4().hex, cwd, box.sb)
        box.kernels[kernel.context_id] = kernel
        gone = asyncio.Event()
        kernel.on_gone.append(gone)
        self._forget_when(box, kernel, gone)
        try:
            await kernel.start()
        except BaseException:
            box.kernels.pop(kernel.context_id, None)
            await kernel.close()
            raise
        return kernel

    def _forget_when(self, box: Contexts, kernel: Kernel, gone: asyncio.Event) -> None:
        """Take a context out of its sandbox's table when its kernel goes (the sandbox
        killed, the bridge ended), and the sandbox's entry when it has none left."""
        async def watch() -> None:
            await gone.wait()
            if box.kernels.get(kernel.context_id) is kernel:
                del box.kernels[kernel.context_id]
            if box.default_id == kernel.context_id:
                box.default_id = None
            sid = box.sb.id
            if not box.kernels and self._boxes.get(sid) is box and not (
                    box.lock.locked() or box.sweep_lock.locked()):  # none being started
                del self._boxes[sid]

        kernel._keep(asyncio.get_running_loop().create_task(watch()))

    async def _default(self, box: Contexts) -> Kernel:
        async with box.lock:  # the first runs of a sandbox share one start
            if box.default_id is not None:
                kernel = box.kernels.get(box.default_id)
                if kernel is not None and kernel.alive:
                    return kernel
            kernel = await self._new(box, DEFAULT_CWD)
            box.default_id = kernel.context_id
            return kernel

    async def _execute(self, request: Request, sid: str) -> Response:
        req = W.parse_run(await _body(request))
        kernel = (self._kernel(self._boxes.get(sid), req.context_id)
                  if req.context_id is not None else await self._default(self._add(sid)))
        run = await kernel.run(req)
        return StreamingResponse(_lines(kernel, run), media_type="application/x-ndjson")


async def _sweep(sb: AsyncSandbox) -> None:
    """End kernel bridges that nobody drives any more (their contexts were an earlier
    daemon's, or an earlier connection's): their kernels follow them (ipykernel exits
    when its parent goes)."""
    stale = [p.pid for p in await sb.processes()
             if p.running and any(a.startswith(f"{BRIDGE_DIR}/kernel_bridge-") for a in p.argv)]
    if stale:
        log.info("sandbox %s: ending %d kernel bridge(s) left by an earlier connection",
                 sb.id, len(stale))
        await sb.exec(["kill", "-TERM", *map(str, stale)], timeout=30)


async def _lines(kernel: Kernel, run: Run) -> AsyncIterator[bytes]:
    try:
        while True:
            line = await run.lines.get()
            if line is None:
                return
            yield line
    finally:
        kernel.abandon(run)  # the client left before the end (a no-op after it)


async def _body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > W.MAX_BODY_BYTES:
            raise W.TooLargeError(f"the request body is over {W.MAX_BODY_BYTES} bytes")
    return bytes(body)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


__all__ = ["Jupyter"]
