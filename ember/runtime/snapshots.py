"""Snapshots on disk: taking one from a sandbox, checking one before a restore, removing.

A snapshot is a directory ``$EMBER_HOME/snapshots/<id>/``:

``state``        QEMU's migration stream: device state (and guest RAM when the source's RAM
                 was not a shared file);
``ram``          guest RAM (sparse), when the source's RAM was a shared file; restores map
                 it privately, so clones share its unmodified pages copy-on-write;
``disk.qcow2``   the root disk at snapshot time, standalone over the template's base image;
``manifest.json`` what it was taken from and, per file, its size and content digest.

The id is the sha256 of the manifest: content-addressed. It is written in a staging
directory beside the store and renamed into place, then registered: a crash at any point
leaves either nothing or a complete snapshot (and staging leftovers that are swept).

Everything read back is validated before QEMU sees it: manifest shape, file sizes, and
(the first time, and whenever the files' inode/size/mtime changed) every file's digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember import proc
from ember.engine import VMHandle
from ember.engine.qemu.cpu import GuestCpu
from ember.errors import BadRequestError, EmberError, SandboxStateError, SnapshotError
from ember.guest.kernel import Kernel, kernel_by_key
from ember.locks import FileLock, owner_gone
from ember.paths import Paths
from ember.runtime.sparse import copy_sparse, digest
from ember.store import SandboxRecord, SnapshotRecord, Store, TemplateRecord
from ember.store.records import NETWORK_META, TENANT_KEY

log = logging.getLogger("ember.snapshots")

MANIFEST_VERSION = 1
STATE, RAM, DISK, MANIFEST = "state", "ram", "disk.qcow2", "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
STAGING_PREFIX = ".staging-"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def check_name(name: str) -> str:
    if (not isinstance(name, str) or not 1 <= len(name) <= 64 or not set(name) <= _NAME_CHARS
            or name[0] in ".-"):
        raise BadRequestError(
            f"snapshot name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'")
    if len(name) >= 6 and all(c in "0123456789abcdef" for c in name):
        raise BadRequestError(f"snapshot name {name!r} looks like an id; pick another")
    return name


@dataclass(frozen=True)
class Taken:
    record: SnapshotRecord
    pause_s: float  # how long the source's vCPUs were stopped
    total_s: float
    #: Held by the taker while it still needs the snapshot (a fork, until its clones are
    #: registered): the leftover sweep never removes a snapshot whose lock is held.
    lock: FileLock | None = None

    def release(self) -> None:
        """Idempotent."""
        if self.lock is not None and self.lock.held:
            release_hold(self.lock)


def hold_lock(paths: Paths, snapshot_id: str) -> FileLock:
    """The lock that marks a snapshot as being written or used by a live process."""
    paths.tmp.mkdir(parents=True, exist_ok=True)
    return FileLock(paths.tmp / f"snapshot-{snapshot_id}.lock")


def release_hold(lock: FileLock) -> None:
    if lock.held:
        lock.path.unlink(missing_ok=True)  # before release: no one finds a free stale file
    lock.release()


def snapshot_dir(paths: Paths, snapshot_id: str) -> Path:
    return paths.snapshots / snapshot_id


def take(paths: Paths, store: Store, engine: Any, handle: VMHandle, rec: SandboxRecord,
         *, kernel: Kernel, cmdline: str, ram_file: Path | None, overlay: Path,
         template: TemplateRecord, name: str | None, resume: bool,
         hold: bool = False, shared: dict[str, str] | None = None,
         device_model: str | None = None) -> Taken:
    """Write a snapshot of the running (or paused) sandbox ``rec``.

    The guest is paused while its state, RAM and disk are copied, then resumed if
    ``resume`` (and if it was running); hashing and publishing happen after that. With
    ``hold`` (a fork) the returned :class:`Taken` keeps the snapshot's hold lock (the
    caller releases it) and the snapshot is marked ephemeral: a killed taker's hold dies
    with it and the sweep collects the snapshot once no clone uses it. ``shared`` makes a
    snapshot any tenant's sandboxes start from (a template snapshot): it is registered
    with that metadata only, and without the source's env or tenant.
    """
    if name is not None:
        check_name(name)
    sweep_staging(paths)
    t0 = time.monotonic()
    staging = paths.snapshots / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    was_running = handle.status() == "running"
    resumed = False
    env = {} if shared is not None else dict(rec.env)
    if shared is not None:
        meta = dict(shared)
    else:
        meta = {**({"ephemeral": "fork"} if hold else {}),
                **{k: v for k, v in rec.metadata.items() if k == TENANT_KEY},
                # a networked sandbox's restores and clones inherit its policy
                **({NETWORK_META: json.dumps(rec.network, sort_keys=True)}
                   if rec.network is not None else {})}
    try:
        # Under KVM the guest runs on the host's CPU model: record it (before the pause).
        cpu = engine.guest_cpu(handle) if rec.accel == "kvm" else None
        saved = engine.save(handle, staging / STATE)
        if not saved.ram_in_stream:
            if ram_file is None or not ram_file.is_file():
                raise SnapshotError(f"sandbox {rec.id}: its RAM is not in the saved state "
                                    f"and its RAM file {ram_file} is missing")
            copy_sparse(ram_file, staging / RAM)
        _standalone_disk(overlay, Path(template.image_path), staging / DISK)
        pause_s = time.monotonic() - t0
        if resume and was_running:
            handle.cont()
            resumed = True
        manifest = {
            "version": MANIFEST_VERSION,
            "template": rec.template, "template_digest": template.digest,
            "kernel_key": kernel.key, "cmdline": cmdline,
            "vmm_version": saved.vmm_version, "accel": rec.accel,
            "vcpus": rec.vcpus, "memory_mib": rec.memory_mib, "disk_mib": rec.disk_mib,
            "ram_file": not saved.ram_in_stream, "source": rec.id,
            **({"device_model": device_model} if device_model else {}),
            **({"nic": True} if rec.network is not None else {}),
            "env": env, "created_at": time.time(),
            **({"cpu": cpu.to_json()} if cpu is not None else {}),
            "files": {f.name: {"size": f.stat().st_size, "digest": digest(f)}
                      for f in sorted(staging.iterdir())},
        }
        raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        (staging / MANIFEST).write_bytes(raw)
        sid = hashlib.sha256(raw).hexdigest()
        final = snapshot_dir(paths, sid)
        lock = hold_lock(paths, sid)  # from the rename until registered (or released)
        lock.acquire(5.0, f"snapshot {sid[:12]}")  # a sweep may be looking at it briefly
        try:
            staging.rename(final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(staging)  # the same content is stored already
        size = sum(f.stat().st_blocks * 512 for f in final.iterdir())
        snap = SnapshotRecord(
            id=sid, name=name, template=rec.template, template_digest=template.digest,
            kernel_key=kernel.key, vmm_version=saved.vmm_version, accel=rec.accel,
            vcpus=rec.vcpus, memory_mib=rec.memory_mib, disk_mib=rec.disk_mib,
            ram_file=not saved.ram_in_stream, size_bytes=size,
            created_at=float(manifest["created_at"]), source=rec.id, env=env, metadata=meta,
            verified=stat_signature(final))
        stored = store.add_snapshot(snap)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if "lock" in locals():
            release_hold(lock)
        raise
    finally:
        if resume and was_running and not resumed:
            with contextlib.suppress(EmberError):
                handle.cont()
    log.info("snapshot %s of sandbox %s: paused %.0f ms, total %.0f ms", sid[:12], rec.id,
             pause_s * 1000, (time.monotonic() - t0) * 1000)
    taken = Taken(stored, pause_s, time.monotonic() - t0, lock)
    if not hold:
        taken.release()
    return taken


def _standalone_disk(overlay: Path, base: Path, dest: Path) -> None:
    """The overlay's content as a new qcow2 over the template's base image only, so that a
    snapshot of a restored sandbox does not depend on its parent snapshot."""
    proc.run(["qemu-img", "convert", "-U", "-q", "-O", "qcow2", "-B", str(base), "-F", "raw",
              str(overlay), str(dest)], what="copy the sandbox disk into the snapshot",
             timeout=600)


def sweep_staging(paths: Paths) -> None:
    """Remove staging directories of snapshot writers that died."""
    if not paths.snapshots.is_dir():
        return
    for d in paths.snapshots.iterdir():
        if not d.name.startswith(STAGING_PREFIX):
            continue
        if owner_gone(d.name[len(STAGING_PREFIX):].split("-", 1)[0]):
            shutil.rmtree(d, ignore_errors=True)


def sweep_orphans(paths: Paths, store: Store, live_states: tuple[str, ...]) -> list[str]:
    """Remove what killed snapshot takers left: staging directories, snapshot directories
    that were never registered, and a fork's snapshot (taken with ``hold``, marked
    ephemeral) that nothing uses, unless a live process holds them. A user's unnamed
    snapshot is kept. Returns the ids removed."""
    sweep_staging(paths)
    removed: list[str] = []
    for f in paths.tmp.glob("snapshot-*.lock") if paths.tmp.is_dir() else []:
        stale = FileLock(f)
        if stale.try_acquire():  # its holder is gone: only the file is left
            release_hold(stale)
    if not paths.snapshots.is_dir():
        return removed
    known = {s.id: s for s in store.list_snapshots()}
    for d in paths.snapshots.iterdir():
        snap = known.get(d.name)
        if d.name.startswith(".") or (snap is not None and not snap.metadata.get("ephemeral")):
            continue  # staging (swept above), or a snapshot someone asked for
        lock = hold_lock(paths, d.name)
        if not lock.try_acquire():
            continue  # being written or used right now
        try:
            if snap is None and not _registered(store, d.name):
                _discard(paths, d)
                removed.append(d.name)
            elif snap is not None and not users(store, snap.id, live_states):
                with contextlib.suppress(EmberError):
                    remove(paths, store, snap, live_states)
                    removed.append(snap.id)
        finally:
            release_hold(lock)
    return removed


def _registered(store: Store, snapshot_id: str) -> bool:
    try:
        store.get_snapshot(snapshot_id)
    except EmberError:
        return False
    return True


def stat_signature(d: Path) -> str:
    sig = []
    for f in sorted(d.iterdir()):
        st = f.stat()
        sig.append([f.name, st.st_ino, st.st_size, st.st_mtime_ns])
    return json.dumps(sig)


# --- restore checks ----------------------------------------------------------------------


@dataclass(frozen=True)
class RestorePlan:
    snapshot: SnapshotRecord
    dir: Path
    kernel: Kernel
    cmdline: str
    template: TemplateRecord
    ram: Path | None
    state: Path
    disk: Path
    #: The guest CPU it was saved on (KVM snapshots); the restoring QEMU must match it.
    cpu: GuestCpu | None = None
    #: The guest has a NIC: a restore needs a network (see :func:`has_nic`).
    nic: bool = False


def plan_restore(paths: Paths, store: Store, snap: SnapshotRecord, *, vmm_version: str,
                 accel: str, template: TemplateRecord,
                 progress: Callable[[str], None] | None = None,
                 device_model: str | None = None) -> RestorePlan:
    """Check that ``snap`` can be restored here, or raise SnapshotError naming why.
    ``device_model``: the digest of the devices a restore would run now
    (:func:`ember.engine.qemu.argv.device_model`), compared with the one recorded."""
    d = snapshot_dir(paths, snap.id)
    manifest = read_manifest(d, snap.id)
    expect = {"template_digest": snap.template_digest, "kernel_key": snap.kernel_key,
              "vcpus": snap.vcpus, "memory_mib": snap.memory_mib, "disk_mib": snap.disk_mib,
              "ram_file": snap.ram_file, "vmm_version": snap.vmm_version}
    for key, value in expect.items():
        if manifest.get(key) != value:
            raise SnapshotError(f"snapshot {snap.id[:12]}: its manifest says {key}="
                                f"{manifest.get(key)!r}, the registry {value!r}")
    if template.digest != snap.template_digest:
        raise SnapshotError(
            f"snapshot {snap.id[:12]} was taken from template {snap.template!r} with digest "
            f"{snap.template_digest[:19]}, but that template is now {template.digest[:19]} "
            "(rebuilt?); the snapshot's disk no longer matches it")
    if not Path(template.image_path).is_file():
        raise SnapshotError(f"snapshot {snap.id[:12]}: template image {template.image_path} "
                            "is missing")
    kernel = kernel_by_key(paths, snap.kernel_key)
    if kernel is None:
        raise SnapshotError(f"snapshot {snap.id[:12]} was taken with kernel "
                            f"{snap.kernel_key[:12]}, which is no longer in the cache")
    if snap.vmm_version != vmm_version:
        raise SnapshotError(f"snapshot {snap.id[:12]} was taken with QEMU "
                            f"{snap.vmm_version}; this host runs {vmm_version}")
    if snap.accel != accel:
        raise SnapshotError(f"snapshot {snap.id[:12]} was taken under {snap.accel}; this "
                            f"host runs guests under {accel} (the CPU state differs)")
    recorded = manifest.get("device_model")
    if device_model is not None and recorded is not None and recorded != device_model:
        raise SnapshotError(f"snapshot {snap.id[:12]} was taken with another device model "
                            "(ember's QEMU devices or their options changed since); its "
                            "saved state would not load")
    files = manifest["files"]
    wanted = {STATE, DISK} | ({RAM} if snap.ram_file else set())
    if set(files) != wanted:
        raise SnapshotError(f"snapshot {snap.id[:12]}: manifest lists {sorted(files)}, "
                            f"expected {sorted(wanted)}")
    for fname, meta in files.items():
        f = d / fname
        try:
            size = f.stat().st_size
        except OSError as err:
            raise SnapshotError(f"snapshot {snap.id[:12]}: {fname} is missing: {err}") from err
        if size != meta["size"]:
            raise SnapshotError(f"snapshot {snap.id[:12]}: {fname} has {size} bytes, the "
                                f"manifest says {meta['size']} (truncated or corrupt)")
    signature = stat_signature(d)
    if snap.verified != signature:
        if progress:
            progress(f"verifying snapshot {snap.id[:12]}")
        for fname, meta in files.items():
            if digest(d / fname) != meta["digest"]:
                raise SnapshotError(f"snapshot {snap.id[:12]}: {fname} does not match its "
                                    "digest (corrupt)")
        store.set_snapshot_verified(snap.id, signature)
    cpu = None
    if accel == "kvm":
        if "cpu" not in manifest:
            raise SnapshotError(f"snapshot {snap.id[:12]} was taken under KVM but records no "
                                "guest CPU; it cannot be checked against this host's CPU")
        try:
            cpu = GuestCpu.from_json(manifest["cpu"])
        except SnapshotError as err:
            raise SnapshotError(f"snapshot {snap.id[:12]}: {err}") from err
    return RestorePlan(snapshot=snap, dir=d, kernel=kernel, cmdline=str(manifest["cmdline"]),
                       template=template, ram=d / RAM if snap.ram_file else None,
                       state=d / STATE, disk=d / DISK, cpu=cpu, nic=bool(manifest.get("nic")))


def has_nic(paths: Paths, snap: SnapshotRecord) -> bool:
    """Whether ``snap``'s guest has a NIC (it was taken from a networked sandbox): its
    restores run the NIC's device model and need a network."""
    try:
        return bool(read_manifest(snapshot_dir(paths, snap.id), snap.id).get("nic"))
    except (SnapshotError, OSError):
        return False  # plan_restore says what is wrong with it


def inherited_network(snap: SnapshotRecord) -> dict[str, Any] | None:
    """The egress policy of the sandbox ``snap`` was taken from (None: not recorded)."""
    raw = snap.metadata.get(NETWORK_META)
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def read_manifest(d: Path, snapshot_id: str) -> dict[str, Any]:
    path = d / MANIFEST
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as err:
        raise SnapshotError(f"snapshot {snapshot_id[:12]}: cannot read {path}: "
                            f"{err.strerror}") from err
    if len(raw) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"snapshot {snapshot_id[:12]}: manifest is too large")
    if hashlib.sha256(raw).hexdigest() != snapshot_id:
        raise SnapshotError(f"snapshot {snapshot_id[:12]}: manifest does not match the "
                            "snapshot id (corrupt or replaced)")
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise SnapshotError(f"snapshot {snapshot_id[:12]}: manifest is not JSON") from err
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise SnapshotError(f"snapshot {snapshot_id[:12]}: unknown manifest version")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("size"), int)
            and isinstance(v.get("digest"), str) for k, v in files.items()):
        raise SnapshotError(f"snapshot {snapshot_id[:12]}: manifest has no valid file list")
    if not isinstance(manifest.get("cmdline"), str):
        raise SnapshotError(f"snapshot {snapshot_id[:12]}: manifest has no kernel cmdline")
    return manifest


# --- removal -----------------------------------------------------------------------------


def users(store: Store, snapshot_id: str, live_states: tuple[str, ...]) -> list[str]:
    """Live sandboxes restored from it and templates baked from it."""
    out = [sid for sid in store.sandboxes_using_snapshot(snapshot_id)
           if store.get_sandbox(sid).state in live_states]
    out += [f"template {t.name}" for t in store.list_templates()
            if t.config.get("snapshot") == snapshot_id]
    return out


def remove(paths: Paths, store: Store, snap: SnapshotRecord,
           live_states: tuple[str, ...]) -> None:
    used = users(store, snap.id, live_states)
    if used:
        raise SandboxStateError(f"snapshot {snap.name or snap.id[:12]} is in use by "
                                f"{', '.join(used)}; destroy those first")
    store.delete_snapshot(snap.id)
    _discard(paths, snapshot_dir(paths, snap.id))


def _discard(paths: Paths, d: Path) -> None:
    """Remove a snapshot directory: renamed away first (atomic: never a half-removed
    snapshot under its id), then deleted."""
    trash = paths.snapshots / f"{STAGING_PREFIX}{os.getpid()}-rm-{secrets.token_hex(4)}"
    with contextlib.suppress(FileNotFoundError):
        d.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
