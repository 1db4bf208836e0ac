"""The jail every VMM process runs in, described as a frozen spec and started by the
stdlib-only ``ember/host/jailer.py`` (what each layer does is in its docstring and in
``docs/security.md``).

Files enter the jail only as bind mounts at the same absolute path they have on the host,
so that a VMM's command line and a qcow2's backing-file names need no rewriting.
"""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ember.errors import BadRequestError, HostError

JAILER = Path(__file__).with_name("jailer.py")
#: The jailer's argv[0]: leak scans look for it (a jailer killed mid-way leaves a child).
JAILER_NAME = "ember-jailer"
LAUNCH_TIMEOUT_S = 20.0
#: Host paths every jailed QEMU needs read-only: its binary, libraries and firmware
#: (Debian's merged /usr), and the dynamic loader's cache.
SYSTEM_BINDS = ("/usr", "/etc/ld.so.cache")
#: Merged-/usr symlinks, recreated inside the jail as the host has them.
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib64")


def jail_wanted() -> tuple[bool, str]:
    """Whether VMMs get jailed here, and why (for logs and ``ember doctor``)."""
    if os.environ.get("EMBER_JAIL", "1") == "0":
        return False, "EMBER_JAIL=0 turns the jail off (debugging only, never for untrusted code)"
    if os.geteuid() != 0:
        return False, "ember is not running as root: no uid change, namespaces or cgroups"
    return True, ("root: every VMM runs as its own uid, in its own namespaces and root, "
                  "under seccomp, rlimits and cgroup limits")


class JailError(HostError):
    """The jail could not be set up, or the VMM could not be started inside it."""


@dataclass(frozen=True)
class Bind:
    """``source`` visible inside the jail at the same path."""

    source: Path
    writable: bool = False
    exec: bool = False
    device: bool = False

    def __post_init__(self) -> None:
        if not self.source.is_absolute() or ".." in self.source.parts:
            raise BadRequestError(f"jail bind source {self.source} must be an absolute path "
                                  "without '..'")


@dataclass(frozen=True)
class JailSpec:
    """Who the VMM runs as and what it can see. See ``jailer.py`` for the steps."""

    uid: int
    gid: int
    hostname: str
    #: An empty directory the jail's root tmpfs is mounted on (in the jail's own mount
    #: namespace only: the host never sees that mount).
    root: Path
    #: stdout and stderr of the VMM (opened by root before the uid changes).
    log: Path
    groups: tuple[int, ...] = ()
    binds: tuple[Bind, ...] = ()
    rlimits: tuple[tuple[str, int, int], ...] = ()
    cgroup_procs: tuple[Path, ...] = ()
    network: bool = False
    #: Descriptors of the caller handed to the program: ``(caller's fd, fd in the jail)``.
    pass_fds: tuple[tuple[int, int], ...] = ()
    #: Transparent huge pages off for the program (``PR_SET_THP_DISABLE``, which survives
    #: ``execve``): its memory is then counted and given in 4 KiB pages, not 2 MiB ones.
    no_thp: bool = False

    def __post_init__(self) -> None:
        for label, value in (("uid", self.uid), ("gid", self.gid), *(("group", g) for g in
                                                                     self.groups)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**32 - 1:
                raise BadRequestError(f"jail {label} must be a positive id, not {value!r}")

    def with_groups(self, *groups: int) -> JailSpec:
        """This jail with ``groups`` added to its supplementary groups."""
        return replace(self, groups=self.groups + tuple(g for g in groups
                                                        if g not in self.groups))

    def with_binds(self, *binds: Bind) -> JailSpec:
        seen = {b.source for b in self.binds}
        return replace(self, binds=self.binds + tuple(b for b in binds if b.source not in seen))

    def encode(self, argv: list[str]) -> bytes:
        """The jailer's input (a marshal-encoded dict of plain values)."""
        binds = [{**asdict(b), "source": str(b.source)} for b in self.binds]
        links = [{"path": p, "target": os.readlink(p)} for p in SYSTEM_LINKS
                 if os.path.islink(p)]
        doc = {
            "argv": argv, "uid": self.uid, "gid": self.gid, "groups": list(self.groups),
            "hostname": self.hostname, "root": str(self.root), "log": str(self.log),
            "binds": [*({"source": s, "exec": True} for s in SYSTEM_BINDS if Path(s).exists()),
                      *binds],
            "symlinks": links,
            "rlimits": {name: [soft, hard] for name, soft, hard in self.rlimits},
            "cgroup_procs": [str(p) for p in self.cgroup_procs],
            "network": self.network,
            "fds": [[src, dst] for src, dst in self.pass_fds],
            "no_thp": self.no_thp,
        }
        return marshal.dumps(doc)


def launch(jail: JailSpec, argv: list[str], *, timeout: float = LAUNCH_TIMEOUT_S) -> int:
    """Start ``argv`` (absolute program path) inside ``jail``; return its host pid once
    ``execve`` succeeded. Raises JailError naming the step that failed."""
    if not argv or not os.path.isabs(argv[0]):
        raise BadRequestError(f"jailed program must be an absolute path: {argv[:1]!r}")
    jail.root.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            # The log path names the sandbox: a leak scan finds a jailer (and its
            # not yet exec'd child) by it.
            [JAILER_NAME, "-I", "-S", str(JAILER), "--for", str(jail.log)],
            executable=sys.executable,
            input=jail.encode(argv), capture_output=True, timeout=timeout, close_fds=True,
            pass_fds=[src for src, _ in jail.pass_fds],
            cwd="/", env={"PATH": "/usr/bin:/bin"},
        )
    except subprocess.TimeoutExpired as err:
        raise JailError(f"the jailer did not finish within {timeout:g} s") from err
    except OSError as err:
        raise JailError(f"cannot run the jailer: {err}") from err
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    kind, _, text = (lines[-1] if lines else "").partition(" ")
    if kind == "error":
        raise JailError(f"cannot jail {Path(argv[0]).name}: {text}")
    if kind != "pid" or not text.isdigit() or int(text) <= 0:
        tail = done.stderr.decode("utf-8", "replace")[-1000:].strip()
        raise JailError(f"the jailer failed (exit {done.returncode}): "
                        f"{tail or text or 'no output'}")
    return int(text)
