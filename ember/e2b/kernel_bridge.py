"""ember's kernel bridge: runs in the guest, with the guest's own ``python3``, and drives
one Jupyter kernel (ipykernel, through ``jupyter_client``) for one code-interpreter
context. The daemon starts it through the agent's exec and talks to it over its stdin and
stdout, one JSON object per line; the guest runs no HTTP server.

In (stdin)::

    {"op": "execute", "id": 7, "code": "...", "env": {"K": "V"} | null}
    {"op": "cancel", "id": 7}    interrupt it if it runs, drop it if it waits
    {"op": "restart"}            a fresh kernel (running and waiting executions end)

Out (stdout)::

    {"ev": "ready", "pid": <kernel pid>}                   after start and each restart
    {"ev": "out", "id": 7, "line": {E2B's line object}}    stdout, stderr, result, error, ...
    {"ev": "done", "id": 7}                                 the execution ended
    {"ev": "fatal", "message": "..."}                       before exiting with status 1

End of stdin shuts the kernel down and ends the bridge. ``line`` objects are what E2B's
code interpreter streams from ``/execute`` (``type``: stdout, stderr, result, error,
number_of_executions, end_of_execution); :func:`e2b_line` makes them from the kernel's
iopub messages, without I/O, so that the host tests it without a kernel. This file needs
only the standard library and, when run, ``jupyter_client`` (imported in :func:`main`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import sys
import tempfile
import time
from typing import Any

#: Kernel start (and restart) deadline: a cold ipykernel under TCG takes seconds.
START_TIMEOUT_S = 180.0
#: A request line from the daemon (it bounds code far below this itself).
MAX_REQUEST_LINE = 16 << 20
#: The most characters of stdout or stderr one line carries.
MAX_STREAM_CHARS = 1 << 20
#: How often a quiet execution checks that its kernel is still alive.
ALIVE_CHECK_S = 2.0
#: MIME types of a Jupyter display bundle and the fields of E2B's ``Result`` they fill.
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
}
#: Every ``type`` a line may have (the SDK's parser ignores the last two).
LINE_TYPES = ("stdout", "stderr", "result", "error", "number_of_executions",
              "end_of_execution", "unexpected_end_of_execution")


def _text(value: Any) -> str:
    """Jupyter allows a MIME value as a list of lines."""
    if isinstance(value, list):
        return "".join(str(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)


def result_line(data: dict[str, Any], *, main: bool) -> dict[str, Any]:
    """E2B's ``result`` line from a display bundle (``execute_result`` is the main one)."""
    line: dict[str, Any] = {"type": "result", "is_main_result": main}
    extra: dict[str, Any] = {}
    for mime, value in data.items():
        field = MIME_FIELDS.get(mime)
        if field == "json":
            line["json"] = value if isinstance(value, dict) else {"value": value}
        elif field is not None:
            line[field] = _text(value).rstrip("\n") if field == "png" else _text(value)
        else:
            extra[str(mime)] = value
    if extra:
        line["extra"] = extra
    return line


def e2b_line(msg: dict[str, Any], now_ns: int) -> dict[str, Any] | None:
    """The line an iopub message becomes, or None for those E2B's stream does not carry
    (status, clear_output, comms, ...)."""
    kind = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
    content = msg.get("content")
    if not isinstance(content, dict):
        return None
    if kind == "stream":
        name = "stderr" if content.get("name") == "stderr" else "stdout"
        return {"type": name, "text": _text(content.get("text", "")), "timestamp": now_ns}
    if kind in ("execute_result", "display_data"):
        data = content.get("data")
        if not isinstance(data, dict) or not data:
            return None
        return result_line(data, main=kind == "execute_result")
    if kind == "error":
        tb = content.get("traceback")
        return {"type": "error", "name": _text(content.get("ename", "")),
                "value": _text(content.get("evalue", "")),
                "traceback": "\n".join(str(t) for t in tb) if isinstance(tb, list) else ""}
    if kind == "execute_input":
        count = content.get("execution_count")
        if isinstance(count, int):
            return {"type": "number_of_executions", "execution_count": count}
    return None


def split_stream(line: dict[str, Any]) -> list[dict[str, Any]]:
    """A long stdout or stderr text as several lines (each well under the daemon's bound
    on one line, whatever the text's escaping costs)."""
    text = line.get("text")
    if not isinstance(text, str) or len(text) <= MAX_STREAM_CHARS:
        return [line]
    return [{**line, "text": text[i:i + MAX_STREAM_CHARS]}
            for i in range(0, len(text), MAX_STREAM_CHARS)]


def error_line(name: str, value: str) -> dict[str, Any]:
    return {"type": "error", "name": name, "value": value, "traceback": f"{name}: {value}"}


def env_code(env: dict[str, str]) -> str:
    """Kernel code that sets ``env`` for one execution and keeps what it replaced (run
    silently: no history, no count), undone by :data:`RESTORE_ENV_CODE`."""
    return ("import os as _ember_os, json as _ember_json\n"
            f"_ember_env = _ember_json.loads({json.dumps(json.dumps(env))})\n"
            "_ember_env_saved = {k: _ember_os.environ.get(k) for k in _ember_env}\n"
            "_ember_os.environ.update(_ember_env)\n"
            "del _ember_env, _ember_json\n")


RESTORE_ENV_CODE = (
    "for _ember_k, _ember_v in _ember_env_saved.items():\n"
    "    if _ember_v is None:\n"
    "        _ember_os.environ.pop(_ember_k, None)\n"
    "    else:\n"
    "        _ember_os.environ[_ember_k] = _ember_v\n"
    "del _ember_env_saved, _ember_os\n"
    "try:\n"
    "    del _ember_k, _ember_v\n"
    "except NameError:\n"
    "    pass\n")


def parse_request(raw: bytes) -> dict[str, Any]:
    """A request line, checked (ValueError otherwise)."""
    req = json.loads(raw)
    if not isinstance(req, dict):
        raise ValueError("a request is a JSON object")
    op = req.get("op")
    if op == "restart":
        return {"op": op}
    if not isinstance(req.get("id"), int) or isinstance(req.get("id"), bool):
        raise ValueError(f"{op!r} needs an integer id")
    if op == "cancel":
        return {"op": op, "id": req["id"]}
    if op != "execute":
        raise ValueError(f"unknown op {op!r}")
    env = req.get("env")
    if not isinstance(req.get("code"), str):
        raise ValueError("execute needs code (a string)")
    if env is not None and not (isinstance(env, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise ValueError("env maps strings to strings")
    return {"op": op, "id": req["id"], "code": req["code"], "env": env or None}


def blas_core_override(cpuinfo: str) -> bool:
    """Whether OpenBLAS must be told its kernels: on QEMU's bare ``qemu64`` CPU (TCG, no
    SSSE3) it picks its Opteron kernels, whose 3DNow! ``femms`` TCG does not emulate, and
    numpy's first matrix product (matplotlib's first plot) dies of SIGILL. Prescott's
    kernels need only SSE3. Every real x86-64 CPU of the last 15 years has SSSE3."""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), None)
    return flags is not None and "ssse3" not in flags and "3dnow" not in flags


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Bridge:
    """One kernel, its executions one at a time in the order asked."""

    def __init__(self, jupyter_client: Any, cwd: str) -> None:
        self.jc = jupyter_client
        self.cwd = cwd
        self.km: Any = None
        self.kc: Any = None
        self.pending: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.cancelled: set[int] = set()
        self.current: tuple[int, asyncio.Task[None]] | None = None
        #: The last execution the worker took up (ids grow): a cancel naming an earlier
        #: one comes too late and is ignored.
        self.last_started = -1
        self.kernel_lock = asyncio.Lock()

    async def start(self) -> None:
        self.km = self.jc.AsyncKernelManager(kernel_name="python3")
        await self.km.start_kernel(cwd=self.cwd)
        await self._connect()

    async def _connect(self) -> None:
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=START_TIMEOUT_S)
        emit({"ev": "ready", "pid": getattr(self.km.provisioner, "pid", None)})

    async def restart(self) -> None:
        for ex in self._drain():
            emit({"ev": "out", "id": ex["id"], "line": error_line(
                "ContextRestarted", "the context was restarted before this code ran")})
            emit({"ev": "done", "id": ex["id"]})
        if self.current is not None:
            self.current[1].cancel()
        async with self.kernel_lock:
            self.kc.stop_channels()
            await self.km.restart_kernel(now=True)
            await self._connect()

    def _drain(self) -> list[dict[str, Any]]:
        out = []
        while not self.pending.empty():
            out.append(self.pending.get_nowait())
        return out

    async def cancel(self, ex_id: int) -> None:
        if self.current is not None and self.current[0] == ex_id:
            await self.km.interrupt_kernel()
        elif ex_id > self.last_started:
            self.cancelled.add(ex_id)

    async def worker(self) -> None:
        while True:
            ex = await self.pending.get()
            self.last_started = max(self.last_started, ex["id"])
            if ex["id"] in self.cancelled:
                self.cancelled.discard(ex["id"])
                emit({"ev": "done", "id": ex["id"]})
                continue
            async with self.kernel_lock:
                task = asyncio.ensure_future(self.execute(ex))
                self.current = (ex["id"], task)
                try:
                    await task
                except asyncio.CancelledError:
                    if not task.cancelled():
                        raise  # the worker itself is being cancelled
                    emit({"ev": "out", "id": ex["id"], "line": error_line(
                        "ContextRestarted", "the context was restarted while this code ran")})
                finally:
                    self.current = None
                emit({"ev": "out", "id": ex["id"], "line": {"type": "end_of_execution"}})
                emit({"ev": "done", "id": ex["id"]})

    async def execute(self, ex: dict[str, Any]) -> None:
        kc = self.kc
        if ex["env"]:
            await kc.execute(env_code(ex["env"]), silent=True, store_history=False,
                             reply=True, timeout=60)
        msg_id = kc.execute(ex["code"], store_history=True, allow_stdin=False,
                            stop_on_error=True)
        restore = bool(ex["env"])
        try:
            while True:
                try:
                    msg = await kc.get_iopub_msg(timeout=ALIVE_CHECK_S)
                except Exception:  # queue.Empty: quiet; is the kernel still there?
                    if not await self.km.is_alive():
                        restore = False
                        emit({"ev": "out", "id": ex["id"], "line": error_line(
                            "KernelDied", "the kernel died; the context was restarted and "
                            "its state is lost")})
                        self.kc.stop_channels()
                        await self.km.restart_kernel(now=True)
                        await self._connect()
                        return
                    continue
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if msg.get("msg_type") == "status" and \
                        msg.get("content", {}).get("execution_state") == "idle":
                    break
                line = e2b_line(msg, time.time_ns())
                for part in split_stream(line) if line is not None else ():
                    emit({"ev": "out", "id": ex["id"], "line": part})
            # the shell reply (read so that replies do not pile up in the socket)
            with contextlib.suppress(Exception):
                await kc._async_recv_reply(msg_id, timeout=10)
        except asyncio.CancelledError:
            restore = False  # a restart: the kernel and its environment go
            raise
        finally:
            if restore:
                with contextlib.suppress(Exception):
                    await kc.execute(RESTORE_ENV_CODE, silent=True, store_history=False,
                                     reply=True, timeout=60)

    async def reader(self) -> None:
        loop = asyncio.get_running_loop()
        stream = asyncio.StreamReader(limit=MAX_REQUEST_LINE)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), sys.stdin)
        while True:
            raw = await stream.readline()
            if not raw:
                return
            try:
                req = parse_request(raw)
            except ValueError as err:
                print(f"kernel bridge: a bad request: {err}", file=sys.stderr, flush=True)
                continue
            if req["op"] == "execute":
                self.pending.put_nowait(req)
            elif req["op"] == "cancel":
                await self.cancel(req["id"])
            else:
                await self.restart()


async def run(cwd: str) -> None:
    os.environ.setdefault("JUPYTER_RUNTIME_DIR", tempfile.mkdtemp(prefix="ember-jupyter-"))
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # debugpy's start warning
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpuinfo = f.read(1 << 16)
        if blas_core_override(cpuinfo):
            os.environ.setdefault("OPENBLAS_CORETYPE", "Prescott")
    os.makedirs(cwd, exist_ok=True)
    try:
        jupyter_client = importlib.import_module("jupyter_client")
        bridge = Bridge(jupyter_client, cwd)
        await bridge.start()
    except Exception as err:
        emit({"ev": "fatal", "message": f"the Jupyter kernel did not start: "
              f"{type(err).__name__}: {err}"})
        raise SystemExit(1) from err
    worker = asyncio.ensure_future(bridge.worker())
    try:
        await bridge.reader()
    finally:
        worker.cancel()
        with contextlib.suppress(BaseException):
            await worker
        with contextlib.suppress(Exception):
            bridge.kc.stop_channels()
            await bridge.km.shutdown_kernel(now=True)


def main(argv: list[str]) -> None:
    asyncio.run(run(argv[1] if len(argv) > 1 else os.getcwd()))


if __name__ == "__main__":
    main(sys.argv)
