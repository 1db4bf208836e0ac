"""The links of one sandbox's network, made and removed with netlink (pyroute2) inside
the right namespace: a veth pair between the host's namespace and the sandbox's, and the
tap device QEMU's virtio-net uses, opened here (``/dev/net/tun`` is root's) and handed to
the jailed VMM as a file descriptor."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import TC_H_ROOT

from ember.net.addressing import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_MAC,
    GUEST_PREFIX,
    TAP,
    UPLINK,
    Link,
)
from ember.net.nsutil import NetnsError, write_sysctl

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
#: The handle of the tbf qdisc a rate limit installs at the root of a link (``1:``).
RATE_HANDLE = 0x10000


def _index(ip: IPRoute, name: str) -> int:
    found = ip.link_lookup(ifname=name)
    if not found:
        raise NetnsError(f"interface {name} is missing")
    return int(found[0])


def make_veth(link: Link, sandbox_ns: Path) -> None:
    """In the host's namespace (the calling thread's): the veth pair, its sandbox end moved
    into ``sandbox_ns``; the host end addressed and up; forwarding on."""
    with IPRoute() as ip:
        _veth_into(ip, link.host_if, f"embp{link.host_if[3:]}"[:15], sandbox_ns)
        host = _index(ip, link.host_if)
        ip.addr("add", index=host, address=link.host_ip, prefixlen=30)
        write_sysctl(f"net.ipv6.conf.{link.host_if}.disable_ipv6", "1")
        ip.link("set", index=host, state="up")
    write_sysctl("net.ipv4.ip_forward", "1")


def setup_sandbox_side(link: Link, *, guest_ns: Path | None = None) -> int | None:
    """In the sandbox's namespace (the calling thread's): the veth end renamed ``eth0``,
    addressed, default route to the host end; then the guest's gateway ``tap0``: for a
    microVM the tap device, whose open descriptor is returned (QEMU's); for a container
    (``guest_ns``, its own namespace) a veth whose other end goes there
    (:func:`setup_guest_side` configures it)."""
    peer = f"embp{link.host_if[3:]}"[:15]
    for scope in ("all", "default"):  # IPv4 only: no link-local IPv6 for a guest to poke
        write_sysctl(f"net.ipv6.conf.{scope}.disable_ipv6", "1")
    with IPRoute() as ip:
        ip.link("set", index=_index(ip, "lo"), state="up")
        up = _index(ip, peer)
        ip.link("set", index=up, ifname=UPLINK)
        ip.addr("add", index=up, address=link.sandbox_ip, prefixlen=30)
        ip.link("set", index=up, state="up")
        ip.route("add", dst="0.0.0.0/0", gateway=link.host_ip)
        fd = None
        if guest_ns is None:
            fd = open_tap(TAP)
        else:
            _veth_into(ip, TAP, GUEST_PEER, guest_ns)
        try:
            tap_index = _index(ip, TAP)
            # One MAC for every gateway: a restored guest's ARP cache stays right.
            ip.link("set", index=tap_index, address=GATEWAY_MAC)
            ip.addr("add", index=tap_index, address=GATEWAY_IP, prefixlen=GUEST_PREFIX)
            ip.link("set", index=tap_index, state="up")
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
    write_sysctl("net.ipv4.ip_forward", "1")  # the guest's packets pass through
    return fd


GUEST_PEER = "embguest0"


def _veth_into(ip: IPRoute, name: str, peer: str, ns: Path) -> None:
    """A veth pair: ``name`` here, ``peer`` moved into ``ns``."""
    try:
        ip.link("add", ifname=name, kind="veth", peer=peer)
    except NetlinkError as err:
        raise NetnsError(f"cannot add veth {name}: {err}") from None
    fd = os.open(ns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ip.link("set", index=_index(ip, peer), net_ns_fd=fd)
    finally:
        os.close(fd)


def setup_guest_side() -> None:
    """In a container's own namespace (the calling thread's): what a microVM guest's agent
    sets up in its kernel, ``eth0`` with the guest's address and the gateway as its route;
    IPv4 only."""
    for scope in ("all", "default"):
        write_sysctl(f"net.ipv6.conf.{scope}.disable_ipv6", "1")
    with IPRoute() as ip:
        ip.link("set", index=_index(ip, "lo"), state="up")
        eth = _index(ip, GUEST_PEER)
        ip.link("set", index=eth, ifname=UPLINK, address=GUEST_MAC)
        ip.addr("add", index=eth, address=GUEST_IP, prefixlen=GUEST_PREFIX)
        ip.link("set", index=eth, state="up")
        ip.route("add", dst="0.0.0.0/0", gateway=GATEWAY_IP)


def open_tap(name: str) -> int:
    """A new tap device ``name`` in this thread's namespace, alive while the descriptor is
    open (not persistent: it goes with its last holder, QEMU)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as err:
        os.close(fd)
        raise NetnsError(f"cannot create tap device {name}: {err.strerror}") from None
    return fd


def remove_host_link(link: Link) -> bool:
    """Delete the host end (its peer goes with it); False if it was gone."""
    with IPRoute() as ip:
        found = ip.link_lookup(ifname=link.host_if)
        if not found:
            return False
        try:
            ip.link("del", index=found[0])
        except NetlinkError as err:
            if err.code != 19:  # ENODEV: gone meanwhile
                raise NetnsError(f"cannot delete {link.host_if}: {err}") from None
        return True


def set_rate(ifname: str, mbit: float | None) -> None:
    """Limit what leaves ``ifname`` (in the calling thread's namespace) to ``mbit`` Mbit/s
    with a token bucket (tbf, ember's root qdisc ``1:``), or lift the limit (None)."""
    with IPRoute() as ip:
        index = _index(ip, ifname)
        if mbit is None:
            try:
                ip.tc("del", index=index, handle=RATE_HANDLE, parent=TC_H_ROOT)
            except NetlinkError as err:
                if err.code not in (2, 22):  # ENOENT, EINVAL: there was none
                    raise NetnsError(f"cannot lift the rate limit of {ifname}: {err}") from None
            return
        rate = int(mbit * 1_000_000 / 8)  # bytes per second
        burst = max(32 * 1024, rate // 100)  # 10 ms of it, at least a few full packets
        try:  # replace: made, or changed in place
            ip.tc("replace", "tbf", index=index, handle=RATE_HANDLE, rate=rate, burst=burst,
                  latency="50ms")
        except NetlinkError as err:
            raise NetnsError(f"cannot limit {ifname} to {mbit:g} Mbit/s: {err}") from None


def link_counters(prefix: str) -> dict[str, dict[str, int]]:
    """Byte and packet counters of the links named ``prefix...`` in the calling thread's
    namespace, by name: ``rx_*`` is what the link received, ``tx_*`` what it sent."""
    out: dict[str, dict[str, int]] = {}
    with IPRoute() as ip:
        for msg in ip.get_links():
            name = msg.get_attr("IFLA_IFNAME")
            stats = msg.get_attr("IFLA_STATS64")
            if isinstance(name, str) and name.startswith(prefix) and stats is not None:
                out[name] = {k: int(stats[k]) for k in ("rx_bytes", "tx_bytes", "rx_packets",
                                                        "tx_packets")}
    return out
