"""ember-jailer: start one VMM process inside its jail, then get out of the way.

Run as root with a fresh interpreter (``python3 -I -S jailer.py``), the jail on stdin as a
``marshal``-encoded dict (see :class:`ember.host.jail.JailSpec`, which writes it; marshal,
not JSON: it needs no import, and the jailer's start-up is on every sandbox's start path).
Standard library only, and single-threaded: everything between ``fork`` and ``exec`` is
plain system calls.

What the VMM process gets, in this order (each step is checked; any failure is reported
on stdout as ``{"error": ...}`` and nothing keeps running):

1. a new pid namespace (the jailer unshares it, then forks: the VMM is pid 1 there and
   sees no other process), a new session, no controlling terminal;
2. the sandbox's cgroups (written before anything else runs in it);
3. new mount, UTS, IPC, cgroup and (unless networking is asked) network namespaces; the
   hostname set to the sandbox id;
4. a new root: a small read-only tmpfs holding only the bind mounts listed in the spec
   (read-only unless marked writable, nosuid, nodev and noexec except where needed),
   entered with ``pivot_root``; the host's root is detached, not just hidden;
5. rlimits; SIGXFSZ ignored (a write past RLIMIT_FSIZE fails with EFBIG instead of
   killing the VMM); umask 077;
6. stdin from /dev/null, stdout and stderr to the VMM log, every other descriptor closed;
   an empty environment but ``PATH``;
7. the unprivileged uid, gid and groups of the spec (which clears every capability), and
   ``no_new_privs``; transparent huge pages off if the spec says ``no_thp``; then
   ``execve``.

On success the jailer prints ``pid N`` (the VMM's pid as the host sees it) once the
``execve`` succeeded, and exits; the VMM is re-parented to the host's init. On failure it
prints ``error <message>`` and exits 1.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # C module: ``signal`` imports ``enum`` (ms)
import ctypes
import marshal
import os
import resource
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86_64
PR_SET_NO_NEW_PRIVS = 38
PR_SET_THP_DISABLE = 41
PR_CAPBSET_DROP = 24

MAX_SPEC_BYTES = 1 << 20
ROOT_TMPFS_OPTS = "mode=0755,size=1m,nr_inodes=4096"

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")


def _unshare(flags: int, what: str) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({what})")


def _enc(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    ret = _libc.mount(_enc(source), _enc(target), _enc(fstype), ctypes.c_ulong(flags),
                      _enc(data))
    _check(ret, f"mount {source or ''} on {target}")


def _make_target(path: str, is_dir: bool) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if is_dir:
        os.makedirs(path, mode=0o755, exist_ok=True)
    elif not os.path.lexists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _bind(root: str, bind: dict[str, Any]) -> None:
    src = bind["source"]
    if os.path.islink(src):
        raise JailError(f"bind source {src} is a symlink; give the real path")
    if not os.path.exists(src):
        raise JailError(f"bind source {src} does not exist")
    target = root + (bind.get("target") or src)
    _make_target(target, os.path.isdir(src))
    _mount(src, target, None, MS_BIND)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID
    if not bind.get("writable"):
        flags |= MS_RDONLY
    if not bind.get("exec"):
        flags |= MS_NOEXEC
    if not bind.get("device"):
        flags |= MS_NODEV
    _mount(None, target, None, flags)


def _symlink(root: str, link: dict[str, str]) -> None:
    path = root + link["path"]
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    os.symlink(link["target"], path)


def _new_root(spec: dict[str, Any]) -> None:
    root = spec["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do reaches the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, ROOT_TMPFS_OPTS)
    for bind in spec["binds"]:
        _bind(root, bind)
    for link in spec.get("symlinks", []):
        _symlink(root, link)
    old = root + "/.old-root"
    os.mkdir(old, 0o700)
    _check(_libc.syscall(SYS_PIVOT_ROOT, os.fsencode(root), os.fsencode(old)), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old-root", MNT_DETACH), "detach the host root")
    os.rmdir("/.old-root")
    # The root itself (directories made above) is read-only from now on.
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _rlimits(spec: dict[str, Any]) -> None:
    for name, value in spec.get("rlimits", {}).items():
        res = getattr(resource, f"RLIMIT_{name.upper()}", None)
        if res is None:
            raise JailError(f"unknown rlimit {name!r}")
        soft, hard = value
        resource.setrlimit(res, (soft, hard))


def _stdio(spec: dict[str, Any]) -> tuple[int, int]:
    """Open (before the root changes) what becomes the VMM's stdin and stdout/stderr."""
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                  | os.O_NOFOLLOW, 0o600)
    return null, log


def _child(spec: dict[str, Any], report: int) -> None:
    os.setsid()
    for procs in spec.get("cgroup_procs", []):
        with open(procs, "w") as f:
            f.write("0\n")  # 0: the writing process
    flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP
    if not spec.get("network"):
        flags |= CLONE_NEWNET
    _unshare(flags, "mount, uts, ipc, cgroup and network namespaces")
    host = os.fsencode(spec["hostname"])
    _check(_libc.sethostname(host, ctypes.c_size_t(len(host))), "sethostname")
    null, log = _stdio(spec)
    _new_root(spec)
    if os.path.exists("/dev/null"):  # the jail's own (bound) /dev/null, not the host's
        os.close(null)
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    _rlimits(spec)
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
    for sig in (_signal.SIGPIPE, _signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(sig, _signal.SIG_DFL)
    os.umask(0o077)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    keep = {report}
    for src, dst in spec.get("fds", []):  # handed over: at the number the program expects
        if dst <= 2 or dst == report or dst in keep:
            raise JailError(f"cannot hand over descriptor {src} as {dst}")
        os.dup2(src, dst)  # inheritable
        keep.add(dst)
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0] + 1)
    _drop_bounding_set()
    os.setgroups([int(g) for g in spec.get("groups", [])])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    if os.getuid() == 0 or os.geteuid() == 0:
        raise JailError("still root after setresuid")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
    if spec.get("no_thp"):
        _check(_libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0), "prctl(PR_SET_THP_DISABLE)")
    argv = spec["argv"]
    os.execve(argv[0], argv, {"PATH": "/usr/bin:/bin"})


def _drop_bounding_set() -> None:
    """Empty the capability bounding set: nothing exec'd later can regain a capability."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == 22:  # EINVAL: past the last capability
                break
            _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")


def _reply(kind: str, text: str) -> None:
    sys.stdout.write(f"{kind} {text}".replace("\n", " ") + "\n")
    sys.stdout.flush()


def main() -> int:
    try:
        spec = marshal.loads(sys.stdin.buffer.read(MAX_SPEC_BYTES))
        if not isinstance(spec, dict):
            raise JailError("the jail spec is not a dict")
        if os.geteuid() != 0:
            raise JailError("the jailer must run as root")
        _unshare(CLONE_NEWPID, "pid namespace")
        rd, wr = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
    except (OSError, ValueError, EOFError, TypeError, KeyError, JailError) as err:
        _reply("error", str(err))
        return 1
    if pid == 0:
        os.close(rd)
        try:
            _child(spec, wr)
            raise JailError("execve returned")
        except BaseException as err:  # report anything, then die
            said = str(err) if isinstance(err, JailError) else f"{type(err).__name__}: {err}"
            os.write(wr, said.encode("utf-8", "replace")[:4000])
            os._exit(127)
    os.close(wr)
    chunks = []
    while chunk := os.read(rd, 4096):  # EOF: execve succeeded (close-on-exec) or it died
        chunks.append(chunk)
    if chunks:
        os.waitpid(pid, 0)
        _reply("error", b"".join(chunks).decode("utf-8", "replace"))
        return 1
    _reply("pid", str(pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
