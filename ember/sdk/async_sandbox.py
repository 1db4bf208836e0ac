"""AsyncSandbox: the SDK's API (the blocking Sandbox wraps it).

Its class methods send each operation to a daemon (:mod:`ember.sdk.remote`) or, in the
daemon itself and with ``EMBER_LOCAL=1``, to the home's operations in this process
(:mod:`ember.sdk.local`); an instance is then a sandbox's agent connection held here.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import functools
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from ember.errors import (
    BadRequestError,
    EmberError,
    EmberTimeoutError,
    GuestError,
    ProtocolError,
    SandboxLostError,
    SandboxNotFoundError,
    SandboxStateError,
    TemplateNotFoundError,
)
from ember.kinds import Boot, Isolation, OnTimeout, SandboxState
from ember.locks import FileLock
from ember.net.policy import NetworkPolicy
from ember.net.stats import NetworkStats
from ember.paths import Paths
from ember.runtime.agent_client import AgentClient
from ember.runtime.exec_defaults import ExecDefaults, exec_defaults
from ember.runtime.guest_port import GuestConnection
from ember.runtime.manager import SandboxDir, SandboxManager, console_tail
from ember.runtime.spec import DEFAULT_TEMPLATE, DEFAULT_TIMEOUT_S, SandboxSpec
from ember.sdk.files import AsyncFiles
from ember.sdk.network import AsyncNetwork
from ember.sdk.process import AsyncProcess, OutputCallback, exec_request
from ember.sdk.pty import LOGIN_SHELL, AsyncPty
from ember.sdk.results import (
    ExecResult,
    ExposedPort,
    PoolInfo,
    ProcessInfo,
    PruneInfo,
    SandboxInfo,
    SandboxUsage,
    SnapshotInfo,
    TemplateInfo,
    snapshot_ref,
)
from ember.sdk.verbs import AsyncVerb, ByIdOrSelf
from ember.store import SandboxRecord, SnapshotRecord
from ember.store.records import RESERVED_PREFIX, TENANT_KEY

if TYPE_CHECKING:
    from ember.sdk.local import Local
    from ember.sdk.remote import Transport

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


MAX_FORK = 64


def snapshot_info(rec: SnapshotRecord, pause_s: float | None = None) -> SnapshotInfo:
    return SnapshotInfo(
        id=rec.id, name=rec.name, template=rec.template, vcpus=rec.vcpus,
        memory_mib=rec.memory_mib, disk_mib=rec.disk_mib, size_bytes=rec.size_bytes,
        created_at=rec.created_at, source=rec.source, ram_file=rec.ram_file, pause_s=pause_s)


_PORTS_NEED_THE_DAEMON = (
    "exposed ports are served by ember's daemon, and this process runs the sandbox "
    "in-process (EMBER_LOCAL=1 or paths= without a daemon): create and use it through the "
    "daemon (the default) to expose ports")


def info_of(rec: SandboxRecord) -> SandboxInfo:
    return SandboxInfo(
        id=rec.id, template=rec.template, state=cast(SandboxState, rec.state), vcpus=rec.vcpus,
        memory_mib=rec.memory_mib, disk_mib=rec.disk_mib, created_at=rec.created_at,
        expires_at=rec.expires_at, accel=rec.accel, error=rec.error, snapshot=rec.snapshot,
        metadata={k: v for k, v in rec.metadata.items() if not k.startswith(RESERVED_PREFIX)},
        isolation=cast(Isolation, rec.isolation), tenant=rec.metadata.get(TENANT_KEY),
        network=None if rec.network is None else NetworkPolicy.from_json(rec.network),
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
        self._paused = False
        self._defaults: ExecDefaults | None = None
        self.files = AsyncFiles(self._require_client)
        self.network = AsyncNetwork(self)

    # --- construction --------------------------------------------------------------------
    @classmethod
    async def create(
        cls,
        template: str = DEFAULT_TEMPLATE,
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        disk_mib: int | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        boot_timeout: float | None = None,
        on_progress: Callable[[str], None] | None = None,
        paths: Paths | None = None,
        on_timeout: OnTimeout = "destroy",
        isolation: Isolation = "microvm",
        url: str | None = None,
        api_key: str | None = None,
        boot: Boot = "auto",
        network: NetworkPolicy | Mapping[str, Any] | None = None,
    ) -> AsyncSandbox:
        """Start a new sandbox from ``template`` and return once its agent answers.

        ``vcpus`` and ``memory_mib`` default to 1 and 256 (a pre-baked template: the size
        it was baked with). ``timeout`` is the sandbox's lifetime in seconds (None: until
        destroyed); when it ends the sandbox is destroyed, or paused with
        ``on_timeout="pause"`` (resume() it to go on). A ready sandbox is taken from a warm
        pool of that template and size when there is one; a pre-baked template is restored
        from its snapshot; anything else is restored from the template snapshot of its
        template and size (a booted, idle guest that the first create of that template and
        size makes: it boots, and is snapshotted before it is handed over).
        ``boot="cold"`` always boots the kernel (no pool, no snapshot).

        ``network``: None (the default) gives the guest no NIC at all. A
        :class:`~ember.NetworkPolicy` (or its JSON form, ``{"internet": bool, "allow":
        [CIDR...], "deny": [CIDR...]}``) gives it one whose egress the policy decides;
        private, link-local, metadata and host addresses stay unreachable unless allowed
        by CIDR (docs/networking.md). Change it later with :meth:`set_network`.

        ``isolation`` chooses the boundary: ``"microvm"`` (the default: its own kernel),
        ``"gvisor"`` (gVisor's user-space kernel) or ``"container"`` (the host's kernel
        behind namespaces, seccomp and cgroups); the weaker tiers start faster and have
        no snapshot or fork (docs/isolation.md). A tier this
        host cannot run raises :class:`~ember.errors.TierUnavailableError` naming the cause
        and the fix.

        ``url`` (or ``EMBER_URL``) sends every operation to an ember daemon instead of
        running in this process: ``unix:///var/lib/ember/emberd.sock`` or
        ``http://host:8700``, with ``api_key`` (or ``EMBER_API_KEY``). The API and the
        errors are the same either way.
        """
        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).create(
                template, vcpus=vcpus, memory_mib=memory_mib, disk_mib=disk_mib,
                timeout=timeout, env=env, metadata=metadata, boot_timeout=boot_timeout,
                on_progress=on_progress, on_timeout=on_timeout, isolation=isolation, boot=boot,
                network=network)
        if on_progress:
            on_progress(f"creating through the daemon at {t.url}")
        body = {"template": template, "vcpus": vcpus, "memory_mib": memory_mib,
                "disk_mib": disk_mib, "timeout": timeout, "env": dict(env or {}),
                "metadata": dict(metadata or {}), "boot_timeout": boot_timeout,
                "on_timeout": on_timeout, "isolation": isolation, "boot": boot,
                "network": None if network is None else
                NetworkPolicy.from_json(network).to_json()}
        return await _remote_sandbox(t, "POST", "/sandboxes", body)

    @classmethod
    async def restore(cls, snapshot: str | SnapshotInfo, *,
                      timeout: float | None = DEFAULT_TIMEOUT_S,
                      env: Mapping[str, str] | None = None,
                      metadata: Mapping[str, str] | None = None,
                      boot_timeout: float | None = None,
                      on_progress: Callable[[str], None] | None = None,
                      paths: Paths | None = None,
                      on_timeout: OnTimeout = "destroy",
                      url: str | None = None, api_key: str | None = None) -> AsyncSandbox:
        """A new sandbox restored from ``snapshot`` (name, id, or what :meth:`snapshot`
        returned): files, memory and running processes as they were, with its own id,
        hostname, disk overlay, RNG and clock.

        Raises SnapshotNotFoundError, or SnapshotError if it is corrupt or was taken with
        another kernel, template, QEMU build or accelerator (nothing is left behind).
        """
        ref = snapshot_ref(snapshot)
        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).restore(ref, timeout=timeout, env=env,
                                               metadata=metadata, boot_timeout=boot_timeout,
                                               on_progress=on_progress, on_timeout=on_timeout)
        body = {"timeout": timeout, "env": dict(env or {}), "metadata": dict(metadata or {}),
                "boot_timeout": boot_timeout, "on_timeout": on_timeout}
        return await _remote_sandbox(t, "POST", f"/snapshots/{_seg(ref)}/restore", body)

    @classmethod
    async def connect(cls, sandbox_id: str, *, wait: float = CONNECT_WAIT_S,
                      paths: Paths | None = None, url: str | None = None,
                      api_key: str | None = None) -> AsyncSandbox:
        """Attach to a running sandbox (created by this or another process)."""
        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).connect(sandbox_id, wait=wait)
        return await _remote_sandbox(t, "GET", f"/sandboxes/{_seg(sandbox_id)}", None,
                                     running=True)

    @classmethod
    async def list(cls, *, paths: Paths | None = None, url: str | None = None,
                   api_key: str | None = None) -> builtins.list[SandboxInfo]:
        """Every sandbox this caller may see (all of the home's, for its administrator)."""
        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).list()
        from ember.sdk.wire import sandbox_info

        async with _closing(t):
            return [sandbox_info(i) for i in await t.call("GET", "/sandboxes")]

    async def _connect(self, timeout: float, *, resync: bool = False) -> None:
        """Connect to the agent; ``resync`` when it has served another client before (which
        may have died mid-frame)."""
        socket = str(SandboxDir(Path(self._rec.dir)).agent_socket)
        self._client = await AgentClient.connect(socket, timeout=timeout,
                                                 on_broken=self._on_broken,
                                                 hostname=self._rec.id, resync=resync)
        self._client.watch = self._fate

    def _on_broken(self, why: str) -> str | None:
        """The connection broke: fail the sandbox, and say why in the caller's words when
        the registry knows better (its lifetime ended, another process destroyed it)."""
        if self._killed:
            return None
        fate = self._fate()
        self._mgr.fail(self._rec.id, why)
        if fate is None:  # no reason known: the guest's last words, if its VM is gone
            with contextlib.suppress(EmberError):
                if self._mgr.store.get_sandbox(self._rec.id).state == "failed":
                    tail = " ".join(console_tail(self._rec, limit=600).split())
                    if tail:
                        fate = f"sandbox {self._rec.id} failed; its console ends: ...{tail}"
        return fate

    def _fate(self) -> str | None:
        """Why this sandbox cannot answer any more, from the registry (None: no reason
        known; it should be answering). Asked while a caller waits on the guest."""
        sid = self._rec.id
        try:
            rec = self._mgr.store.get_sandbox(sid)
        except SandboxNotFoundError:
            exp = self._rec.expires_at
            if exp is not None and time.time() >= exp - 1.0:
                return (f"sandbox {sid} reached the end of its lifetime "
                        f"({self._rec.timeout_s:g} s) and was destroyed")
            return f"sandbox {sid} was destroyed (by another process)"
        self._rec = rec
        if rec.expires_at is not None and time.time() >= rec.expires_at - 1.0 \
                and rec.on_timeout == "destroy":  # the reaper is destroying it right now
            return (f"sandbox {sid} reached the end of its lifetime "
                    f"({rec.timeout_s:g} s) and was destroyed")
        if rec.state == "paused" and not self._paused:
            return f"sandbox {sid} was paused: {rec.error or 'by another process'}"
        if rec.state == "failed":
            return f"sandbox {sid} failed: {rec.error}"
        return None

    def _require_client(self) -> AgentClient:
        if self._killed:
            raise SandboxStateError(f"sandbox {self._rec.id} was destroyed")
        if self._paused:
            raise SandboxStateError(f"sandbox {self._rec.id} is paused; call resume() first")
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

    @classmethod
    async def get_info(cls, sandbox_id: str, *, paths: Paths | None = None,
                       url: str | None = None, api_key: str | None = None) -> SandboxInfo:
        """A sandbox's state, in any state, without connecting to it."""
        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).get_info(sandbox_id)
        from ember.sdk.wire import sandbox_info

        async with _closing(t):
            return sandbox_info(await t.call("GET", f"/sandboxes/{_seg(sandbox_id)}"))

    #: ``await sb.logs()``, or ``await AsyncSandbox.logs(id)`` for a sandbox in any state:
    #: the guest's console output (kernel and init messages).
    logs = ByIdOrSelf[AsyncVerb[str]]()

    async def _logs_self(self) -> str:
        return console_tail(self._rec, limit=1 << 20)

    @classmethod
    async def _logs_id(cls, sandbox_id: str, *, paths: Paths | None = None,
                       url: str | None = None, api_key: str | None = None) -> str:
        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).logs(sandbox_id)
        async with _closing(t):
            return str(await t.call("GET", f"/sandboxes/{_seg(sandbox_id)}/logs") or "")

    # --- commands ------------------------------------------------------------------------
    async def spawn(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, user: str | int | None = None,
                    stdin: bool = False,
                    timeout: float | None = DEFAULT_EXEC_TIMEOUT_S) -> AsyncProcess:
        """Start a command and return at once; stream with ``output()``, end with ``wait()``.

        A string runs through ``/bin/sh -c``; a list is executed directly.
        """
        return await self._spawn(cmd, env=env, cwd=cwd, user=user, stdin=stdin,
                                 timeout=timeout)

    async def _spawn(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None,
                     cwd: str | None, user: str | int | None, stdin: bool,
                     timeout: float | None, keep_output: bool = True,
                     pty: tuple[int, int] | None = None) -> AsyncProcess:
        # the template image's ENV, WORKDIR and USER (docs/images.md), under the
        # sandbox's env and the caller's env, cwd and user
        merged, cwd, user = self._exec_defaults().apply({**self._rec.env, **(env or {})},
                                                       cwd, user)
        msg = exec_request(cmd, env=merged, cwd=cwd, user=user, stdin=stdin, timeout=timeout,
                           pty=pty)
        return await AsyncProcess.start(self._require_client(), msg, keep_output=keep_output)

    def _exec_defaults(self) -> ExecDefaults:
        """What the sandbox's template image says commands run with (env, working
        directory, user; read once)."""
        if self._defaults is None:
            try:
                config = self._mgr.store.get_template(self._rec.template).config
            except TemplateNotFoundError:  # removed since: ember's own defaults
                config = {}
            self._defaults = exec_defaults(config)
        return self._defaults

    async def _connect_port(self, port: int) -> GuestConnection:
        """A TCP connection to ``port`` on the guest's loopback, carried by the agent (no
        network device needed); :class:`PortNotOpenError` when nothing listens there."""
        return await GuestConnection.open(self._require_client(), port)

    async def pty(self, cmd: str | Sequence[str] | None = None, *, rows: int = 24,
                  cols: int = 80, env: Mapping[str, str] | None = None, cwd: str | None = None,
                  user: str | int | None = None) -> AsyncPty:
        """Start ``cmd`` (default: a login shell) on a new terminal of ``rows`` x ``cols``
        in the guest; write keys to it, read what it shows, resize it (:class:`AsyncPty`).
        It has no timeout: it ends when its command does (or with ``kill()``)."""
        proc = await self._spawn(cmd if cmd is not None else LOGIN_SHELL, env=env, cwd=cwd,
                                 user=user, stdin=True, timeout=None, keep_output=False,
                                 pty=(rows, cols))
        return AsyncPty(proc)

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

    # --- pause, snapshot, fork ------------------------------------------------------------
    #: ``await sb.pause()`` or ``await AsyncSandbox.pause(id)``: stop the guest's vCPUs
    #: (memory, processes and connections stay). Commands and file operations raise
    #: SandboxStateError until it is resumed.
    pause = ByIdOrSelf[AsyncVerb[None]]()
    #: ``await sb.resume()`` or ``await AsyncSandbox.resume(id)``: continue a paused guest.
    resume = ByIdOrSelf[AsyncVerb[None]]()

    @classmethod
    async def _pause_id(cls, sandbox_id: str, *, paths: Paths | None = None,
                        url: str | None = None, api_key: str | None = None) -> None:
        await cls._by_id("pause", sandbox_id, paths, url, api_key)

    @classmethod
    async def _resume_id(cls, sandbox_id: str, *, paths: Paths | None = None,
                         url: str | None = None, api_key: str | None = None) -> None:
        await cls._by_id("resume", sandbox_id, paths, url, api_key)

    @classmethod
    async def _kill_id(cls, sandbox_id: str, *, paths: Paths | None = None,
                       url: str | None = None, api_key: str | None = None) -> None:
        await cls._by_id("kill", sandbox_id, paths, url, api_key)

    @classmethod
    async def update_network(cls, sandbox_id: str, policy: NetworkPolicy | Mapping[str, Any],
                             *, paths: Paths | None = None, url: str | None = None,
                             api_key: str | None = None) -> SandboxInfo:
        """:meth:`set_network` by id, without connecting to the sandbox."""
        pol = NetworkPolicy.from_json(policy)
        t = await _target(url, api_key, paths)
        if t is None:
            return info_of(await _local(paths).set_network(sandbox_id, pol))
        async with _closing(t):
            from ember.sdk.wire import sandbox_info

            return sandbox_info(await t.call(
                "PUT", f"/sandboxes/{_seg(sandbox_id)}/network", json=pol.to_json()))

    @classmethod
    async def _by_id(cls, verb: str, sandbox_id: str, paths: Paths | None, url: str | None,
                     api_key: str | None) -> None:
        t = await _target(url, api_key, paths)
        if t is None:
            local = _local(paths)
            op = {"pause": local.pause, "resume": local.resume, "kill": local.kill}[verb]
            await op(sandbox_id)
            return
        path = f"/sandboxes/{_seg(sandbox_id)}"
        async with _closing(t):
            if verb == "kill":
                await t.call("DELETE", path)
            else:
                await t.call("POST", f"{path}/{verb}")

    async def _pause_self(self) -> None:
        self._paused = True
        try:
            await asyncio.to_thread(self._mgr.pause, self.id)
        except BaseException:
            self._paused = False
            raise

    async def _resume_self(self) -> None:
        await asyncio.to_thread(self._mgr.resume, self.id)
        self._paused = False
        if self._client is not None and self._client.broken:  # a deadline passed meanwhile
            await self._client.close()
            await self._connect(30.0, resync=True)

    async def snapshot(self, name: str | None = None) -> SnapshotInfo:
        """Save this sandbox (memory, devices, disk) as a snapshot; it keeps running.

        The guest is paused only while its state, RAM and disk are copied. Restore with
        :meth:`restore` (or ``ember restore``), as often as wanted.
        """
        self._require_client()
        taken = await asyncio.to_thread(self._mgr.snapshot, self.id, name)
        return snapshot_info(taken.record, taken.pause_s)

    async def fork(self, n: int = 1) -> builtins.list[AsyncSandbox]:
        """``n`` new sandboxes from this one's current state (it keeps running).

        Each clone has its own disk overlay, id and hostname, a freshly seeded kernel RNG
        and a corrected clock; unmodified memory is shared copy-on-write between clones.
        If any clone fails, the others are destroyed and the error is raised.
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FORK:
            raise BadRequestError(f"n must be an integer between 1 and {MAX_FORK}, not {n!r}")
        self._require_client()
        # Held until the clones are registered: a sweep never takes the snapshot from us,
        # and collects it if we are killed before any clone uses it.
        taken = await asyncio.to_thread(functools.partial(self._mgr.snapshot, self.id, None,
                                                          hold=True))
        try:
            return await self._clones(taken.record, n)
        finally:
            taken.release()

    async def _clones(self, snap: SnapshotRecord, n: int) -> builtins.list[AsyncSandbox]:
        spec = SandboxSpec(template=snap.template, vcpus=snap.vcpus, memory_mib=snap.memory_mib,
                           timeout=self._rec.timeout_s, env={},
                           metadata={**self._rec.metadata, "forked_from": self.id},
                           on_timeout=cast(OnTimeout, self._rec.on_timeout))
        gate = asyncio.Semaphore(max(1, os.cpu_count() or 1))

        local = _local(self._mgr.paths)

        async def one() -> AsyncSandbox:
            async with gate:
                return await local.start_restore(snap, spec, None, None, self._rec.template)

        results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        clones = [r for r in results if isinstance(r, AsyncSandbox)]
        failures = [r for r in results if not isinstance(r, AsyncSandbox)]
        if failures:
            for c in clones:
                with contextlib.suppress(Exception):
                    await c.kill()
            await asyncio.to_thread(self._mgr.collect_snapshot, snap.id)
            raise failures[0]
        return clones

    @classmethod
    async def list_snapshots(cls, *, paths: Paths | None = None, url: str | None = None,
                             api_key: str | None = None) -> builtins.list[SnapshotInfo]:
        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).list_snapshots()
        from ember.sdk.wire import snapshot_info as decode

        async with _closing(t):
            return [decode(i) for i in await t.call("GET", "/snapshots")]

    @classmethod
    async def delete_snapshot(cls, snapshot: str | SnapshotInfo, *,
                              paths: Paths | None = None, url: str | None = None,
                              api_key: str | None = None) -> None:
        """Remove a snapshot (refused while sandboxes restored from it still run)."""
        t = await _target(url, api_key, paths)
        if t is None:
            await _local(paths).delete_snapshot(snapshot_ref(snapshot))
            return
        async with _closing(t):
            await t.call("DELETE", f"/snapshots/{_seg(snapshot_ref(snapshot))}")

    @classmethod
    async def list_usage(cls, *, paths: Paths | None = None, url: str | None = None,
                         api_key: str | None = None) -> builtins.list[SandboxUsage]:
        """One sample per live sandbox of the caller: host CPU seconds used so far and
        host memory held now (CPU use is the difference of two samples; ``ember top``)."""
        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).list_usage()
        from ember.sdk.wire import sandbox_usage

        async with _closing(t):
            return [sandbox_usage(u) for u in await t.call("GET", "/usage")]

    # --- templates ------------------------------------------------------------------------
    @classmethod
    async def build_template(cls, name: str, source: str | None = None, *,
                             packages: Sequence[str] = (), force: bool = False,
                             rebuild: bool = False, free_mib: int = 1024,
                             on_progress: Callable[[str], None] | None = None,
                             paths: Paths | None = None, url: str | None = None,
                             api_key: str | None = None, dockerfile: str | None = None,
                             build_args: Mapping[str, str] | None = None,
                             target: str | None = None, no_cache: bool = False,
                             build_network: NetworkPolicy | Mapping[str, Any] | None = None,
                             build_vcpus: int | None = None,
                             build_memory_mib: int | None = None) -> TemplateInfo:
        """Build template ``name`` from ``source`` (``ember image build``; docs/images.md)
        and register it; ``on_progress`` gets its status lines as they come. The
        administrator's; builds whose image is cached by recipe take a moment.

        ``source="dockerfile:PATH"`` (an absolute context directory or Dockerfile on the
        building host) builds from a Dockerfile, its RUN steps in microVMs
        (docs/dockerfile.md), with ``dockerfile`` (the file, relative to the context),
        ``build_args``, ``target`` (a stage), ``no_cache``, ``build_network`` (the RUN
        steps' network policy; None: no NIC) and the build VM's ``build_vcpus`` and
        ``build_memory_mib`` (default: the FROM template's)."""
        from ember.sdk import template_ops
        from ember.sdk.results import DockerfileOptions

        opts = None
        if (dockerfile is not None or build_args or target is not None or no_cache
                or build_network is not None or build_vcpus is not None
                or build_memory_mib is not None):
            opts = DockerfileOptions(
                file=dockerfile, build_args=dict(build_args or {}), target=target,
                no_cache=no_cache, network=None if build_network is None
                else NetworkPolicy.from_json(build_network).to_json(), vcpus=build_vcpus,
                memory_mib=build_memory_mib)
        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).build_template(
                name, source, packages=packages, force=force, rebuild=rebuild,
                free_mib=free_mib, on_progress=on_progress, dockerfile=opts)
        body: dict[str, Any] = {"name": name, "source": source,
                                "packages": builtins.list(packages), "force": force,
                                "rebuild": rebuild, "free_mib": free_mib}
        if opts is not None:
            body["dockerfile"] = dataclasses.asdict(opts)
        async with _closing(t):
            return await template_ops.build_remote(t, body, on_progress)

    @classmethod
    async def prune_build_cache(cls, *, paths: Paths | None = None, url: str | None = None,
                                api_key: str | None = None) -> PruneInfo:
        """Remove the Dockerfile step cache entries that no template uses (``ember image
        prune``). The administrator's."""
        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).prune_build_cache()
        async with _closing(t):
            got = await t.call("POST", "/templates/prune")
        if not isinstance(got, dict) or not isinstance(got.get("removed"), list):
            raise ProtocolError("malformed answer to a build cache prune")
        return PruneInfo(removed=[str(i) for i in got["removed"]],
                         freed_bytes=int(got.get("freed_bytes", 0)),
                         sandboxes=[str(i) for i in got.get("sandboxes", [])])

    @classmethod
    async def list_templates(cls, *, paths: Paths | None = None, url: str | None = None,
                             api_key: str | None = None) -> builtins.list[TemplateInfo]:
        """The templates sandboxes can be created from."""
        from ember.sdk import template_ops

        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).list_templates()
        async with _closing(t):
            return await template_ops.list_remote(t)

    @classmethod
    async def delete_template(cls, name: str, *, paths: Paths | None = None,
                              url: str | None = None, api_key: str | None = None) -> None:
        """Remove template ``name`` (refused while sandboxes use it)."""
        from ember.sdk import template_ops

        t = await _target(url, api_key, paths)
        if t is None:
            await _local(paths).delete_template(name)
            return
        async with _closing(t):
            await template_ops.remove_remote(t, name)

    @classmethod
    async def drop_template_snapshots(cls, template: str, *, paths: Paths | None = None,
                                      url: str | None = None,
                                      api_key: str | None = None) -> builtins.list[str]:
        """Remove the template snapshots of ``template`` (the next create boots and makes
        a new one); those that live sandboxes were restored from stay until they are gone.
        Returns the ids removed. The administrator's."""
        from ember.sdk import template_ops

        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).drop_template_snapshots(template)
        async with _closing(t):
            return await template_ops.drop_snapshots_remote(t, template)

    # --- warm pools -----------------------------------------------------------------------
    @classmethod
    async def set_pool(cls, template: str, size: int, *, vcpus: int | None = None,
                       memory_mib: int | None = None, disk_mib: int | None = None,
                       paths: Paths | None = None, url: str | None = None,
                       api_key: str | None = None) -> PoolInfo:
        """Keep ``size`` sandboxes of ``template`` at that shape started ahead, so that a
        :meth:`create` of that template and shape returns at once (0 removes the pool).
        The daemon fills it in the background (the administrator's)."""
        from ember.sdk import pool_ops

        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).set_pool(template, size, vcpus=vcpus,
                                                memory_mib=memory_mib, disk_mib=disk_mib)
        async with _closing(t):
            return await pool_ops.set_remote(t, template, size, vcpus, memory_mib, disk_mib)

    @classmethod
    async def list_pools(cls, *, paths: Paths | None = None, url: str | None = None,
                         api_key: str | None = None) -> builtins.list[PoolInfo]:
        """The warm pools: size asked, members ready and starting, their idle memory."""
        from ember.sdk import pool_ops

        t = await _target(url, api_key, paths)
        if t is None:
            return await _local(paths).list_pools()
        async with _closing(t):
            return await pool_ops.list_remote(t)

    @classmethod
    async def remove_pool(cls, key: str, *, paths: Paths | None = None,
                          url: str | None = None, api_key: str | None = None) -> None:
        """Remove the pool ``key`` (as listed) and destroy its ready members."""
        from ember.sdk import pool_ops

        t = await _target(url, api_key, paths)
        if t is None:
            await _local(paths).remove_pool(key)
            return
        async with _closing(t):
            await pool_ops.remove_remote(t, key)

    # --- lifetime ------------------------------------------------------------------------
    async def set_timeout(self, timeout: float | None) -> None:
        """Change the sandbox's remaining lifetime (seconds from now; None = no limit)."""
        await asyncio.to_thread(self._mgr.set_timeout, self.id, timeout)
        self._rec = await asyncio.to_thread(self._mgr.store.get_sandbox, self.id)

    async def set_network(self, policy: NetworkPolicy | Mapping[str, Any]) -> SandboxInfo:
        """Replace the egress policy of a sandbox created with a network; applied
        atomically (no packet sees half of it) while the sandbox runs."""
        self._rec = await asyncio.to_thread(self._mgr.set_network, self.id,
                                            NetworkPolicy.from_json(policy))
        return info_of(self._rec)

    async def network_stats(self) -> NetworkStats | None:
        """The counters of the sandbox's network (bytes and packets each way, packets
        refused by its policy, dropped spoofed ones); None without a network."""
        got = await asyncio.to_thread(self._mgr.network.stats)
        return got.get(self.id)

    # --- exposed ports ---------------------------------------------------------------------
    async def expose(self, port: int, *, pause_after_idle: float | None = None) -> ExposedPort:
        """Make the guest's TCP ``port`` reachable from outside: the answer says at which
        host address (``.address``). Served by ember's daemon, which listens for it; the
        sandbox needs a network (``network={"internet": False}`` is enough).
        ``pause_after_idle`` (seconds): scale to zero: the sandbox is paused once none of
        its exposed ports carried traffic for that long, and the next connection resumes it
        (its client sees a slower first byte)."""
        raise BadRequestError(_PORTS_NEED_THE_DAEMON)

    async def unexpose(self, port: int) -> None:
        """Stop exposing ``port``."""
        raise BadRequestError(_PORTS_NEED_THE_DAEMON)

    async def ports(self) -> builtins.list[ExposedPort]:
        """The exposed ports."""
        raise BadRequestError(_PORTS_NEED_THE_DAEMON)

    async def close(self) -> None:
        """Disconnect without destroying the sandbox (it keeps running)."""
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._lock.release()

    #: ``await sb.kill()`` or ``await AsyncSandbox.kill(id)``: destroy the sandbox (its VM,
    #: disk, sockets and registry row). On an instance, one already gone is no error.
    kill = ByIdOrSelf[AsyncVerb[None]]()

    async def _kill_self(self) -> None:
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


def _local(paths: Paths | None) -> Local:
    from ember.sdk.local import Local

    return Local(paths)


def in_process() -> bool:
    """Whether this process runs sandboxes itself instead of asking a daemon: with
    ``EMBER_LOCAL=1`` (embedding ember in a program of one's own; the home's daemon, started
    on demand, still enforces lifetimes and refills pools)."""
    return os.environ.get("EMBER_LOCAL") == "1"


async def _target(url: str | None, api_key: str | None,
                  paths: Paths | None) -> Transport | None:
    """The daemon to send operations to, or None to run them in this process.

    ``url``, else ``EMBER_URL`` (unless the caller named a home with ``paths``); else, with
    ``EMBER_LOCAL=1``, this process; else the daemon of the home (``paths``, else
    ``EMBER_HOME``), started on first use when none runs."""
    from ember.sdk.remote import Transport

    key = api_key or os.environ.get("EMBER_API_KEY")
    named = url or (os.environ.get("EMBER_URL") if paths is None else None)
    if named:
        return Transport(named, key)
    if in_process():
        return None
    from ember.daemon.control import ensure_running, revive

    home = paths or Paths.from_env()
    await asyncio.to_thread(ensure_running, home)
    return Transport(f"unix://{home.daemon_socket}", key,
                     revive=functools.partial(revive, home))


async def _remote_sandbox(t: Transport, method: str, path: str, body: dict[str, Any] | None,
                          *, running: bool = False) -> AsyncSandbox:
    """The sandbox a daemon answers with (``running``: refuse one in another state)."""
    from ember.sdk.remote import RemoteSandbox
    from ember.sdk.wire import sandbox_info

    try:
        info = sandbox_info(await t.call(method, path, json=body))
        if running and info.state != "running":  # lost: its node died (a cluster's)
            state: str = info.state  # "lost" is a cluster-wide view's state only
            cls = SandboxLostError if state == "lost" else SandboxStateError
            raise cls(f"sandbox {info.id} is {info.state}"
                      + (f": {info.error}" if info.error else ""))
    except BaseException:
        await t.close()
        raise
    return RemoteSandbox(t, info, owns_transport=True)


@contextlib.asynccontextmanager
async def _closing(t: Transport) -> AsyncIterator[Transport]:
    try:
        yield t
    finally:
        await t.close()


def _seg(part: str) -> str:
    """One path segment of a URL (an id or a name, quoted)."""
    from urllib.parse import quote

    return quote(part, safe="")


__all__ = ["AsyncSandbox", "EmberTimeoutError", "manager"]
