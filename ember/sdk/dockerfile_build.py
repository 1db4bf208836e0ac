"""Templates from a Dockerfile, its RUN steps run in microVMs (``ember image build NAME
--from dockerfile:PATH``; docs/dockerfile.md).

The Dockerfile is parsed and planned first (:mod:`ember.guest.dockerfile`): nothing
unsupported reaches a VM. The build then walks the plan's file-system steps (RUN, COPY,
ADD, WORKDIR). Each step's result is a snapshot of the build sandbox, kept as the step
cache's entry under the step's key (parent key, instruction after expansion, content
digest of what it copies). A step whose key has an entry is not run ("cached"); the
first one that has none restores its parent's entry (or creates a sandbox from the base
template) and the rest run in that one sandbox, a snapshot after each. RUN goes through
``exec`` (the instruction's env, workdir and user), COPY through the files API (a tar the
guest unpacks). The result is an ordinary template: the last step's disk flattened into
an image of its own (:mod:`ember.guest.dockerfile_image`), the ENV/WORKDIR/USER/CMD/
ENTRYPOINT/EXPOSE/LABEL metadata under ``config["oci"]``, and its template snapshot made
by a first create before the build returns. The template is registered last: a failed or
killed build registers nothing. Build sandboxes carry their builder's identity, and the
next build (or prune) destroys those whose builder is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import secrets
import shlex
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import (
    BuildStepError,
    CommandNotFoundError,
    CommandTimeoutError,
    DockerfileError,
    EmberError,
    ImageSourceError,
    SnapshotError,
    SnapshotNotFoundError,
    TemplateNotFoundError,
)
from ember.guest import dockerfile as df
from ember.guest.dockerfile_context import (
    Context,
    ContextError,
    Entry,
    extract_guest_tar,
    is_archive,
    max_context_bytes,
)
from ember.net.policy import NetworkPolicy
from ember.runtime.states import LIVE_STATES
from ember.store import SnapshotRecord, TemplateRecord

if TYPE_CHECKING:
    from ember.sdk.async_sandbox import AsyncSandbox
    from ember.sdk.local import Local

Progress = Callable[[str], None] | None

#: Snapshot metadata of a step cache entry: its key.
STEP_META = "ember.build-step"
#: Sandbox metadata of a build sandbox: "pid:start time" of the process building.
BUILDER_META = "ember.builder"
RUN_TIMEOUT_S = 3600.0
#: A build sandbox's lifetime: the reaper ends it if its builder never does.
BUILD_LIFETIME_S = 4 * 3600.0
TAIL_BYTES = 2000
GUEST_TAR = "/tmp/.ember-copy.tar"
#: ember's own steps (COPY's unpacking, WORKDIR's mkdir, sync) run as root, whatever USER
#: the base image names (a build sandbox's commands get its template's defaults otherwise).
ROOT = 0


@dataclass(frozen=True)
class DockerfileSource:
    """Where a Dockerfile build reads from (on the host that builds)."""

    context: Path
    dockerfile: Path

    @classmethod
    def resolve(cls, path: str, dockerfile: str | None = None) -> DockerfileSource:
        """``path``: the context directory, or a Dockerfile (its directory is the context);
        ``dockerfile``: the Dockerfile (relative: to the context)."""
        p = Path(path)
        if not p.is_absolute():
            raise ContextError(f"dockerfile:{path}: give an absolute path")
        if p.is_file() and dockerfile is None:
            return cls(p.parent, p)
        if not p.is_dir():
            raise ContextError(f"dockerfile:{path}: no such file or directory")
        f = Path(dockerfile) if dockerfile else Path("Dockerfile")
        return cls(p, f if f.is_absolute() else p / f)


@dataclass(frozen=True)
class BuildOptions:
    build_args: Mapping[str, str] = dataclasses.field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    network: NetworkPolicy | None = None
    force: bool = False
    vcpus: int | None = None  # the build VM's shape (None: the FROM template's default)
    memory_mib: int | None = None


async def build_dockerfile(local: Local, name: str, src: DockerfileSource,
                           opts: BuildOptions, progress: Progress = None) -> TemplateRecord:
    """Build template ``name`` from ``src``; register it and return its record."""
    from ember.guest.image import validate_name

    validate_name(name)
    if not opts.force and _template(local, name) is not None:
        raise DockerfileError(f"template {name!r} already exists (use --force to replace it)")
    try:
        raw = src.dockerfile.read_bytes()[:df.MAX_DOCKERFILE_BYTES + 1]
    except OSError as err:
        raise ContextError(f"cannot read the Dockerfile {src.dockerfile}: {err}") from err
    text = raw.decode("utf-8", "replace")
    plan = df.plan(text, opts.build_args, opts.target)  # everything checked before any VM
    ctx = Context(src.context)
    size, count = await asyncio.to_thread(ctx.check)
    say = progress or (lambda _m: None)
    say(f"context {src.context}: {count} entries, {size >> 10} KiB")
    await asyncio.to_thread(sweep_orphans, local)
    b = _Build(local, ctx, opts, say)
    # each stage starts from its base image's metadata (ENV, WORKDIR, USER, CMD, ...)
    bases = {base: (await b.base(base, line)).config.get("oci") or {}
             for base, line in df.bases_of(plan)}
    plan = df.plan(text, opts.build_args, opts.target, bases)
    snap, key = await b.run(plan)
    rec = await asyncio.to_thread(_register, local, name, src, opts, plan, snap, key,
                                  list(dict.fromkeys(b.keys)), say)
    say(f"template {name}: {len(b.ran)} step(s) run, {b.cached} cached; making its "
        "template snapshot")
    try:
        sb = await local.create(name, vcpus=None, memory_mib=None, disk_mib=None,
                                timeout=600, env=None,
                                metadata={BUILDER_META: builder_identity()},
                                boot_timeout=None, on_progress=say, on_timeout="destroy",
                                isolation="microvm")
        await sb.kill()
    except EmberError as err:  # the template is whole; its first create makes the snapshot
        say(f"template {name}: its template snapshot was not made ({err}); the first "
            "create makes it")
    return rec


def _register(local: Local, name: str, src: DockerfileSource, opts: BuildOptions,
              plan: df.Plan, snap: SnapshotRecord, key: str, keys: list[str],
              say: Callable[[str], None]) -> TemplateRecord:
    """Flatten the last step's disk into the template's own image and register it."""
    from ember.guest.dockerfile_image import flatten
    from ember.runtime import snapshots, template_snapshots

    mgr = local.mgr
    base = mgr.store.get_template(snap.template)  # the image under the snapshot's disk
    oci = plan.final.config()
    source = f"dockerfile:{src.dockerfile}"
    digest = "sha256:" + hashlib.sha256(f"ember-dockerfile\0{key}".encode()).hexdigest()
    disk = snapshots.snapshot_dir(mgr.paths, snap.id) / snapshots.DISK
    meta = flatten(mgr.paths, disk, digest, {"digest": digest, "source": source,
                                             "config": oci},
                   {"source": source, "source_digest": base.digest, "packages": [],
                    "config": oci, "recipe": df.STEP_RECIPE}, say)
    defaults = {k: base.config[k] for k in ("memory_mib",) if k in base.config}
    rec = TemplateRecord(
        name=name, source=source, digest=digest, image_path=meta["image_path"],
        size_bytes=int(meta["size_bytes"]), created_at=time.time(),
        config={"oci": oci, "packages": [], "source_digest": base.digest, **defaults,
                "dockerfile": {"path": str(src.dockerfile), "from": plan.base,
                               "target": opts.target or "", "keys": keys}})
    mgr.store.put_template(rec, replace=opts.force)
    template_snapshots.collect(mgr, name)  # a replaced template's snapshots
    return rec


class _Build:
    def __init__(self, local: Local, ctx: Context, opts: BuildOptions,
                 say: Callable[[str], None]) -> None:
        self.local, self.ctx, self.opts, self.say = local, ctx, opts, say
        self.done: dict[str, SnapshotRecord] = {}  # this build's entries, by key
        self.stages: dict[str, tuple[SnapshotRecord, str]] = {}  # built stages, by index
        self.ran: list[str] = []
        self.keys: list[str] = []  # every state's key, cached or built
        self.cached = 0
        self.bases: dict[str, TemplateRecord] = {}  # FROM templates, by the FROM

    async def run(self, plan: df.Plan) -> tuple[SnapshotRecord, str]:
        """Build ``plan``; (its last state's snapshot, that state's key)."""
        for idx, dep in plan.deps.items():  # COPY --from stages first
            if idx not in self.stages:
                self.stages[idx] = await self.run(dep)
        base = await self.base(plan.base, plan.stage.line)
        key = df.base_key(plan.base, base.digest, str(base.config.get("snapshot", "")),
                          await asyncio.to_thread(self._vm_identity))
        steps = [s for s in plan.steps if s.kind != "meta"]
        current: SnapshotRecord | None = None
        sb: AsyncSandbox | None = None
        try:
            for i, step in enumerate(steps, 1):
                content = await self._content(step, plan)
                key = df.step_key(key, step, content)
                self.keys.append(key)
                where = f"step {i}/{len(steps)} (line {step.instruction.line})"
                found = self._lookup(key)
                if found is not None:
                    self.say(f"{where} {_short(step)}: cached")
                    self.cached += 1
                    if sb is not None:
                        await sb.kill()
                        sb = None
                    current = found
                    continue
                self.say(f"{where} {_short(step)}")
                if sb is None:
                    try:
                        sb = await self._start(base.name, current)
                    except (SnapshotError, SnapshotNotFoundError) as err:
                        if current is None or current in self.done.values():
                            raise
                        # a cache entry that cannot be restored (damaged, removed
                        # meanwhile): drop it and build this stage without the cache
                        self.say(f"cache entry {current.id[:12]} cannot be restored "
                                 f"({err}); building without the cache")
                        await asyncio.to_thread(self._drop, current)
                        self.opts = dataclasses.replace(self.opts, no_cache=True)
                        return await self.run(plan)
                await self._execute(sb, step, plan)
                current = await self._snapshot(sb, key)
                self.ran.append(key)
            if current is None:  # no step changes the file system: the base's state
                self.keys.append(key)
                found = self._lookup(key)
                if found is None:
                    sb = sb or await self._start(base.name, None)
                    found = await self._snapshot(sb, key)
                current = found
        finally:
            if sb is not None:
                with contextlib.suppress(EmberError):
                    await sb.kill()
        return current, key

    async def base(self, base: str, line: int) -> TemplateRecord:
        """The FROM template: a template's name; else an image source (``registry:...``,
        ``docker://...``, ``oci-layout:...``, ``debian:SUITE``, ...) or an image reference
        as Docker reads it (``python:3.11-slim``: Docker Hub, or ``EMBER_DEFAULT_REGISTRY``),
        built first as the template ``from-<hash>`` (kept: a later build of the same source
        reuses it)."""
        if base in self.bases:
            return self.bases[base]
        tpl = _template(self.local, base)
        if tpl is None:
            tpl = await self._from_source(base, line)
        self.bases[base] = tpl
        return tpl

    async def _from_source(self, base: str, line: int) -> TemplateRecord:
        source = base if is_source(base) else df.image_source(base, default_registry())
        if source is None:
            raise df.dockerfile_error(
                line, f"FROM {base}: no template of that name (see ember image ls), and not "
                "an image reference (python:3.11-slim, ghcr.io/org/repo:tag) or an image "
                "source (registry:HOST/REPO:TAG, docker://..., oci-layout:DIR, "
                "docker-archive:FILE, debian:SUITE, dir:PATH)")
        name = base_template_name(source)
        tpl = _template(self.local, name)
        via = "" if source == base else f" ({source})"
        if tpl is not None and tpl.source == source:
            self.say(f"FROM {base}: template {name}{via}")
            return tpl
        self.say(f"FROM {base}: building it as template {name}{via}")
        try:
            await self.local.build_template(name, source, packages=(), force=True,
                                            rebuild=False, free_mib=1024,
                                            on_progress=self.say)
        except ImageSourceError as err:
            if source == base:
                raise
            raise df.dockerfile_error(
                line, f"FROM {base}: no template of that name, and the image "
                f"{source.removeprefix('registry:')} cannot be pulled: {err}") from err
        return self.local.mgr.store.get_template(name)

    async def _start(self, template: str, parent: SnapshotRecord | None) -> AsyncSandbox:
        """A build sandbox: restored from ``parent``, else created from ``template``."""
        from ember.runtime.spec import SandboxSpec

        meta = {BUILDER_META: builder_identity()}
        if parent is None:
            return await self.local.create(
                template, vcpus=self.opts.vcpus, memory_mib=self.opts.memory_mib, disk_mib=None,
                timeout=BUILD_LIFETIME_S, env=None, metadata=meta, boot_timeout=None,
                on_progress=self.say, on_timeout="destroy", isolation="microvm",
                network=self.opts.network)
        spec = SandboxSpec(template=parent.template, vcpus=parent.vcpus,
                           memory_mib=parent.memory_mib, timeout=BUILD_LIFETIME_S, env={},
                           metadata=meta, on_timeout="destroy", network=self.opts.network)
        return await self.local.start_restore(parent, spec, None, self.say, None)

    def _vm_identity(self) -> dict[str, Any]:
        """What a cache entry (a snapshot) can only be restored under: kernel, agent, QEMU
        build, accelerator; and the build's network policy."""
        from ember.guest.image import agent_hash

        mgr = self.local.mgr
        return {"kernel": mgr.kernel().key, "agent": agent_hash(), "vmm": mgr.engine.version(),
                "accel": mgr.accel.accel, "network": None if self.opts.network is None
                else self.opts.network.to_json(), "vcpus": self.opts.vcpus,
                "memory_mib": self.opts.memory_mib}

    def _drop(self, snap: SnapshotRecord) -> None:
        from ember.runtime import snapshots

        with contextlib.suppress(EmberError):
            if not snapshots.users(self.local.mgr.store, snap.id, LIVE_STATES):
                snapshots.remove(self.local.mgr.paths, self.local.mgr.store, snap,
                                 LIVE_STATES)

    def _lookup(self, key: str) -> SnapshotRecord | None:
        if key in self.done:
            return self.done[key]
        if self.opts.no_cache:
            return None
        found = [s for s in self.local.mgr.store.list_snapshots()
                 if s.metadata.get(STEP_META) == key]
        return max(found, key=lambda s: s.created_at) if found else None

    async def _snapshot(self, sb: AsyncSandbox, key: str) -> SnapshotRecord:
        await sb.exec(["sync"], cwd="/", user=ROOT, timeout=120)
        name = f"build-{key[:24]}-{secrets.token_hex(4)}"
        taken = await asyncio.to_thread(self.local.mgr.snapshot, sb.id, name,
                                        shared={STEP_META: key})
        self.done[key] = taken.record
        return taken.record

    async def _content(self, step: df.Step, plan: df.Plan) -> str:
        c = step.copy
        if c is None:
            return ""
        if c.from_stage is not None:
            return self.stages[c.from_stage][1]
        try:
            entries = await asyncio.to_thread(self.ctx.resolve, c.sources, c.dest)
            return await asyncio.to_thread(self.ctx.digest, entries)
        except ContextError as err:
            raise df.dockerfile_error(step.instruction.line, str(err)) from err

    async def _execute(self, sb: AsyncSandbox, step: df.Step, plan: df.Plan) -> None:
        st = step.state
        if step.kind == "run":
            if step.instruction.name == "WORKDIR":  # ember's own step: as root
                await self._run(sb, step, list(step.argv), env=st.vars(), cwd="/", user=ROOT)
                return
            await self._run(sb, step, list(step.argv), env=st.vars(), cwd=st.workdir,
                            user=_user(st.user) or ROOT)
            return
        c = step.copy
        assert c is not None
        archives: list[Entry] = []
        with tempfile.TemporaryDirectory(prefix="ember-copy-") as tmp:
            tar = Path(tmp) / "copy.tar"
            if c.from_stage is not None:
                await self._copy_from_stage(step, plan, Path(tmp), tar)
            else:
                entries = await asyncio.to_thread(self.ctx.resolve, c.sources, c.dest)
                if c.add:  # ADD unpacks local tar archives (any compression tar reads)
                    archives = [e for e in entries if e.kind == "file"
                                and is_archive(self.ctx.root / e.rel)]
                    entries = [e for e in entries if e not in archives]
                await asyncio.to_thread(self.ctx.write_tar, entries, tar, c.chmod)
            await sb.files.upload(tar, GUEST_TAR, mode=0o600)
            for i, a in enumerate(archives):
                await sb.files.upload(self.ctx.root / a.rel, f"{GUEST_TAR}.{i}", mode=0o600)
        script = f"tar -xpf {GUEST_TAR} -C / && "
        if c.chown:
            script += (f"tar -tf {GUEST_TAR} | while IFS= read -r p; do "
                       f"chown -h {shlex.quote(c.chown)} \"/$p\" || exit 1; done && ")
        into = shlex.quote(c.dest if c.dest.endswith("/") else c.dest + "/")
        for i in range(len(archives)):
            script += (f"mkdir -p {into} && tar -xf {GUEST_TAR}.{i} -C {into} && "
                       f"rm -f {GUEST_TAR}.{i} && ")
        script += f"rm -f {GUEST_TAR}"
        await self._run(sb, step, ["/bin/sh", "-c", script], env={}, cwd="/", user=ROOT)

    async def _copy_from_stage(self, step: df.Step, plan: df.Plan, tmp: Path,
                               tar: Path) -> None:
        """COPY --from: tar the sources in a sandbox of that stage's last state, unpack
        them on the host (refusing anything that leaves the directory) and take them
        from there as from a context."""
        c = step.copy
        assert c is not None and c.from_stage is not None
        snap = self.stages[c.from_stage][0]
        src = await self._start("", snap)
        try:
            # the guest's shell expands the globs (sources are words without spaces)
            names = " ".join(s.lstrip("/") or "." for s in c.sources)
            script = f"cd / && tar -cf {GUEST_TAR} -- {names}"
            await self._run(src, step, ["/bin/sh", "-c", script], env={}, cwd="/", user=ROOT)
            await _download_bounded(src, GUEST_TAR, tmp / "from.tar",
                                    max_context_bytes() + (64 << 20))
        finally:
            with contextlib.suppress(EmberError):
                await src.kill()
        root = tmp / "from"
        root.mkdir()
        try:
            await asyncio.to_thread(extract_guest_tar, tmp / "from.tar", root)
            ctx = Context(root, guest_links=True)
            entries = ctx.resolve([s.lstrip("/") for s in c.sources], c.dest)
        except ContextError as err:
            raise df.dockerfile_error(step.instruction.line, str(err)) from err
        await asyncio.to_thread(ctx.write_tar, entries, tar, c.chmod)

    async def _run(self, sb: AsyncSandbox, step: df.Step, argv: list[str], *,
                   env: Mapping[str, str], cwd: str | None, user: str | int | None) -> None:
        tail = bytearray()
        partial = [""]

        def out(chunk: str) -> None:
            tail.extend(chunk.encode(errors="replace"))
            del tail[:-TAIL_BYTES]
            text = partial[0] + chunk
            *lines, partial[0] = text.split("\n")
            for line in lines:
                self.say(f"  | {line}"[:2000])

        try:
            res = await sb.exec(argv, env=env, cwd=cwd, user=user, timeout=RUN_TIMEOUT_S,
                                on_stdout=out, on_stderr=out)
            code = res.exit_code
        except CommandNotFoundError as err:
            code = 127
            tail.extend(str(err).encode())
        except CommandTimeoutError as err:
            raise _step_error(step, None, bytes(tail),
                              f"ran past {RUN_TIMEOUT_S:.0f} s") from err
        if partial[0]:
            self.say(f"  | {partial[0]}"[:2000])
        if code != 0:
            raise _step_error(step, code, bytes(tail), f"exited with code {code}")


SOURCE_PREFIXES = ("registry:", "docker://", "oci-layout:", "docker-archive:", "debian:",
                   "dir:")


def is_source(base: str) -> bool:
    """Whether FROM names an image source ``ember image build --from`` accepts."""
    return base.startswith(SOURCE_PREFIXES)


#: Where FROM's Docker Hub names are pulled from instead of Docker Hub (``HOST[:PORT]``):
#: a mirror, or an air-gapped site's registry (read by the process that builds).
DEFAULT_REGISTRY_ENV = "EMBER_DEFAULT_REGISTRY"


def default_registry() -> str | None:
    return os.environ.get(DEFAULT_REGISTRY_ENV) or None


def base_template_name(source: str) -> str:
    return "from-" + hashlib.sha256(source.encode()).hexdigest()[:12]


async def _download_bounded(sb: AsyncSandbox, path: str, dest: Path, limit: int) -> None:
    """A guest file to ``dest``, refusing more than ``limit`` bytes (the guest is not
    trusted to stop)."""
    size = 0
    with open(dest, "xb") as f:
        async for chunk in sb.files.read_chunks(path):
            size += len(chunk)
            if size > limit:
                raise ContextError(f"COPY --from: the stage's files are larger than "
                                   f"{limit >> 20} MiB")
            f.write(chunk)


def _step_error(step: df.Step, code: int | None, tail: bytes, what: str) -> BuildStepError:
    text = tail.decode("utf-8", "replace").strip()
    err = BuildStepError(f"Dockerfile line {step.instruction.line}: "
                         f"{step.instruction.text.splitlines()[0][:200]} {what}"
                         + (f"; last output:\n{text}" if text else ""))
    err.line, err.exit_code, err.output_tail = step.instruction.line, code, text
    return err


def _short(step: df.Step) -> str:
    text = " ".join(step.instruction.text.split())
    return text if len(text) <= 120 else text[:117] + "..."


def _user(user: str) -> str | int | None:
    if not user:
        return None
    name = user.split(":", 1)[0]
    return int(name) if name.isdigit() else name


def _template(local: Local, name: str) -> TemplateRecord | None:
    try:
        return local.mgr.store.get_template(name)
    except TemplateNotFoundError:
        return None


# --- the builder's identity, orphans and prune -----------------------------------------
def builder_identity(pid: int | None = None) -> str:
    """"pid:start time" of a process (the start time tells a reused pid apart)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(identity: str) -> bool:
    pid, _, start = identity.partition(":")
    return pid.isdigit() and bool(start) and _start_time(int(pid)) == start


def sweep_orphans(local: Local) -> list[str]:
    """Destroy build sandboxes whose builder died; return their ids."""
    gone = []
    for rec in local.mgr.store.list_sandboxes():
        who = rec.metadata.get(BUILDER_META)
        if who and not _alive(who):
            with contextlib.suppress(EmberError):
                local.mgr.destroy(rec.id)
                gone.append(rec.id)
    return gone


@dataclass(frozen=True)
class PruneResult:
    removed: list[str]  # snapshot ids
    freed_bytes: int
    sandboxes: list[str]  # orphaned build sandboxes destroyed


def prune(local: Local) -> PruneResult:
    """Remove the step cache entries that no template was built from (a template keeps
    the newest entry of each of its steps: rebuilding it is all cache hits) and no live
    sandbox was restored from, and the build sandboxes of dead builders."""
    from ember.runtime import snapshots

    mgr = local.mgr
    orphans = sweep_orphans(local)
    used: set[str] = set()
    keys: set[str] = set()
    for t in mgr.store.list_templates():
        if t.config.get("snapshot"):
            used.add(str(t.config["snapshot"]))
        built = t.config.get("dockerfile")
        if isinstance(built, dict) and isinstance(built.get("keys"), list):
            keys.update(str(k) for k in built["keys"])
    removed, freed = [], 0
    found = sorted(cache_entries(local), key=lambda s: s.created_at, reverse=True)
    newest: dict[str, str] = {}
    for snap in found:
        newest.setdefault(snap.metadata[STEP_META], snap.id)
    for snap in found:
        key = snap.metadata[STEP_META]
        if snap.id in used or (key in keys and newest[key] == snap.id):
            continue  # what a template was made of (an older one a --no-cache superseded goes)
        if snapshots.users(mgr.store, snap.id, LIVE_STATES):
            continue
        size = _dir_size(snapshots.snapshot_dir(mgr.paths, snap.id))
        try:
            snapshots.remove(mgr.paths, mgr.store, snap, LIVE_STATES)
        except EmberError:
            continue
        removed.append(snap.id)
        freed += size
    return PruneResult(removed, freed, orphans)


def _dir_size(d: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for f in d.iterdir():
            total += f.stat().st_blocks * 512
    return total


def is_step_snapshot(snap: SnapshotRecord) -> bool:
    return STEP_META in snap.metadata


def cache_entries(local: Local) -> list[SnapshotRecord]:
    return [s for s in local.mgr.store.list_snapshots() if is_step_snapshot(s)]


__all__: Sequence[str] = ("BuildOptions", "DockerfileSource", "PruneResult",
                          "build_dockerfile", "cache_entries", "is_step_snapshot", "prune")
