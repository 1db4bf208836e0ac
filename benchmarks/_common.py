"""Shared helpers for the benchmark scripts: raw QEMU baselines, timing and reporting.

The raw baselines build their QEMU command lines here, by hand, not with ember's engine,
so that ember's overhead is measured against plain QEMU booting the same kernel and image.
"""

from __future__ import annotations

import os
import re
import select
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ember.engine.accel import detect_accel, host_tsc_khz
from ember.engine.qemu.argv import TCG_CPU_MODEL, TCG_TB_SIZE_MIB

if TYPE_CHECKING:
    from ember.paths import Paths
    from ember.store import Store

QEMU = "qemu-system-x86_64"


def machine_args(memory_mib: int = 256) -> list[str]:
    accel = detect_accel()
    machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off"
    if accel.accel == "kvm":
        return ["-M", machine + ",pit=off,pic=off", "-accel", "kvm", "-cpu", "host",
                "-m", str(memory_mib), "-smp", "1"]
    return ["-M", machine, "-accel", f"tcg,tb-size={TCG_TB_SIZE_MIB}", "-cpu", TCG_CPU_MODEL,
            "-m", str(memory_mib), "-smp", "1"]


def base_cmdline(extra: str) -> str:
    tsc = host_tsc_khz(Path("/"))
    hint = f" tsc_early_khz={tsc} tsc=reliable" if tsc and detect_accel().accel == "tcg" else ""
    return f"console=ttyS0 reboot=t panic=-1 root=/dev/vda rootfstype=ext4 ro quiet{hint} {extra}"


def raw_argv(kernel: Path, image: Path, cmdline: str, *, agent_socket: Path | None = None,
             wait_for_agent: bool = False) -> list[str]:
    argv = [QEMU, *machine_args(), "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", str(kernel), "-append", base_cmdline(cmdline),
            "-serial", "stdio",
            "-drive", f"id=root,file={image},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-object", "rng-random,filename=/dev/urandom,id=rng0",
            "-device", "virtio-rng-device,rng=rng0"]
    if agent_socket is not None:
        wait = "on" if wait_for_agent else "off"
        argv += ["-device", "virtio-serial-device",
                 "-chardev", f"socket,id=agent,path={agent_socket},server=on,wait={wait}",
                 "-device", "virtserialport,chardev=agent,name=ember.agent"]
    return argv


def read_until(p: subprocess.Popen[bytes], pattern: bytes, timeout: float = 120) -> bytes:
    assert p.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    fd = p.stdout.fileno()
    while pattern not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{pattern!r} not seen; got {buf[-500:]!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"QEMU exited before {pattern!r}; got {buf[-500:]!r}")
            buf += chunk
    return buf


def raw_boot_to_line(kernel: Path, image: Path, cmdline: str, line: bytes) -> float:
    """Seconds from starting QEMU to ``line`` on the serial console (VM then killed)."""
    t0 = time.monotonic()
    p = subprocess.Popen(raw_argv(kernel, image, cmdline), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        read_until(p, line)
        return time.monotonic() - t0
    finally:
        p.kill()
        p.wait()


def raw_boot_to_shell(kernel: Path, image: Path) -> float:
    """Seconds from starting QEMU to a shell (the image's /bin/sh as init) answering."""
    t0 = time.monotonic()
    p = subprocess.Popen(raw_argv(kernel, image, "init=/bin/sh"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdin is not None
    try:
        p.stdin.write(b"echo RE''ADY\n")
        p.stdin.flush()
        read_until(p, b"READY")
        return time.monotonic() - t0
    finally:
        p.kill()
        p.wait()


class RawEcho:
    """A VM whose only program echoes the virtio-serial port back (``cat`` run by the shell
    as init): the floor for a round trip over ember's agent channel."""

    def __init__(self, kernel: Path, image: Path) -> None:
        self._dir = tempfile.mkdtemp(prefix="rawecho-")
        sock = Path(self._dir) / "a.sock"
        self.p = subprocess.Popen(raw_argv(kernel, image, "init=/bin/sh", agent_socket=sock),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL)
        assert self.p.stdin is not None
        self.p.stdin.write(b"echo BO''OTED\n")
        self.p.stdin.flush()
        read_until(self.p, b"BOOTED")
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(100):
            try:
                self.s.connect(str(sock))
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.2)
        self.p.stdin.write(b"p=$(ls /dev/vport*p1); exec cat <>$p >&0\n")
        self.p.stdin.flush()
        self.s.settimeout(30)
        for attempt in range(100):  # wait for cat to be reading
            self.s.sendall(b"x")
            try:
                self.s.settimeout(0.2)
                if self.s.recv(16):
                    break
            except TimeoutError:
                if attempt == 99:
                    raise RuntimeError("the raw echo guest never answered") from None
        self.s.settimeout(30)
        time.sleep(0.3)
        self.s.setblocking(False)
        try:
            while self.s.recv(4096):
                pass
        except BlockingIOError:
            pass
        self.s.setblocking(True)

    def ping(self, size: int = 16) -> float:
        msg = b"p" * size
        t0 = time.perf_counter()
        self.s.sendall(msg)
        got = 0
        while got < size:
            got += len(self.s.recv(65536))
        return time.perf_counter() - t0

    def close(self) -> None:
        self.s.close()
        self.p.kill()
        self.p.wait()


def pss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def guest_ram_pss_kib(pid: int, memory_mib: int) -> int:
    """PSS of the mapping that holds guest RAM (the anonymous mapping of its size)."""
    total = 0
    size_kib = memory_mib * 1024
    current_size = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            current_size = None
        elif line.startswith("Size:"):
            current_size = int(line.split()[1])
        elif line.startswith("Pss:") and current_size is not None and \
                size_kib <= current_size <= size_kib + 4096:
            total += int(line.split()[1])
    return total


async def agent_exec_true(socket_path: Path, *, timeout: float,
                          hostname: str | None = None) -> None:
    """Connect ember's agent client to a raw VM's agent socket and run ``true`` once."""
    from ember.runtime.agent_client import AgentClient
    from ember.sdk.process import AsyncProcess, exec_request

    client = await AgentClient.connect(str(socket_path), timeout=timeout, hostname=hostname)
    p = await AsyncProcess.start(client, exec_request("true", env={}, cwd=None, user=None,
                                                      stdin=False, timeout=30))
    await p.wait()
    await client.close()


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def fmt_ms(x: float) -> str:
    return f"{x * 1000:8.1f} ms"


def daemon_on_tcp(paths: Paths, store: Store, tenant: str = "bench") -> tuple[str, str]:
    """(Re)start the home's daemon with a TCP listener on a free loopback port; its URL and
    a new API key of ``tenant`` (stop it with ``control.stop(paths)``)."""
    from ember.daemon import control
    from ember.daemon.auth import new_key

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    control.stop(paths)
    control.start(paths, listen=url.removeprefix("http://"))
    _, key = new_key(store, tenant)
    return url, key


def home_with_default_template() -> tuple[Paths, Store]:
    """The home of ``EMBER_HOME`` with ember's default template (built if missing)."""
    from ember.errors import TemplateNotFoundError
    from ember.guest.image import build_image
    from ember.paths import Paths
    from ember.store import Store

    paths = Paths.from_env().ensure()
    store = Store(paths.db)
    try:
        store.get_template("debian-python")
    except TemplateNotFoundError:
        build_image(paths, store, "debian-python")
    return paths, store
