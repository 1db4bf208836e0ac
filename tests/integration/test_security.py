"""Isolation seen from inside real guests: host files, other sandboxes, network, limits.

Two sandboxes, A and B, are booted once for the module (a TCG boot costs seconds). A is
given more vCPUs, memory and disk than B so that each guest can be told apart by what it
sees of its own machine. Every check that looks for something absent is paired with a
positive control that proves the same probe does find what is present (a marker written
inside the guest, A's own process, a connection the host makes to its own server).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember import Sandbox
from ember.paths import Paths
from ember.sdk.async_sandbox import manager

pytestmark = pytest.mark.integration

A_VCPUS = min(2, os.cpu_count() or 1)
A_MEMORY_MIB = 384
A_EXTRA_DISK_MIB = 64
B_VCPUS = 1
B_MEMORY_MIB = 256
SCAN_TIMEOUT_S = 600.0

# Guest-side scanner. The markers come on stdin, never on a command line or in a file, so
# the scan cannot find its own request. Regular files under / (not /proc, /sys) and the raw
# block device are read in chunks that overlap by the longest marker.
GUEST_SCAN = r"""
import json, os, stat, sys

markers = [m.encode() for m in sys.stdin.read().split()]
overlap = max(map(len, markers)) - 1
CHUNK = 4 << 20


def scan(f, found):
    tail = b""
    n = 0
    while True:
        block = f.read(CHUNK)
        if not block:
            return n
        n += len(block)
        buf = tail + block
        for m in markers:
            if m in buf:
                found.add(m)
        tail = buf[-overlap:]


files = {m.decode(): [] for m in markers}
n_files = n_bytes = 0
for root, dirs, names in os.walk("/"):
    if root == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys")]
    for name in names:
        path = os.path.join(root, name)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            found = set()
            with open(path, "rb") as f:
                n_bytes += scan(f, found)
        except OSError:
            continue
        n_files += 1
        for m in found:
            files[m.decode()].append(path)

device = sys.argv[1]
os.sync()
with open("/proc/sys/vm/drop_caches", "w") as f:  # read the device, not stale page cache
    f.write("3")
found = set()
with open(device, "rb", buffering=0) as f:
    device_bytes = scan(f, found)
print(json.dumps({"files": files, "device": sorted(m.decode() for m in found),
                  "n_files": n_files, "n_bytes": n_bytes, "device_bytes": device_bytes}))
"""

# Guest-side TCP connect attempts: JSON list of [host, port] on stdin, result per target.
GUEST_CONNECT = r"""
import errno, json, socket, sys

out = {}
for host, port in json.loads(sys.stdin.read()):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        s.settimeout(2)
        out[f"{host}:{port}"] = "connected:" + s.recv(16).decode(errors="replace")
    except OSError as e:
        out[f"{host}:{port}"] = errno.errorcode.get(e.errno or 0, str(e))
    finally:
        s.close()
print(json.dumps(out))
"""

# Guest-side listener (run in B): logs every accepted peer to a file and answers "B".
GUEST_LISTENER = r"""
import socket, sys

port = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(16)
while True:
    c, peer = s.accept()
    with open("/tmp/accepted.log", "a") as f:
        f.write(f"{peer[0]}:{peer[1]}\n")
    c.sendall(b"B")
    c.close()
"""

# Guest-side network inventory: interfaces (backed by a device? up?) and routes.
GUEST_NET = r"""
import json, os

ifaces = {}
for name in sorted(os.listdir("/sys/class/net")):
    d = f"/sys/class/net/{name}"
    with open(f"{d}/flags") as f:
        flags = int(f.read(), 16)
    ifaces[name] = {"device": os.path.exists(f"{d}/device"), "up": bool(flags & 1)}
with open("/proc/net/route") as f:
    routes4 = f.read().splitlines()[1:]
with open("/proc/net/ipv6_route") as f:
    routes6 = [line.split()[-1] for line in f.read().splitlines()]
print(json.dumps({"ifaces": ifaces, "routes4": routes4, "routes6_devs": routes6}))
"""

# Brings the guest's loopback up (ember's init leaves it down): as root, hostile code can,
# and then 127.0.0.1 inside the guest is the guest's own and nothing else.
GUEST_LO_UP = r"""
import fcntl, socket, struct

SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
flags = struct.unpack("16sH22x", ifr)[1]
fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
"""

# Interfaces the guest kernel creates by itself for built-in tunnel drivers ("fallback
# devices", e.g. sit0 with CONFIG_IPV6_SIT=y). They have no device behind them and can only
# encapsulate over another interface; none is up.
KERNEL_FALLBACK_TUNNELS = {"sit0", "tunl0", "ip6tnl0", "gre0", "gretap0", "erspan0",
                           "ip_vti0", "ip6_vti0", "ip6gre0"}


def marker(kind: str) -> str:
    return f"EMBER-{kind}-{secrets.token_hex(16)}"


def guest_scan(sb: Sandbox, markers: list[str]) -> dict[str, Any]:
    r = sb.exec(["python3", "-c", GUEST_SCAN, "/dev/vda"], stdin=" ".join(markers),
                timeout=SCAN_TIMEOUT_S)
    assert r.exit_code == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    # the scan really covered a filesystem and a whole disk
    assert result["n_files"] > 1000 and result["n_bytes"] > 50_000_000, result
    assert result["device_bytes"] == sb.info().disk_mib << 20, result
    return result


def guest_connect(sb: Sandbox, targets: list[tuple[str, int]]) -> dict[str, str]:
    r = sb.exec(["python3", "-c", GUEST_CONNECT], stdin=json.dumps(targets), timeout=120)
    assert r.exit_code == 0, r.stderr
    out: dict[str, str] = json.loads(r.stdout)
    return out


def guest_lo_up(sb: Sandbox) -> None:
    sb.exec(["python3", "-c", GUEST_LO_UP]).check()
    assert json.loads(sb.exec(["python3", "-c", GUEST_NET]).stdout)["ifaces"]["lo"]["up"]


def _argv(pid: int | str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_qemu_of(argv: list[str], sb: Sandbox) -> bool:
    return bool(argv) and os.path.basename(argv[0]).startswith("qemu-system") and \
        f"guest={sb.id}" in argv


def qemu_pid(paths: Paths, sb: Sandbox) -> int:
    """The host pid of ``sb``'s QEMU: the registry's, or (should the registry ever record a
    wrapper such as a jailer) the one QEMU process named after the sandbox."""
    pid = manager(paths).store.get_sandbox(sb.id).pid
    if pid is not None and _is_qemu_of(_argv(pid), sb):
        return pid
    found = [int(d.name) for d in Path("/proc").iterdir()
             if d.name.isdigit() and _is_qemu_of(_argv(d.name), sb)]
    assert len(found) == 1, (sb.id, pid, found)
    return found[0]


def qemu_argv(paths: Paths, sb: Sandbox) -> list[str]:
    return _argv(qemu_pid(paths, sb))


def open_inodes(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of every file the process has open, wherever its jail put it."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            st = fd.stat()
            out.add((st.st_dev, st.st_ino))
    return out


def host_ip() -> str | None:
    """The host's own non-loopback IPv4 address (no packet is sent), if it has one."""
    for probe in ("192.0.2.1", "10.255.255.255", "8.8.8.8"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect((probe, 9))
            ip: str = s.getsockname()[0]
        except OSError:
            continue
        finally:
            s.close()
        if not ip.startswith("127.") and ip != "0.0.0.0":
            return ip
    with contextlib.suppress(OSError):
        ip = socket.gethostbyname(socket.gethostname())
        if not ip.startswith("127."):
            return ip
    return None


class HostServer:
    """A TCP server on all of the host's addresses that records every accepted peer."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.peers: list[tuple[str, int]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer)
            with contextlib.suppress(OSError):
                conn.sendall(b"HOST")
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def pair(ember_paths: Paths, debian_template) -> Iterator[tuple[Sandbox, Sandbox]]:  # type: ignore[no-untyped-def]
    base_mib = -(-debian_template.size_bytes // (1 << 20))
    a = Sandbox.create("debian-python", vcpus=A_VCPUS, memory_mib=A_MEMORY_MIB,
                       disk_mib=base_mib + A_EXTRA_DISK_MIB, timeout=1800, paths=ember_paths)
    try:
        b = Sandbox.create("debian-python", vcpus=B_VCPUS, memory_mib=B_MEMORY_MIB,
                           timeout=1800, paths=ember_paths)
    except BaseException:
        a.kill()
        raise
    try:
        yield a, b
    finally:
        a.kill()
        b.kill()


def test_guest_cannot_read_host_files(pair: tuple[Sandbox, Sandbox], ember_paths: Paths,
                                      tmp_path: Path) -> None:
    a, b = pair
    secret = marker("HOSTSECRET")
    control = marker("CONTROL")
    a_dir = Path(manager(ember_paths).store.get_sandbox(a.id).dir)
    host_files = [tmp_path / "host-secret.txt",
                  Path("/tmp") / f"ember-host-secret-{secrets.token_hex(4)}.txt",
                  a_dir / "host-secret.txt"]  # next to A's own disk, on the host
    try:
        for f in host_files:
            f.write_text(secret + "\n")
            assert f.read_text().strip() == secret  # the host itself can read it
        for sb in (a, b):
            for f in host_files:
                r = sb.exec(["cat", str(f)])
                assert r.exit_code != 0 and secret not in r.stdout, (sb.id, str(f), r)
                assert not sb.files.exists(str(f)), (sb.id, str(f))
        # positive control: a marker on A's own disk is found by the same scan
        a.files.write("/root/control.txt", control + "\n")
        found = guest_scan(a, [secret, control])
    finally:
        for f in host_files:
            f.unlink(missing_ok=True)
    assert found["files"][control] == ["/root/control.txt"], found
    assert control in found["device"], found
    assert found["files"][secret] == [], found
    assert secret not in found["device"], found


def test_sandboxes_do_not_see_each_others_processes(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    ps_args = ["ps", "-eo", "args="]
    proc_cmdlines = ("import json, os\nout = []\nfor p in os.listdir('/proc'):\n"
                     "    if p.isdigit():\n        try:\n"
                     "            out.append(open(f'/proc/{p}/cmdline', 'rb').read()"
                     ".decode(errors='replace').split('\\0')[:-1])\n"
                     "        except OSError:\n            pass\nprint(json.dumps(out))\n")
    sleeper = a.spawn(["sleep", "987654"], timeout=None)
    try:
        # positive control: A's own views show it
        assert "sleep 987654" in [ln.strip() for ln in a.exec(ps_args).stdout.splitlines()]
        assert ["sleep", "987654"] in json.loads(a.exec(["python3", "-c", proc_cmdlines]).stdout)
        assert any(p.pid == sleeper.pid and p.argv == ("sleep", "987654") and p.running
                   for p in a.processes())
        # B's views do not
        b_ps = b.exec(ps_args).stdout.splitlines()
        assert len(b_ps) > 5 and not [ln for ln in b_ps if "987654" in ln], b_ps
        b_cmdlines = json.loads(b.exec(["python3", "-c", proc_cmdlines]).stdout)
        assert b_cmdlines and not [c for c in b_cmdlines if "987654" in " ".join(c)], b_cmdlines
        assert not [p for p in b.processes() if "987654" in p.argv]
        # nor any of the host's: no QEMU, no pytest, and its own init is PID 1
        assert not [ln for ln in b_ps if "qemu-system" in ln or "pytest" in ln], b_ps
        assert b.exec(["cat", "/proc/1/cmdline"]).stdout.startswith("/.ember/runtime/")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sandboxes_do_not_see_each_others_files(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    secret = marker("ASECRET")
    control = marker("BCONTROL")
    a.files.write("/root/a-secret.txt", secret + "\n")
    a.files.write("/tmp/a-secret.txt", secret + "\n")
    a.exec("sync").check()
    assert a.files.read_text("/root/a-secret.txt").strip() == secret
    for path in ("/root/a-secret.txt", "/tmp/a-secret.txt"):
        assert not b.files.exists(path)
        assert b.exec(["cat", path]).exit_code != 0
    b.files.write("/root/b-control.txt", control + "\n")  # positive control, B's own disk
    found = guest_scan(b, [secret, control])
    assert found["files"][control] == ["/root/b-control.txt"], found
    assert control in found["device"], found
    assert found["files"][secret] == [], found
    assert secret not in found["device"], found


def test_sandboxes_see_only_their_own_disk(pair: tuple[Sandbox, Sandbox],
                                           ember_paths: Paths) -> None:
    a, b = pair
    sizes = {}
    for sb in (a, b):
        blocks = sb.exec(["ls", "-1", "/sys/block"]).stdout.split()
        assert blocks == ["vda"], (sb.id, blocks)
        partitions = [ln.split()[-1] for ln in
                      sb.exec(["cat", "/proc/partitions"]).stdout.splitlines()[2:] if ln.strip()]
        assert partitions == ["vda"], (sb.id, partitions)
        sizes[sb.id] = int(sb.exec(["cat", "/sys/block/vda/size"]).stdout) * 512
        # its disk is the size it was given, so it is its own disk
        assert sizes[sb.id] == sb.info().disk_mib << 20, (sb.id, sizes[sb.id])
    assert sizes[a.id] == sizes[b.id] + (A_EXTRA_DISK_MIB << 20)
    # on the host, each QEMU is given one disk, its own sandbox's overlay, and has the
    # other sandbox's overlay nowhere among its open files
    overlays = {sb.id: Path(manager(ember_paths).store.get_sandbox(sb.id).dir) / "overlay.qcow2"
                for sb in (a, b)}
    inode = {k: (v.stat().st_dev, v.stat().st_ino) for k, v in overlays.items()}
    for sb, other in ((a, b), (b, a)):
        drives = [arg for arg in qemu_argv(ember_paths, sb) if "file=" in arg]
        assert len(drives) == 1 and f"file={overlays[sb.id]}," in drives[0], drives
        opened = open_inodes(qemu_pid(ember_paths, sb))
        assert inode[sb.id] in opened and inode[other.id] not in opened, (sb.id, opened)


def test_no_network(pair: tuple[Sandbox, Sandbox], ember_paths: Paths) -> None:
    a, b = pair
    for sb in (a, b):
        argv = qemu_argv(ember_paths, sb)
        assert not [x for x in argv if x in ("-netdev", "-nic", "-net")], argv
        assert not [x for x in argv if "virtio-net" in x or x.startswith("user,")], argv
        net = json.loads(sb.exec(["python3", "-c", GUEST_NET]).stdout)
        ifaces = net["ifaces"]
        assert "lo" in ifaces, ifaces
        others = {k: v for k, v in ifaces.items() if k != "lo"}
        # no NIC at all: anything besides lo is a kernel-made tunnel stub, down, no device
        assert set(others) <= KERNEL_FALLBACK_TUNNELS, ifaces
        assert not [k for k, v in ifaces.items() if v["device"] or (k != "lo" and v["up"])]
        assert net["routes4"] == [], net
        assert set(net["routes6_devs"]) <= {"lo"}, net
        guest_lo_up(sb)  # the guest does what it can: 127.0.0.1 is now its own loopback

    server = HostServer()
    try:
        targets = [("127.0.0.1", server.port)]
        ip = host_ip()
        if ip is not None:
            targets.append((ip, server.port))
        # positive control: the server answers on those addresses from the host
        for host, port in targets:
            with socket.create_connection((host, port), timeout=5) as s:
                assert s.recv(16) == b"HOST"
        deadline = time.monotonic() + 5
        while len(server.peers) < len(targets) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(server.peers) == len(targets)
        seen_by_control = list(server.peers)
        for sb in (a, b):
            out = guest_connect(sb, targets)
            assert len(out) == len(targets)
            assert not [v for v in out.values() if v.startswith("connected")], (sb.id, out)
        time.sleep(1)
        assert server.peers == seen_by_control  # nothing from any guest reached the host
    finally:
        server.close()


def test_sandbox_cannot_reach_another_sandbox(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    port = 47011
    for sb in (a, b):
        guest_lo_up(sb)
    listener = b.spawn(["python3", "-c", GUEST_LISTENER, str(port)], timeout=None)
    try:
        # positive control: B reaches its own listener
        deadline = time.monotonic() + 60
        while True:
            own = guest_connect(b, [("127.0.0.1", port)])
            if own[f"127.0.0.1:{port}"] == "connected:B":
                break
            assert time.monotonic() < deadline, own
            time.sleep(0.5)
        accepted_before = b.files.read_text("/tmp/accepted.log").splitlines()
        assert accepted_before
        # from A, every address B could conceivably have: none connects
        ip = host_ip()
        candidates = ["127.0.0.1", "10.0.2.15", "10.0.2.2", "192.168.122.1", "172.17.0.1"]
        if ip is not None:
            candidates.append(ip)
        out = guest_connect(a, [(h, port) for h in candidates])
        assert not [v for v in out.values() if v.startswith("connected")], out
        time.sleep(1)
        assert b.files.read_text("/tmp/accepted.log").splitlines() == accepted_before
    finally:
        listener.kill()
        listener.wait()


def test_guest_sees_its_own_vcpus_and_memory(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    mem_kib = {}
    for sb, vcpus, memory_mib in ((a, A_VCPUS, A_MEMORY_MIB), (b, B_VCPUS, B_MEMORY_MIB)):
        info = sb.info()
        assert (info.vcpus, info.memory_mib) == (vcpus, memory_mib)
        assert int(sb.exec(["nproc"]).stdout) == vcpus
        assert int(sb.exec(["grep", "-c", "^processor", "/proc/cpuinfo"]).stdout) == vcpus
        meminfo = sb.exec(["cat", "/proc/meminfo"]).stdout
        mem_kib[sb.id] = int(next(ln for ln in meminfo.splitlines()
                                  if ln.startswith("MemTotal:")).split()[1])
        # MemTotal is what was asked minus what the kernel keeps for itself (a few %)
        assert 0.85 * memory_mib * 1024 <= mem_kib[sb.id] <= memory_mib * 1024, \
            (sb.id, mem_kib[sb.id], memory_mib)
    assert mem_kib[a.id] > mem_kib[b.id]
