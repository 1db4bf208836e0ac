"""The traditional full VM baseline: QEMU ``q35`` with SeaBIOS, Debian's stock cloud kernel
(``linux-image-cloud-amd64``) and a small busybox initramfs that loads the kernel's virtio
modules, mounts the template copy-on-write (a qcow2 overlay) and hands over to ember's init,
so the same ember agent answers over virtio-serial-pci.

The kernel package is fetched once with ``apt-get download`` into ``$EMBER_CACHE/bench``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ember import proc
from ember.engine.qemu.argv import TCG_TB_SIZE_MIB
from ember.errors import EmberTimeoutError, HostError, MissingDependencyError
from ember.runtime.agent_client import AgentClient
from ember.sdk.process import AsyncProcess, exec_request

PACKAGE = "linux-image-cloud-amd64"
#: Load order (each after its dependencies); ``virtio_rng`` feeds the guest's entropy pool,
#: which Python needs at start.
MODULES: tuple[tuple[str, str], ...] = (
    ("virtio_ring", "drivers/virtio/virtio_ring.ko"),
    ("virtio", "drivers/virtio/virtio.ko"),
    ("virtio_pci_legacy_dev", "drivers/virtio/virtio_pci_legacy_dev.ko"),
    ("virtio_pci_modern_dev", "drivers/virtio/virtio_pci_modern_dev.ko"),
    ("virtio_pci", "drivers/virtio/virtio_pci.ko"),
    ("virtio_blk", "drivers/block/virtio_blk.ko"),
    ("virtio_console", "drivers/char/virtio_console.ko"),
    ("virtio_rng", "drivers/char/hw_random/virtio-rng.ko"),
)
INIT_SCRIPT = """#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev /newroot
$B mount -t proc proc /proc
$B mount -t devtmpfs devtmpfs /dev
for m in {modules}; do $B insmod /lib/modules/$m.ko; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 3000 ]; do $B usleep 10000; i=$((i+1)); done
$B mount -t ext4 -o rw /dev/vda /newroot || {{ echo "ember-initramfs: no /dev/vda"; $B reboot -f; }}
INIT=/sbin/init
for w in $($B cat /proc/cmdline); do case "$w" in init=*) INIT=${{w#init=}};; esac; done
$B umount /proc
$B umount /dev
exec $B switch_root /newroot "$INIT"
"""
BUSYBOX = Path("/bin/busybox")


def initramfs_script() -> str:
    return INIT_SCRIPT.format(modules=" ".join(name for name, _ in MODULES))


class TradKernel:
    """The cloud kernel and its initramfs, fetched and built once under ``cache``."""

    def __init__(self, cache: Path) -> None:
        self.dir = cache / "bench" / "traditional-vm"

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.gz"

    def ensure(self) -> str:
        """Fetch and extract the kernel, build the initramfs; the kernel version."""
        version_file = self.dir / "version"
        if self.vmlinuz.is_file() and self.initrd.is_file() and version_file.is_file():
            return version_file.read_text().strip()
        for tool in ("apt-get", "dpkg-deb", "cpio"):
            if shutil.which(tool) is None:
                raise MissingDependencyError(f"{tool} is needed to build the traditional VM")
        if not BUSYBOX.is_file():
            raise MissingDependencyError("/bin/busybox is missing (apt-get install busybox-static)")
        self.dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tradvm-", dir=self.dir) as tmp:
            work = Path(tmp)
            os.chmod(work, 0o755)  # apt's _apt user downloads into it
            meta = proc.run(["apt-cache", "depends", PACKAGE], what="find the cloud kernel")
            deps = [line.split(":", 1)[1].strip() for line in meta.stdout.splitlines()
                    if line.strip().startswith("Depends:") and "linux-image-" in line]
            if not deps:
                raise HostError(f"apt-cache does not know {PACKAGE} (run apt-get update)")
            proc.run(["apt-get", "download", deps[0]], what=f"download {deps[0]}", cwd=work,
                     timeout=600)
            debs = list(work.glob("linux-image-*.deb"))
            if not debs:
                raise HostError(f"apt-get download {deps[0]} left no .deb")
            root = work / "root"
            proc.run(["dpkg-deb", "-x", str(debs[0]), str(root)], what="extract the kernel")
            kernels = sorted((root / "boot").glob("vmlinuz-*"))
            if not kernels:
                raise HostError(f"{debs[0].name} holds no /boot/vmlinuz-*")
            version = kernels[0].name.removeprefix("vmlinuz-")
            mods = root / "lib" / "modules" / version / "kernel"
            self._build_initramfs(work / "initramfs", mods)
            shutil.copyfile(kernels[0], self.dir / "vmlinuz.tmp")
            os.replace(self.dir / "vmlinuz.tmp", self.vmlinuz)
            os.replace(work / "initrd.gz", self.initrd)
            version_file.write_text(version + "\n")
        return version

    def _build_initramfs(self, tree: Path, mods: Path) -> None:
        (tree / "bin").mkdir(parents=True)
        (tree / "lib" / "modules").mkdir(parents=True)
        shutil.copyfile(BUSYBOX, tree / "bin" / "busybox")
        os.chmod(tree / "bin" / "busybox", 0o755)
        for name, rel in MODULES:
            if not (mods / rel).is_file():
                raise HostError(f"the cloud kernel has no {rel}")
            shutil.copyfile(mods / rel, tree / "lib" / "modules" / f"{name}.ko")
        (tree / "init").write_text(initramfs_script())
        os.chmod(tree / "init", 0o755)
        names = "\n".join(str(p.relative_to(tree)) for p in sorted(tree.rglob("*"))) + "\n"
        res = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree,
                             input=names.encode(), capture_output=True, check=False)
        if res.returncode != 0:
            raise HostError(f"cpio failed: {proc.tail(res.stderr.decode(errors='replace'))}")
        with gzip.open(tree.parent / "initrd.gz", "wb", compresslevel=1) as f:
            f.write(res.stdout)


def build_argv(*, kernel: Path, initrd: Path, overlay: Path, workdir: Path, memory_mib: int,
               accel: str, name: str) -> list[str]:
    """A conventional full VM: q35 (PCI, ACPI, SeaBIOS firmware), virtio PCI devices."""
    accel_args = (["-accel", "kvm", "-cpu", "host"] if accel == "kvm"
                  else ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MIB}"])
    cmdline = (f"console=ttyS0 reboot=t panic=-1 quiet init=/.ember/init "
               f"ember.hostname={name} ember.id={name}")
    # fmt: off
    return [
        "qemu-system-x86_64", "-name", f"guest={name}", "-M", "q35", *accel_args,
        "-m", str(memory_mib), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-serial", f"file:{workdir / 'console.log'}",
        "-drive", f"id=root,file={overlay},format=qcow2,if=none,cache=unsafe",
        "-device", "virtio-blk-pci,drive=root",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={workdir / 'agent.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=ember.agent",
        "-object", "rng-random,filename=/dev/urandom,id=rng0",
        "-device", "virtio-rng-pci,rng=rng0",
        "-pidfile", str(workdir / "qemu.pid"), "-daemonize",
    ]
    # fmt: on


class TradVM:
    """One running traditional VM; :meth:`close` kills QEMU and removes its files."""

    def __init__(self, kernel: TradKernel, image: Path, runs_dir: Path, *, memory_mib: int,
                 accel: str, boot_timeout: float) -> None:
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="vm-", dir=runs_dir))
        self.pid: int | None = None
        # A valid hostname (the guest refuses one ending in '-', as a mkdtemp suffix can).
        self.name = "trad-" + secrets.token_hex(4)
        try:
            overlay = self.workdir / "disk.qcow2"
            proc.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image),
                      str(overlay)], what="create the traditional VM's disk overlay")
            argv = build_argv(kernel=kernel.vmlinuz, initrd=kernel.initrd, overlay=overlay,
                              workdir=self.workdir, memory_mib=memory_mib, accel=accel,
                              name=self.name)
            proc.run(argv, what="start the traditional VM", timeout=60)
            self.pid = int((self.workdir / "qemu.pid").read_text().strip())
            self._run(["true"], boot_timeout)
        except BaseException:
            self.close()
            raise

    def console_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "console.log").read_text(errors="replace")[-800:]
        return ""

    def _run(self, argv: list[str], connect_timeout: float) -> None:
        async def go() -> None:
            client = await AgentClient.connect(str(self.workdir / "agent.sock"),
                                               timeout=connect_timeout, hostname=self.name)
            try:
                p = await AsyncProcess.start(client, exec_request(
                    argv, env={}, cwd=None, user=None, stdin=False, timeout=60))
                res = await p.wait()
                if res.exit_code != 0:
                    raise HostError(f"{argv} exited {res.exit_code} in the traditional VM")
            finally:
                await client.close()

        try:
            asyncio.run(go())
        except EmberTimeoutError as err:
            raise EmberTimeoutError(f"traditional VM agent did not answer: {err}\n"
                                    f"--- console ---\n{self.console_tail()}") from err

    def run(self, argv: list[str]) -> None:
        self._run(argv, 30.0)

    def close(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            self.pid = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def unavailable_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


__all__ = ["TradKernel", "TradVM", "build_argv", "initramfs_script", "unavailable_reason"]
