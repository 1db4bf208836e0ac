"""One cgroup per sandbox: CPU, memory and process-count limits for its QEMU process.

Layout, in every hierarchy that serves ``cpu``, ``memory`` or ``pids`` (one directory on
cgroup v2, one per controller hierarchy on v1)::

    <anchor>/ember/<home key>/<sandbox id>/

``<home key>`` is a short hash of ``EMBER_HOME`` (the same one :class:`ember.paths.Paths`
uses for its RAM directory), so that several homes (test sessions, users) never see each
other's sandboxes. Nothing here touches a cgroup outside ``<anchor>/ember``.

A process joins the cgroup before its first instruction by being started through
:meth:`SandboxCgroup.wrap_argv`: a ``/bin/sh`` writes its own pid into every hierarchy's
``cgroup.procs`` and then ``exec``\\ s the real program, so QEMU (and the child it forks with
``-daemonize``) starts inside. See ``docs/cgroups.md`` for why this rather than
``preexec_fn`` or ``clone3(CLONE_INTO_CGROUP)``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from ember.errors import BadRequestError, HostError
from ember.host.cgroup_detect import FREEZER, CgroupSupport
from ember.host.cgroupfs import CgroupFS

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel refuses a smaller CFS quota
MAX_CPUS = 1024.0
MIN_MEMORY_BYTES = 1 << 20
MAX_PIDS = 4_194_304  # PID_MAX_LIMIT on 64-bit
KILL_TIMEOUT_S = 5.0
FREEZE_TIMEOUT_S = 5.0

#: Exit status of the :meth:`SandboxCgroup.wrap_argv` wrapper when it cannot join the cgroup.
ENTER_FAILED_EXIT = 125

# $0 is the name the shell uses in its own error messages; "$@" is: procs files, "--", argv.
# Paths and argv stay positional parameters: nothing is interpolated into the script.
_ENTER_SCRIPT = (
    'while [ "$#" -gt 0 ]; do '
    'if [ "$1" = "--" ]; then shift; exec "$@"; fi; '
    "printf '%s\\n' \"$$\" > \"$1\" || "
    '{ echo "ember: cannot join cgroup ($1)" >&2; exit 125; }; '
    "shift; done; exit 125"
)
_ENTER_NAME = "ember-cgroup-enter"
SHELL = "/bin/sh"


class CgroupError(HostError):
    """A sandbox cgroup could not be created, limited, joined, emptied or removed."""


@dataclass(frozen=True)
class CgroupLimits:
    """Resource limits of one sandbox; None leaves that resource unlimited.

    ``cpus`` is CPU time in units of whole CPUs (1.0: one CPU's worth per period, 0.5: half
    of one, 2.0: two); ``memory_bytes`` covers the QEMU process including guest RAM;
    ``pids_max`` counts tasks, i.e. threads too (QEMU runs several).
    """

    cpus: float | None = None
    memory_bytes: int | None = None
    pids_max: int | None = None
    cpu_period_us: int = CPU_PERIOD_US

    def __post_init__(self) -> None:
        p = self.cpu_period_us
        if isinstance(p, bool) or not isinstance(p, int) or not 1_000 <= p <= 1_000_000:
            raise BadRequestError(f"cpu period must be 1000..1000000 us, not {p!r}")
        if self.cpus is not None:
            c = self.cpus
            if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c):
                raise BadRequestError(f"cpus must be a number, not {c!r}")
            if not 0 < c <= MAX_CPUS or round(c * p) < MIN_CPU_QUOTA_US:
                raise BadRequestError(
                    f"cpus must be in ({MIN_CPU_QUOTA_US / p:g}, {MAX_CPUS:g}], not {c!r}")
        _check_int("memory_bytes", self.memory_bytes, MIN_MEMORY_BYTES, (1 << 62))
        _check_int("pids_max", self.pids_max, 1, MAX_PIDS)

    @property
    def cpu_quota_us(self) -> int | None:
        """CFS quota per period, or None for no CPU limit."""
        return None if self.cpus is None else round(self.cpus * self.cpu_period_us)


def _check_int(what: str, value: int | None, low: int, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequestError(f"{what} must be an integer in [{low}, {high}], not {value!r}")


@dataclass(frozen=True)
class CgroupStats:
    """A snapshot of a sandbox cgroup's counters; None where the host cannot tell."""

    pids: tuple[int, ...]
    memory_bytes: int | None
    memory_peak_bytes: int | None
    oom_kills: int | None
    cpu_throttled_periods: int | None


@dataclass(frozen=True)
class _Dir:
    """The sandbox's directory in one hierarchy and the controllers it serves there."""

    version: Literal[1, 2]
    path: Path
    controllers: frozenset[str]


def home_key(home: Path) -> str:
    """The short hash of an ember home that names its cgroup (as in ``Paths.ram``)."""
    return hashlib.sha256(os.fsencode(home)).hexdigest()[:12]


def _check_name(what: str, name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise BadRequestError(f"invalid {what} for a cgroup name: {name!r}")
    return name


def _keyed(text: str) -> dict[str, int]:
    """``key value`` lines (memory.events, memory.oom_control, cpu.stat) as a dict."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _ember_parents(support: CgroupSupport) -> dict[Path, _Dir]:
    """One entry per hierarchy in use: ember's parent directory -> what it serves."""
    dirs: dict[Path, _Dir] = {}
    for c in support.in_use:
        if not c.usable or c.parent is None or c.version is None:
            continue
        old = dirs.get(c.parent)
        ctrls = (old.controllers if old else frozenset()) | {c.name}
        dirs[c.parent] = _Dir(c.version, c.parent, ctrls)
    return dirs


class SandboxCgroup:
    """The cgroup of one sandbox, in every hierarchy ember uses. Cheap to construct (no I/O);
    :meth:`create` makes it, :meth:`destroy` kills what is inside and removes it."""

    def __init__(self, support: CgroupSupport, home_key: str, sandbox_id: str, *,
                 fs: CgroupFS | None = None) -> None:
        self.support = support
        self.home_key = _check_name("home key", home_key)
        self.sandbox_id = _check_name("sandbox id", sandbox_id)
        self._fs = fs or CgroupFS()
        self._dirs = tuple(
            _Dir(d.version, parent / home_key / sandbox_id, d.controllers)
            for parent, d in _ember_parents(support).items()
        )

    def __repr__(self) -> str:
        return f"SandboxCgroup({self.home_key}/{self.sandbox_id}, {[str(p) for p in self.paths]})"

    def __enter__(self) -> SandboxCgroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    @property
    def paths(self) -> tuple[Path, ...]:
        """The sandbox's cgroup directory in each hierarchy (one on cgroup v2)."""
        return tuple(d.path for d in self._dirs)

    @property
    def procs_files(self) -> tuple[Path, ...]:
        return tuple(d.path / "cgroup.procs" for d in self._dirs)

    def path(self, controller: str) -> Path | None:
        """The directory holding ``controller``'s files, or None if it is not usable."""
        d = self._dir(controller)
        return d.path if d else None

    def _dir(self, controller: str) -> _Dir | None:
        return next((d for d in self._dirs if controller in d.controllers), None)

    def exists(self) -> bool:
        return any(self._fs.is_dir(p) for p in self.paths)

    # -- creation and limits ------------------------------------------------------------

    def create(self) -> SandboxCgroup:
        """Create the cgroup in every hierarchy (idempotent); returns self."""
        if not self._dirs:
            raise CgroupError(f"no cgroup controller is usable: {self.support.summary()}")
        for d in self._dirs:
            for attempt in range(3):
                try:
                    self._create_one(d)
                    break
                except FileNotFoundError as err:
                    # A concurrent prune() removed an empty parent between our mkdirs.
                    if attempt == 2:
                        raise CgroupError(f"creating cgroup {d.path}: {err}") from err
                except OSError as err:
                    raise CgroupError(f"creating cgroup {d.path}: {err}") from err
        return self

    def _create_one(self, d: _Dir) -> None:
        key_dir = d.path.parent
        ember = key_dir.parent
        for parent, child in ((ember.parent, ember), (ember, key_dir), (key_dir, d.path)):
            self._fs.mkdir(child)
            if d.version == 2:
                self._enable(parent, d.controllers)

    def _enable(self, parent: Path, controllers: frozenset[str]) -> None:
        """cgroup v2: let ``parent``'s children use ``controllers``."""
        ctl = parent / "cgroup.subtree_control"
        missing = controllers - {FREEZER} - set(self._fs.read(ctl).split())
        if missing:
            self._fs.write(ctl, " ".join(f"+{c}" for c in sorted(missing)))

    def apply(self, limits: CgroupLimits) -> None:
        """Set every limit (a None limit is set to unlimited, so applying is declarative).

        Raises CgroupError if a limit is asked of a controller the host cannot provide.
        """
        wanted = {"cpu": limits.cpus, "memory": limits.memory_bytes, "pids": limits.pids_max}
        for controller, value in wanted.items():
            if value is not None and self._dir(controller) is None:
                detail = self.support.controller(controller).detail
                raise CgroupError(
                    f"cannot limit {controller} of sandbox {self.sandbox_id}: {detail}")
        if (d := self._dir("cpu")) is not None:
            quota = limits.cpu_quota_us
            if d.version == 1:
                self._set(d.path / "cpu.cfs_period_us", str(limits.cpu_period_us))
                self._set(d.path / "cpu.cfs_quota_us", str(quota) if quota else "-1")
            else:
                self._set(d.path / "cpu.max", f"{quota or 'max'} {limits.cpu_period_us}")
        if (d := self._dir("memory")) is not None:
            if d.version == 1:
                self._set_v1_memory(d.path, limits.memory_bytes)
            else:
                self._set(d.path / "memory.max", str(limits.memory_bytes or "max"))
                swap = d.path / "memory.swap.max"
                if self._fs.exists(swap):
                    self._set(swap, "0" if limits.memory_bytes else "max")
        if (d := self._dir("pids")) is not None:
            self._set(d.path / "pids.max", str(limits.pids_max or "max"))

    def _set_v1_memory(self, path: Path, limit: int | None) -> None:
        """v1: memory.limit_in_bytes, and memory+swap to the same value when swap is
        accounted (no swapping past the limit). The kernel insists that limit <= memsw at
        every step, so the order depends on the direction of the change."""
        value = str(limit) if limit else "-1"
        mem, memsw = path / "memory.limit_in_bytes", path / "memory.memsw.limit_in_bytes"
        if not self._fs.exists(memsw):
            self._set(mem, value)
            return
        try:
            self._fs.write(mem, value)
        except OSError as err:
            if err.errno != errno.EINVAL:  # e.g. EBUSY: usage cannot be reclaimed below it
                raise CgroupError(f"setting {mem} to {value!r} for sandbox "
                                  f"{self.sandbox_id}: {err.strerror or err}") from err
            # EINVAL: above the current memory+swap limit, which must be raised first.
            self._set(memsw, value)
            self._set(mem, value)
            return
        self._set(memsw, value)

    def _set(self, path: Path, value: str) -> None:
        try:
            self._fs.write(path, value)
        except OSError as err:
            raise CgroupError(f"setting {path} to {value!r} for sandbox {self.sandbox_id}: "
                              f"{err.strerror or err}") from err

    # -- membership ---------------------------------------------------------------------

    def wrap_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that the process joins this cgroup before it starts.

        Run the result instead of ``argv`` (e.g. with :func:`ember.proc.run`); it fails
        with exit status 125 and a message on stderr if it cannot join. Give the program as
        an absolute path: the wrapper's shell, not ember, looks it up in ``PATH``.
        """
        return enter_argv(self.procs_files, argv)

    def add_pid(self, pid: int) -> None:
        """Move a running process (all its threads) into the cgroup in every hierarchy."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise BadRequestError(f"invalid pid {pid!r}")
        for f in self.procs_files:
            try:
                self._fs.write(f, str(pid))
            except OSError as err:
                raise CgroupError(f"moving pid {pid} into {f.parent}: "
                                  f"{err.strerror or err}") from err

    def pids(self) -> list[int]:
        """The processes in the cgroup (in any hierarchy), sorted; [] if it does not exist."""
        found: set[int] = set()
        for f in self.procs_files:
            found.update(self._read_pids(f))
        return sorted(found)

    def _read_pids(self, procs: Path) -> list[int]:
        try:
            return self._fs.pids_in(procs)
        except OSError as err:
            raise CgroupError(f"reading {procs}: {err.strerror or err}") from err

    # -- counters -----------------------------------------------------------------------

    def _read(self, controller: str, v1_file: str, v2_file: str) -> str | None:
        d = self._dir(controller)
        if d is None:
            return None
        try:
            return self._fs.read(d.path / (v1_file if d.version == 1 else v2_file))
        except OSError:
            return None

    def _read_int(self, controller: str, v1_file: str, v2_file: str) -> int | None:
        text = self._read(controller, v1_file, v2_file)
        return int(text) if text is not None and text.strip().isdigit() else None

    def memory_usage(self) -> int | None:
        """Bytes charged to the sandbox now (including page cache and tmpfs pages it
        touched first), or None if memory is not accounted or the cgroup is gone."""
        return self._read_int("memory", "memory.usage_in_bytes", "memory.current")

    def memory_peak(self) -> int | None:
        return self._read_int("memory", "memory.max_usage_in_bytes", "memory.peak")

    def oom_kills(self) -> int | None:
        """How many processes the kernel OOM-killed for hitting this cgroup's memory limit;
        None if the kernel does not count them (v1 before 4.13) or the cgroup is gone."""
        text = self._read("memory", "memory.oom_control", "memory.events")
        return None if text is None else _keyed(text).get("oom_kill")

    def oom_killed(self) -> bool:
        return (self.oom_kills() or 0) > 0

    def cpu_throttled_periods(self) -> int | None:
        """How many CFS periods the sandbox was throttled for exceeding its CPU quota."""
        text = self._read("cpu", "cpu.stat", "cpu.stat")
        return None if text is None else _keyed(text).get("nr_throttled")

    def cpu_seconds(self) -> float | None:
        """CPU time the cgroup's processes used so far (v2 ``usage_usec``, v1 cpuacct);
        None where it is not accounted."""
        text = self._read("cpu", "cpuacct.usage", "cpu.stat")
        if text is None:
            return None
        if text.strip().isdigit():  # v1: nanoseconds
            return int(text) / 1e9
        usec = _keyed(text).get("usage_usec")
        return None if usec is None else usec / 1e6

    def stats(self) -> CgroupStats:
        return CgroupStats(tuple(self.pids()), self.memory_usage(), self.memory_peak(),
                           self.oom_kills(), self.cpu_throttled_periods())

    # -- freezer ------------------------------------------------------------------------

    @property
    def can_freeze(self) -> bool:
        return self._dir(FREEZER) is not None

    def freeze(self, timeout: float = FREEZE_TIMEOUT_S) -> None:
        """Stop every process in the cgroup (they stay stopped until :meth:`thaw`); returns
        once the kernel reports the cgroup frozen. Raises CgroupError without a freezer, or
        if the cgroup does not freeze within ``timeout`` (it is thawed again then)."""
        self._freezer_set(True)
        deadline = time.monotonic() + timeout
        while not self.frozen():
            if time.monotonic() > deadline:
                self._freezer_set(False)
                raise CgroupError(f"sandbox {self.sandbox_id}: its cgroup did not freeze "
                                  f"within {timeout:g} s")
            time.sleep(0.005)

    def thaw(self) -> None:
        """Let the cgroup's processes run again (a no-op if it is not frozen)."""
        self._freezer_set(False)

    def frozen(self) -> bool:
        """True once every process of the cgroup is frozen."""
        text = self._read(FREEZER, "freezer.state", "cgroup.events")
        if text is None:
            return False
        d = self._dir(FREEZER)
        assert d is not None
        return text.strip() == "FROZEN" if d.version == 1 else _keyed(text).get("frozen") == 1

    def _freezer_set(self, frozen: bool) -> None:
        d = self._dir(FREEZER)
        if d is None:
            detail = self.support.freezer.detail if self.support.freezer else "not detected"
            raise CgroupError(f"cannot freeze sandbox {self.sandbox_id}: no usable freezer "
                              f"({detail})")
        if d.version == 1:
            self._set(d.path / "freezer.state", "FROZEN" if frozen else "THAWED")
        else:
            self._set(d.path / "cgroup.freeze", "1" if frozen else "0")

    # -- teardown -----------------------------------------------------------------------

    def destroy(self, timeout: float = KILL_TIMEOUT_S) -> None:
        """SIGKILL everything in the cgroup (and any child cgroups), wait until it is empty
        and remove it from every hierarchy. Idempotent; raises CgroupError if processes
        remain after ``timeout`` seconds (e.g. stuck in uninterruptible sleep)."""
        deadline = time.monotonic() + timeout
        tree = [p for d in self._dirs for p in self._post_order(d.path)]
        if not tree:
            return
        if (d := self._dir(FREEZER)) is not None and d.version == 1:
            # A v1-frozen process does not act on SIGKILL until it is thawed.
            with contextlib.suppress(OSError):
                self._fs.write(d.path / "freezer.state", "THAWED")
        for d in self._dirs:
            kill_file = d.path / "cgroup.kill"  # v2, Linux 5.14+: kills the subtree at once
            if d.version == 2 and self._fs.exists(kill_file):
                # On failure, signalling each process below still empties it.
                with contextlib.suppress(OSError):
                    self._fs.write(kill_file, "1")
        delay = 0.005
        while True:
            alive = [pid for p in tree for pid in self._read_pids(p / "cgroup.procs")]
            if not alive:
                break
            if time.monotonic() > deadline:
                raise CgroupError(f"sandbox {self.sandbox_id}: processes {sorted(set(alive))} "
                                  f"are still in its cgroup after {timeout:g} s of SIGKILL")
            for p in tree:
                self._fs.signal_members(p / "cgroup.procs", signal.SIGKILL)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        for p in tree:
            self._rmdir(p, deadline)

    def _post_order(self, path: Path) -> list[Path]:
        """``path`` and its child cgroups, children first; [] if ``path`` does not exist."""
        if not self._fs.is_dir(path):
            return []
        out: list[Path] = []
        for name in self._fs.subdirs(path):
            out.extend(self._post_order(path / name))
        out.append(path)
        return out

    def _rmdir(self, path: Path, deadline: float) -> None:
        while True:
            try:
                self._fs.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as err:
                if time.monotonic() > deadline:
                    raise CgroupError(f"removing cgroup {path}: {err.strerror or err}") from err
                time.sleep(0.01)  # EBUSY: a killed process has not finished exiting


def enter_argv(procs_files: Sequence[Path], argv: Sequence[str]) -> list[str]:
    """An argv that writes its own pid to each of ``procs_files`` and then execs ``argv``.

    Everything after the script is a positional parameter of ``sh -c`` (never spliced into
    the script), so paths and arguments may hold any characters."""
    args = [str(a) for a in argv]
    if not args or not args[0]:
        raise BadRequestError("empty argv")
    files = [str(f) for f in procs_files]
    if "--" in files or any(not f.startswith("/") for f in files):
        raise BadRequestError(f"cgroup.procs files must be absolute paths: {files!r}")
    return [SHELL, "-c", _ENTER_SCRIPT, _ENTER_NAME, *files, "--", *args]


def sandbox_ids(support: CgroupSupport, home_key: str, *,
                fs: CgroupFS | None = None) -> set[str]:
    """The sandbox ids that have a cgroup of this ember home (in any hierarchy)."""
    fs = fs or CgroupFS()
    _check_name("home key", home_key)
    found: set[str] = set()
    for parent in _ember_parents(support):
        found.update(n for n in fs.subdirs(parent / home_key) if NAME_RE.fullmatch(n))
    return found


def sweep(support: CgroupSupport, home_key: str,
          keep: AbstractSet[str] | Callable[[], AbstractSet[str]], *,
          fs: CgroupFS | None = None, timeout: float = KILL_TIMEOUT_S) -> list[str]:
    """Destroy the sandbox cgroups of one ember home whose ids are not in ``keep`` (leaks of
    crashed runs); returns the ids removed. Directories whose names ember would never
    create are left alone.

    ``keep`` may be a function, asked *after* the cgroups are listed: when a sandbox is
    registered before its cgroup is made, a cgroup being made right now is then always
    among the ids it returns (a set computed before the listing could miss it)."""
    found = sandbox_ids(support, home_key, fs=fs)
    kept = keep() if callable(keep) else keep
    stale = sorted(found - set(kept))
    for sandbox_id in stale:
        SandboxCgroup(support, home_key, sandbox_id, fs=fs).destroy(timeout)
    return stale


def prune(support: CgroupSupport, home_key: str, *, fs: CgroupFS | None = None) -> None:
    """Remove ``ember/<home_key>`` and then ``ember`` where they are empty (a busy or
    missing directory is left as it is)."""
    fs = fs or CgroupFS()
    _check_name("home key", home_key)
    for parent in _ember_parents(support):
        for d in (parent / home_key, parent):
            try:
                fs.rmdir(d)
            except OSError:
                break
