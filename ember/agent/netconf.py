"""The guest's network, configured by init with ioctls (the guest kernel has no IP_PNP,
and a template need not ship iproute2) when the host gave the guest a NIC: loopback up,
``eth0`` at the address every networked guest has (each sits alone on its own link,
see ember/net/addressing.py), its default route, and the resolver in /etc/resolv.conf.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

GUEST_IP = "100.127.255.254"
GATEWAY_IP = "100.127.255.253"
NETMASK = "255.255.255.252"
NIC = "eth0"

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2


def _sockaddr(address: str) -> bytes:
    return struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(address))


def _ifreq(name: str, payload: bytes) -> bytes:
    return struct.pack("16s24s", name.encode(), payload)


def _up(sock: socket.socket, name: str) -> None:
    flags = struct.unpack_from("H", fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq(name, b"")), 16)[0]
    fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))


def _default_route(sock: socket.socket, gateway: str) -> None:
    # struct rtentry (x86-64): pad, dst, gateway, genmask, flags, ..., dev, mtu, window, irtt
    entry = struct.pack("@L16s16s16sHhLPhPLLH", 0, _sockaddr("0.0.0.0"), _sockaddr(gateway),
                        _sockaddr("0.0.0.0"), RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0,
                        0, 0, 0)
    fcntl.ioctl(sock, SIOCADDRT, entry.ljust(120, b"\0"))


def has_nic(name: str = NIC) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def configure(resolv_conf: str = "/etc/resolv.conf") -> str | None:
    """Bring the links up; None when done, else what failed (init logs it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            _up(sock, "lo")
        except OSError as err:
            return f"cannot bring up lo: {err}"
        if not has_nic():
            return None
        try:
            fcntl.ioctl(sock, SIOCSIFADDR, _ifreq(NIC, _sockaddr(GUEST_IP)))
            fcntl.ioctl(sock, SIOCSIFNETMASK, _ifreq(NIC, _sockaddr(NETMASK)))
            _up(sock, NIC)
            _default_route(sock, GATEWAY_IP)
        except OSError as err:
            return f"cannot configure {NIC}: {err}"
    try:
        if os.path.islink(resolv_conf):  # a symlink into a resolver's state: replaced
            os.unlink(resolv_conf)
        with open(resolv_conf, "w", encoding="ascii") as f:
            f.write(f"nameserver {GATEWAY_IP}\noptions timeout:2 attempts:2\n")
    except OSError as err:
        return f"cannot write {resolv_conf}: {err}"
    return None

