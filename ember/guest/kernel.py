"""The guest kernel: Debian's linux-source-6.1, ``make tinyconfig`` plus ember's fragment.

Built kernels live in the shared cache, addressed by :func:`kernel_key` (the source
package's version, the fragment's bytes and :data:`RECIPE_VERSION`)::

    <cache>/kernels/<key>/        bzImage, vmlinux, config, meta.json (published by one rename)
    <cache>/src/<pkg>_<ver>/      the unpacked source tree (published by one rename, then only read)
    <cache>/src/<pkg>_<ver>.obj/  out-of-tree objects (``make O=``), kept for fast rebuilds
    <cache>/src/<pkg>_<ver>.lock  held by the one build that may use the two above

An entry under ``kernels/`` is either complete or absent: it is assembled in a staging
directory under ``<cache>/tmp`` that is removed on every failure, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ember.errors import (
    BadRequestError,
    BuildError,
    HostCommandError,
    HostError,
    MissingDependencyError,
)
from ember.paths import Paths
from ember.proc import require, run, tail

Progress = Callable[[str], None]

#: Describes how a kernel is made from the source and the fragment. Change it whenever the
#: build steps change in a way that changes the result: it is part of the cache key.
RECIPE_VERSION = (
    "ember-kernel/1: make ARCH=x86_64 tinyconfig; merge_config.sh -m fragment; "
    "make olddefconfig; make bzImage vmlinux"
)
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_TOPDIR = "linux-source-6.1"  # the tarball's single top-level directory
BUILD_PACKAGES = (
    SOURCE_PACKAGE,
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "make",
    "gcc",
    "xz-utils",
)
FRAGMENT = Path(__file__).with_name("kernel-fragment.config")
ENTRY_FILES = ("bzImage", "vmlinux", "config", "meta.json")
GIB = 2**30
FREE_TO_UNPACK = 3 * GIB  # the 6.1 tree is about 1.4 GB; objects and artifacts are smaller
FREE_TO_BUILD = 1 * GIB
PROGRESS_EVERY_S = 2.0
OUTPUT_TAIL_LINES = 40
APT_TIMEOUT_S = 1800.0

_KBUILD_STEP = re.compile(r"^\s+([A-Z][A-Z0-9_-]{1,11})\s+(\S+)")
_CONFIG_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_CONFIG_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


@dataclass(frozen=True)
class Kernel:
    key: str
    dir: Path
    bzimage: Path
    vmlinux: Path
    release: str  # ``make kernelrelease``, e.g. "6.1.192"


# --- cache key and config checks (no I/O) ------------------------------------------------


def key_for(source_version: str, fragment: bytes, recipe: str = RECIPE_VERSION) -> str:
    """The cache key of a kernel built by ``recipe`` from that source and fragment."""
    h = hashlib.sha256()
    for part in (b"ember-kernel", source_version.encode(), recipe.encode(), fragment):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X`` -> value (``"n"`` for "is not set") from a .config or a fragment."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _CONFIG_SET.match(line):
            out[m.group(1)] = m.group(2)
        elif m := _CONFIG_UNSET.match(line):
            out[m.group(1)] = "n"
    return out


def unmet_options(fragment: str, config: str) -> list[str]:
    """The fragment's settings that the final .config does not have (Kconfig dropped them)."""
    want, got = parse_config(fragment), parse_config(config)
    return [
        f"{name}={value} (got {got.get(name, 'n')})"
        for name, value in want.items()
        if got.get(name, "n") != value
    ]


# --- lookup --------------------------------------------------------------------------------


def _installed_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Package -> version for those of ``packages`` that dpkg says are installed."""
    res = run(
        ["dpkg-query", "-W", "-f=${Package}\\t${db:Status-Abbrev}\\t${Version}\\n", *packages],
        what="asking dpkg which kernel build packages are installed",
        timeout=60,
        check=False,
    )
    out = {}
    for line in res.stdout.splitlines():
        name, _, rest = line.partition("\t")
        status, _, version = rest.partition("\t")
        if status.startswith("ii"):
            out[name] = version
    return out


def source_version() -> str:
    """The installed version of linux-source-6.1, or MissingDependencyError."""
    version = _installed_versions((SOURCE_PACKAGE,)).get(SOURCE_PACKAGE)
    if version is None:
        raise MissingDependencyError(
            f"{SOURCE_PACKAGE} is not installed; run: ember kernel build "
            f"(or apt-get install -y {' '.join(BUILD_PACKAGES)})"
        )
    return version


def kernel_key() -> str:
    return key_for(source_version(), FRAGMENT.read_bytes())


def _load(key: str, entry: Path) -> Kernel | None:
    if not all((entry / name).is_file() for name in ENTRY_FILES):
        return None
    try:
        release = json.loads((entry / "meta.json").read_text())["release"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(release, str) or not release:
        return None
    return Kernel(
        key=key, dir=entry, bzimage=entry / "bzImage", vmlinux=entry / "vmlinux", release=release
    )


def find_kernel(paths: Paths) -> Kernel | None:
    """The cached kernel for the current key, if it is present and complete."""
    try:
        key = kernel_key()
    except MissingDependencyError:
        return None
    return _load(key, paths.kernels / key)


def kernel_by_key(paths: Paths, key: str) -> Kernel | None:
    """The cached kernel ``key`` (any key, not only the current one), if complete."""
    if not key or "/" in key or key.startswith("."):
        return None
    return _load(key, paths.kernels / key)


def require_kernel(paths: Paths) -> Kernel:
    kernel = find_kernel(paths)
    if kernel is None:
        raise MissingDependencyError("no guest kernel built; run: ember kernel build")
    return kernel


# --- build ---------------------------------------------------------------------------------


def build_kernel(
    paths: Paths, *, jobs: int | None = None, force: bool = False, progress: Progress | None = None
) -> Kernel:
    """Build the guest kernel into the cache, or return the cached one (unless ``force``).

    ``force`` also discards the kept object tree, so it is a from-scratch build.
    """
    say = progress or (lambda _line: None)
    jobs = jobs if jobs is not None else (os.cpu_count() or 1)
    if jobs < 1:
        raise BadRequestError(f"jobs must be at least 1, not {jobs}")
    if platform.machine() != "x86_64":
        raise HostError(f"the guest kernel builds on x86_64 hosts only, not {platform.machine()}")
    _ensure_build_packages(say)
    version = source_version()
    key = key_for(version, FRAGMENT.read_bytes())
    final = paths.kernels / key
    if not force and (kernel := _load(key, final)) is not None:
        return kernel
    paths.ensure()
    src = source_tree(paths, version)
    src.parent.mkdir(parents=True, exist_ok=True)
    with _locked(src.with_name(f"{src.name}.lock"), say):
        if not force and (kernel := _load(key, final)) is not None:
            return kernel  # another process built it while we waited
        t0 = time.monotonic()
        _ensure_source(paths, src, version, say)
        obj = src.with_name(f"{src.name}.obj")
        if force and obj.exists():
            _discard(obj, paths.cache_tmp)
        obj.mkdir(exist_ok=True)
        _check_free(paths.cache, FREE_TO_BUILD)
        staging = Path(tempfile.mkdtemp(prefix=f"kernel-{key[:12]}-", dir=paths.cache_tmp))
        try:
            env = _make_env()
            _configure(src, obj, env, say)
            _stream_make(
                _make(src, obj, f"-j{jobs}", "bzImage", "vmlinux"),
                env=env,
                what="compiling the guest kernel",
                cache=paths.cache,
                say=say,
                first=f"compiling (make -j{jobs})...",
            )
            release = run(
                _make(src, obj, "-s", "kernelrelease"),
                env=env,
                timeout=120,
                what="reading the kernel release",
            ).stdout.strip()
            say("saving the kernel to the cache")
            meta = {
                "key": key,
                "release": release,
                "source_package": SOURCE_PACKAGE,
                "source_version": version,
                "recipe": RECIPE_VERSION,
                "build_seconds": round(time.monotonic() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _stage(obj, staging, meta, paths.cache)
            _publish(staging, final, replace=force or final.exists())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _prune_other_sources(src.parent, keep=src.name, trash=paths.cache_tmp)
    kernel = _load(key, final)
    if kernel is None:
        raise BuildError(f"the kernel cache entry {final} is incomplete after the build")
    return kernel


def source_tree(paths: Paths, version: str) -> Path:
    """Where the unpacked tree of that linux-source-6.1 version is kept in the cache."""
    name = re.sub(r"[^A-Za-z0-9.+_-]", "_", f"{SOURCE_PACKAGE}_{version}")  # safe in make O=
    return paths.cache / "src" / name


def _ensure_build_packages(say: Progress) -> None:
    installed = _installed_versions(BUILD_PACKAGES)
    missing = [p for p in BUILD_PACKAGES if p not in installed]
    if not missing:
        return
    command = f"apt-get install -y {' '.join(missing)}"
    if os.geteuid() != 0:
        raise MissingDependencyError(
            f"the kernel build needs {', '.join(missing)}; as root, run: {command}"
        )
    require("apt-get")
    say(f"installing build dependencies ({', '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    try:
        try:
            run(argv, what="installing kernel build packages", env=env, timeout=APT_TIMEOUT_S)
        except HostCommandError:  # a fresh host often has no package lists yet
            say("updating the package lists (apt-get update)")
            run(["apt-get", "update"], what="apt-get update", env=env, timeout=APT_TIMEOUT_S)
            run(argv, what="installing kernel build packages", env=env, timeout=APT_TIMEOUT_S)
    except HostCommandError as err:
        raise MissingDependencyError(
            f"could not install the kernel build packages ({err}); run: {command}"
        ) from err


@contextlib.contextmanager
def _locked(path: Path, say: Progress) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("waiting for another kernel build to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_free(where: Path, need: int) -> None:
    free = shutil.disk_usage(where).free
    if free < need:
        raise HostError(
            f"not enough disk space for the kernel build in {where}: "
            f"{free / GIB:.1f} GiB free, about {need / GIB:.0f} GiB needed"
        )


def _disk_hint(where: Path) -> str:
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return ""
    return f" (disk full? {free / 2**20:.0f} MiB free in {where})" if free < FREE_TO_BUILD else ""


def _ensure_source(paths: Paths, dest: Path, version: str, say: Progress) -> None:
    """The unpacked source tree, unpacking it (into staging, then one rename) if needed."""
    if dest.is_dir():
        return
    if not SOURCE_TARBALL.is_file():
        raise MissingDependencyError(
            f"{SOURCE_TARBALL} is missing although {SOURCE_PACKAGE} {version} is installed; "
            f"run: apt-get install --reinstall -y {SOURCE_PACKAGE}"
        )
    _check_free(paths.cache, FREE_TO_UNPACK)
    say(f"unpacking {SOURCE_PACKAGE}")
    tmp = Path(tempfile.mkdtemp(prefix="src-", dir=paths.cache_tmp))
    try:
        try:
            run(
                ["tar", "-xJf", str(SOURCE_TARBALL), "-C", str(tmp)],
                timeout=1800,
                what=f"unpacking {SOURCE_TARBALL}",
            )
        except HostCommandError as err:
            raise BuildError(f"{err}{_disk_hint(paths.cache)}") from err
        top = tmp / SOURCE_TOPDIR
        if not (top / "Makefile").is_file():
            raise BuildError(f"{SOURCE_TARBALL} does not hold {SOURCE_TOPDIR}/Makefile")
        os.rename(top, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KCONFIG_", "KBUILD_"))}
    for k in (
        "ARCH",
        "CROSS_COMPILE",
        "LOCALVERSION",
        "MAKEFLAGS",
        "MFLAGS",
        "MAKELEVEL",
        "O",
        "CC",
        "LD",
        "CFLAGS",
    ):
        env.pop(k, None)
    env.update(LC_ALL="C", KBUILD_BUILD_USER="ember", KBUILD_BUILD_HOST="ember")
    return env


def _make(src: Path, obj: Path, *args: str) -> list[str]:
    return ["make", "-C", str(src), f"O={obj}", "ARCH=x86_64", *args]


def _configure(src: Path, obj: Path, env: Mapping[str, str], say: Progress) -> None:
    say("configuring")
    run(_make(src, obj, "tinyconfig"), env=env, timeout=600, what="make tinyconfig")
    run(
        [
            "sh",
            str(src / "scripts/kconfig/merge_config.sh"),
            "-m",
            "-O",
            str(obj),
            str(obj / ".config"),
            str(FRAGMENT),
        ],
        cwd=obj,
        env=env,
        timeout=120,
        what="merging ember's kernel config fragment",
    )
    run(_make(src, obj, "olddefconfig"), env=env, timeout=600, what="make olddefconfig")
    unmet = unmet_options(FRAGMENT.read_text(), (obj / ".config").read_text())
    if unmet:
        raise BuildError(
            f"Kconfig did not keep these settings of {FRAGMENT.name} (a "
            f"dependency is missing from the fragment): {', '.join(unmet)}"
        )


def _stream_make(
    argv: list[str], *, env: Mapping[str, str], what: str, cache: Path, say: Progress, first: str
) -> None:
    """Run a long make, reporting its latest step now and then; its process group dies with us."""
    argv = [require(argv[0]), *argv[1:]]
    say(first)
    lines: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            close_fds=True,
            start_new_session=True,
        )
    except OSError as err:
        raise HostCommandError(f"{what}: cannot run make: {err}", argv=argv) from err
    try:
        assert proc.stdout is not None
        last = time.monotonic()
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            lines.append(line)
            step = _KBUILD_STEP.match(line)
            if step and time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                say(f"compiling: {step.group(1)} {step.group(2)}")
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # we are leaving early (Ctrl-C, a progress callback raised)
            _kill_group(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    if rc != 0:
        t = tail("\n".join(lines))
        raise HostCommandError(
            f"{what} failed (make exited with {rc}){_disk_hint(cache)}: {t}",
            argv=argv,
            returncode=rc,
            stderr_tail=t,
        )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _stage(obj: Path, staging: Path, meta: dict[str, object], cache: Path) -> None:
    """Copy the artifacts into ``staging`` and flush them to disk."""
    try:
        for src, name in (
            (obj / "arch/x86/boot/bzImage", "bzImage"),
            (obj / "vmlinux", "vmlinux"),
            (obj / ".config", "config"),
        ):
            shutil.copyfile(src, staging / name)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it 0700; the cache is shared
        for name in ENTRY_FILES:
            fd = os.open(staging / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as err:
        raise BuildError(
            f"saving the kernel to the cache failed: {err}{_disk_hint(cache)}"
        ) from err


def _publish(staging: Path, final: Path, *, replace: bool) -> None:
    """Move ``staging`` to ``final`` in one rename; an existing entry is kept unless ``replace``."""
    if replace and final.exists():
        _discard(final, staging.parent)
    try:
        os.rename(staging, final)
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise BuildError(f"cannot publish the kernel into {final}: {err}") from err
        # Another process published the same key first: the content is the same, keep theirs.


def _discard(path: Path, trash_root: Path) -> None:
    """Delete a cache directory so that no half-deleted copy is ever seen under its name."""
    trash = Path(tempfile.mkdtemp(prefix="discard-", dir=trash_root))
    try:
        os.rename(path, trash / path.name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _prune_other_sources(src_root: Path, *, keep: str, trash: Path) -> None:
    """Drop the source and object trees of other source versions (about 1.5 GB each)."""
    for lock in src_root.glob(f"{SOURCE_PACKAGE}_*.lock"):
        name = lock.name.removesuffix(".lock")
        if name == keep:
            continue
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use by a build right now
            for tree in (src_root / name, src_root / f"{name}.obj"):
                if tree.exists():
                    _discard(tree, trash)
        finally:
            os.close(fd)
