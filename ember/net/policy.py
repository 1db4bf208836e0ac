"""The egress policy of a networked sandbox: a frozen spec validated where it enters, and
the I/O-free decisions it stands for (the nftables rules in :mod:`ember.net.ruleset` and
the resolver's configuration in :mod:`ember.net.resolver` are compiled from the same
order).

``allow`` and ``deny`` hold IPv4 CIDRs (a bare address is a /32) and domain names, exact
(``example.com``) or wildcard (``*.example.com``: its subdomains, not itself). For an
address, first match wins:

1. ``deny`` CIDRs: refused (deny always wins over allow);
2. ``allow`` CIDRs: accepted;
3. :data:`ALWAYS_DENIED` (the host, other sandboxes, private, link-local, metadata, CGNAT,
   multicast ranges): refused, unless step 2 allowed them explicitly;
4. addresses the sandbox's resolver returned for an allowed domain: accepted;
5. ``internet``: accepted when on, refused when off.

For a name the resolver is asked: a denied domain (or a subdomain of one) does not exist;
an allowed one is resolved; anything else is resolved only when ``internet`` is on.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ember.errors import BadRequestError

#: The most entries one policy may hold (allow and deny together).
MAX_RULES = 1000
MIN_RATE_MBIT = 0.1
MAX_RATE_MBIT = 100_000.0
MAX_CONNECTIONS = 1_000_000
_LIMITS = ("rate_out_mbit", "rate_in_mbit", "max_connections")

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

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True)
class NetworkPolicy:
    """What a networked sandbox may reach. ``NetworkPolicy()`` is internet access with
    the always-denied ranges kept out; ``NetworkPolicy(internet=False, allow=[...])``
    reaches only what is listed (CIDRs, and domains through the sandbox's resolver)."""

    internet: bool = True
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    #: Bandwidth limits in Mbit/s, from the guest (``out``) and to it (``in``); None: none.
    rate_out_mbit: float | None = None
    rate_in_mbit: float | None = None
    #: Connections the guest may have open at once (TCP and UDP flows it started; new ones
    #: beyond it are refused); None: no limit.
    max_connections: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.internet, bool):
            raise BadRequestError(f"network internet must be true or false, "
                                  f"not {self.internet!r}")
        for name in ("rate_out_mbit", "rate_in_mbit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, int | float) or not MIN_RATE_MBIT <= value <= MAX_RATE_MBIT):
                raise BadRequestError(f"network {name} must be {MIN_RATE_MBIT:g}.."
                                      f"{MAX_RATE_MBIT:g} (Mbit/s) or null, not {value!r}")
        mc = self.max_connections
        if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int)
                               or not 1 <= mc <= MAX_CONNECTIONS):
            raise BadRequestError(f"network max_connections must be 1..{MAX_CONNECTIONS} or "
                                  f"null, not {mc!r}")
        object.__setattr__(self, "allow", _entries("allow", self.allow))
        object.__setattr__(self, "deny", _entries("deny", self.deny))
        if len(self.allow) + len(self.deny) > MAX_RULES:
            raise BadRequestError(f"a network policy holds at most {MAX_RULES} entries, "
                                  f"this one has {len(self.allow) + len(self.deny)}")

    @classmethod
    def from_json(cls, doc: object) -> NetworkPolicy:
        """A policy from its JSON form (``{"internet": bool, "allow": [...], "deny": [...]}``);
        unknown keys are refused by name."""
        if isinstance(doc, NetworkPolicy):
            return doc
        if not isinstance(doc, Mapping):
            raise BadRequestError(f"a network policy is an object, not {type(doc).__name__}")
        unknown = sorted(set(doc) - {"internet", "allow", "deny", *_LIMITS})
        if unknown:
            raise BadRequestError(f"unknown network policy field(s): {', '.join(unknown)}")
        return cls(internet=doc.get("internet", True), allow=_seq("allow", doc.get("allow", ())),
                   deny=_seq("deny", doc.get("deny", ())),
                   **{k: doc[k] for k in _LIMITS if doc.get(k) is not None})

    def to_json(self) -> dict[str, Any]:
        return {"internet": self.internet, "allow": list(self.allow), "deny": list(self.deny),
                **{k: getattr(self, k) for k in _LIMITS}}

    @property
    def allow_cidrs(self) -> tuple[str, ...]:
        return tuple(e for e in self.allow if is_cidr(e))

    @property
    def deny_cidrs(self) -> tuple[str, ...]:
        return tuple(e for e in self.deny if is_cidr(e))

    @property
    def allow_domains(self) -> tuple[str, ...]:
        return tuple(e for e in self.allow if not is_cidr(e))

    @property
    def deny_domains(self) -> tuple[str, ...]:
        return tuple(e for e in self.deny if not is_cidr(e))

    @property
    def has_domains(self) -> bool:
        return bool(self.allow_domains or self.deny_domains)

    def decide(self, address: str, *, resolved_for_allowed: bool = False) -> bool:
        """Whether a packet to ``address`` (IPv4) leaves the sandbox; ``resolved_for_allowed``:
        the sandbox's resolver returned it for an allowed domain. IPv6 never leaves: the
        guest gets no IPv6 address or route."""
        ip = ipaddress.ip_address(address)
        if ip.version != 4:
            return False
        if any(ip in ipaddress.ip_network(c) for c in self.deny_cidrs):
            return False
        if any(ip in ipaddress.ip_network(c) for c in self.allow_cidrs):
            return True
        if any(ip in ipaddress.ip_network(c) for c in ALWAYS_DENIED):
            return False
        return resolved_for_allowed or self.internet

    def resolves(self, name: str) -> bool:
        """Whether the sandbox's resolver answers for ``name`` (else it does not exist)."""
        name = name.lower().rstrip(".")
        if any(domain_matches(d, name) or name.endswith("." + d.removeprefix("*."))
               for d in self.deny_domains):
            return False
        return self.internet or any(domain_matches(d, name) for d in self.allow_domains)


def is_cidr(entry: str) -> bool:
    return entry[:1].isdigit() and "/" in entry


def domain_matches(pattern: str, name: str) -> bool:
    """``example.com`` matches itself; ``*.example.com`` matches its subdomains only."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


def _seq(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise BadRequestError(f"network {name} must be a list of CIDRs and domain names, "
                              f"not {value!r}")
    return tuple(value)


def _entries(name: str, values: object) -> tuple[str, ...]:
    """Each entry normalized (a CIDR as an IPv4 network, a domain in lower case without a
    final dot), in order, once."""
    out: list[str] = []
    for value in _seq(name, values):
        if not isinstance(value, str) or not value.strip() or len(value) > 253:
            raise BadRequestError(f"invalid entry in network {name}: {value!r}")
        text = _normalize(name, value.strip())
        if text not in out:
            out.append(text)
    return tuple(out)


def _normalize(name: str, value: str) -> str:
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        net = None
    if net is not None:
        if net.version != 4:
            raise BadRequestError(f"network {name}: {value!r} is IPv6; sandboxes get IPv4 "
                                  "only, and all IPv6 is dropped")
        return str(net)
    if value[:1].isdigit() and (":" in value or "/" in value or value.replace(".", "").isdigit()):
        raise BadRequestError(f"invalid CIDR in network {name}: {value!r}")
    domain = value.lower().rstrip(".")
    if ":" in domain:
        raise BadRequestError(f"network {name}: {value!r} is IPv6; sandboxes get IPv4 only, "
                              "and all IPv6 is dropped")
    if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
        raise BadRequestError(f"invalid entry in network {name}: {value!r} is neither an IPv4 "
                              "CIDR nor a domain name (example.com or *.example.com; "
                              "internationalized names in their xn-- form)")
    return domain
