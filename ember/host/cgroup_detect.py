"""Find which cgroup controllers ember can use on this host, and say why not when it cannot.

Nothing is assumed about paths: the cgroup filesystems are found in ``/proc/self/mountinfo``,
ember's own position in each hierarchy in ``/proc/self/cgroup`` and the kernel's controllers
in ``/proc/cgroups``. A controller (``cpu``, ``memory``, ``pids``) is served either by a v1
hierarchy that has it bound, or by the cgroup2 (unified) hierarchy if that offers it, so one
model covers pure v1, pure v2 and the hybrid layout (v1 controllers plus a cgroup2 mount at
``/sys/fs/cgroup/unified`` that holds no controllers we need).

Detection only reads; it never creates a cgroup. The parsers are pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from ember.host.cgroupfs import CgroupFS

#: The controllers a sandbox cgroup limits.
CONTROLLERS = ("cpu", "memory", "pids")
#: The controller that pauses a sandbox whose runtime cannot pause itself (a crun
#: container). Not a limit: a host without it only loses pause on that tier. On cgroup v2
#: it is not a controller but the core ``cgroup.freeze`` file of every non-root cgroup.
FREEZER = "freezer"

#: The cgroup under which every ember cgroup lives, in every hierarchy.
EMBER_PARENT = "ember"

Anchor = Literal["root", "self"]
Mode = Literal["v2", "v1", "hybrid", "none"]

# Super-block options of a v1 cgroup mount that are not controller names.
_V1_MOUNT_FLAGS = frozenset(
    {"rw", "ro", "noprefix", "clone_children", "xattr", "cpuset_v2_mode", "favordynmods"}
)


@dataclass(frozen=True)
class CgroupMount:
    """One mounted cgroup hierarchy, as ``/proc/self/mountinfo`` describes it."""

    version: Literal[1, 2]
    mount_point: Path
    root: str  # the part of the hierarchy this mount shows ("/" unless bind-mounted/namespaced)
    controllers: frozenset[str]  # v1: the bound controllers; v2: empty (see cgroup.controllers)
    name: str | None  # v1 named hierarchy (name=systemd), else None
    read_only: bool

    @property
    def key(self) -> frozenset[str]:
        """What ``/proc/self/cgroup`` lists for this hierarchy (v2: the empty set)."""
        if self.version == 2:
            return frozenset()
        return self.controllers | ({f"name={self.name}"} if self.name else set())


@dataclass(frozen=True)
class ControllerStatus:
    """Whether ember can use one controller, where, or why not."""

    name: str
    usable: bool
    version: Literal[1, 2] | None
    parent: Path | None  # ember's parent cgroup directory for it (created on first use)
    detail: str  # where it is served from, or why it cannot be used


@dataclass(frozen=True)
class CgroupSupport:
    """What the host offers for per-sandbox resource limits (for ``ember doctor`` and for
    :class:`ember.host.cgroups.SandboxCgroup`, which takes its directories from here)."""

    mode: Mode
    anchor: Anchor
    controllers: tuple[ControllerStatus, ...]
    notes: tuple[str, ...] = ()
    freezer: ControllerStatus | None = None

    @property
    def in_use(self) -> tuple[ControllerStatus, ...]:
        """The limit controllers and the freezer: every hierarchy a sandbox cgroup joins."""
        return self.controllers + ((self.freezer,) if self.freezer is not None else ())

    def controller(self, name: str) -> ControllerStatus:
        for c in self.controllers:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def usable(self) -> bool:
        """True if every controller ember limits is usable."""
        return all(c.usable for c in self.controllers)

    def summary(self) -> str:
        parts = [f"cgroups {self.mode}"]
        for c in self.controllers:
            parts.append(f"{c.name}: {'ok' if c.usable else 'unusable'} ({c.detail})")
        if self.freezer is not None:
            f = self.freezer
            parts.append(f"freezer (pause of isolation=container): "
                         f"{'ok' if f.usable else 'unusable'} ({f.detail})")
        return "; ".join(parts)


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, ``\\134`` for a backslash)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        ch = field[i]
        digits = field[i + 1 : i + 4]
        if ch == "\\" and len(digits) == 3 and all(d in "01234567" for d in digits):
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts in a ``/proc/<pid>/mountinfo`` text, in order.

    Lines that are not cgroup mounts, or are malformed, are skipped.
    """
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        fstype, super_opts = fields[sep + 1], fields[sep + 3].split(",")
        if fstype not in ("cgroup", "cgroup2"):
            continue
        read_only = "ro" in fields[5].split(",") or "ro" in super_opts
        root, mount_point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if fstype == "cgroup2":
            mounts.append(CgroupMount(2, mount_point, root, frozenset(), None, read_only))
            continue
        names = [o[len("name="):] for o in super_opts if o.startswith("name=")]
        ctrls = frozenset(o for o in super_opts if "=" not in o and o not in _V1_MOUNT_FLAGS)
        mounts.append(
            CgroupMount(1, mount_point, root, ctrls, names[0] if names else None, read_only)
        )
    return mounts


def parse_proc_cgroup(text: str) -> dict[frozenset[str], str]:
    """``/proc/<pid>/cgroup`` as {controllers of a hierarchy: path}; cgroup2's key is the
    empty set. Malformed lines are skipped."""
    out: dict[frozenset[str], str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        key = frozenset(p for p in parts[1].split(",") if p)
        out[key] = parts[2]
    return out


def parse_proc_cgroups(text: str) -> dict[str, bool]:
    """``/proc/cgroups`` as {controller: enabled}."""
    out: dict[str, bool] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 4 and not line.startswith("#") and fields[3].isdigit():
            out[fields[0]] = fields[3] != "0"
    return out


def _relative(path: str, root: str) -> str | None:
    """``path`` (a cgroup path in a hierarchy) relative to a mount showing ``root``."""
    p, r = PurePosixPath(path), PurePosixPath(root)
    if ".." in p.parts:
        return None
    if p == r:
        return ""
    if r in p.parents:
        return p.relative_to(r).as_posix()
    return None


def _base(mount: CgroupMount, self_paths: dict[frozenset[str], str],
          anchor: Anchor) -> tuple[Path | None, str]:
    """The directory under which ``ember/`` goes in ``mount``, or None and why not."""
    if anchor == "root":
        return mount.mount_point, ""
    own = self_paths.get(mount.key)
    if own is None:
        return None, f"ember's own cgroup in {mount.mount_point} is not in /proc/self/cgroup"
    rel = _relative(own, mount.root)
    if rel is None:
        return None, (f"ember's own cgroup {own} is not visible under {mount.mount_point} "
                      f"(which shows {mount.root})")
    return (mount.mount_point / rel if rel else mount.mount_point), ""


def _words(fs: CgroupFS, path: Path) -> set[str]:
    try:
        return set(fs.read(path).split())
    except OSError:
        return set()


def _v1_status(fs: CgroupFS, name: str, mount: CgroupMount,
               self_paths: dict[frozenset[str], str], anchor: Anchor) -> ControllerStatus:
    where = f"v1 hierarchy at {mount.mount_point}"
    base, why = _base(mount, self_paths, anchor)
    if base is None:
        return ControllerStatus(name, False, 1, None, f"{where}: {why}")
    if mount.read_only:
        return ControllerStatus(name, False, 1, None, f"{where} is mounted read-only")
    if not fs.is_dir(base):
        return ControllerStatus(name, False, 1, None, f"{where}: {base} does not exist")
    if not fs.writable(base):
        return ControllerStatus(name, False, 1, None,
                                f"{where}: no write permission on {base} (ember must run as root)")
    return ControllerStatus(name, True, 1, base / EMBER_PARENT, where)


def _v2_status(fs: CgroupFS, name: str, mount: CgroupMount,
               self_paths: dict[frozenset[str], str], anchor: Anchor, *,
               core: bool = False) -> ControllerStatus:
    """``core``: a feature of every cgroup2 directory (the freezer), not a controller
    that parents must offer and enable."""
    where = f"cgroup2 hierarchy at {mount.mount_point}"
    base, why = _base(mount, self_paths, anchor)
    if base is None:
        return ControllerStatus(name, False, 2, None, f"{where}: {why}")
    if mount.read_only:
        return ControllerStatus(name, False, 2, None, f"{where} is mounted read-only")
    if core:
        if not fs.writable(base):
            return ControllerStatus(name, False, 2, None, f"{where}: no write permission on "
                                    f"{base} (ember must run as root)")
        return ControllerStatus(name, True, 2, base / EMBER_PARENT, f"{where} (cgroup.freeze)")
    offered = _words(fs, base / "cgroup.controllers")
    if name not in offered:
        listed = " ".join(sorted(offered)) or "none"
        return ControllerStatus(name, False, 2, None,
                                f"{where}: {base} does not offer it (cgroup.controllers: {listed})")
    if base != mount.mount_point and name not in _words(fs, base / "cgroup.subtree_control"):
        procs = _words(fs, base / "cgroup.procs")
        if procs:
            return ControllerStatus(
                name, False, 2, None,
                f"{where}: {base} holds processes, so it cannot enable {name} for child "
                "cgroups (cgroup2's no-internal-processes rule); run ember in a leaf of a "
                "delegated cgroup, or anchor ember's cgroups at the root")
    if not fs.writable(base):
        return ControllerStatus(name, False, 2, None,
                                f"{where}: no write permission on {base} (ember must run as root)")
    return ControllerStatus(name, True, 2, base / EMBER_PARENT, where)


def _missing(name: str, kernel: dict[str, bool] | None, v2: CgroupMount | None) -> str:
    if kernel is not None and name not in kernel:
        return "the kernel has no such controller (/proc/cgroups)"
    if kernel is not None and not kernel[name]:
        return "disabled on the kernel command line (/proc/cgroups says enabled=0)"
    if v2 is None:
        return "no v1 hierarchy with it is mounted and cgroup2 is not mounted"
    return "not bound to a mounted v1 hierarchy"


def _mode(mounts: Iterable[CgroupMount]) -> Mode:
    mounts = list(mounts)
    v1 = any(m.version == 1 and m.controllers for m in mounts)
    v2 = any(m.version == 2 for m in mounts)
    if v1 and v2:
        return "hybrid"
    return "v1" if v1 else "v2" if v2 else "none"


def _notes(fs: CgroupFS, memory: ControllerStatus) -> tuple[str, ...]:
    if not memory.usable or memory.parent is None or memory.version != 1:
        return ()
    base = memory.parent.parent
    notes = []
    if fs.exists(base / "memory.memsw.limit_in_bytes"):
        notes.append("memory: swap is accounted (memory.memsw), a sandbox cannot swap past "
                     "its limit")
    else:
        notes.append("memory: no swap accounting (memory.memsw.* missing; boot with "
                     "swapaccount=1): a sandbox may use host swap beyond its memory limit")
    try:
        counted = any(line.startswith("oom_kill ")
                      for line in fs.read(base / "memory.oom_control").splitlines())
    except OSError:
        counted = False
    notes.append("memory: OOM kills are counted (memory.oom_control oom_kill)" if counted else
                 "memory: this kernel does not count OOM kills (needs 4.13 or newer)")
    return tuple(notes)


def _pick(candidates: Iterable[CgroupMount]) -> CgroupMount | None:
    """The first writable mount among ``candidates`` (else the first), or None."""
    found = list(candidates)
    writable = [m for m in found if not m.read_only]
    return (writable or found)[0] if found else None


def detect_cgroups(fs: CgroupFS | None = None, *, anchor: Anchor = "root") -> CgroupSupport:
    """Which of ``cpu``, ``memory`` and ``pids`` ember can use, where, and why not.

    ``anchor="root"`` puts ``ember/`` at the top of each hierarchy (stable, whichever cgroup
    the ember command runs in); ``anchor="self"`` nests it under ember's own cgroup (for a
    service given a delegated subtree, e.g. systemd's ``Delegate=yes``).
    """
    fs = fs or CgroupFS()
    mounts = parse_mountinfo(fs.read_proc("self/mountinfo") or "")
    self_paths = parse_proc_cgroup(fs.read_proc("self/cgroup") or "")
    kernel_text = fs.read_proc("cgroups")
    kernel = parse_proc_cgroups(kernel_text) if kernel_text is not None else None

    v2 = _pick(m for m in mounts if m.version == 2)
    statuses = []
    for name in CONTROLLERS:
        v1 = _pick(m for m in mounts if m.version == 1 and name in m.controllers)
        if v1 is not None:
            statuses.append(_v1_status(fs, name, v1, self_paths, anchor))
        elif v2 is not None and (kernel is None or kernel.get(name, False)):
            statuses.append(_v2_status(fs, name, v2, self_paths, anchor))
        else:
            statuses.append(ControllerStatus(name, False, None, None, _missing(name, kernel, v2)))
    memory = next(s for s in statuses if s.name == "memory")
    v1 = _pick(m for m in mounts if m.version == 1 and FREEZER in m.controllers)
    if v1 is not None:
        freezer = _v1_status(fs, FREEZER, v1, self_paths, anchor)
    elif v2 is not None:
        freezer = _v2_status(fs, FREEZER, v2, self_paths, anchor, core=True)
    else:
        freezer = ControllerStatus(FREEZER, False, None, None, _missing(FREEZER, kernel, v2))
    return CgroupSupport(_mode(mounts), anchor, tuple(statuses), _notes(fs, memory), freezer)
