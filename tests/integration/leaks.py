"""Find everything an ember home may leak after a failure path, by kind.

``leaks(paths)`` looks at the host, not at what ember believes: processes, files, sockets,
mounts, cgroups and registry rows. It never changes anything (a client lock is probed in
``/proc/locks``, not by taking it), so it can run while sandboxes are alive. Sandboxes a
test means to keep alive are passed in ``keep``; their resources are not leaks.

Kinds (keys of the result; each value is a sorted list of human-readable findings):

``processes``  live programs (QEMU, qemu-img, a jailer, a cgroup wrapper: any program)
               whose command line names the home or its RAM directory and that do not
               belong to a kept sandbox;
``ram``        guest RAM files (``*.ram``) in ``paths.ram`` not of a kept sandbox;
``sandbox_dirs`` directories under ``paths.sandboxes`` with no registry row, or whose row
               is failed but which hold more than the console and QEMU logs;
``sockets``    Unix sockets anywhere under the home, outside kept sandboxes' directories;
``overlays``   ``*.qcow2`` files under ``paths.sandboxes`` outside kept sandboxes;
``rows``       registry rows: in a live state but not kept, in a live state whose VM is
               not running, in a transient state (creating, booting, snapshotting) whose
               owner is gone, or failed (unless ``allow_failed_rows``);
``mounts``     entries of ``/proc/self/mountinfo`` naming the home or its RAM directory;
``cgroups``    per-sandbox cgroup directories (``<anchor>/ember/<home key>/<id>``, every
               hierarchy) of sandboxes that are not kept;
``uids``       jail uid allocations (host-wide files ``/run/ember/ids/<uid>`` naming the
               sandbox directory that holds the uid) of this home's sandboxes that are not
               kept, and live processes running as such a uid;
``staging``    anything in ``paths.tmp``, snapshot staging directories
               (``snapshots/.staging-*``) and overlay-cache staging files;
``snapshots``  snapshot rows without a directory, snapshot directories without a row,
               snapshots nobody asked to keep (see ``keep_snapshots``), and template
               snapshots superseded by a newer one of the same shape that nothing uses.

Only non-empty kinds appear in the result: ``leaks(paths) == {}`` means nothing leaked.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from ember.host import detect_cgroups, home_key
from ember.paths import Paths
from ember.runtime.manager import KEEP_ON_FAILURE, SandboxDir
from ember.runtime.snapshots import STAGING_PREFIX
from ember.runtime.states import LIVE_STATES
from ember.runtime.template_snapshots import DISK_META, KEY_META, NIC_META
from ember.store import SandboxRecord, SnapshotRecord, Store

#: What a failed sandbox's directory may still hold (for ``ember logs``).
FAILED_DIR_MAY_KEEP = frozenset(KEEP_ON_FAILURE) | {"console.log", "qemu.log"}
#: States that only last while their owner (creator or snapshot writer) lives.
TRANSIENT_STATES = {"creating": "client.lock", "booting": "client.lock",
                    "snapshotting": "snapshot.lock"}

Leaks = dict[str, list[str]]


def leaks(paths: Paths, *, allow_failed_rows: bool = False, keep: Collection[str] = (),
          keep_snapshots: Collection[str] | None = None) -> Leaks:
    """Every resource of ``paths``' home that no kept sandbox owns, by kind (see the module
    docstring). ``keep``: ids of sandboxes that are meant to be alive (running or paused,
    VM up). ``keep_snapshots``: ids or names of snapshots meant to exist; None keeps every
    named snapshot and reports unnamed ones that no live sandbox uses (a fork's leftovers).
    The home's daemon and its socket are not leaks."""
    rows, snaps = _registry(paths)
    kept = {r.id: r for r in rows if r.id in keep and r.state in LIVE_STATES}
    kept_dirs = [Path(r.dir) for r in kept.values()]
    found: Leaks = {
        "processes": _processes(paths, kept_dirs),
        "ram": _ram(paths, kept),
        "sandbox_dirs": _sandbox_dirs(paths, rows),
        "sockets": _sockets(paths, kept_dirs),
        "overlays": _overlays(paths, kept_dirs),
        "rows": _rows(rows, keep, allow_failed_rows),
        "mounts": _mounts(paths),
        "cgroups": _cgroups(paths, kept),
        "uids": _uids(paths, kept_dirs),
        "staging": _staging(paths),
        "snapshots": _snapshots(paths, rows, snaps, kept, keep_snapshots),
        "networks": _networks(paths, kept),
    }
    return {kind: sorted(items) for kind, items in found.items() if items}


def assert_no_leaks_anywhere(paths: Paths, *, allow_failed_rows: bool = False,
                             keep: Collection[str] = (),
                             keep_snapshots: Collection[str] | None = None,
                             settle: float = 3.0,
                             context: str = "") -> None:
    """Fail with every leak listed, by kind. Killed processes take a moment to exit (and
    their files to be released): leaks are re-checked for up to ``settle`` seconds."""
    deadline = time.monotonic() + settle
    while True:
        found = leaks(paths, allow_failed_rows=allow_failed_rows, keep=keep,
                      keep_snapshots=keep_snapshots)
        if not found or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if found:
        lines = [f"  {kind}: {item}" for kind, items in found.items() for item in items]
        where = f" after {context}" if context else ""
        raise AssertionError(f"ember home {paths.home} leaked{where}:\n" + "\n".join(lines))


# --- registry --------------------------------------------------------------------------------


def _registry(paths: Paths) -> tuple[list[SandboxRecord], list[SnapshotRecord]]:
    if not paths.db.exists():
        return [], []
    store = Store(paths.db)
    try:
        return store.list_sandboxes(), store.list_snapshots()
    finally:
        store.close()


def _rows(rows: list[SandboxRecord], keep: Collection[str], allow_failed: bool) -> list[str]:
    out = []
    for r in rows:
        what = f"{r.id} ({r.state})"
        if r.state == "failed":
            if not allow_failed:
                out.append(f"{what}: failed row left ({r.error})")
            continue
        if r.state not in LIVE_STATES:
            out.append(f"{what}: unknown state")
            continue
        if r.id not in keep:
            out.append(f"{what}: live row nobody kept")
        if not vm_running(r):
            out.append(f"{what}: live row whose VM (pid {r.pid}) is not running")
        lock = TRANSIENT_STATES.get(r.state)
        if lock is not None and lock_holder(Path(r.dir) / lock) is None:
            out.append(f"{what}: {lock} is free (its owner died) and nobody reconciled it")
    return out


def vm_running(rec: SandboxRecord) -> bool:
    """True if the row's recorded pid is a live QEMU serving that sandbox's QMP socket."""
    if rec.pid is None:
        return False
    argv = cmdline(rec.pid)
    return argv is not None and os.fsencode(SandboxDir(Path(rec.dir)).qmp_socket) in argv


# --- processes -------------------------------------------------------------------------------


def cmdline(pid: int) -> bytes | None:
    """The command line of a live (non-zombie) process, or None."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return None
    return None if state in "ZX" else argv


def _pids() -> Iterator[int]:
    for d in os.scandir("/proc"):
        if d.name.isdigit():
            yield int(d.name)


def _mentions(argv: bytes, root: Path) -> bool:
    """``root`` itself or a path below it appears in ``argv`` (not a longer sibling name)."""
    needle = os.fsencode(root)
    for arg in argv.split(b"\0"):
        start = arg.find(needle)
        while start != -1:
            end = start + len(needle)
            if end == len(arg) or arg[end:end + 1] in (b"/", b",", b":", b" ", b"="):
                return True
            start = arg.find(needle, start + 1)
    return False


def home_pids(paths: Paths) -> dict[int, bytes]:
    """Live processes (any program) whose command line names the home or its RAM dir."""
    me = os.getpid()
    out = {}
    for pid in _pids():
        if pid == me:
            continue
        argv = cmdline(pid)
        if argv and (_mentions(argv, paths.home) or _mentions(argv, paths.ram)):
            out[pid] = argv
    return out


def _processes(paths: Paths, kept_dirs: list[Path]) -> list[str]:
    out = []
    for pid, argv in home_pids(paths).items():
        if any(_mentions(argv, d) for d in kept_dirs):
            continue
        shown = argv.replace(b"\0", b" ").decode(errors="replace")
        out.append(f"pid {pid}: {shown[:300]}")
    return out


# --- files -----------------------------------------------------------------------------------


def _ram(paths: Paths, kept: dict[str, SandboxRecord]) -> list[str]:
    if not paths.ram.is_dir():
        return []
    return [str(f) for f in paths.ram.glob("*.ram") if f.stem not in kept]


def _sandbox_dirs(paths: Paths, rows: list[SandboxRecord]) -> list[str]:
    if not paths.sandboxes.is_dir():
        return []
    by_dir = {Path(r.dir): r for r in rows}
    out = []
    for d in paths.sandboxes.iterdir():
        rec = by_dir.get(d)
        if rec is None:
            names = sorted(p.name for p in d.iterdir()) if d.is_dir() else ["(not a dir)"]
            out.append(f"{d}: no registry row (holds {names})")
        elif rec.state == "failed" and d.is_dir():
            extra = sorted(p.name for p in d.iterdir() if p.name not in FAILED_DIR_MAY_KEEP)
            if extra:
                out.append(f"{d}: failed sandbox still holds {extra}")
    return out


def _walk(root: Path, skip: list[Path]) -> Iterator[tuple[Path, os.stat_result]]:
    """Every entry below ``root`` (not following symlinks), except below ``skip``."""
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            p = Path(e.path)
            if p in skip:
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            yield p, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(p)


def _sockets(paths: Paths, kept_dirs: list[Path]) -> list[str]:
    skip = [*kept_dirs, paths.cache]
    return [str(p) for p, st in _walk(paths.home, skip)
            if stat.S_ISSOCK(st.st_mode) and p != paths.daemon_socket]


def _overlays(paths: Paths, kept_dirs: list[Path]) -> list[str]:
    return [str(p) for p, st in _walk(paths.sandboxes, kept_dirs)
            if p.name.endswith(".qcow2") and not stat.S_ISDIR(st.st_mode)]


def _staging(paths: Paths) -> list[str]:
    out = []
    if paths.tmp.is_dir():
        out += [f"{p} (home tmp)" for p in paths.tmp.iterdir()]
    if paths.snapshots.is_dir():
        out += [f"{p} (snapshot staging)" for p in paths.snapshots.iterdir()
                if p.name.startswith(STAGING_PREFIX)]
    overlays = paths.home / "overlays"
    if overlays.is_dir():
        out += [f"{p} (overlay staging)" for p in overlays.iterdir() if p.name.startswith(".")]
    return out


def _snapshots(paths: Paths, rows: list[SandboxRecord], snaps: list[SnapshotRecord],
               kept: dict[str, SandboxRecord], keep: Collection[str] | None) -> list[str]:
    out = []
    ids = {s.id for s in snaps}
    if paths.snapshots.is_dir():
        for d in paths.snapshots.iterdir():
            if not d.name.startswith(STAGING_PREFIX) and d.name not in ids:
                out.append(f"{d}: snapshot directory with no registry row")
    used = {r.snapshot for r in rows if r.snapshot and r.id in kept}
    baked = _baked_snapshots(paths)
    newest: dict[tuple[object, ...], SnapshotRecord] = {}  # template snapshots by shape
    for s in snaps:
        if KEY_META in s.metadata:
            shape = (s.template, s.vcpus, s.memory_mib, s.metadata.get(DISK_META),
                     s.metadata.get(NIC_META))
            if shape not in newest or s.created_at > newest[shape].created_at:
                newest[shape] = s
    for s in snaps:
        label = f"{s.name or '(unnamed)'} {s.id[:12]}"
        if not (paths.snapshots / s.id).is_dir():
            out.append(f"{label}: registry row with no directory")
        if s.id in used or s.id in baked:
            continue
        if KEY_META in s.metadata:  # the newest of its shape is meant to stay
            if s not in newest.values():
                out.append(f"{label}: superseded template snapshot that nothing uses")
            continue
        if keep is None:
            if s.name is None:
                out.append(f"{label}: unnamed snapshot (a fork's) that nothing uses")
        elif s.id not in keep and (s.name is None or s.name not in keep):
            out.append(f"{label}: snapshot nobody kept")
    return out


def _baked_snapshots(paths: Paths) -> set[str]:
    if not paths.db.exists():
        return set()
    store = Store(paths.db)
    try:
        return {str(t.config["snapshot"]) for t in store.list_templates()
                if t.config.get("snapshot")}
    finally:
        store.close()


# --- kernel objects --------------------------------------------------------------------------


def _mounts(paths: Paths) -> list[str]:
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        # root and mount point; mountinfo escapes spaces as \040
        for f in (fields[3], fields[4]):
            p = f.replace("\\040", " ")
            if _mentions(p.encode(), paths.home) or _mentions(p.encode(), paths.ram):
                out.append(line)
                break
    return out


def _cgroups(paths: Paths, kept: dict[str, SandboxRecord]) -> list[str]:
    key = home_key(paths.home)
    parents = {c.parent for c in detect_cgroups().in_use if c.parent is not None}
    out = []
    for parent in parents:
        d = parent / key
        if not d.is_dir():
            continue
        out += [str(c) for c in d.iterdir() if c.is_dir() and c.name not in kept]
    return out


def _networks(paths: Paths, kept: dict[str, SandboxRecord]) -> list[str]:
    """Network leases (and the namespaces they name) of this home's sandboxes that are
    not kept: whatever the host namespace (``/run/ember/net/<host>/<index>``)."""
    from ember.net.addressing import GUEST_NETNS_SUFFIX
    from ember.net.manager import LEASES_ROOT

    found = []
    for lease in LEASES_ROOT.glob("*/[0-9]*"):
        try:
            doc = json.loads(lease.read_text()) if lease.name.isdigit() else None
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("home") == str(paths.home) \
                and doc.get("sandbox") not in kept:
            found.append(f"{lease} ({doc.get('sandbox')})")
    for ns in Path("/run/netns").glob("ember-sb-*"):
        sid = ns.name.removeprefix("ember-").removesuffix(GUEST_NETNS_SUFFIX)
        if sid not in kept and (paths.sandboxes / sid).exists():
            found.append(f"network namespace {ns.name}")
    return found + _orphan_proxies()


def _orphan_proxies() -> list[str]:
    """Network proxies (any home's) whose network is gone: their policy file removed, they
    should have exited."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ember.net.proxy" in argv and b"--policy" in argv[:-1]:
            policy = Path(argv[argv.index(b"--policy") + 1].decode(errors="replace"))
            if not policy.exists():
                found.append(f"network proxy pid {cmdline.parent.name} ({policy.name})")
    return found


def lock_holder(path: Path) -> int | None:
    """The pid holding an flock on ``path`` (from ``/proc/locks``), or None if it is free
    or missing. Read-only: never takes the lock, so it cannot disturb its owner."""
    try:
        st = path.stat()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF" ("->" marks a blocked waiter)
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5] == want and fields[4].isdigit():
            return int(fields[4])
    return None


def ids_dir() -> Path:
    """Where jail uid allocations live (host-wide), or a path that does not exist on an
    ember without per-sandbox uids."""
    try:
        from ember.host.ids import IDS_DIR
    except ImportError:
        return Path("/run/ember/ids")
    return IDS_DIR


def _uids(paths: Paths, kept_dirs: list[Path]) -> list[str]:
    d = ids_dir()
    if not d.is_dir():
        return []
    held: dict[int, Path] = {}
    for f in d.iterdir():
        try:
            owner = Path(f.read_text())
        except OSError:
            continue
        if f.name.isdigit() and owner.parent == paths.sandboxes and owner not in kept_dirs:
            held[int(f.name)] = owner
    out = [f"uid {uid} still allocated to {owner}" for uid, owner in held.items()]
    if held:
        for pid in _pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            uid_line = next((ln for ln in status.splitlines() if ln.startswith("Uid:")), "")
            ruid = uid_line.split()[1:2]
            if ruid and ruid[0].isdigit() and int(ruid[0]) in held and cmdline(pid):
                out.append(f"pid {pid} runs as uid {ruid[0]} of {held[int(ruid[0])]}")
    return out
