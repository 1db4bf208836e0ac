"""Where each piece of a sandbox's network lives: names and addresses, pure.

Every guest sees the same link (so that clones of a snapshot keep their guest address):
``GUEST_IP`` on ``eth0``, its gateway and resolver at ``GATEWAY_IP``. The sandbox's own
namespace NATs it onto a per-sandbox /30 link to the host namespace (``LINK_POOL``), whose
index is leased host-wide.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

GUEST_IP = "100.127.255.254"
GATEWAY_IP = "100.127.255.253"
GUEST_PREFIX = 30
#: The gateway's (tap device's) MAC, the same everywhere: a guest restored from a snapshot
#: keeps the gateway's entry in its ARP cache.
GATEWAY_MAC = "52:54:00:e0:00:01"
#: The guest's own MAC (a microVM's virtio-net, a container's veth end).
GUEST_MAC = "52:54:00:e0:00:02"
#: The per-sandbox host links: /30 each, inside CGNAT space (always denied as a
#: destination, so one sandbox never reaches another's link).
LINK_POOL = ipaddress.ip_network("100.100.0.0/16")
MAX_LINKS = LINK_POOL.num_addresses // 4
#: Names: the sandbox's namespace, and its links there and in the host's namespace.
NETNS_PREFIX = "ember-"
HOST_IF_PREFIX = "emb"
TAP = "tap0"
UPLINK = "eth0"
#: A microVM's TCP ports whose connections go through its proxy (:mod:`ember.net.proxy`)
#: when its policy names domains, and where that proxy listens in the sandbox's namespace
#: (on the gateway's address, reached only by redirected connections).
PROXIED_PORTS = (80, 443)
PROXY_PORT = 15080


@dataclass(frozen=True)
class Link:
    """The addresses of one sandbox's link to the host namespace."""

    index: int
    sandbox_id: str

    def __post_init__(self) -> None:
        if not 0 <= self.index < MAX_LINKS:
            raise ValueError(f"link index {self.index} is outside 0..{MAX_LINKS - 1}")

    @property
    def host_ip(self) -> str:
        return str(LINK_POOL.network_address + 4 * self.index + 1)

    @property
    def sandbox_ip(self) -> str:
        return str(LINK_POOL.network_address + 4 * self.index + 2)

    @property
    def netns(self) -> str:
        return netns_name(self.sandbox_id)

    @property
    def host_if(self) -> str:
        return host_ifname(self.sandbox_id)


def netns_name(sandbox_id: str) -> str:
    return f"{NETNS_PREFIX}{sandbox_id}"


def guest_netns_name(sandbox_id: str) -> str:
    """A container's own namespace, behind its sandbox's (where a microVM has its tap): the
    container sees what a microVM guest sees, ``eth0`` with the guest's address."""
    return f"{NETNS_PREFIX}{sandbox_id}{GUEST_NETNS_SUFFIX}"


GUEST_NETNS_SUFFIX = "-guest"


def host_ifname(sandbox_id: str) -> str:
    """``emb`` + the id's 12 hex digits: 15 characters, the kernel's limit."""
    return f"{HOST_IF_PREFIX}{sandbox_id.removeprefix('sb-')}"[:15]
