"""A command running in a sandbox: stream its output, feed its stdin, signal it, wait for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal

from ember import protocol as P
from ember.errors import (
    BadRequestError,
    CommandNotFoundError,
    CommandTimeoutError,
    EmberTimeoutError,
    ProtocolError,
)
from ember.runtime.agent_client import AgentClient, error_from_reply, reply_of
from ember.sdk.results import ExecResult, OutputChunk

#: Output kept per stream in an ExecResult; beyond it output is dropped (``truncated``).
MAX_OUTPUT_BYTES = 64 << 20
#: How long past a command's own timeout the host waits for the guest to report its end.
TIMEOUT_GRACE_S = 15.0

OutputCallback = Callable[[str], Any]


def exec_request(cmd: str | Sequence[str], *, env: Mapping[str, str] | None, cwd: str | None,
                 user: str | int | None, stdin: bool, timeout: float | None,
                 pty: tuple[int, int] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "exec", "stdin": stdin, "timeout": timeout}
    if pty is not None:
        rows, cols = check_size(*pty)
        msg["pty"] = {"rows": rows, "cols": cols}
    checked = check_cmd(cmd)
    msg["shell" if isinstance(checked, str) else "argv"] = checked
    if env:
        msg["env"] = dict(env)
    if cwd is not None:
        msg["cwd"] = cwd
    if user is not None:
        msg["user"] = user
    if timeout is not None and not 0 < timeout <= 86400 * 7:
        raise BadRequestError(f"timeout must be positive, got {timeout!r}")
    return msg


def check_cmd(cmd: str | Sequence[str]) -> str | list[str]:
    """A command as given: a non-blank string (for /bin/sh -c) or a non-empty argv list."""
    if isinstance(cmd, str):
        if not cmd.strip():
            raise BadRequestError("empty command")
        return cmd
    argv = list(cmd)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise BadRequestError("command must be a non-empty string or list of strings")
    return argv


def check_size(rows: int, cols: int) -> tuple[int, int]:
    """A terminal size the agent accepts (1 to 1000 each way)."""
    for v in (rows, cols):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1000:
            raise BadRequestError(f"terminal size must be 1..1000 rows and columns, not "
                                  f"{rows!r}x{cols!r}")
    return rows, cols


class AsyncProcess:
    """Handle of one command started with :meth:`AsyncSandbox.spawn`."""

    def __init__(self, client: AgentClient, sid: int, pid: int, timeout: float | None,
                 label: str, *, keep_output: bool = True) -> None:
        self._client = client
        self._sid = sid
        self._track(pid, timeout, label, keep_output)

    def _track(self, pid: int, timeout: float | None, label: str, keep_output: bool) -> None:
        """What every process handle keeps, wherever its output comes from."""
        self.pid = pid
        self._timeout = timeout
        self._label = label
        self._start = time.monotonic()
        self._out = bytearray()
        self._err = bytearray()
        self._truncated = False
        #: False where the output only passes through (the daemon streams it to a client,
        #: which keeps it): the result then carries none.
        self._keep = keep_output
        self._result: ExecResult | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, client: AgentClient, msg: dict[str, Any], *,
                    keep_output: bool = True) -> AsyncProcess:
        sid = client.open_stream(lossy=True)  # a background command's output may go unread
        label = msg.get("shell") or " ".join(msg.get("argv", []))
        try:
            await client.send_msg(sid, msg)
            frame = await client.next_frame(sid, 60.0)
            reply = reply_of(sid, frame)
            if reply["op"] == "error":
                err = error_from_reply(reply, f"exec {label!r}")
                if reply.get("kind") == "not_found" and "argv" in msg:
                    raise CommandNotFoundError(str(err)) from None
                raise err
            if reply["op"] != "started" or not isinstance(reply.get("pid"), int):
                raise ProtocolError(f"expected 'started' from the agent, got {reply['op']!r}")
        except BaseException:
            client.close_stream(sid)
            raise
        return cls(client, sid, int(reply["pid"]), msg.get("timeout"), str(label)[:200],
                   keep_output=keep_output)

    # --- input and signals ---------------------------------------------------------------
    async def write_stdin(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        await self._client.send_data(self._sid, P.Kind.STDIN, data)

    async def close_stdin(self) -> None:
        await self._client.send_msg(self._sid, {"op": "stdin_eof"})

    async def signal(self, signum: int) -> None:
        await self._client.request({"op": "signal", "target": self._sid, "signal": int(signum)},
                                   what=f"signal {self._label!r}")

    async def kill(self) -> None:
        await self.signal(9)

    async def resize(self, rows: int, cols: int) -> None:
        """A new size for the terminal of a command started on one (``pty``)."""
        rows, cols = check_size(rows, cols)
        await self._client.request({"op": "resize", "target": self._sid, "rows": rows,
                                    "cols": cols}, what=f"resize {self._label!r}")

    # --- output --------------------------------------------------------------------------
    async def output(self) -> AsyncIterator[OutputChunk]:
        """Yield stdout and stderr chunks as the guest produces them, until the command ends."""
        async with self._lock:
            while self._result is None:
                chunk = await self._next()
                if chunk is not None:
                    yield chunk

    async def wait(self, on_stdout: OutputCallback | None = None,
                   on_stderr: OutputCallback | None = None) -> ExecResult:
        """Wait for the command to end and return its result (calling the callbacks per chunk)."""
        async for chunk in self.output():
            cb = on_stdout if chunk.stream == "stdout" else on_stderr
            if cb is not None:
                r = cb(chunk.text)
                if asyncio.iscoroutine(r):
                    await r
        assert self._result is not None
        if self._result.timed_out:
            raise CommandTimeoutError(
                f"command {self._label!r} exceeded its timeout of {self._timeout} s and was "
                "killed", self._result)
        return self._result

    async def _next(self) -> OutputChunk | None:
        wait = None if self._timeout is None else self._timeout + TIMEOUT_GRACE_S
        try:
            frame = await self._client.next_frame(self._sid, wait)
        except EmberTimeoutError:
            self._client.close_stream(self._sid)
            raise EmberTimeoutError(
                f"the guest did not report the end of {self._label!r} within its timeout "
                f"plus {TIMEOUT_GRACE_S} s") from None
        if frame.kind in (P.Kind.STDOUT, P.Kind.STDERR):
            name: Literal["stdout", "stderr"] = (
                "stdout" if frame.kind == P.Kind.STDOUT else "stderr")
            return self._keep_chunk(name, frame.payload)
        if frame.kind != P.Kind.MSG:
            raise ProtocolError(f"unexpected frame kind {frame.kind} on an exec stream")
        msg = reply_of(self._sid, frame)
        if msg["op"] == "exit":
            self._finish(msg)
            return None
        if msg["op"] == "error":
            self._client.close_stream(self._sid)
            raise error_from_reply(msg, f"exec {self._label!r}")
        raise ProtocolError(f"unexpected message {msg['op']!r} on an exec stream")

    def _finish(self, msg: dict[str, Any]) -> None:
        sig = msg.get("signal")
        code = msg.get("code")
        sig = sig if isinstance(sig, int) and not isinstance(sig, bool) and 0 < sig < 128 else None
        if sig is not None:
            exit_code = 128 + sig
        elif isinstance(code, int) and not isinstance(code, bool) and 0 <= code <= 255:
            exit_code = code
        else:
            raise ProtocolError(f"invalid exit message from the guest: {msg!r:.200}")
        self._conclude(exit_code, sig, timed_out=msg.get("timed_out") is True,
                       dropped=self._client.dropped_bytes(self._sid) > 0)
        self._client.close_stream(self._sid)

    def _keep_chunk(self, stream: Literal["stdout", "stderr"], data: bytes) -> OutputChunk:
        """Keep what fits of a chunk of output (bounded per stream) and pass it on."""
        if self._keep:
            buf = self._out if stream == "stdout" else self._err
            room = MAX_OUTPUT_BYTES - len(buf)
            if len(data) > room:
                self._truncated = True
            buf += data[:max(room, 0)]
        return OutputChunk(stream, data)

    def _conclude(self, exit_code: int, signal: int | None, *, timed_out: bool,
                  dropped: bool) -> None:
        """The command ended: its result, with what was kept of its output."""
        self._result = ExecResult(
            exit_code=exit_code, stdout_bytes=bytes(self._out), stderr_bytes=bytes(self._err),
            duration=time.monotonic() - self._start, pid=self.pid, signal=signal,
            timed_out=timed_out, truncated=self._truncated or dropped)

    @property
    def result(self) -> ExecResult | None:
        return self._result
