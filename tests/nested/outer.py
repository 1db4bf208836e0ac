"""An outer VM that gives ember's KVM path a real KVM on hosts that have none.

QEMU's TCG emulates AMD SVM. An outer VM (``-accel tcg -cpu qemu64,+svm,+npt``, no NIC)
boots Debian's generic kernel, which ships ``kvm.ko`` and ``kvm-amd.ko``, loads them with
nested paging, and so offers a ``/dev/kvm`` on which ember's jailed ``qemu-system-x86_64
-accel kvm -M microvm`` boots its guests. The host's ``/usr``, ``/etc``, ``/var/lib/dpkg``,
ember's cache and the checkout are shared over virtio-9p at the same paths (read-only;
``/etc`` and the cache get a tmpfs overlay so that the inside can add a ``kvm`` group and
build what the cache lacks); one writable share brings the results back.

Artifacts: the kernel package comes from Debian's archive (``apt-get download``), and the
kernel plus a busybox initramfs are cached under ``$EMBER_CACHE/nested-kvm/<key>/``, the key
being the sha256 of everything they are made of (the package, busybox, the init script
and this builder's recipe). ``python -m tests.nested.outer build`` makes them (the test
setup runs it); ``run`` boots the VM with a script.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
INIT = HERE / "outer-init"
BUSYBOX = Path("/bin/busybox")
#: Kernel modules the outer VM loads, in order (virtio and 9p for the shares, overlay for
#: the writable /etc and cache, kvm-amd for the KVM under test, loop and ext4 for the
#: container tiers' template mounts).
MODULES = (
    "drivers/virtio/virtio_ring", "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev", "drivers/virtio/virtio", "drivers/virtio/virtio_pci",
    "net/9p/9pnet", "net/9p/9pnet_virtio", "fs/netfs/netfs", "fs/fscache/fscache", "fs/9p/9p",
    "fs/overlayfs/overlay", "virt/lib/irqbypass", "arch/x86/kvm/kvm", "drivers/crypto/ccp/ccp",
    "arch/x86/kvm/kvm-amd", "drivers/block/loop", "crypto/crc32c_generic", "lib/crc16",
    "fs/mbcache", "fs/jbd2/jbd2", "fs/ext4/ext4",
)
#: Modules sandbox networking needs (tap and veth links, nftables with NAT, conntrack
#: state and counts, reject, limit and redirect, the tbf rate limit), by name: each is
#: loaded after what it depends on (read from the module's own ``.modinfo``).
NET_MODULES = ("tun", "veth", "nf_tables", "nft_ct", "nft_chain_nat", "nft_nat", "nft_masq",
               "nft_redir", "nft_reject_inet", "nft_limit", "nft_connlimit", "sch_tbf")
RECIPE_VERSION = 2  # of the kernel and initramfs (the CPU and memory are not in it)
#: The outer machine: TCG emulating AMD SVM with nested paging; no NIC, no display. The
#: CPU is qemu64 raised to x86-64-v2 (what Debian's Python wheels, numpy's among them,
#: assume: without it ``ember bench``'s plotting dies of SIGILL).
CPU = "qemu64,+svm,+npt,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,+lahf-lm"
#: Multi-threaded TCG (one host thread per vCPU). ``thread=single`` avoided nothing and made
#: nested boots time out; see inside.sh for the workaround of an MTTCG hang.
OUTER_ACCEL = "tcg"
MEMORY_MIB = 6144
VCPUS = 2
ROOT_TMPFS = "4g"


def cache_root() -> Path:
    return Path(os.environ.get("EMBER_CACHE") or "/var/lib/ember/cache") / "nested-kvm"


@dataclass(frozen=True)
class Outer:
    """The built outer VM: its kernel and initramfs."""

    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.gz"


def _sh(argv: list[str], *, cwd: Path | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-1500:]}")
    return done.stdout


def kernel_package(debs: Path) -> Path:
    """Debian's generic kernel package: the cached one, else downloaded from the archive."""
    found = sorted(debs.glob("linux-image-6.1.0-*-amd64_*.deb"))
    if found:
        return found[-1]
    debs.mkdir(parents=True, exist_ok=True)

    def name() -> str:
        for line in _sh(["apt-cache", "depends", "linux-image-amd64"]).splitlines():
            dep = line.strip().removeprefix("Depends: ")
            if dep.startswith("linux-image-6.1.0-") and dep.endswith("-amd64"):
                return dep
        raise RuntimeError("apt-cache names no linux-image-6.1.0-*-amd64 package")

    try:
        pkg = name()
        _sh(["apt-get", "download", pkg], cwd=debs)
    except RuntimeError:
        _sh(["apt-get", "update", "-q"])
        pkg = name()
        _sh(["apt-get", "download", pkg], cwd=debs)
    found = sorted(debs.glob("linux-image-6.1.0-*-amd64_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {pkg} left no package in {debs}")
    return found[-1]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def recipe_key(deb: Path) -> str:
    parts = {"deb": _digest(deb), "busybox": _digest(BUSYBOX), "init": _digest(INIT),
             "modules": MODULES, "net_modules": NET_MODULES, "version": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio (newc) archive of (name, mode, data) entries, plus its trailer."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        out.write(header + raw)
        pad(len(header) + len(raw))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def _module_bytes(base: Path) -> bytes | None:
    """A module (``base`` without its ``.ko`` suffix) uncompressed, or None if missing."""
    plain, packed = Path(f"{base}.ko"), Path(f"{base}.ko.xz")
    if plain.is_file():
        return plain.read_bytes()
    if packed.is_file():
        return lzma.decompress(packed.read_bytes())
    return None


def _module_files(mod_root: Path) -> dict[str, str]:
    """Every module of the tree by name (dashes as underscores, as the kernel names them):
    its path under ``mod_root`` without the suffix."""
    out = {}
    for f in mod_root.rglob("*.ko*"):
        rel = str(f.relative_to(mod_root)).removesuffix(".xz").removesuffix(".ko")
        out[Path(rel).name.replace("-", "_")] = rel
    return out


def _depends(data: bytes) -> list[str]:
    """The ``depends=`` entry of an ELF64 module's ``.modinfo`` section."""
    shoff = int.from_bytes(data[0x28:0x30], "little")
    size, count, names = (int.from_bytes(data[o:o + 2], "little") for o in (0x3A, 0x3C, 0x3E))
    headers = [data[shoff + i * size:shoff + (i + 1) * size] for i in range(count)]

    def section(h: bytes) -> bytes:
        off, length = (int.from_bytes(h[o:o + 8], "little") for o in (0x18, 0x20))
        return data[off:off + length]

    strtab = section(headers[names])
    for h in headers:
        start = int.from_bytes(h[0:4], "little")
        if strtab[start:strtab.index(b"\0", start)] == b".modinfo":
            for entry in section(h).split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
    return []


def _with_dependencies(mod_root: Path, wanted: tuple[str, ...]) -> list[str]:
    """The paths (under ``mod_root``, without suffix) of the ``wanted`` modules and of all
    they depend on, each after its dependencies; modules built into the kernel have no
    file and are skipped."""
    modules = _module_files(mod_root)
    order: list[str] = []

    def visit(name: str, depth: int) -> None:
        rel = modules.get(name)
        if rel is None or rel in order or depth > 32:
            return
        data = _module_bytes(mod_root / rel)
        for dep in _depends(data) if data else []:
            visit(dep.replace("-", "_"), depth + 1)
        if rel not in order:
            order.append(rel)

    for name in wanted:
        visit(name, 0)
    return order


def build(progress: bool = False) -> Outer:
    """The outer kernel and initramfs, built once per content (see the module doc)."""
    root = cache_root()
    deb = kernel_package(root / "debs")
    out = Outer(root / recipe_key(deb))
    if out.kernel.is_file() and out.initrd.is_file():
        return out
    if progress:
        print(f"nested-kvm: building the outer VM from {deb.name}", file=sys.stderr)
    staging = root / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tree = staging / "deb"
        tree.mkdir(parents=True)
        _sh(["dpkg-deb", "-x", str(deb), str(tree)])
        kver = next((tree / "lib/modules").iterdir()).name
        shutil.copyfile(tree / f"boot/vmlinuz-{kver}", staging / "vmlinuz")
        mod_root = tree / "lib/modules" / kver / "kernel"
        dirs = ["bin", "mod", "proc", "sys", "dev", "newroot"]
        entries: list[tuple[str, int, bytes]] = [(d, stat.S_IFDIR | 0o755, b"") for d in dirs]
        entries.append(("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes()))
        entries.append(("init", stat.S_IFREG | 0o755, INIT.read_bytes()))
        order = []
        for m in [*MODULES, *_with_dependencies(mod_root, NET_MODULES)]:
            name = f"{Path(m).name}.ko"
            if name in order:
                continue
            data = _module_bytes(mod_root / m)
            if data is None:
                continue  # built into this kernel
            entries.append((f"mod/{name}", stat.S_IFREG | 0o644, data))
            order.append(name)
        entries.append(("mod/order", stat.S_IFREG | 0o644, ("\n".join(order) + "\n").encode()))
        (staging / "initrd.gz").write_bytes(gzip.compress(_newc(entries), compresslevel=1))
        shutil.rmtree(tree)
        try:
            staging.rename(out.dir)
        except OSError:
            if not out.kernel.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


@dataclass(frozen=True)
class Share:
    path: Path
    mode: str = "ro"  # ro | rw | overlay (read-only, with a tmpfs layer on top inside)


def default_shares(results: Path) -> list[Share]:
    cache = Path(os.environ.get("EMBER_CACHE") or "/var/lib/ember/cache")
    return [Share(Path("/usr")), Share(Path("/etc"), "overlay"), Share(Path("/var/lib/dpkg")),
            Share(cache, "overlay"), Share(REPO), Share(results, "rw")]


def argv(outer: Outer, script: Path, console: Path, shares: list[Share],
         env: dict[str, str]) -> list[str]:
    """The outer QEMU's command line: ``script`` runs inside as root, on a tmpfs root."""
    args: list[str] = []
    mounts = []
    for i, share in enumerate(shares, start=1):
        ro = ",readonly=on" if share.mode != "rw" else ""
        args += ["-fsdev", f"local,id=f{i},path={share.path},security_model=none{ro}",
                 "-device", f"virtio-9p-pci,fsdev=f{i},mount_tag=t{i}"]
        mounts.append(f"t{i}:{share.mode}:{share.path}")
    extra = " ".join(f"NK_ENV_{k}={v}" for k, v in env.items())
    cmdline = (f"console=ttyS0 panic=-1 reboot=t quiet loglevel=4 NK_SCRIPT={script} "
               f"NK_ROOT_SIZE={ROOT_TMPFS} NK_MOUNTS={','.join(mounts)} {extra}").strip()
    return ["qemu-system-x86_64", "-accel", OUTER_ACCEL, "-M", "pc", "-cpu", CPU,
            "-m", str(MEMORY_MIB), "-smp", str(VCPUS), "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-kernel", str(outer.kernel),
            "-initrd", str(outer.initrd), "-append", cmdline,
            "-serial", f"file:{console}", *args]


def run(command: str, results: Path, *, timeout: float,
        env: dict[str, str] | None = None) -> int:
    """Boot the outer VM and run the shell ``command`` inside, as root, from the checkout;
    ``results`` (seen inside at the same path, as ``$RESULTS``) receives ``output.log``
    (its output), ``status`` (its exit status) and the outer console. Returns the outer
    QEMU's exit status (124: timed out)."""
    outer = build()
    results.mkdir(parents=True, exist_ok=True)
    for stale in ("status", "output.log"):
        (results / stale).unlink(missing_ok=True)
    (results / "command.sh").write_text(command + "\n")
    full_env = {"RESULTS": str(results), "CHECKOUT": str(REPO),
                "INSIDE_TIMEOUT": str(int(timeout) - 60), **(env or {})}
    cmd = argv(outer, HERE / "run-inside.sh", results / "outer-console.log",
               default_shares(results), full_env)
    with open(results / "outer-qemu.log", "wb") as err, subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True) as qemu:
        try:
            return qemu.wait(timeout=timeout)
        except BaseException:
            qemu.kill()
            qemu.wait()
            raise


def inside_status(results: Path) -> int | None:
    """The exit status the command had inside, or None when it never finished."""
    try:
        return int((results / "status").read_text().strip())
    except (OSError, ValueError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find cached) the outer kernel and initramfs")
    r = sub.add_parser("run", help="boot the outer VM and run a shell COMMAND inside")
    r.add_argument("command")
    r.add_argument("results", type=Path)
    r.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    if a.cmd == "build":
        t0 = time.monotonic()
        out = build(progress=True)
        print(f"nested-kvm outer VM: {out.dir} ({time.monotonic() - t0:.1f} s)")
        return 0
    try:
        rc = run(a.command, a.results.resolve(), timeout=a.timeout)
    except subprocess.TimeoutExpired:
        print(f"the outer VM did not finish within {a.timeout:g} s", file=sys.stderr)
        return 124
    status = inside_status(a.results)
    print(f"outer VM exited with {rc}; inside, the command exited with {status}; "
          f"see {a.results}")
    return status if status is not None else 1


if __name__ == "__main__":
    sys.exit(main())
