"""Templates across the nodes of a cluster (docs/cluster.md, "Templates across nodes"):
a daemon that must create a sandbox of a template it does not hold fetches it from a node
that does, daemon to daemon, and checks it before registering it.

* **Who holds what**: the directory's ``template/<name>/<node>`` entries
  (:mod:`ember.cluster.templates`), read in a child process (the daemon never imports Ray)
  and written by :func:`publish` after every build, removal and pull and when the daemon
  starts.
* **The transfer** (:func:`pull`): the holder's manifest (``GET
  /v1/cluster/templates/{name}/manifest``), then each file of its image directory (``GET
  /v1/cluster/images/{hex}/{file}``, frames of data regions: a sparse image stays sparse,
  :mod:`ember.cluster.transfer`), both vouched for as the administrator with the cluster's
  secret. Written into a staging directory (``$EMBER_CACHE/tmp/pull-*``, flock-ed while
  its pull lives; a dead pull's is swept by the next pull and when the daemon starts),
  checked against what the manifest announced, then the image's **tree digest is
  recomputed from the ext4 image** (:mod:`ember.guest.ext4_digest`) and must be the digest
  the directory names: otherwise :class:`TemplateDigestError` and nothing is kept. Then
  the directory is renamed into ``images/<digest>/`` and the template registered, as a
  build does.
* **One pull per template**: a lock per name in the daemon and a lock file per name in the
  cache; a create that finds a pull under way waits for it and uses its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from ember.cluster import child
from ember.cluster.directory import Directory, NodeEntry
from ember.cluster.record import ClusterRecord, load_record, load_secret
from ember.cluster.templates import Holders, held, parse_holders, sources, wanted_digest
from ember.cluster.transfer import FILES, FileEntry, FrameDecoder, Manifest, describe
from ember.cluster.vouch import FORWARDED_HEADER, VOUCH_HEADER, sign
from ember.daemon.auth import ADMIN
from ember.errors import (
    BadRequestError,
    EmberError,
    EmberTimeoutError,
    HostError,
    TemplateDigestError,
    TemplateNotFoundError,
    TemplateTransferError,
)
from ember.guest.ext4_digest import image_digest
from ember.locks import FileLock, locked_staging, sweep_abandoned
from ember.paths import Paths
from ember.store import Store, TemplateRecord

log = logging.getLogger("ember.daemon")
Progress = Callable[[str], None] | None

#: Reading the directory and the template holders (a child process); writing this node's.
LOOKUP_TIMEOUT_S = 10.0
SYNC_TIMEOUT_S = 15.0
#: Reaching a holder's daemon; a holder that sends nothing for this long is given up.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 60.0
#: A whole pull (every holder tried, the transfer and the check).
PULL_TIMEOUT_S = 1800.0
MANIFEST_MAX_BYTES = 1 << 20
STAGING_PREFIX = "pull-"
#: A pull's staging directories (its data, before the digest is checked).
STAGE_PREFIX = f"{STAGING_PREFIX}stage-"
#: How often the progress says how far the transfer is.
PROGRESS_EVERY = 64 << 20

_guard = threading.Lock()
_locks: dict[str, threading.Lock] = {}


# --- the directory ------------------------------------------------------------------------
def read_cluster(address: str) -> tuple[Directory, Holders]:
    """One reading of the directory and the template holders (a child process)."""
    answer = child.ask("templates", "read", address,
                       what="reading the cluster's template directory", timeout=LOOKUP_TIMEOUT_S)
    try:
        return Directory.from_json(answer["directory"]), parse_holders(answer.get("templates"))
    except (ValueError, KeyError, TypeError) as err:
        raise HostError(f"reading the cluster's template directory failed: {err}") from err


def publish(paths: Paths, store: Store) -> dict[str, Any] | None:
    """Make the directory say which templates this node holds (None: in no cluster, or
    the cluster cannot be reached, which is logged: the next publish catches up)."""
    try:
        rec = load_record(paths)
    except HostError:
        return None
    if rec is None:
        return None
    try:
        return child.ask("templates", "sync", rec.address, rec.node_id,
                         stdin=json.dumps(held(store)).encode(),
                         what="publishing this node's templates", timeout=SYNC_TIMEOUT_S)
    except EmberError as err:
        log.warning("could not publish this node's templates to the cluster: %s", err)
        return None


async def publish_async(paths: Paths, store: Store) -> None:
    await asyncio.to_thread(publish, paths, store)


def on_start(paths: Paths, store: Store) -> threading.Thread:
    """When the daemon starts: sweep what dead pulls left, then publish (in a thread)."""
    def body() -> None:
        sweep_stale(paths)
        publish(paths, store)

    t = threading.Thread(target=body, name="ember-templates-publish", daemon=True)
    t.start()
    return t


# --- a create of a template this node does not hold ----------------------------------------
async def ensure(paths: Paths, store: Store, name: str) -> None:
    """Before a create on a node of a cluster: fetch ``name`` from a holder when this home
    does not hold it (nothing to do outside a cluster or when it is here)."""
    try:
        await asyncio.to_thread(store.get_template, name)
        return
    except TemplateNotFoundError:
        pass
    try:
        rec = await asyncio.to_thread(load_record, paths)
    except HostError:
        return
    if rec is None:
        return
    await asyncio.to_thread(pull, paths, store, rec, name)


# --- the pull -------------------------------------------------------------------------------
def pull(paths: Paths, store: Store, rec: ClusterRecord, name: str, *, force: bool = False,
         progress: Progress = None) -> TemplateRecord:
    """Fetch template ``name`` from a node that holds it, check its digest and register
    it; answer its record (at once when this home holds it already at the wanted digest).
    One pull per name at a time: others wait for it (at most :data:`PULL_TIMEOUT_S`)."""
    deadline = time.monotonic() + PULL_TIMEOUT_S
    with _guard:
        lock = _locks.setdefault(name, threading.Lock())
    if not lock.acquire(timeout=PULL_TIMEOUT_S):
        raise EmberTimeoutError(f"another pull of {name!r} did not end within "
                                f"{PULL_TIMEOUT_S:.0f} s")
    try:
        paths.ensure()
        file_lock = FileLock(paths.cache_tmp / f"{STAGING_PREFIX}{name}.lock")
        while not file_lock.try_acquire():  # another process of this cache pulls it
            if time.monotonic() > deadline:
                raise EmberTimeoutError(f"another pull of {name!r} did not end within "
                                        f"{PULL_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        try:
            return _pull(paths, store, rec, name, force, progress, deadline)
        finally:
            file_lock.release()
    finally:
        lock.release()


def _pull(paths: Paths, store: Store, rec: ClusterRecord, name: str, force: bool,
          progress: Progress, deadline: float) -> TemplateRecord:
    directory, holders = read_cluster(rec.address)
    digest = wanted_digest(holders, name, rec.node_id)
    try:
        mine: TemplateRecord | None = store.get_template(name)
    except TemplateNotFoundError:
        mine = None
    if digest is None:
        if mine is not None:
            return mine
        raise TemplateNotFoundError(f"template {name!r} is held by no node of the cluster")
    if mine is not None:
        if mine.digest == digest:
            return mine  # a pull that ended while this one waited, or a build
        if not force:
            raise BadRequestError(f"this node holds template {name!r} at {mine.digest}, the "
                                  f"cluster at {digest}: pull with force to replace it")
    secret = load_secret(paths)
    if secret is None:
        raise TemplateTransferError("this node has no cluster secret (join again)")
    nodes = sources(directory, holders, name, digest, rec.node_id)
    if not nodes:
        raise TemplateTransferError(f"no live node that holds template {name!r} at {digest} "
                                    "published a daemon")
    errors: list[TemplateTransferError] = []
    for node in nodes:  # a holder that fails (its copy corrupt included): the next one
        if time.monotonic() > deadline:
            break
        try:
            got = _pull_from(paths, store, rec, node, secret, name, digest, force or
                             mine is not None, progress, deadline)
        except TemplateTransferError as err:
            log.warning("pulling %s from node %s: %s", name, node.node_id[:12], err)
            if progress:
                progress(f"node {node.node_id[:12]}: {err}")
            errors.append(err)
            continue
        publish(paths, store)
        return got
    corrupt = [e for e in errors if isinstance(e, TemplateDigestError)]
    if corrupt or errors:
        raise (corrupt or errors)[-1]  # a corrupt copy is the news, else the last failure
    raise EmberTimeoutError(f"pulling {name!r} did not end within {PULL_TIMEOUT_S:.0f} s")


def _pull_from(paths: Paths, store: Store, rec: ClusterRecord, node: NodeEntry, secret: str,
               name: str, digest: str, replace: bool, progress: Progress,
               deadline: float) -> TemplateRecord:
    t0 = time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        manifest = _manifest(client, rec, node, secret, name, digest)
        final = paths.images / manifest.hex
        if progress:
            progress(f"pulling {name} ({digest[:19]}, {manifest.data_bytes / (1 << 20):.1f} "
                     f"MiB of data) from node {node.node_id[:12]} ({node.daemon})")
        if not (final / "rootfs.ext4").is_file() or not (final / "meta.json").is_file():
            with staging(paths) as stage:
                image = stage / "image"
                image.mkdir()
                for entry in manifest.files:
                    _fetch(client, rec, node, secret, manifest, entry, image / entry.name,
                           progress, deadline)
                _check(manifest, image, stage / "verify", progress)
                meta = json.loads((image / "meta.json").read_text())
                meta["image_path"] = str(final / "rootfs.ext4")
                (image / "meta.json").write_text(json.dumps(meta, indent=1))
                (image / "rootfs.ext4").chmod(0o444)
                for f in image.iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                try:
                    os.rename(image, final)
                except OSError as err:
                    if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise TemplateTransferError(f"registering {name}: {err}") from err
        elif progress:
            progress(f"this node's cache has image {manifest.hex[:12]} already")
    rec_t = TemplateRecord(name=name, source=manifest.source, digest=digest,
                           image_path=str(final / "rootfs.ext4"),
                           size_bytes=manifest.size_bytes, created_at=time.time(),
                           config={**manifest.config, "pulled_from": node.node_id})
    store.put_template(rec_t, replace=replace)
    log.info("template %s (%s) pulled from node %s in %.1f s", name, digest,
             node.node_id[:12], time.monotonic() - t0)
    return rec_t


def _headers(secret: str, path: str, rec: ClusterRecord) -> dict[str, str]:
    return {VOUCH_HEADER: sign(secret, ADMIN, "GET", path), FORWARDED_HEADER: rec.node_id}


def _manifest(client: httpx.Client, rec: ClusterRecord, node: NodeEntry, secret: str,
              name: str, digest: str) -> Manifest:
    path = f"/v1/cluster/templates/{name}/manifest"
    try:
        with client.stream("GET", f"http://{node.daemon}{path}",
                           headers=_headers(secret, path, rec)) as r:
            body = b""
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > MANIFEST_MAX_BYTES:
                    raise TemplateTransferError(f"node {node.node_id[:12]}'s manifest of "
                                                f"{name!r} is over {MANIFEST_MAX_BYTES} bytes")
            status = r.status_code
    except httpx.HTTPError as err:
        raise TemplateTransferError(f"node {node.node_id[:12]} ({node.daemon}) does not "
                                    f"answer: {type(err).__name__}: {err}") from err
    try:
        raw = json.loads(body)
    except ValueError as err:
        raise TemplateTransferError(f"node {node.node_id[:12]} answered {status} without "
                                    "JSON") from err
    if status != 200:
        msg = raw.get("error", {}).get("message") if isinstance(raw, dict) else None
        raise TemplateTransferError(f"node {node.node_id[:12]} answered {status} for the "
                                    f"manifest of {name!r}: {str(msg)[:500]}")
    return Manifest.from_json(raw, name=name, digest=digest)


def _fetch(client: httpx.Client, rec: ClusterRecord, node: NodeEntry, secret: str,
           manifest: Manifest, entry: FileEntry, out: Path, progress: Progress,
           deadline: float) -> None:
    """One file of the image, its frames written where they belong (holes stay holes)."""
    path = f"/v1/cluster/images/{manifest.hex}/{entry.name}"
    decoder = FrameDecoder(entry)
    told = 0
    try:
        with open(out, "wb") as f, client.stream(
                "GET", f"http://{node.daemon}{path}", headers=_headers(secret, path, rec)) as r:
            if r.status_code != 200:
                raise TemplateTransferError(f"node {node.node_id[:12]} answered "
                                            f"{r.status_code} for {entry.name}")
            for chunk in r.iter_raw():
                for offset, data in decoder.feed(chunk):
                    os.pwrite(f.fileno(), data, offset)
                if time.monotonic() > deadline:
                    raise EmberTimeoutError(f"pulling {manifest.name!r} did not end within "
                                            f"{PULL_TIMEOUT_S:.0f} s")
                if progress and decoder.received - told >= PROGRESS_EVERY:
                    told = decoder.received
                    progress(f"{entry.name}: {told >> 20} of {entry.data_bytes >> 20} MiB")
            decoder.finish()
            f.truncate(entry.size)
    except httpx.HTTPError as err:
        raise TemplateTransferError(f"the transfer of {entry.name} from node "
                                    f"{node.node_id[:12]} broke off: {type(err).__name__}: "
                                    f"{err}") from err
    except OSError as err:
        raise TemplateTransferError(f"writing {out}: {err}") from err


def _check(manifest: Manifest, image: Path, work: Path, progress: Progress) -> None:
    """The received image must be the template the directory names: its meta.json says
    that digest and the tree inside its ext4 image hashes to it."""
    try:
        meta = json.loads((image / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise TemplateDigestError(f"the meta.json of {manifest.name!r} is not JSON") from err
    if not isinstance(meta, dict) or meta.get("digest") != manifest.digest:
        raise TemplateDigestError(f"the meta.json of {manifest.name!r} names another digest")
    if progress:
        progress("checking the image's digest (its tree, read from the ext4 image)")
    work.mkdir()
    try:
        got = image_digest(image / "rootfs.ext4", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if got != manifest.digest:
        raise TemplateDigestError(f"template {manifest.name!r} came with digest {got}, not "
                                  f"{manifest.digest}: refused, nothing kept")


@contextlib.contextmanager
def staging(paths: Paths) -> Iterator[Path]:
    """A pull's staging directory, flock-ed while the pull lives; removed after it."""
    with locked_staging(paths.cache_tmp, STAGE_PREFIX) as stage:
        yield stage


def sweep_stale(paths: Paths) -> list[str]:
    """Remove the staging directories of pulls that died (killed, crashed)."""
    return sweep_abandoned(paths.cache_tmp.glob(f"{STAGE_PREFIX}*"))


# --- the holder's side ----------------------------------------------------------------------
def manifest_of(paths: Paths, store: Store, name: str) -> Manifest:
    """What this node says about its template ``name`` to a node that pulls it."""
    t = store.get_template(name)
    if "snapshot" in t.config:
        raise BadRequestError(f"template {name!r} is pre-baked (a snapshot of this node): "
                              "it does not travel; bake it on each node")
    hexd = t.digest.split(":", 1)[-1]
    d = paths.images / hexd
    if not all((d / f).is_file() for f in FILES):
        raise TemplateNotFoundError(f"template {name!r}'s image is not in this node's cache")
    raw = {"name": t.name, "digest": t.digest, "source": t.source,
           "size_bytes": (d / "rootfs.ext4").stat().st_size,
           "config": {k: v for k, v in t.config.items() if k != "pulled_from"},
           "files": [describe(d / f).to_json() for f in FILES]}
    return Manifest.from_json(raw, name=name)


def image_file(paths: Paths, hexd: str, name: str) -> Path:
    if name not in FILES or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise BadRequestError(f"no such image file: {hexd[:64]}/{name[:32]}")
    f = paths.images / hexd / name
    if not f.is_file():
        raise TemplateNotFoundError(f"image {hexd[:12]} is not in this node's cache")
    return f
