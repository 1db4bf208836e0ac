"""The OCI runtime configuration (``config.json``) of a container sandbox. Pure: no I/O.

crun (``isolation="container"``) and runsc (``isolation="gvisor"``) read the same bundle:
the template's root filesystem (an overlay the host mounted), ember's agent bound
read-only at ``/.ember/lib``, the sandbox's ``vm/`` directory bound at ``/.ember/run``
(the agent's socket), new pid, mount, IPC, UTS and network namespaces (the network
namespace is empty: no interface but a down loopback), a reduced capability set,
``no_new_privs``, a seccomp filter and rlimits. cgroups are not in the bundle: ember puts
the runtime in the sandbox's cgroup before it starts (``ember.host.cgroups``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ember.agent import CONTAINER_INIT_CODE, DEFAULT_PATH

OCI_VERSION = "1.0.2"
RUNTIME_PYTHON = "/.ember/runtime/bin/python3"
AGENT_LIB = "/.ember/lib"
AGENT_RUN = "/.ember/run"

#: Capabilities of the container's root: what the agent needs to run commands as other
#: users and what package managers expect; no CAP_SYS_ADMIN, CAP_NET_*, CAP_SYS_PTRACE,
#: CAP_MKNOD or CAP_SYS_MODULE.
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_SETFCAP", "CAP_SYS_CHROOT",
)

#: System calls the filter refuses (EPERM): kernel-wide state, new namespaces and mounts,
#: kernel modules and keyrings, BPF, perf, ptrace and other large attack surface that a
#: sandboxed program has no use for. Everything else is allowed (a default-allow list
#: keeps every template's programs working; the capability set bounds the rest).
DENIED_SYSCALLS = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
    "delete_module", "finit_module", "fsconfig", "fsmount", "fsopen", "fspick",
    "get_kernel_syms", "get_mempolicy", "init_module", "io_uring_enter", "io_uring_register",
    "io_uring_setup", "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl",
    "lookup_dcookie", "mbind", "mount", "mount_setattr", "move_mount", "move_pages",
    "name_to_handle_at", "nfsservctl", "open_by_handle_at", "open_tree", "perf_event_open",
    "personality", "pivot_root", "process_vm_readv", "process_vm_writev", "ptrace",
    "query_module", "quotactl", "reboot", "request_key", "set_mempolicy", "setns",
    "settimeofday", "stime", "swapoff", "swapon", "syslog", "umount", "umount2", "unshare",
    "uselib", "userfaultfd", "ustat", "vhangup", "_sysctl",
)
EPERM = 1


def seccomp_profile(denied: Sequence[str] = DENIED_SYSCALLS) -> dict[str, Any]:
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": sorted(denied), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}],
    }


def _tmpfs(target: str, options: str, *, devices: bool = False) -> dict[str, Any]:
    flags = ["nosuid"] if devices else ["nosuid", "nodev"]
    return {"destination": target, "type": "tmpfs", "source": "tmpfs",
            "options": [*flags, *options.split(",")]}


def _bind(source: Path, target: str, *, writable: bool) -> dict[str, Any]:
    return {"destination": target, "type": "bind", "source": str(source),
            "options": ["rbind", "rw" if writable else "ro", "nosuid", "nodev"]}


def oci_config(*, sandbox_id: str, rootfs: Path, run_dir: Path, agent_lib: Path,
               nofile: int, nproc: int, gvisor: bool, netns: Path | None = None,
               resolv_conf: Path | None = None) -> dict[str, Any]:
    """The ``config.json`` of one sandbox.

    ``netns``: the sandbox's network namespace (crun joins it; runsc is started inside it
    with ``--network=host``); ``resolv_conf`` is bound over /etc/resolv.conf.
    ``nofile``/``nproc`` must not exceed the host's hard limits (the runtime cannot raise
    them without CAP_SYS_RESOURCE). For runsc (``gvisor``) it adds an identity-mapped user
    namespace, which runsc needs on hosts where its gofer otherwise fails to start
    (``fork/exec /proc/self/exe: operation not permitted``).
    """
    caps = list(CAPABILITIES)
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "network", "ipc", "uts",
                                                              "mount")]
    if netns is not None:  # the runtime joins the sandbox's network namespace
        namespaces[1]["path"] = str(netns)
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "seccomp": seccomp_profile(),
        "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                        "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                        "/proc/sched_debug", "/proc/scsi", "/sys/firmware"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                          "/proc/sysrq-trigger"],
    }
    if gvisor:
        namespaces.append({"type": "user"})
        ident = [{"containerID": 0, "hostID": 0, "size": 4294967295}]
        linux["uidMappings"] = ident
        linux["gidMappings"] = ident
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            # The sandbox id as the last argument: it identifies the process in /proc.
            "args": [RUNTIME_PYTHON, "-IS", "-c", CONTAINER_INIT_CODE, sandbox_id],
            "env": [f"PATH={DEFAULT_PATH}", "HOME=/root", "LANG=C.UTF-8"],
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile},
                {"type": "RLIMIT_NPROC", "hard": nproc, "soft": nproc},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": sandbox_id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            _tmpfs("/dev", "strictatime,mode=755,size=65536k", devices=True),
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            _tmpfs("/dev/shm", "noexec,mode=1777,size=65536k"),
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            _tmpfs("/tmp", "mode=1777"),
            _tmpfs("/run", "mode=755"),
            _bind(agent_lib, AGENT_LIB, writable=False),
            _bind(run_dir, AGENT_RUN, writable=True),
            *([_bind(resolv_conf, "/etc/resolv.conf", writable=False)] if resolv_conf else []),
        ],
        "linux": linux,
    }
