"""A fake host and a fake internet, each a network namespace this test process creates,
so that network tests never send a packet off this machine.

``host`` plays the host's part for ember (``EMBER_NET_HOST_NS``): its only uplink is a
veth to ``inet``, which holds the "internet" (198.51.100.0/24, TEST-NET-2) and a
"private" service (10.77.0.10). Its web servers are threads whose sockets were opened
inside ``inet`` (no name lookups); its DNS server is a dnsmasq there, answering only the
names in :data:`NAMES`, and ``/etc/netns/<host>/resolv.conf`` points the host at it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from ember.net.manager import LEASES_ROOT
from ember.net.nsutil import in_netns, netns_path, remove_netns

INET_IP = "198.51.100.10"
HOST_UPLINK_IP = "198.51.100.1"
PRIVATE_IP = "10.77.0.10"
HTTP_PORT = 8080
BULK_PORT = 8081  # send a decimal byte count and a newline: that many bytes come back
HOLD_PORT = 8082  # connections stay open until the client closes them
UDP_PORT = 9999
#: Web servers on every fake internet address: whatever a client sends first (an HTTP
#: request, a TLS ClientHello), the answer names the address it reached.
WEB_PORTS = (80, 443)
#: The fake internet's names and addresses (each address is served by the web server).
NAMES = {
    "allowed.test": INET_IP,
    "sub.test": "198.51.100.13",
    "a.sub.test": "198.51.100.12",
    "other.test": "198.51.100.11",
    "rebind.test": PRIVATE_IP,
}


@dataclass
class World:
    host: str
    inet: str
    udp_seen: list[tuple[str, bytes]] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def host_listen(self, port: int) -> socket.socket:
        """A TCP listener in the fake host's namespace, on all its addresses."""
        s = in_netns(netns_path(self.host), lambda: socket.create_server(("0.0.0.0", port)))
        self.sockets.append(s)
        threading.Thread(target=_serve, args=(s, b"host"), daemon=True).start()
        return s


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _serve(listener: socket.socket, who: bytes) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from "
                             + who + b"\n")
            except OSError:
                pass


def _where(listener: socket.socket) -> None:
    def one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            with suppress(OSError):
                conn.recv(16384)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"
                             b"hello from " + conn.getsockname()[0].encode() + b"\n")

    accept_each(listener, one)


def _bulk(listener: socket.socket) -> None:
    def one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            try:
                n = int(conn.recv(64).split(b"\n")[0] or b"0")
                chunk = b"z" * 65536
                while n > 0:
                    conn.sendall(chunk[:n])
                    n -= len(chunk)
            except (OSError, ValueError):
                pass

    accept_each(listener, one)


def _hold(listener: socket.socket) -> None:
    def one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(120)
            with suppress(OSError):
                while conn.recv(4096):
                    pass

    accept_each(listener, one)


def accept_each(listener: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """Each connection to ``listener`` handled in a thread of its own, until it is closed."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _udp(sock: socket.socket, seen: list[tuple[str, bytes]]) -> None:
    while True:
        try:
            data, addr = sock.recvfrom(2048)
        except OSError:
            return
        if addr is None:  # shut down
            return
        seen.append((addr[0], data))


@contextmanager
def fake_world() -> Iterator[World]:
    tag = f"{os.getpid() % 100000}"
    world = World(host=f"etest-host-{tag}", inet=f"etest-inet-{tag}")
    for ns in (world.host, world.inet):
        remove_netns(netns_path(ns))
        in_netns(netns_path(ns), lambda: None, create=True)
    try:
        _ip("link", "add", "up0", "netns", world.host, "type", "veth", "peer", "name", "wan0",
            "netns", world.inet)
        _ip("-n", world.host, "addr", "add", f"{HOST_UPLINK_IP}/24", "dev", "up0")
        _ip("-n", world.inet, "addr", "add", f"{INET_IP}/24", "dev", "wan0")
        for address in {*NAMES.values()} - {INET_IP}:
            _ip("-n", world.inet, "addr", "add", f"{address}/32", "dev", "lo")
        for ns, dev in ((world.host, "up0"), (world.inet, "wan0")):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", world.host, "route", "add", "default", "via", INET_IP)
        inet = netns_path(world.inet)
        http = in_netns(inet, lambda: socket.create_server(("0.0.0.0", HTTP_PORT)))
        udp = in_netns(inet, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        udp.bind(("0.0.0.0", UDP_PORT))
        world.sockets += [http, udp]
        threading.Thread(target=_serve, args=(http, b"the fake internet"), daemon=True).start()
        threading.Thread(target=_udp, args=(udp, world.udp_seen), daemon=True).start()
        bulk = in_netns(inet, lambda: socket.create_server(("0.0.0.0", BULK_PORT)))
        hold = in_netns(inet, lambda: socket.create_server(("0.0.0.0", HOLD_PORT),
                                                           backlog=64))
        world.sockets += [bulk, hold]
        threading.Thread(target=_bulk, args=(bulk,), daemon=True).start()
        threading.Thread(target=_hold, args=(hold,), daemon=True).start()
        for port in WEB_PORTS:
            web = in_netns(inet, lambda port=port: socket.create_server(("0.0.0.0", port)))
            world.sockets.append(web)
            threading.Thread(target=_where, args=(web,), daemon=True).start()
        etc = Path("/etc/netns") / world.host
        etc.mkdir(parents=True, exist_ok=True)
        dns = in_netns(inet, lambda: subprocess.Popen(
            ["dnsmasq", "--conf-file=/dev/null", "--keep-in-foreground", "--no-resolv",
             f"--pid-file={etc / 'dnsmasq.pid'}",  # not /var/run's (a minimal root lacks it)
             "--no-hosts", "--bind-interfaces", f"--listen-address={INET_IP}",
             "--log-facility=/dev/null", "--user=nobody", "--group=nogroup",
             *(f"--address=/{n}/{a}" for n, a in NAMES.items())]))
        world.processes.append(dns)
        with suppress(subprocess.TimeoutExpired):
            dns.wait(timeout=0.5)
            raise RuntimeError(f"the fake internet's dnsmasq exited at once ({dns.returncode})")
        (etc / "resolv.conf").write_text(f"nameserver {INET_IP}\n")
        yield world
    finally:
        for child in world.processes:
            child.terminate()
            child.wait(timeout=10)
        shutil.rmtree(Path("/etc/netns") / world.host, ignore_errors=True)
        for s in world.sockets:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for ns in (world.host, world.inet):
            remove_netns(netns_path(ns))
        shutil.rmtree(LEASES_ROOT / world.host, ignore_errors=True)  # its empty lease table
