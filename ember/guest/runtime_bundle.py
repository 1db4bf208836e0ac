"""A self-contained CPython for the guest agent, isolated from the image's own libraries.

Template images may have no Python at all, or a libc the agent cannot use (busybox, musl).
So ember puts its own interpreter into every image, under a reserved prefix
(:data:`DEFAULT_PREFIX`, ``/.ember/runtime``)::

    bin/python3               Debian's /usr/bin/python3.11 (libpython linked in), patched
    lib/ld-linux-x86-64.so.2  the dynamic loader, libc.so.6, libm, libgcc_s (pthread_exit
    lib/lib*.so.*             needs it) and every library the kept extension modules need
    lib/python3.11/           Debian's stdlib minus what the agent never needs, with .pyc

Isolation: ``bin/python3``'s ELF interpreter is ``<prefix>/lib/ld-linux-x86-64.so.2`` and
every ELF file but the loader carries ``DT_RPATH=<prefix>/lib``. It has to be DT_RPATH
(``patchelf --force-rpath``), not DT_RUNPATH: DT_RPATH is searched before LD_LIBRARY_PATH,
``/etc/ld.so.cache`` and the default directories, and the executable's DT_RPATH also
applies to what extension modules, ctypes and libc itself dlopen(). CPython finds its stdlib
from the executable's location (landmark ``lib/python3.11/os.py`` above ``bin/``), so no
PYTHONHOME is needed. The agent runs it with ``-I -S``.

The .pyc files use ``unchecked-hash`` invalidation: they do not depend on file times (the
build is reproducible and survives copying into images) and are never re-validated against
their source, which keeps startup fast in a slow emulated guest.

Builds are cached, keyed by :func:`runtime_key`, in ``Paths.cache/runtime/<key>``; a build
happens in ``Paths.cache_tmp`` and appears in the cache only by one atomic rename.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from fnmatch import fnmatch
from pathlib import Path

from ember.errors import BadRequestError, BuildError, MissingDependencyError
from ember.paths import Paths
from ember.proc import require, run

DEFAULT_PREFIX = "/.ember/runtime"
PYTHON_VERSION = "3.11"
SOURCE_PYTHON = Path(f"/usr/bin/python{PYTHON_VERSION}")
SOURCE_STDLIB = Path(f"/usr/lib/python{PYTHON_VERSION}")
LOADER = "ld-linux-x86-64.so.2"
#: Libraries glibc dlopen()s by name at run time, so that ldd does not list them.
DLOPENED_LIBS = ("libgcc_s.so.1",)
LIB_DIRS = (Path("/lib/x86_64-linux-gnu"), Path("/usr/lib/x86_64-linux-gnu"))

#: Debian packages whose files end up in the runtime; their versions are part of the key.
SOURCE_PACKAGES = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libgcc-s1",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
)

#: Top-level stdlib entries left out: tests, developer tools, the build configuration
#: (25 MiB), packages whose extension module is dropped, and Debian's sitecustomize.py
#: (a symlink into /etc, and never imported with -S anyway).
DROP_TOP = (
    "test",
    "idlelib",
    "tkinter",
    "turtle.py",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "venv",
    "config-*",
    "site-packages",
    "dist-packages",
    "sitecustomize.py",
    "sqlite3",
    "curses",
)
#: Directory names left out at any depth (stale Debian bytecode is rebuilt below).
DROP_ANYWHERE = ("__pycache__", "test", "tests", "idle_test")
#: Extension modules (by module name) left out: test helpers, terminal and database
#: bindings, and _ssl/_hashlib, which would add 5.3 MiB of OpenSSL (hashlib falls back to
#: the built-in sha*/md5/blake2 implementations, which Debian links into the interpreter).
DROP_EXTENSIONS = (
    "_test*",
    "_ctypes_test",
    "xx*",
    "_xx*",
    "_curses*",
    "readline",
    "_dbm",
    "_gdbm",
    "nis",
    "_sqlite3",
    "_ssl",
    "_hashlib",
    "_crypt",
    "ossaudiodev",
    "audioop",
    "_tkinter",
)
#: Everything that decides the contents besides package versions and the prefix.
RECIPE = (
    "ember-runtime/1",
    DROP_TOP,
    DROP_ANYWHERE,
    DROP_EXTENSIONS,
    DLOPENED_LIBS,
    "pyc:unchecked-hash",
)

_LDD_FOUND = re.compile(r"^\t(\S+) => (/\S+) \(0x[0-9a-f]+\)$")
_LDD_MISSING = re.compile(r"^\t(\S+) => not found$")
_LDD_LOADER = re.compile(r"^\t(/\S+) \(0x[0-9a-f]+\)$")

Progress = Callable[[str], None]


def runtime_key(prefix: str = DEFAULT_PREFIX) -> str:
    """Content key of the runtime this host would build for ``prefix``."""
    _check_prefix(prefix)
    text = repr((_package_versions(), RECIPE, prefix))
    return hashlib.sha256(text.encode()).hexdigest()


def build_runtime(
    paths: Paths, *, prefix: str = DEFAULT_PREFIX, progress: Progress | None = None
) -> Path:
    """Return the cached runtime directory for ``prefix``, building it first if needed.

    The directory is meant to be copied into images at ``prefix``; it only works there.
    """
    say: Progress = progress or (lambda _msg: None)
    key = runtime_key(prefix)
    final = paths.cache / "runtime" / key
    if final.is_dir():
        return final
    patchelf = require("patchelf")
    _check_sources()
    paths.cache_tmp.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"runtime-{key[:12]}-", dir=paths.cache_tmp))
    try:
        work.chmod(0o755)
        _assemble(work, prefix, patchelf, say)
        _publish(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already once published
    say(f"python runtime ready: {final} ({runtime_size(final) / 2**20:.1f} MiB)")
    return final


def runtime_size(directory: Path) -> int:
    """Bytes in the regular files under ``directory`` (what copying it into an image costs)."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            total += st.st_size
    return total


def _check_prefix(prefix: str) -> None:
    # ':' separates RPATH entries and '$' starts ld.so substitutions ($ORIGIN, $LIB).
    if (
        not prefix.startswith("/")
        or prefix == "/"
        or os.path.normpath(prefix) != prefix
        or any(c in prefix for c in ":$")
        or not prefix.isprintable()
        or " " in prefix
    ):
        raise BadRequestError(f"runtime prefix must be a plain absolute path, got {prefix!r}")


def _package_versions() -> tuple[tuple[str, str], ...]:
    res = run(
        [
            "dpkg-query",
            "-W",
            "-f=${Package}\t${Architecture}\t${db:Status-Abbrev}\t${Version}\n",
            *SOURCE_PACKAGES,
        ],
        what="reading the versions of the python runtime's Debian packages",
        check=False,
    )
    found: dict[str, str] = {}
    for line in res.stdout.splitlines():
        fields = line.split("\t")
        if len(fields) == 4 and fields[1] in ("amd64", "all") and fields[2].startswith("ii"):
            found[fields[0]] = fields[3]
    missing = [p for p in SOURCE_PACKAGES if p not in found]
    if missing:
        raise MissingDependencyError(
            "the guest python runtime is built from Debian's python3.11, but these packages "
            f"are not installed: {', '.join(missing)}. "
            f"Install them with: apt-get install -y {' '.join(missing)}"
        )
    return tuple((p, found[p]) for p in SOURCE_PACKAGES)


def _check_sources() -> None:
    if not SOURCE_PYTHON.is_file() or not (SOURCE_STDLIB / "os.py").is_file():
        raise MissingDependencyError(
            f"{SOURCE_PYTHON} or its standard library in {SOURCE_STDLIB} is missing. "
            "Install them with: apt-get install -y python3.11-minimal libpython3.11-stdlib"
        )


def _assemble(work: Path, prefix: str, patchelf: str, say: Progress) -> None:
    say(f"copying {SOURCE_PYTHON} and its standard library")
    (work / "bin").mkdir()
    lib = work / "lib"
    lib.mkdir()
    python = work / "bin" / "python3"
    shutil.copy2(SOURCE_PYTHON, python)
    stdlib = lib / f"python{PYTHON_VERSION}"
    shutil.copytree(SOURCE_STDLIB, stdlib, ignore=_ignore)
    extensions = sorted((stdlib / "lib-dynload").glob("*.so"))
    say("bundling the shared libraries it needs")
    libs = _bundle_libraries([python, *extensions], lib)
    say(f"pointing it at {prefix}/lib with patchelf")
    rpath = ["--force-rpath", "--set-rpath", f"{prefix}/lib"]
    run(
        [patchelf, "--set-interpreter", f"{prefix}/lib/{LOADER}", *rpath, str(python)],
        what="patching the runtime's python3",
    )
    others = [str(p) for p in [*extensions, *libs] if p.name != LOADER]
    run([patchelf, *rpath, *others], what="setting the runtime's libraries' RPATH")
    say("precompiling the standard library")
    _compile_stdlib(stdlib, prefix)


def _ignore(directory: str, names: list[str]) -> set[str]:
    here = Path(directory)
    drop = {n for n in names if n in DROP_ANYWHERE and (here / n).is_dir()}
    if here == SOURCE_STDLIB:
        drop |= {n for n in names if any(fnmatch(n, p) for p in DROP_TOP)}
    elif here == SOURCE_STDLIB / "lib-dynload":
        drop |= {n for n in names if any(fnmatch(n.split(".", 1)[0], p) for p in DROP_EXTENSIONS)}
    return drop


def _bundle_libraries(elves: Sequence[Path], lib: Path) -> list[Path]:
    """Copy every library ``elves`` load (as resolved on this host) into ``lib``."""
    res = run(["ldd", *map(str, elves)], what="listing the libraries python3.11 needs")
    sources: dict[str, Path] = {}
    for line in res.stdout.splitlines():
        if m := _LDD_MISSING.match(line):
            raise BuildError(f"python runtime: library {m[1]} is not installed on this host")
        if m := _LDD_FOUND.match(line):
            sources.setdefault(m[1], Path(m[2]))
        elif m := _LDD_LOADER.match(line):
            sources.setdefault(Path(m[1]).name, Path(m[1]))
    if LOADER not in sources:
        raise BuildError(
            f"python runtime: {SOURCE_PYTHON} does not use {LOADER}; "
            "only x86_64 glibc hosts are supported"
        )
    for name in DLOPENED_LIBS:
        sources[name] = _find_lib(name)
    for name, src in sources.items():
        shutil.copy2(src, lib / name)  # follows the soname symlink to the real file
    return [lib / name for name in sorted(sources)]


def _find_lib(name: str) -> Path:
    for d in LIB_DIRS:
        if (d / name).is_file():
            return d / name
    raise MissingDependencyError(
        f"python runtime: {name} not found in {', '.join(map(str, LIB_DIRS))}"
    )


def _compile_stdlib(stdlib: Path, prefix: str) -> None:
    # Tracebacks in the guest name the files where they will be: -d <prefix>/lib/python3.11.
    run(
        [
            str(SOURCE_PYTHON),
            "-I",
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-d",
            f"{prefix}/lib/python{PYTHON_VERSION}",
            str(stdlib),
        ],
        what="precompiling the runtime's standard library",
    )


def _publish(work: Path, final: Path) -> None:
    try:
        work.rename(final)
    except OSError as err:
        if final.is_dir():  # a concurrent build got there first; its result is identical
            return
        raise BuildError(
            f"cannot move the python runtime into the cache at {final}: {err}"
        ) from err
