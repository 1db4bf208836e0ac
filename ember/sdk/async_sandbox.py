"""AsyncSandbox: the one implementation of the SDK (the blocking Sandbox wraps it)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ember.errors import EmberError, EmberTimeoutError, GuestError, SandboxStateError
from ember.locks import FileLock
from ember.paths import Paths
from ember.runtime.agent_client import AgentClient
from ember.runtime.manager import SandboxDir, SandboxManager, console_tail
from ember.runtime.spec import DEFAULT_TEMPLATE, DEFAULT_TIMEOUT_S, SandboxSpec
from ember.sdk.files import AsyncFiles
from ember.sdk.process import AsyncProcess, OutputCallback, exec_request
from ember.sdk.results import ExecResult, ProcessInfo, SandboxInfo
from ember.store import SandboxRecord

#: How long a client waits for another client of the same sandbox to disconnect.
CONNECT_WAIT_S = 30.0
DEFAULT_EXEC_TIMEOUT_S = 60.0

_managers: dict[Path, SandboxManager] = {}
_managers_lock = threading.Lock()


def manager(paths: Paths | None = None) -> SandboxManager:
    """The process-wide manager of one ember home (``EMBER_HOME`` by default)."""
    p = paths or Paths.from_env()
    with _managers_lock:
        if p.home not in _managers:
            _managers[p.home] = SandboxManager(p)
        return _managers[p.home]


def boot_timeout_for(accel: str) -> float:
    return 30.0 if accel == "kvm" else 180.0


def info_of(rec: SandboxRecord) -> SandboxInfo:
    return SandboxInfo(
        id=rec.id, template=rec.template, state=rec.state, vcpus=rec.vcpus,
        memory_mib=rec.memory_mib, disk_mib=rec.disk_mib, created_at=rec.created_at,
        expires_at=rec.expires_at, accel=rec.accel, metadata=dict(rec.metadata),
        error=rec.error,
    )


class AsyncSandbox:
    """A microVM sandbox. Create with ``await AsyncSandbox.create(...)``.

    ``async with await AsyncSandbox.create() as sb:`` destroys it on exit.
    """

    def __init__(self, mgr: SandboxManager, rec: SandboxRecord, lock: FileLock) -> None:
        self._mgr = mgr
        self._rec = rec
        self._lock = lock
        self._client: AgentClient | None = None
        self._killed = False
        self.files = AsyncFiles(self._require_client)

    # --- construction --------------------------------------------------------------------
    @classmethod
    async def create(
        cls,
        template: str = DEFAULT_TEMPLATE,
        *,
        vcpus: int = 1,
        memory_mib: int = 256,
        disk_mib: int | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        boot_timeout: float | None = None,
        on_progress: Callable[[str], None] | None = None,
        paths: Paths | None = None,
    ) -> AsyncSandbox:
        """Boot a new sandbox from ``template`` and return once its agent answers.

        ``timeout`` is the sandbox's lifetime in seconds (None: until destroyed).
        """
        spec = SandboxSpec(template=template, vcpus=vcpus, memory_mib=memory_mib,
                           disk_mib=disk_mib, timeout=timeout, env=dict(env or {}),
                           metadata=dict(metadata or {}))
        mgr = manager(paths)
        locks: list[FileLock] = []
        rec = await asyncio.to_thread(mgr.start, spec, locks, on_progress)
        sb = cls(mgr, rec, locks[0])
        try:
            if on_progress:
                on_progress("waiting for the guest agent")
            await sb._connect(boot_timeout or boot_timeout_for(rec.accel))
            mgr.mark_running(rec.id)
            sb._rec = mgr.store.get_sandbox(rec.id)
        except BaseException as err:
            tail = console_tail(rec)
            with contextlib.suppress(EmberError):
                mgr.destroy(rec.id)
            sb._lock.release()
            if isinstance(err, EmberError):
                raise type(err)(f"sandbox {rec.id} did not start: {err}\n--- console tail ---\n"
                                f"{tail[-1500:]}") from err
            raise
        return sb

    @classmethod
    async def connect(cls, sandbox_id: str, *, wait: float = CONNECT_WAIT_S,
                      paths: Paths | None = None) -> AsyncSandbox:
        """Attach to a running sandbox (created by this or another process)."""
        mgr = manager(paths)
        rec = await asyncio.to_thread(mgr.get, sandbox_id)
        if rec.state != "running":
            raise SandboxStateError(
                f"sandbox {sandbox_id} is {rec.state}" + (f": {rec.error}" if rec.error else ""))
        lock = FileLock(SandboxDir(Path(rec.dir)).lock)
        await asyncio.to_thread(lock.acquire, wait, f"sandbox {sandbox_id}")
        sb = cls(mgr, rec, lock)
        try:
            await sb._connect(30.0)
        except BaseException:
            lock.release()
            raise
        return sb

    @classmethod
    async def list(cls, *, paths: Paths | None = None) -> builtins.list[SandboxInfo]:
        mgr = manager(paths)
        return [info_of(r) for r in await asyncio.to_thread(mgr.list)]

    async def _connect(self, timeout: float) -> None:
        socket = str(SandboxDir(Path(self._rec.dir)).agent_socket)
        self._client = await AgentClient.connect(socket, timeout=timeout,
                                                 on_broken=self._on_broken)

    def _on_broken(self, why: str) -> None:
        if not self._killed:
            self._mgr.fail(self._rec.id, why)

    def _require_client(self) -> AgentClient:
        if self._killed:
            raise SandboxStateError(f"sandbox {self._rec.id} was destroyed")
        if self._client is None:
            raise SandboxStateError(f"sandbox {self._rec.id} is not connected")
        if self._client.broken:
            raise GuestError(f"sandbox {self._rec.id} failed: {self._client.broken}")
        return self._client

    # --- identity ------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._rec.id

    @property
    def sandbox_id(self) -> str:
        return self._rec.id

    async def info(self) -> SandboxInfo:
        return info_of(await asyncio.to_thread(self._mgr.get, self.id))

    async def logs(self) -> str:
        """The guest's console output (kernel and init messages)."""
        return console_tail(self._rec, limit=1 << 20)

    # --- commands ------------------------------------------------------------------------
    async def spawn(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, user: str | int | None = None,
                    stdin: bool = False,
                    timeout: float | None = DEFAULT_EXEC_TIMEOUT_S) -> AsyncProcess:
        """Start a command and return at once; stream with ``output()``, end with ``wait()``.

        A string runs through ``/bin/sh -c``; a list is executed directly.
        """
        merged = {**self._rec.env, **(env or {})}
        msg = exec_request(cmd, env=merged, cwd=cwd, user=user, stdin=stdin, timeout=timeout)
        return await AsyncProcess.start(self._require_client(), msg)

    async def exec(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | int | None = None,
                   stdin: bytes | str | None = None,
                   timeout: float | None = DEFAULT_EXEC_TIMEOUT_S,
                   on_stdout: OutputCallback | None = None,
                   on_stderr: OutputCallback | None = None) -> ExecResult:
        """Run a command to completion and return its exit code, output and duration.

        Raises CommandNotFoundError if the program does not exist, CommandTimeoutError when
        the command outlives ``timeout`` (it is killed). A non-zero exit is not an error:
        check ``result.exit_code`` or call ``result.check()``.
        """
        p = await self.spawn(cmd, env=env, cwd=cwd, user=user, stdin=stdin is not None,
                             timeout=timeout)
        if stdin is not None:
            await p.write_stdin(stdin)
            await p.close_stdin()
        return await p.wait(on_stdout, on_stderr)

    async def processes(self) -> builtins.list[ProcessInfo]:
        msg = await self._require_client().request({"op": "ps"}, what="ps")
        out = []
        procs: builtins.list[Any] = []
        if isinstance(msg.get("processes"), list):
            procs = msg["processes"]
        for p in procs:
            if isinstance(p, dict) and isinstance(p.get("pid"), int):
                raw = p.get("argv")
                argv: builtins.list[Any] = raw if isinstance(raw, list) else []
                out.append(ProcessInfo(int(p.get("stream", 0) or 0), p["pid"],
                                       tuple(str(a) for a in argv), p.get("running") is True))
        return out

    async def ping(self, timeout: float = 10.0) -> float:
        """Round trip to the guest agent, in seconds."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await self._require_client().request({"op": "ping"}, timeout=timeout, what="ping")
        return loop.time() - t0

    # --- lifetime ------------------------------------------------------------------------
    async def set_timeout(self, timeout: float | None) -> None:
        """Change the sandbox's remaining lifetime (seconds from now; None = no limit)."""
        await asyncio.to_thread(self._mgr.set_timeout, self.id, timeout)

    async def close(self) -> None:
        """Disconnect without destroying the sandbox (it keeps running)."""
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._lock.release()

    async def kill(self) -> None:
        """Destroy the sandbox: stop its VM and remove its disk, sockets and registry row."""
        if self._killed:
            return
        self._killed = True
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None
        try:
            await asyncio.to_thread(self._mgr.destroy, self.id)
        except EmberError as err:
            if "no sandbox" not in str(err):
                raise
        finally:
            self._lock.release()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.kill()

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} template={self._rec.template}>"


__all__ = ["AsyncSandbox", "EmberTimeoutError", "manager"]
