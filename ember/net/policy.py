"""The egress policy of a networked sandbox: a frozen spec validated where it enters, and
the I/O-free decision it stands for (the nftables rules in :mod:`ember.net.ruleset` are
compiled from the same order).

Order of evaluation, first match wins:

1. ``deny`` CIDRs: dropped (deny always wins over allow);
2. ``allow`` CIDRs: accepted;
3. :data:`ALWAYS_DENIED` (the host, other sandboxes, private, link-local, metadata, CGNAT,
   multicast ranges): dropped, unless step 2 allowed them explicitly;
4. ``internet``: accepted when on, dropped when off.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ember.errors import BadRequestError

#: The most CIDRs one policy may hold (allow and deny together).
MAX_RULES = 1000

#: Destinations no sandbox reaches unless a policy allows them by CIDR: this host and
#: its loopback services, other sandboxes (their links are in CGNAT space), private
#: networks, link-local and cloud metadata, multicast and reserved space.
ALWAYS_DENIED: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # CGNAT: ember's own sandbox links live here
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, 169.254.169.254 metadata
    "192.0.0.0/24", "198.18.0.0/15",  # IETF protocol assignments, benchmarking
    "224.0.0.0/4", "240.0.0.0/4",  # multicast, reserved, broadcast
)


@dataclass(frozen=True)
class NetworkPolicy:
    """What a networked sandbox may reach. ``NetworkPolicy()`` is internet access with
    the always-denied ranges kept out; ``NetworkPolicy(internet=False, allow=[...])``
    reaches only what is listed."""

    internet: bool = True
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.internet, bool):
            raise BadRequestError(f"network internet must be true or false, "
                                  f"not {self.internet!r}")
        object.__setattr__(self, "allow", _cidrs("allow", self.allow))
        object.__setattr__(self, "deny", _cidrs("deny", self.deny))
        if len(self.allow) + len(self.deny) > MAX_RULES:
            raise BadRequestError(f"a network policy holds at most {MAX_RULES} CIDRs, "
                                  f"this one has {len(self.allow) + len(self.deny)}")

    @classmethod
    def from_json(cls, doc: object) -> NetworkPolicy:
        """A policy from its JSON form (``{"internet": bool, "allow": [...], "deny": [...]}``);
        unknown keys are refused by name."""
        if isinstance(doc, NetworkPolicy):
            return doc
        if not isinstance(doc, Mapping):
            raise BadRequestError(f"a network policy is an object, not {type(doc).__name__}")
        unknown = sorted(set(doc) - {"internet", "allow", "deny"})
        if unknown:
            raise BadRequestError(f"unknown network policy field(s): {', '.join(unknown)}")
        return cls(internet=doc.get("internet", True), allow=_seq("allow", doc.get("allow", ())),
                   deny=_seq("deny", doc.get("deny", ())))

    def to_json(self) -> dict[str, Any]:
        return {"internet": self.internet, "allow": list(self.allow), "deny": list(self.deny)}

    def decide(self, address: str) -> bool:
        """Whether a packet to ``address`` (IPv4) leaves the sandbox. IPv6 never does: the
        guest gets no IPv6 address or route."""
        ip = ipaddress.ip_address(address)
        if ip.version != 4:
            return False
        if any(ip in ipaddress.ip_network(c) for c in self.deny):
            return False
        if any(ip in ipaddress.ip_network(c) for c in self.allow):
            return True
        if any(ip in ipaddress.ip_network(c) for c in ALWAYS_DENIED):
            return False
        return self.internet


def _seq(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise BadRequestError(f"network {name} must be a list of CIDRs, not {value!r}")
    return tuple(value)


def _cidrs(name: str, values: object) -> tuple[str, ...]:
    """Each entry as a normalized IPv4 CIDR (a bare address is a /32), in order, once."""
    out: list[str] = []
    for value in _seq(name, values):
        if not isinstance(value, str) or len(value) > 64:
            raise BadRequestError(f"invalid CIDR in network {name}: {value!r}")
        try:
            net = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError as err:
            raise BadRequestError(f"invalid CIDR in network {name}: {value!r} ({err})") from None
        if net.version != 4:
            raise BadRequestError(f"network {name}: {value!r} is IPv6; sandboxes get IPv4 "
                                  "only, and all IPv6 is dropped")
        text = str(net)
        if text not in out:
            out.append(text)
    return tuple(out)
