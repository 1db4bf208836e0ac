"""The host-side operations on one ember home, in this process: what the daemon serves and
what ``EMBER_LOCAL=1`` gives the SDK.

:class:`Local` is the typed layer between callers and the runtime: every operation the
API offers on a home (create with its policy, restore, connect, list, by-id verbs,
snapshots, usage, templates, pools) with the SDK's results and errors. The daemon's routes
call it (and only translate HTTP); :class:`~ember.sdk.async_sandbox.AsyncSandbox` calls it
when it runs sandboxes itself; the benchmarks measure it as the in-process baseline.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ember.engine.container import require_tier
from ember.errors import BadRequestError, EmberError, SandboxStateError, SnapshotError
from ember.kinds import BOOTS, Boot, Isolation, OnTimeout
from ember.locks import FileLock
from ember.net.policy import NetworkPolicy
from ember.paths import Paths
from ember.runtime import template_snapshots
from ember.runtime.manager import SandboxDir, SandboxManager, console_tail
from ember.runtime.spec import SandboxSpec
from ember.sdk import pool_ops, template_ops
from ember.sdk.async_sandbox import (
    AsyncSandbox,
    boot_timeout_for,
    info_of,
    manager,
    snapshot_info,
)
from ember.sdk.dockerfile_build import is_step_snapshot
from ember.sdk.results import (
    DockerfileOptions,
    PoolInfo,
    PruneInfo,
    SandboxInfo,
    SandboxUsage,
    SnapshotInfo,
    TemplateInfo,
)
from ember.store import SandboxRecord, SnapshotRecord, TemplateRecord

log = logging.getLogger("ember.sdk")
#: The command run once in a sandbox before its template snapshot is taken, at most.
WARM_EXEC_TIMEOUT_S = 30.0
#: That command, as a shell line: the paths a clone's first commands take are then in the
#: snapshot's page cache. ``sb.exec("...")`` runs ``/bin/sh -c``; ``sb.exec([...])`` a
#: program (here ``/usr/bin/true``, so the loader and libc); E2B's SDKs run
#: ``/bin/bash -l -c`` (so bash and the login profile, where the template has bash).
WARM_COMMAND = "/usr/bin/true; if [ -x /bin/bash ]; then /bin/bash -l -c true; fi; sync"

Progress = Callable[[str], None] | None


class Local:
    """The operations on the home ``paths`` (``EMBER_HOME`` by default), in this process."""

    def __init__(self, paths: Paths | None = None) -> None:
        self.mgr: SandboxManager = manager(paths)
        self.paths = self.mgr.paths

    # --- sandboxes -----------------------------------------------------------------------
    async def create(self, template: str, *, vcpus: int | None, memory_mib: int | None,
                     disk_mib: int | None, timeout: float | None,
                     env: Mapping[str, str] | None, metadata: Mapping[str, str] | None,
                     boot_timeout: float | None, on_progress: Progress,
                     on_timeout: OnTimeout, isolation: Isolation,
                     boot: Boot = "auto",
                     network: NetworkPolicy | Mapping[str, object] | None = None,
                     ) -> AsyncSandbox:
        """A new sandbox, by the create policy: a warm pool's member if one is ready,
        else a pre-baked template's snapshot restored, else the template snapshot of its
        template and shape restored (made from this boot on first use), else a boot.
        ``boot="cold"`` always boots. The weaker tiers have neither pools nor snapshots:
        they always start fresh. A sandbox with a ``network`` restores the template
        snapshot of guests with a NIC (warm pools have none)."""
        if boot not in BOOTS:
            raise BadRequestError(f"boot must be one of {', '.join(BOOTS)}, got {boot!r}")
        if isolation != "microvm":  # a tier this host cannot run: say so before anything else
            await asyncio.to_thread(require_tier, isolation)
        mgr = self.mgr
        tpl = await asyncio.to_thread(mgr.store.get_template, template)
        baked = tpl.config.get("snapshot")
        spec = SandboxSpec(template=template, vcpus=(vcpus if vcpus is not None
                              else int(tpl.config.get("vcpus", 1))),
                           memory_mib=(memory_mib if memory_mib is not None
                                       else int(tpl.config.get("memory_mib", 256))),
                           disk_mib=disk_mib, timeout=timeout, env=dict(env or {}),
                           metadata=dict(metadata or {}), on_timeout=on_timeout,
                           isolation=isolation,
                           network=None if network is None else NetworkPolicy.from_json(network))
        maker: tuple[FileLock, str, str] | None = None
        if baked and spec.network is not None:
            raise BadRequestError(f"template {template!r} is pre-baked from a snapshot "
                                  "without a NIC: its sandboxes cannot have a network")
        if isolation == "microvm" and boot == "auto":
            pooled = await self._from_pool(spec) if spec.network is None else None
            if pooled is not None:
                return pooled
            if baked:
                snap = await asyncio.to_thread(mgr.store.get_snapshot, str(baked))
                return await self.start_restore(snap, spec, boot_timeout, on_progress,
                                                template)
            restored, maker = await self._from_template_snapshot(tpl, spec, boot_timeout,
                                                                 on_progress)
            if restored is not None:
                return restored
        locks: list[FileLock] = []
        try:
            rec = await asyncio.to_thread(mgr.start, spec, locks, on_progress)
            sb = await self._finish_start(rec, locks[0], boot_timeout, on_progress)
            if maker is not None:
                await self._make_template_snapshot(sb, maker, on_progress)
            return sb
        finally:
            if maker is not None:
                template_snapshots.release_maker(maker[0])

    async def _from_template_snapshot(
            self, tpl: TemplateRecord, spec: SandboxSpec, boot_timeout: float | None,
            on_progress: Progress) -> tuple[AsyncSandbox | None, tuple[FileLock, str, str] | None]:
        """Restore the template snapshot of ``spec``'s template and shape, or say how the
        boot that follows should make it: (sandbox, None) or (None, (held maker lock, key,
        disk label)), or (None, None) when another process is making it or this host
        cannot key one."""
        mgr = self.mgr
        disk = template_snapshots.disk_label(spec.disk_mib)
        try:
            key = await asyncio.to_thread(template_snapshots.key_for, mgr, tpl, spec.vcpus,
                                          spec.memory_mib, disk, nic=spec.network is not None)
        except EmberError:
            return None, None  # no kernel or QEMU: the boot says why
        for _ in range(2):  # a snapshot that fails its checks is dropped; look once more
            snap = await asyncio.to_thread(template_snapshots.find, mgr, key)
            if snap is None:
                break
            try:
                return await self.start_restore(snap, spec, boot_timeout, on_progress,
                                                None), None
            except SnapshotError as err:
                await asyncio.to_thread(template_snapshots.drop, mgr, snap, str(err))
        lock = template_snapshots.maker_lock(mgr.paths, key)
        if not await asyncio.to_thread(lock.try_acquire):
            return None, None  # another process is making it: boot meanwhile
        if await asyncio.to_thread(template_snapshots.find, mgr, key) is not None:
            template_snapshots.release_maker(lock)  # made just now by its last holder
            return await self._from_template_snapshot(tpl, spec, boot_timeout, on_progress)
        return None, (lock, key, disk)

    async def _make_template_snapshot(self, sb: AsyncSandbox, maker: tuple[FileLock, str, str],
                                      on_progress: Progress) -> None:
        """Snapshot the just booted ``sb`` as its template snapshot. A failure (a full
        disk, say) costs only the snapshot: the sandbox is handed over all the same."""
        _, key, disk = maker
        await self._warm_exec_path(sb, on_progress)
        if on_progress:
            on_progress("saving the template snapshot for the next creates")
        try:
            await asyncio.to_thread(template_snapshots.make, self.mgr, sb.id, key, disk)
        except (EmberError, OSError) as err:
            log.warning("sandbox %s: cannot make the template snapshot of %s: %s", sb.id,
                        sb._rec.template, err)

    async def _warm_exec_path(self, sb: AsyncSandbox, on_progress: Progress) -> None:
        """Run one command in a sandbox about to become its template's snapshot, so that
        what every first command needs (the agent's exec path, the program's pages in
        the guest's page cache) is in the snapshot instead of done again in each clone:
        measured here, a clone's first command 75-80 ms instead of 120-150 ms, and fewer
        guest pages copied per clone (:data:`WARM_COMMAND`). A failure only costs that:
        the snapshot is made."""
        if on_progress:
            on_progress("warming the guest's command path before the template snapshot")
        try:
            res = await sb.exec(WARM_COMMAND, cwd="/", timeout=WARM_EXEC_TIMEOUT_S)
            if res.exit_code != 0:
                log.info("sandbox %s: warming command exited %d", sb.id, res.exit_code)
        except EmberError as err:
            log.info("sandbox %s: no warming command before its template snapshot: %s",
                     sb.id, err)

    async def _finish_start(self, rec: SandboxRecord, lock: FileLock,
                            boot_timeout: float | None, on_progress: Progress) -> AsyncSandbox:
        """Connect to a just started (booted or restored) sandbox's agent; destroy it if
        that fails."""
        mgr = self.mgr
        sb = AsyncSandbox(mgr, rec, lock)
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
            lock.release()
            if isinstance(err, EmberError):
                raise type(err)(f"sandbox {rec.id} did not start: {err}\n--- console tail ---\n"
                                f"{tail[-1500:]}") from err
            raise
        return sb

    async def _from_pool(self, spec: SandboxSpec) -> AsyncSandbox | None:
        """A ready sandbox out of the warm pool for ``spec``, or None."""
        mgr = self.mgr
        while True:
            rec = await asyncio.to_thread(mgr.claim_pooled, spec)
            if rec is None:
                return None
            lock = FileLock(SandboxDir(Path(rec.dir)).lock)
            sb = AsyncSandbox(mgr, rec, lock)
            try:
                lock.acquire(5.0, f"sandbox {rec.id}")
                await sb._connect(10.0)
                return sb
            except EmberError:  # a broken pooled VM: discard it and take the next
                lock.release()
                with contextlib.suppress(EmberError):
                    mgr.destroy(rec.id)

    async def restore(self, ref: str, *, timeout: float | None,
                      env: Mapping[str, str] | None, metadata: Mapping[str, str] | None,
                      boot_timeout: float | None, on_progress: Progress,
                      on_timeout: OnTimeout) -> AsyncSandbox:
        """A new sandbox restored from snapshot ``ref`` (name or id)."""
        snap = await asyncio.to_thread(self.mgr.store.get_snapshot, ref)
        spec = SandboxSpec(template=snap.template, vcpus=snap.vcpus,
                           memory_mib=snap.memory_mib, timeout=timeout, env=dict(env or {}),
                           metadata=dict(metadata or {}), on_timeout=on_timeout)
        return await self.start_restore(snap, spec, boot_timeout, on_progress, None)

    async def start_restore(self, snap: SnapshotRecord, spec: SandboxSpec,
                            boot_timeout: float | None, on_progress: Progress,
                            template_name: str | None) -> AsyncSandbox:
        """Restore ``snap`` as ``spec`` (a create from a baked template, a restore, a fork's
        clone) and connect to it."""
        locks: list[FileLock] = []
        rec = await asyncio.to_thread(self.mgr.start_restore, snap, spec, locks, on_progress,
                                      template_name=template_name)
        return await self._finish_start(rec, locks[0], boot_timeout or 30.0, on_progress)

    async def connect(self, sandbox_id: str, *, wait: float) -> AsyncSandbox:
        """The sandbox's agent connection, ours alone (another in-process client waits up
        to ``wait`` seconds for it)."""
        mgr = self.mgr
        rec = await asyncio.to_thread(mgr.get, sandbox_id)
        if rec.state != "running":
            raise SandboxStateError(
                f"sandbox {sandbox_id} is {rec.state}" + (f": {rec.error}" if rec.error else ""))
        lock = FileLock(SandboxDir(Path(rec.dir)).lock)
        await asyncio.to_thread(lock.acquire, wait, f"sandbox {sandbox_id}")
        sb = AsyncSandbox(mgr, rec, lock)
        try:
            await sb._connect(30.0, resync=True)
        except BaseException:
            lock.release()
            raise
        return sb

    async def list(self) -> builtins.list[SandboxInfo]:
        """Every sandbox of the home; dead VMs are found and marked failed."""
        return [info_of(r) for r in await asyncio.to_thread(self.mgr.list)]

    async def get_info(self, sandbox_id: str) -> SandboxInfo:
        return info_of(await asyncio.to_thread(self.mgr.get, sandbox_id))

    async def logs(self, sandbox_id: str) -> str:
        rec = await asyncio.to_thread(self.mgr.store.get_sandbox, sandbox_id)  # any state
        return await asyncio.to_thread(console_tail, rec, 1 << 22)

    async def pause(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self.mgr.pause, sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self.mgr.resume, sandbox_id)

    async def kill(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self.mgr.destroy, sandbox_id)

    async def set_network(self, sandbox_id: str,
                          policy: NetworkPolicy | Mapping[str, object]) -> SandboxRecord:
        return await asyncio.to_thread(self.mgr.set_network, sandbox_id,
                                       NetworkPolicy.from_json(policy))

    async def set_timeout(self, sandbox_id: str, timeout: float | None) -> None:
        await asyncio.to_thread(self.mgr.set_timeout, sandbox_id, timeout)

    async def list_usage(self) -> builtins.list[SandboxUsage]:
        from ember.sdk.usage import usage_of

        return [u for u, _ in await asyncio.to_thread(usage_of, self.mgr)]

    # --- snapshots -----------------------------------------------------------------------
    async def list_snapshots(self) -> builtins.list[SnapshotInfo]:
        """The snapshots taken of sandboxes (template snapshots are listed with their
        templates)."""
        return [snapshot_info(s)
                for s in await asyncio.to_thread(self.mgr.store.list_snapshots)
                if not template_snapshots.is_template_snapshot(s)
                and not is_step_snapshot(s)]

    async def delete_snapshot(self, ref: str) -> None:
        await asyncio.to_thread(self.mgr.remove_snapshot, ref)

    # --- templates -----------------------------------------------------------------------
    async def build_template(self, name: str, source: str | None, *, packages: Sequence[str],
                             force: bool, rebuild: bool, free_mib: int,
                             on_progress: Progress,
                             dockerfile: DockerfileOptions | None = None) -> TemplateInfo:
        if source is not None and source.startswith("dockerfile:"):
            from ember.sdk import dockerfile_build as dfb

            d = dockerfile or DockerfileOptions()
            src = dfb.DockerfileSource.resolve(source.removeprefix("dockerfile:"), d.file)
            rec = await dfb.build_dockerfile(self, name, src, dfb.BuildOptions(
                build_args=dict(d.build_args), target=d.target, no_cache=d.no_cache or rebuild,
                vcpus=d.vcpus, memory_mib=d.memory_mib,
                network=None if d.network is None else NetworkPolicy.from_json(d.network),
                force=force), on_progress)
            return template_ops.info(rec)
        if dockerfile is not None:
            raise BadRequestError("Dockerfile options need --from dockerfile:PATH")
        return await asyncio.to_thread(functools.partial(
            template_ops.build_here, self.mgr, name, source, packages=packages, force=force,
            rebuild=rebuild, free_mib=free_mib, progress=on_progress))

    async def prune_build_cache(self) -> PruneInfo:
        """Remove the Dockerfile step cache entries no template uses (``ember image
        prune``)."""
        from ember.sdk import dockerfile_build as dfb

        got = await asyncio.to_thread(dfb.prune, self)
        return PruneInfo(removed=got.removed, freed_bytes=got.freed_bytes,
                         sandboxes=got.sandboxes)

    async def list_templates(self) -> builtins.list[TemplateInfo]:
        return await asyncio.to_thread(template_ops.list_here, self.mgr)

    async def delete_template(self, name: str) -> None:
        await asyncio.to_thread(template_ops.remove_here, self.mgr, name)

    async def drop_template_snapshots(self, name: str) -> builtins.list[str]:
        return await asyncio.to_thread(template_ops.drop_snapshots_here, self.mgr, name)

    # --- pools ---------------------------------------------------------------------------
    async def set_pool(self, template: str, size: int, *, vcpus: int | None,
                       memory_mib: int | None, disk_mib: int | None) -> PoolInfo:
        return await pool_ops.set_here(self.mgr, template, size, vcpus, memory_mib, disk_mib)

    async def list_pools(self) -> builtins.list[PoolInfo]:
        return await pool_ops.list_here(self.mgr)

    async def remove_pool(self, key: str) -> None:
        await pool_ops.remove_here(self.mgr, key)


__all__ = ["Local"]
