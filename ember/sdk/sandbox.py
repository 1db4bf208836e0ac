"""Sandbox: the blocking face of :class:`AsyncSandbox` (same behaviour, same errors)."""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from ember.kinds import Boot, Isolation, OnTimeout
from ember.net.policy import NetworkPolicy
from ember.net.stats import NetworkStats
from ember.paths import Paths
from ember.runtime.spec import DEFAULT_TEMPLATE, DEFAULT_TIMEOUT_S
from ember.sdk.async_sandbox import CONNECT_WAIT_S, DEFAULT_EXEC_TIMEOUT_S, AsyncSandbox
from ember.sdk.files import AsyncFiles
from ember.sdk.network import AsyncNetwork
from ember.sdk.portal import portal
from ember.sdk.process import AsyncProcess, OutputCallback
from ember.sdk.pty import AsyncPty
from ember.sdk.results import (
    EntryInfo,
    ExecResult,
    ExposedPort,
    OutputChunk,
    PoolInfo,
    ProcessInfo,
    PruneInfo,
    SandboxInfo,
    SandboxUsage,
    SnapshotInfo,
    TemplateInfo,
)
from ember.sdk.verbs import ByIdOrSelf, SyncVerb
from ember.sdk.watch import Watch


class Process:
    """A command running in a sandbox (blocking API)."""

    def __init__(self, inner: AsyncProcess) -> None:
        self._inner = inner
        self.pid = inner.pid

    def output(self) -> Iterator[OutputChunk]:
        """Iterate over stdout/stderr chunks as produced, until the command ends."""
        return portal().iterate(self._inner.output())

    def wait(self, on_stdout: OutputCallback | None = None,
             on_stderr: OutputCallback | None = None) -> ExecResult:
        return portal().call(self._inner.wait(on_stdout, on_stderr))

    def write_stdin(self, data: bytes | str) -> None:
        portal().call(self._inner.write_stdin(data))

    def close_stdin(self) -> None:
        portal().call(self._inner.close_stdin())

    def signal(self, signum: int) -> None:
        portal().call(self._inner.signal(signum))

    def kill(self) -> None:
        portal().call(self._inner.kill())


class Pty:
    """A command on a terminal in a sandbox (blocking API); see :class:`AsyncPty`."""

    def __init__(self, inner: AsyncPty) -> None:
        self._inner = inner
        self.pid = inner.pid

    def write(self, data: bytes | str) -> None:
        portal().call(self._inner.write(data))

    def resize(self, rows: int, cols: int) -> None:
        portal().call(self._inner.resize(rows, cols))

    def signal(self, signum: int) -> None:
        portal().call(self._inner.signal(signum))

    def kill(self) -> None:
        portal().call(self._inner.kill())

    def output(self) -> Iterator[bytes]:
        return portal().iterate(self._inner.output())

    def wait(self) -> int:
        return portal().call(self._inner.wait())

    def close(self) -> None:
        portal().call(self._inner.close())


class Files:
    """``sandbox.files`` (blocking API); see :class:`ember.sdk.files.AsyncFiles`."""

    def __init__(self, inner: AsyncFiles) -> None:
        self._inner = inner

    def read(self, path: str) -> bytes:
        return portal().call(self._inner.read(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return portal().call(self._inner.read_text(path, encoding))

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        return portal().call(self._inner.write(path, data, mode=mode))

    def download(self, path: str, local: str | os.PathLike[str]) -> int:
        return portal().call(self._inner.download(path, local))

    def upload(self, local: str | os.PathLike[str], path: str, *, mode: int | None = None) -> int:
        return portal().call(self._inner.upload(local, path, mode=mode))

    def list(self, path: str) -> list[EntryInfo]:
        return portal().call(self._inner.list(path))

    def stat(self, path: str) -> EntryInfo:
        return portal().call(self._inner.stat(path))

    def exists(self, path: str) -> bool:
        return portal().call(self._inner.exists(path))

    def mkdir(self, path: str, *, parents: bool = True) -> None:
        portal().call(self._inner.mkdir(path, parents=parents))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        portal().call(self._inner.remove(path, recursive=recursive))

    def rename(self, src: str, dst: str) -> None:
        portal().call(self._inner.rename(src, dst))

    def watch(self, path: str, *, recursive: bool = False) -> Watch:
        """Watch a directory: ``with sb.files.watch("/work") as w: for ev in w: ...``."""
        return Watch(portal().call(self._inner.watch(path, recursive=recursive)))


class Network:
    """``sandbox.network`` (blocking API); see :class:`ember.sdk.network.AsyncNetwork`."""

    def __init__(self, inner: AsyncNetwork) -> None:
        self._inner = inner

    def update(self, policy: NetworkPolicy | Mapping[str, Any]) -> SandboxInfo:
        return portal().call(self._inner.update(policy))

    def policy(self) -> NetworkPolicy | None:
        return portal().call(self._inner.policy())

    def stats(self) -> NetworkStats | None:
        return portal().call(self._inner.stats())

    def expose(self, port: int, *, pause_after_idle: float | None = None) -> ExposedPort:
        return portal().call(self._inner.expose(port, pause_after_idle=pause_after_idle))

    def unexpose(self, port: int) -> None:
        portal().call(self._inner.unexpose(port))

    def ports(self) -> list[ExposedPort]:
        return portal().call(self._inner.ports())


class Sandbox:
    """A microVM sandbox (blocking API). ``with Sandbox.create() as sb:`` destroys on exit."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._inner = inner
        self.files = Files(inner.files)
        self.network = Network(inner.network)

    @classmethod
    def create(
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
    ) -> Sandbox:
        """Start a new sandbox from ``template``; see :meth:`AsyncSandbox.create` (``url``
        or ``EMBER_URL``: through an ember daemon)."""
        return cls(portal().call(AsyncSandbox.create(
            template, vcpus=vcpus, memory_mib=memory_mib, disk_mib=disk_mib, timeout=timeout,
            env=env, metadata=metadata, boot_timeout=boot_timeout, on_progress=on_progress,
            paths=paths, on_timeout=on_timeout, isolation=isolation, url=url,
            api_key=api_key, boot=boot, network=network)))

    @classmethod
    def restore(cls, snapshot: str | SnapshotInfo, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                env: Mapping[str, str] | None = None,
                metadata: Mapping[str, str] | None = None,
                boot_timeout: float | None = None,
                on_progress: Callable[[str], None] | None = None,
                paths: Paths | None = None, on_timeout: OnTimeout = "destroy",
                url: str | None = None, api_key: str | None = None) -> Sandbox:
        """A new sandbox restored from ``snapshot``; see :meth:`AsyncSandbox.restore`."""
        return cls(portal().call(AsyncSandbox.restore(
            snapshot, timeout=timeout, env=env, metadata=metadata, boot_timeout=boot_timeout,
            on_progress=on_progress, paths=paths, on_timeout=on_timeout, url=url,
            api_key=api_key)))

    @classmethod
    def list_snapshots(cls, *, paths: Paths | None = None, url: str | None = None,
                       api_key: str | None = None) -> builtins.list[SnapshotInfo]:
        return portal().call(AsyncSandbox.list_snapshots(paths=paths, url=url, api_key=api_key))

    @classmethod
    def delete_snapshot(cls, snapshot: str | SnapshotInfo, *, paths: Paths | None = None,
                        url: str | None = None, api_key: str | None = None) -> None:
        portal().call(AsyncSandbox.delete_snapshot(snapshot, paths=paths, url=url,
                                                   api_key=api_key))

    @classmethod
    def build_template(cls, name: str, source: str | None = None, *,
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
        """Build and register a template; see :meth:`AsyncSandbox.build_template`."""
        return portal().call(AsyncSandbox.build_template(
            name, source, packages=packages, force=force, rebuild=rebuild, free_mib=free_mib,
            on_progress=on_progress, paths=paths, url=url, api_key=api_key,
            dockerfile=dockerfile, build_args=build_args, target=target, no_cache=no_cache,
            build_network=build_network, build_vcpus=build_vcpus,
            build_memory_mib=build_memory_mib))

    @classmethod
    def prune_build_cache(cls, *, paths: Paths | None = None, url: str | None = None,
                          api_key: str | None = None) -> PruneInfo:
        """See :meth:`AsyncSandbox.prune_build_cache`."""
        return portal().call(AsyncSandbox.prune_build_cache(paths=paths, url=url,
                                                            api_key=api_key))

    @classmethod
    def list_templates(cls, *, paths: Paths | None = None, url: str | None = None,
                       api_key: str | None = None) -> builtins.list[TemplateInfo]:
        return portal().call(AsyncSandbox.list_templates(paths=paths, url=url,
                                                         api_key=api_key))

    @classmethod
    def delete_template(cls, name: str, *, paths: Paths | None = None, url: str | None = None,
                        api_key: str | None = None) -> None:
        portal().call(AsyncSandbox.delete_template(name, paths=paths, url=url,
                                                   api_key=api_key))

    @classmethod
    def drop_template_snapshots(cls, template: str, *, paths: Paths | None = None,
                                url: str | None = None,
                                api_key: str | None = None) -> builtins.list[str]:
        """See :meth:`AsyncSandbox.drop_template_snapshots`."""
        return portal().call(AsyncSandbox.drop_template_snapshots(
            template, paths=paths, url=url, api_key=api_key))

    @classmethod
    def list_usage(cls, *, paths: Paths | None = None, url: str | None = None,
                   api_key: str | None = None) -> builtins.list[SandboxUsage]:
        """What each live sandbox costs the host; see :meth:`AsyncSandbox.list_usage`."""
        return portal().call(AsyncSandbox.list_usage(paths=paths, url=url, api_key=api_key))

    @classmethod
    def set_pool(cls, template: str, size: int, *, vcpus: int | None = None,
                 memory_mib: int | None = None, disk_mib: int | None = None,
                 paths: Paths | None = None, url: str | None = None,
                 api_key: str | None = None) -> PoolInfo:
        """Keep ``size`` sandboxes of ``template`` ready; see :meth:`AsyncSandbox.set_pool`."""
        return portal().call(AsyncSandbox.set_pool(
            template, size, vcpus=vcpus, memory_mib=memory_mib, disk_mib=disk_mib,
            paths=paths, url=url, api_key=api_key))

    @classmethod
    def list_pools(cls, *, paths: Paths | None = None, url: str | None = None,
                   api_key: str | None = None) -> builtins.list[PoolInfo]:
        return portal().call(AsyncSandbox.list_pools(paths=paths, url=url, api_key=api_key))

    @classmethod
    def remove_pool(cls, key: str, *, paths: Paths | None = None, url: str | None = None,
                    api_key: str | None = None) -> None:
        portal().call(AsyncSandbox.remove_pool(key, paths=paths, url=url, api_key=api_key))

    @classmethod
    def connect(cls, sandbox_id: str, *, wait: float = CONNECT_WAIT_S,
                paths: Paths | None = None, url: str | None = None,
                api_key: str | None = None) -> Sandbox:
        return cls(portal().call(AsyncSandbox.connect(sandbox_id, wait=wait, paths=paths,
                                                      url=url, api_key=api_key)))

    @classmethod
    def list(cls, *, paths: Paths | None = None, url: str | None = None,
             api_key: str | None = None) -> builtins.list[SandboxInfo]:
        return portal().call(AsyncSandbox.list(paths=paths, url=url, api_key=api_key))

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def sandbox_id(self) -> str:
        return self._inner.id

    def info(self) -> SandboxInfo:
        return portal().call(self._inner.info())

    @classmethod
    def get_info(cls, sandbox_id: str, *, paths: Paths | None = None, url: str | None = None,
                 api_key: str | None = None) -> SandboxInfo:
        """A sandbox's state, in any state, without connecting to it."""
        return portal().call(AsyncSandbox.get_info(sandbox_id, paths=paths, url=url,
                                                   api_key=api_key))

    #: ``sb.logs()`` or ``Sandbox.logs(id)``: the guest's console (kernel and init output).
    logs = ByIdOrSelf[SyncVerb[str]]()

    def _logs_self(self) -> str:
        return portal().call(self._inner.logs())

    @classmethod
    def _logs_id(cls, sandbox_id: str, *, paths: Paths | None = None, url: str | None = None,
                 api_key: str | None = None) -> str:
        return portal().call(AsyncSandbox.logs(sandbox_id, paths=paths, url=url,
                                               api_key=api_key))

    def exec(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, user: str | int | None = None,
             stdin: bytes | str | None = None, timeout: float | None = DEFAULT_EXEC_TIMEOUT_S,
             on_stdout: OutputCallback | None = None,
             on_stderr: OutputCallback | None = None) -> ExecResult:
        """Run a command to completion; see :meth:`AsyncSandbox.exec`."""
        return portal().call(self._inner.exec(
            cmd, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout,
            on_stdout=on_stdout, on_stderr=on_stderr))

    def spawn(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, user: str | int | None = None, stdin: bool = False,
              timeout: float | None = DEFAULT_EXEC_TIMEOUT_S) -> Process:
        """Start a command in the background; see :meth:`AsyncSandbox.spawn`."""
        return Process(portal().call(self._inner.spawn(
            cmd, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout)))

    def pty(self, cmd: str | Sequence[str] | None = None, *, rows: int = 24, cols: int = 80,
            env: Mapping[str, str] | None = None, cwd: str | None = None,
            user: str | int | None = None) -> Pty:
        """``cmd`` (default: a login shell) on a new terminal; see :meth:`AsyncSandbox.pty`."""
        return Pty(portal().call(self._inner.pty(cmd, rows=rows, cols=cols, env=env, cwd=cwd,
                                                 user=user)))

    def processes(self) -> builtins.list[ProcessInfo]:
        return portal().call(self._inner.processes())

    def ping(self, timeout: float = 10.0) -> float:
        return portal().call(self._inner.ping(timeout))

    #: ``sb.pause()`` or ``Sandbox.pause(id)``; see :attr:`AsyncSandbox.pause`.
    pause = ByIdOrSelf[SyncVerb[None]]()
    #: ``sb.resume()`` or ``Sandbox.resume(id)``.
    resume = ByIdOrSelf[SyncVerb[None]]()
    #: ``sb.kill()`` or ``Sandbox.kill(id)``: destroy the sandbox.
    kill = ByIdOrSelf[SyncVerb[None]]()

    def _pause_self(self) -> None:
        portal().call(self._inner.pause())

    def _resume_self(self) -> None:
        portal().call(self._inner.resume())

    def _kill_self(self) -> None:
        portal().call(self._inner.kill())

    @classmethod
    def update_network(cls, sandbox_id: str, policy: NetworkPolicy | Mapping[str, Any], *,
                       paths: Paths | None = None, url: str | None = None,
                       api_key: str | None = None) -> SandboxInfo:
        """:meth:`set_network` by id, without connecting to the sandbox."""
        return portal().call(AsyncSandbox.update_network(sandbox_id, policy, paths=paths,
                                                         url=url, api_key=api_key))

    @classmethod
    def _pause_id(cls, sandbox_id: str, *, paths: Paths | None = None, url: str | None = None,
                  api_key: str | None = None) -> None:
        portal().call(AsyncSandbox.pause(sandbox_id, paths=paths, url=url, api_key=api_key))

    @classmethod
    def _resume_id(cls, sandbox_id: str, *, paths: Paths | None = None, url: str | None = None,
                   api_key: str | None = None) -> None:
        portal().call(AsyncSandbox.resume(sandbox_id, paths=paths, url=url, api_key=api_key))

    @classmethod
    def _kill_id(cls, sandbox_id: str, *, paths: Paths | None = None, url: str | None = None,
                 api_key: str | None = None) -> None:
        portal().call(AsyncSandbox.kill(sandbox_id, paths=paths, url=url, api_key=api_key))

    def snapshot(self, name: str | None = None) -> SnapshotInfo:
        """Save this sandbox as a snapshot; see :meth:`AsyncSandbox.snapshot`."""
        return portal().call(self._inner.snapshot(name))

    def fork(self, n: int = 1) -> builtins.list[Sandbox]:
        """``n`` clones of this sandbox's current state; see :meth:`AsyncSandbox.fork`."""
        return [Sandbox(c) for c in portal().call(self._inner.fork(n))]

    def set_timeout(self, timeout: float | None) -> None:
        portal().call(self._inner.set_timeout(timeout))

    def network_stats(self) -> NetworkStats | None:
        """The counters of the sandbox's network; see :meth:`AsyncSandbox.network_stats`."""
        return portal().call(self._inner.network_stats())

    def expose(self, port: int, *, pause_after_idle: float | None = None) -> ExposedPort:
        """Make the guest's TCP ``port`` reachable from outside (``.address``); see
        :meth:`AsyncSandbox.expose` (``pause_after_idle``: scale to zero)."""
        return portal().call(self._inner.expose(port, pause_after_idle=pause_after_idle))

    def unexpose(self, port: int) -> None:
        portal().call(self._inner.unexpose(port))

    def ports(self) -> builtins.list[ExposedPort]:
        return portal().call(self._inner.ports())

    def set_network(self, policy: NetworkPolicy | Mapping[str, Any]) -> SandboxInfo:
        """Replace the egress policy of a sandbox created with a network (atomic, live)."""
        return portal().call(self._inner.set_network(policy))

    def close(self) -> None:
        portal().call(self._inner.close())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"<Sandbox {self.id}>"
