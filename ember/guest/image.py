"""Build, list and remove templates: bootable read-only ext4 root filesystem images.

A build stages everything in a temporary directory on the cache's filesystem, then renames
the finished image into the content-addressed cache (``images/<digest>/``) and registers the
template in the store last, so that no half-written artifact is ever visible.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember import proc
from ember.errors import BadRequestError, BuildError, HostCommandError, ImageSourceError
from ember.guest import digest as digests
from ember.guest import inject, rootfs_debian
from ember.locks import locked_staging
from ember.paths import Paths
from ember.store import Store, TemplateRecord

Progress = Callable[[str], None] | None

#: Bump when the way images are assembled changes (invalidates cached Debian builds).
IMAGE_RECIPE = ("ember-image-v2: minbase, /dev emptied, /.ember injected, ext4 -m0, "
                "Debian login shells run no program")
DEBOOTSTRAP_RECIPE = "debootstrap --variant=minbase v1"
DEFAULT_FREE_MIB = 1024
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Recipe:
    source: str
    packages: tuple[str, ...] = ()
    #: The template's default memory size for its sandboxes (None: ember's default).
    memory_mib: int | None = None


BUILTIN: dict[str, Recipe] = {
    "debian-python": Recipe("debian:bookworm", ("python3", "coreutils", "procps",
                                                "ca-certificates")),
    "debian": Recipe("debian:bookworm"),
    # E2B's Code Interpreter template (docs/e2b.md): a Jupyter kernel from Debian's packages,
    # driven by ember's kernel bridge (ember/e2b/kernel_bridge.py, put in at first use).
    # debootstrap does not resolve virtual packages: the last two provide python3-zmq's
    # python3-cffi-backend-api-* and gdb's (via debugpy) libboost-regex1.74.0-icu72.
    "code-interpreter-v1": Recipe("debian:bookworm", (
        "python3", "coreutils", "procps", "ca-certificates", "python3-ipykernel",
        "python3-jupyter-client", "python3-matplotlib", "python3-numpy", "python3-pandas",
        "python3-cffi-backend", "libboost-regex1.74.0"),
        # a kernel with pandas and matplotlib loaded holds ~150 MiB; a few contexts fit
        memory_mib=1024),
}


def validate_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise BadRequestError(
            f"invalid template name {name!r}: use 1-63 of a-z 0-9 . _ - starting with a "
            "letter or digit"
        )


def build_image(
    paths: Paths,
    store: Store,
    name: str,
    source: str | None = None,
    *,
    packages: Sequence[str] = (),
    force: bool = False,
    rebuild: bool = False,
    free_mib: int = DEFAULT_FREE_MIB,
    progress: Progress = None,
) -> TemplateRecord:
    """Build template ``name`` from ``source`` and register it; return its record."""
    validate_name(name)
    defaults: dict[str, Any] = {}
    if source is None:
        if name not in BUILTIN:
            raise BadRequestError(f"template {name!r} is not built in: give --from SOURCE")
        source, packages = BUILTIN[name].source, BUILTIN[name].packages
        if BUILTIN[name].memory_mib is not None:
            defaults["memory_mib"] = BUILTIN[name].memory_mib
    if not 0 <= free_mib <= 1 << 20:
        raise BadRequestError(f"free space {free_mib} MiB is out of range")
    if not force and any(t.name == name for t in store.list_templates()):
        raise BadRequestError(f"template {name!r} already exists (use --force to replace it)")
    paths.ensure()
    from ember.guest.runtime_bundle import build_runtime

    runtime_dir = build_runtime(paths, progress=progress)
    recipe_key = None
    if source.startswith("debian:"):
        suite = source.split(":", 1)[1]
        rootfs_debian.check_suite(suite)
        rootfs_debian.check_packages(packages)
        recipe_key = _recipe_key(source, packages, runtime_dir, free_mib)
        cached = None if rebuild else _lookup_recipe(paths, recipe_key)
        if cached is not None:
            if progress:
                progress(f"reusing cached image {cached['digest']} (same recipe)")
            return _register(store, name, cached, force, defaults)
    with _staging(paths) as stage:
        meta = _assemble(paths, stage, source, packages, runtime_dir, free_mib, progress)
        final = paths.images / meta["digest"].split(":", 1)[1]
        meta["image_path"] = str(final / "rootfs.ext4")
        (stage / "image" / "meta.json").write_text(json.dumps(meta, indent=1))
        if not (final / "rootfs.ext4").exists():
            _fsync_tree(stage / "image")
            try:
                os.rename(stage / "image", final)
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        if recipe_key is not None:
            _atomic_write(paths.images / "recipes" / f"{recipe_key}.json", json.dumps(meta))
    return _register(store, name, meta, force, defaults)


def remove_image(paths: Paths, store: Store, name: str) -> TemplateRecord:
    users = store.sandboxes_using_template(name)
    store.get_template(name)  # raises TemplateNotFoundError
    if users:
        raise BadRequestError(
            f"template {name!r} is in use by sandbox(es) {', '.join(users)}: remove them first"
        )
    rec = store.delete_template(name)
    img_dir = Path(rec.image_path).parent
    own_cache = paths.cache == paths.home / "cache"
    if own_cache and not store.template_image_in_use(rec.image_path) and img_dir.is_dir():
        shutil.rmtree(img_dir, ignore_errors=True)
        for recipe in (paths.images / "recipes").glob("*.json"):
            try:
                if json.loads(recipe.read_text()).get("image_path") == rec.image_path:
                    recipe.unlink()
            except (OSError, ValueError):
                continue
    return rec


# --- internals -------------------------------------------------------------------------
def _assemble(paths: Paths, stage: Path, source: str, packages: Sequence[str],
              runtime_dir: Path, free_mib: int, progress: Progress) -> dict[str, Any]:
    rootfs = stage / "rootfs"
    rootfs.mkdir(mode=0o755)
    config: dict[str, Any] = {}
    source_digest = ""
    try:
        if source.startswith("debian:"):
            _debian_rootfs(paths, source.split(":", 1)[1], packages, rootfs, progress)
            rootfs_debian.quick_login(rootfs)
        elif source.startswith("dir:") or _is_plain_dir(source):
            _copy_dir(Path(source.removeprefix("dir:")), rootfs, progress)
        else:
            from ember.guest.oci import extract_oci

            work = stage / "work"
            work.mkdir()
            pulled = extract_oci(source, rootfs, work=work, progress=progress)
            config = pulled.config.to_json()
            source_digest = pulled.digest
            shutil.rmtree(work)
        _prepare_rootfs(rootfs)
        if progress:
            progress("injecting ember init, agent and runtime into /.ember")
        inject.inject(rootfs, runtime_dir)
        if progress:
            progress("hashing the root filesystem")
        digest = digests.tree_digest(rootfs)
        meta: dict[str, Any] = {
            "digest": digest,
            "source": source,
            "source_digest": source_digest,
            "packages": list(packages),
            "config": config,
            "created_at": time.time(),
            "recipe": IMAGE_RECIPE,
        }
        inject.write_image_json(rootfs, {k: meta[k] for k in ("digest", "source", "config")})
        image_dir = stage / "image"
        image_dir.mkdir()
        size = _make_ext4(rootfs, image_dir / "rootfs.ext4", free_mib, progress)
        meta["size_bytes"] = size
        return meta
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise BuildError(f"disk full while building image from {source}: {err}") from err
        raise BuildError(f"building image from {source} failed: {err}") from err


def _make_ext4(rootfs: Path, out: Path, free_mib: int, progress: Progress) -> int:
    content, entries = digests.tree_size(rootfs)
    size_mib = math.ceil((content * 1.1 + entries * 4096) / (1 << 20)) + 64 + free_mib
    if progress:
        progress(f"writing ext4 image ({size_mib} MiB, sparse)")
    with open(out, "wb") as f:
        f.truncate(size_mib << 20)
    try:
        proc.run(["mkfs.ext4", "-q", "-F", "-L", "ember-root", "-m", "0", "-d", str(rootfs),
                  str(out)], what="mkfs.ext4 -d (build the root filesystem image)", timeout=1800)
    except HostCommandError as err:
        if "No space left" in err.stderr_tail:
            raise BuildError(f"disk full while writing {out}: {err.stderr_tail}") from err
        raise BuildError(str(err)) from err
    out.chmod(0o444)
    return size_mib << 20


def _debian_rootfs(paths: Paths, suite: str, packages: Sequence[str], rootfs: Path,
                   progress: Progress) -> None:
    """debootstrap, or unpack the cached tarball of the same debootstrap (the slow step:
    changing ember's agent must not download Debian again)."""
    key = hashlib.sha256(json.dumps({
        "suite": suite, "packages": sorted(packages), "mirror": rootfs_debian.DEFAULT_MIRROR,
        "recipe": DEBOOTSTRAP_RECIPE}, sort_keys=True).encode()).hexdigest()
    cached = paths.cache / "rootfs" / f"debian-{key}.tar"
    tar_opts = ["--numeric-owner", "--xattrs", "--xattrs-include=*"]
    if cached.is_file():
        if progress:
            progress(f"unpacking cached debootstrap of {suite}")
        proc.run(["tar", "-xpf", str(cached), "-C", str(rootfs), *tar_opts],
                 what="unpack the cached Debian root filesystem", timeout=900)
        return
    rootfs_debian.debootstrap(suite, rootfs, packages=packages, progress=progress)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        proc.run(["tar", "-cf", str(tmp), "-C", str(rootfs), *tar_opts, "."],
                 what="cache the Debian root filesystem", timeout=900)
        os.replace(tmp, cached)
    finally:
        tmp.unlink(missing_ok=True)


def _register(store: Store, name: str, meta: dict[str, Any], force: bool,
              defaults: dict[str, Any] | None = None) -> TemplateRecord:
    """``defaults``: sandbox settings its sandboxes get unless asked (``memory_mib``)."""
    image_path = Path(meta["image_path"])
    if not image_path.is_file():
        raise BuildError(f"cached image {image_path} is missing; rebuild with --rebuild")
    rec = TemplateRecord(
        name=name,
        source=meta["source"],
        digest=meta["digest"],
        image_path=str(image_path),
        size_bytes=int(meta["size_bytes"]),
        created_at=time.time(),
        config={"oci": meta.get("config") or {}, "packages": meta.get("packages", []),
                "source_digest": meta.get("source_digest", ""), **(defaults or {})},
    )
    store.put_template(rec, replace=force)
    return rec


def _recipe_key(source: str, packages: Sequence[str], runtime_dir: Path, free_mib: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({
        "source": source, "packages": sorted(packages), "mirror": rootfs_debian.DEFAULT_MIRROR,
        "recipe": IMAGE_RECIPE, "runtime": runtime_dir.name, "agent": agent_hash(),
        "free_mib": free_mib,
    }, sort_keys=True).encode())
    return h.hexdigest()


def agent_hash() -> str:
    """Hash of the guest-side sources injected into every image."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent.parent
    for sub in ("protocol", "agent"):
        for f in sorted((pkg / sub).rglob("*.py")):
            h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _lookup_recipe(paths: Paths, key: str) -> dict[str, Any] | None:
    f = paths.images / "recipes" / f"{key}.json"
    try:
        meta: dict[str, Any] = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return meta if Path(meta.get("image_path", "")).is_file() else None


def _is_plain_dir(source: str) -> bool:
    p = Path(source)
    return p.is_absolute() and p.is_dir() and not (p / "index.json").exists()


def _copy_dir(src: Path, dest: Path, progress: Progress) -> None:
    if not src.is_dir():
        raise ImageSourceError(f"source directory {src} does not exist")
    if progress:
        progress(f"copying directory {src}")
    proc.run(["cp", "-a", "--", f"{src}/.", str(dest)], what=f"copy {src}")


def _prepare_rootfs(rootfs: Path) -> None:
    """Make a source tree a template root: drop device nodes under /dev (the guest mounts
    devtmpfs there), reset the build host's identity, and create the mount points."""
    dev = rootfs / "dev"
    if dev.is_symlink():
        dev.unlink()
    if dev.is_dir():
        for child in dev.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    else:
        dev.mkdir(mode=0o755)
    # debootstrap copies the build host's identity and resolver: a template has neither
    etc = rootfs / "etc"
    if etc.is_dir() and not etc.is_symlink():
        for name, text in (("hostname", "ember\n"), ("resolv.conf", "")):
            f = etc / name
            if f.is_symlink():
                f.unlink()
            f.write_text(text)
    for d, mode in (("proc", 0o555), ("sys", 0o555), ("tmp", 0o1777), ("run", 0o755)):
        p = rootfs / d
        if not p.exists() and not p.is_symlink():
            p.mkdir()
            p.chmod(mode)


@contextmanager
def _staging(paths: Paths) -> Iterator[Path]:
    """A staging directory, flock-ed while this build lives; stale ones are swept first."""
    with locked_staging(paths.cache_tmp, "image-") as stage:
        yield stage


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_tree(d: Path) -> None:
    for f in d.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
