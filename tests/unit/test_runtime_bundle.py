"""The guest python runtime, built for real and run in chroots that hold nothing else.

Building takes about a second (copy, ldd, patchelf, compileall), so these stay unit tests.
They need root (chroot) and the host tools named in the skip message otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ember.errors import BadRequestError, MissingDependencyError
from ember.guest import runtime_bundle
from ember.guest.runtime_bundle import DEFAULT_PREFIX, build_runtime, runtime_key, runtime_size
from ember.paths import Paths

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")

AGENT_IMPORTS = (
    "import json, subprocess, threading, ctypes, fcntl, signal, select, pwd, "
    "hashlib, socket, os; print(os.uname().release, ctypes.CDLL(None) is not None)"
)


def _paths(home: Path) -> Paths:
    return Paths(home=home, cache=home / "cache")


def _build(paths: Paths, prefix: str = DEFAULT_PREFIX) -> Path:
    try:
        return build_runtime(paths, prefix=prefix)
    except MissingDependencyError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[Paths, Path]:
    paths = _paths(tmp_path_factory.mktemp("runtime-home"))
    return paths, _build(paths)


def _image(runtime: Path, root: Path, prefix: str = DEFAULT_PREFIX) -> Path:
    """An image root that holds the runtime at ``prefix`` and nothing else."""
    shutil.copytree(runtime, root / prefix.lstrip("/"), symlinks=True)
    return root


def _python(
    root: Path, *args: str, prefix: str = DEFAULT_PREFIX, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(root), f"{prefix}/bin/python3", "-I", "-S", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **(env or {})},
    )


def _garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF not really" + os.urandom(4096))


@needs_root
def test_runs_in_a_root_with_no_libraries_at_all(
    cached: tuple[Paths, Path], tmp_path: Path
) -> None:
    root = _image(cached[1], tmp_path / "root")
    assert sorted(os.listdir(root)) == [".ember"]
    cp = _python(root, "-c", AGENT_IMPORTS)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == f"{os.uname().release} True\n"


@needs_root
def test_ignores_the_image_libc_loader_cache_and_library_path(
    cached: tuple[Paths, Path], tmp_path: Path
) -> None:
    root = _image(cached[1], tmp_path / "root")
    for bogus in (
        "lib/x86_64-linux-gnu/libc.so.6",
        "lib/x86_64-linux-gnu/libffi.so.8",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "lib64/ld-linux-x86-64.so.2",
        "etc/ld.so.cache",
    ):
        _garbage(root / bogus)
    cp = _python(root, "-c", AGENT_IMPORTS, env={"LD_LIBRARY_PATH": "/lib/x86_64-linux-gnu"})
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == f"{os.uname().release} True\n"


@needs_root
def test_ctypes_loads_libc_by_name(cached: tuple[Paths, Path], tmp_path: Path) -> None:
    root = _image(cached[1], tmp_path / "root")
    _garbage(root / "lib/x86_64-linux-gnu/libc.so.6")
    code = (
        "import ctypes, os; libc = ctypes.CDLL('libc.so.6', use_errno=True); "
        "print(libc.getpid() == os.getpid(), callable(libc.reboot))"
    )
    cp = _python(root, "-c", code)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == "True True\n"


@needs_root
def test_daemon_threads_do_not_abort_the_exit(cached: tuple[Paths, Path], tmp_path: Path) -> None:
    # A daemon thread that wakes during finalization calls pthread_exit, which dlopen()s
    # libgcc_s.so.1 and aborts the process if it cannot.
    root = _image(cached[1], tmp_path / "root")
    code = (
        "import threading, time\n"
        "def spin():\n    while True: time.sleep(0.0001)\n"
        "for _ in range(8): threading.Thread(target=spin, daemon=True).start()\n"
        "time.sleep(0.05)\n"
    )
    for _ in range(3):
        cp = _python(root, "-c", code)
        assert cp.returncode == 0, cp.stderr
        assert "libgcc_s" not in cp.stderr


@needs_root
def test_stdlib_is_found_next_to_the_interpreter_and_precompiled(
    cached: tuple[Paths, Path], tmp_path: Path
) -> None:
    root = _image(cached[1], tmp_path / "root")
    code = (
        "import sys, json; print(sys.prefix); print(sys.path[1:]); "
        "print(json.__cached__); print(json.dumps.__code__.co_filename)"
    )
    cp = _python(root, "-c", code)
    assert cp.returncode == 0, cp.stderr
    stdlib = f"{DEFAULT_PREFIX}/lib/python3.11"
    assert cp.stdout.splitlines() == [
        DEFAULT_PREFIX,
        repr([stdlib, f"{stdlib}/lib-dynload"]),
        f"{stdlib}/json/__pycache__/__init__.cpython-311.pyc",
        f"{stdlib}/json/__init__.py",
    ]
    pyc = cached[1] / "lib/python3.11/json/__pycache__/__init__.cpython-311.pyc"
    flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
    assert flags == 0b01  # hash-based, source never checked


def test_pruned_contents(cached: tuple[Paths, Path]) -> None:
    runtime = cached[1]
    stdlib = runtime / "lib/python3.11"
    for gone in ("test", "lib2to3", "ensurepip", "distutils", "sitecustomize.py"):
        assert not (stdlib / gone).exists(), gone
    assert not list(stdlib.glob("config-*"))
    dynload = {p.name.split(".")[0] for p in (stdlib / "lib-dynload").iterdir()}
    assert "_ctypes" in dynload
    assert not dynload & {"_ssl", "_hashlib", "_sqlite3", "_testcapi", "readline"}
    libs = {p.name for p in (runtime / "lib").iterdir() if p.is_file()}
    assert {"ld-linux-x86-64.so.2", "libc.so.6", "libffi.so.8", "libgcc_s.so.1"} <= libs
    assert not {"libssl.so.3", "libcrypto.so.3"} & libs
    assert not [p for p in runtime.rglob("*") if p.is_symlink()]
    assert 16 * 2**20 < runtime_size(runtime) < 48 * 2**20


def test_second_build_reuses_the_cache(cached: tuple[Paths, Path]) -> None:
    paths, first = cached
    before = first.stat().st_ino, first.stat().st_mtime_ns
    said: list[str] = []
    again = build_runtime(paths, progress=said.append)
    assert again == first
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == before
    assert said == []
    assert list(paths.cache_tmp.iterdir()) == []


@pytest.mark.parametrize("step", ["_bundle_libraries", "_compile_stdlib", "_publish"])
def test_interrupted_build_leaves_nothing_behind(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _paths(tmp_path)
    reached: list[str] = []

    def interrupt(*_args: object) -> None:
        reached.append(step)
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime_bundle, step, interrupt)
    with pytest.raises(KeyboardInterrupt):
        _build(paths)
    assert reached == [step]
    assert list(paths.cache_tmp.iterdir()) == []
    assert list((paths.cache / "runtime").iterdir()) == []


@needs_root
def test_prefix_is_configurable(tmp_path: Path) -> None:
    prefix = "/opt/agent-runtime"
    runtime = _build(_paths(tmp_path / "home"), prefix)
    root = _image(runtime, tmp_path / "root", prefix)
    cp = _python(root, "-c", "import sys, ctypes; print(sys.prefix)", prefix=prefix)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == f"{prefix}\n"


def test_key_depends_on_the_prefix() -> None:
    try:
        key = runtime_key()
    except MissingDependencyError as err:
        pytest.skip(str(err))
    assert key == runtime_key(DEFAULT_PREFIX)
    assert len(key) == 64
    assert runtime_key("/opt/agent-runtime") != key


@pytest.mark.parametrize("prefix", ["relative", "/", "/a:b", "/a/../b", "/a/", "/$ORIGIN", "/a b"])
def test_bad_prefixes_are_refused(prefix: str, tmp_path: Path) -> None:
    with pytest.raises(BadRequestError):
        build_runtime(_paths(tmp_path), prefix=prefix)


def test_missing_source_package_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian host")
    wanted = (*runtime_bundle.SOURCE_PACKAGES, "ember-no-such-package")
    monkeypatch.setattr(runtime_bundle, "SOURCE_PACKAGES", wanted)
    with pytest.raises(MissingDependencyError, match="apt-get install -y ember-no-such-package"):
        build_runtime(_paths(tmp_path))
    assert not (tmp_path / "cache").exists()
