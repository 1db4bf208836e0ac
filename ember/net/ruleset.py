"""nftables rules as JSON commands (``nft -j -f -``), pure: no I/O.

The host's namespace holds one table, ``inet ember``, shared by every ember home on the
host: its base chains pass other traffic untouched and send each sandbox link to that
sandbox's chain through a verdict map; nothing new enters a sandbox link and the host
itself answers nothing on one. Each sandbox's own namespace holds ``ip ember_sb``: NAT of
the guest onto its link, and drop of anything not from the guest's address.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ember.net.addressing import (
    GATEWAY_IP,
    GUEST_IP,
    HOST_IF_PREFIX,
    LINK_POOL,
    PROXIED_PORTS,
    PROXY_PORT,
    TAP,
    UPLINK,
    Link,
)
from ember.net.policy import ALWAYS_DENIED, NetworkPolicy

Cmd = dict[str, Any]
TABLE = "ember"
FAMILY = "inet"
EGRESS_MAP = "egress"
#: Each sandbox link to its own chain of what it may send the host itself (its resolver).
INGRESS_MAP = "ingress"
#: (link, host address) pairs whose resolver a sandbox may query.
RESOLVERS_SET = "resolvers"
#: The base table's layout: a table without this set is rebuilt (its base chains flushed
#: and filled again in one transaction; sandbox chains and sets are kept).
LAYOUT_SET = "layout-3"
DNS_PORT = 53
#: DNS packets a sandbox may send its resolver per second (and in one burst); beyond, they
#: are dropped and counted: a guest flooding DNS slows itself, not the host.
DNS_RATE = 200
DNS_BURST = 400
SANDBOX_TABLE = "ember_sb"
#: In the sandbox's table: the guest's TCP ports that go through its proxy.
PROXIED_SET = "proxied"
_ANY_LINK = f"{HOST_IF_PREFIX}*"


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _match(left: object, right: object, op: str = "==") -> Cmd:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _established() -> Cmd:
    return _match({"ct": {"key": "state"}}, ["established", "related"], "in")


def _counter() -> Cmd:
    return {"counter": {"packets": 0, "bytes": 0}}


def _rule(chain: str, *expr: Cmd, table: str = TABLE, family: str = FAMILY) -> Cmd:
    return {"add": {"rule": {"family": family, "table": table, "chain": chain,
                             "expr": list(expr)}}}


def _chain(name: str, table: str = TABLE, family: str = FAMILY, **base: Any) -> Cmd:
    return {"add": {"chain": {"family": family, "table": table, "name": name, **base}}}


def _dns() -> list[Cmd]:
    return [_match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
            _match(_payload("th", "dport"), DNS_PORT)]


def _flush(name: str) -> Cmd:
    return {"flush": {"chain": {"family": FAMILY, "table": TABLE, "name": name}}}


def base_table() -> list[Cmd]:
    """The host table, made (or brought to this layout) in one transaction: all or
    nothing. Base chains are flushed and filled again; sandbox chains and sets stay."""
    drop = {"drop": None}
    accept = {"accept": None}
    link_in = _match(_meta("iifname"), _ANY_LINK)
    link_out = _match(_meta("oifname"), _ANY_LINK)
    resolver = _match({"concat": [_meta("iifname"), _payload("ip", "daddr")]},
                      f"@{RESOLVERS_SET}")
    return [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"map": {"family": FAMILY, "table": TABLE, "name": EGRESS_MAP,
                         "type": "ifname", "map": "verdict"}}},
        {"add": {"map": {"family": FAMILY, "table": TABLE, "name": INGRESS_MAP,
                         "type": "ifname", "map": "verdict"}}},
        {"add": {"set": {"family": FAMILY, "table": TABLE, "name": RESOLVERS_SET,
                         "type": ["ifname", "ipv4_addr"]}}},
        _chain("forward", type="filter", hook="forward", prio=0, policy="accept"),
        _chain("input", type="filter", hook="input", prio=0, policy="accept"),
        _chain("postrouting", type="nat", hook="postrouting", prio=100, policy="accept"),
        _flush("forward"), _flush("input"), _flush("postrouting"),
        _rule("forward", link_in, {"vmap": {"key": _meta("iifname"), "data": f"@{EGRESS_MAP}"}}),
        _rule("forward", link_in, _counter(), drop),  # a link with no sandbox chain
        _rule("forward", link_out, _established(), accept),
        _rule("forward", link_out, _counter(), drop),  # nothing new into a sandbox
        _rule("input", link_in, {"vmap": {"key": _meta("iifname"),
                                          "data": f"@{INGRESS_MAP}"}}),  # its DNS rate
        _rule("input", link_in, _established(), accept),
        _rule("input", link_in, resolver, *_dns(), accept),  # its own resolver only
        _rule("input", link_in, _counter(), drop),  # the host answers nothing on a link
        _rule("postrouting", _match(_payload("ip", "saddr"), _prefix(str(LINK_POOL))),
              _match(_meta("oifname"), _ANY_LINK, "!="), {"masquerade": None}),
        {"add": {"set": {"family": FAMILY, "table": TABLE, "name": LAYOUT_SET,
                         "type": "ipv4_addr"}}},
    ]


def sandbox_chain_name(link: Link) -> str:
    return f"sb-{link.sandbox_id.removeprefix('sb-')}"


def ingress_chain_name(link: Link) -> str:
    """The chain of what the sandbox sends the host itself (before the base input rules)."""
    return f"in-{link.sandbox_id.removeprefix('sb-')}"


def domain_set_name(link: Link) -> str:
    """The set of addresses the sandbox's resolver returned for its allowed domains."""
    return f"dom-{link.sandbox_id.removeprefix('sb-')}"


#: How long an address resolved for an allowed domain stays reachable after its last
#: lookup (each lookup refreshes it).
DOMAIN_ADDRESS_TIMEOUT_S = 3600


def _prefix(cidr: str) -> dict[str, Any] | str:
    net = ipaddress.ip_network(cidr)
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _set_of(cidrs: tuple[str, ...]) -> dict[str, Any]:
    nets = ipaddress.collapse_addresses(ipaddress.IPv4Network(c) for c in cidrs)
    return {"set": [_prefix(str(n)) for n in nets]}


#: A destination the policy denies is refused at once (TCP reset or ICMP "administratively
#: prohibited"), so that a guest's connect fails fast and says why; spoofed or IPv6
#: packets are dropped silently.
REFUSE: Cmd = {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}


def policy_rules(link: Link, policy: NetworkPolicy) -> list[Cmd]:
    """The sandbox chain's rules, in :mod:`ember.net.policy`'s order."""
    chain = sandbox_chain_name(link)
    daddr = _payload("ip", "daddr")
    rules = [
        _rule(chain, _match(_meta("nfproto"), "ipv6"), _counter(), {"drop": None}),
        _rule(chain, _match(_payload("ip", "saddr"), link.sandbox_ip, "!="), _counter(),
              {"drop": None}),  # spoofed: not from the sandbox's NAT address
    ]
    if policy.max_connections is not None:  # counted per rule: this sandbox's flows
        rules.append(_rule(chain, _match({"ct": {"key": "state"}}, "new", "in"),
                           {"ct count": {"val": policy.max_connections, "inv": True}},
                           _counter(), REFUSE))
    if policy.has_domains:  # QUIC would carry names past the resolver's view: TCP only
        rules.append(_rule(chain, _match(_meta("l4proto"), "udp"),
                           _match(_payload("udp", "dport"), 443), _counter(), REFUSE))
    if policy.deny_cidrs:
        rules.append(_rule(chain, _match(daddr, _set_of(policy.deny_cidrs)), _counter(),
                           REFUSE))
    if policy.allow_cidrs:
        rules.append(_rule(chain, _match(daddr, _set_of(policy.allow_cidrs)), _counter(),
                           {"accept": None}))
    rules.append(_rule(chain, _match(daddr, _set_of(ALWAYS_DENIED)), _counter(), REFUSE))
    rules.append(_rule(chain, _match(daddr, f"@{domain_set_name(link)}"), _counter(),
                       {"accept": None}))
    rules.append(_rule(chain, _counter(), {"accept": None} if policy.internet else REFUSE))
    return rules


def _element(link: Link, vmap: str = EGRESS_MAP) -> dict[str, Any]:
    chain = sandbox_chain_name(link) if vmap == EGRESS_MAP else ingress_chain_name(link)
    return {"family": FAMILY, "table": TABLE, "name": vmap,
            "elem": [[link.host_if, {"jump": {"target": chain}}]]}


def ingress_rules(link: Link) -> list[Cmd]:
    """DNS beyond the sandbox's rate is dropped (and counted); the rest returns to the
    base input chain."""
    over = {"limit": {"rate": DNS_RATE, "burst": DNS_BURST, "per": "second", "inv": True}}
    return [_rule(ingress_chain_name(link), *_dns(), over, _counter(), {"drop": None})]


def _domain_set(link: Link) -> dict[str, Any]:
    return {"family": FAMILY, "table": TABLE, "name": domain_set_name(link)}


def _resolver_element(link: Link) -> dict[str, Any]:
    return {"family": FAMILY, "table": TABLE, "name": RESOLVERS_SET,
            "elem": [{"concat": [link.host_if, link.host_ip]}]}


def add_sandbox(link: Link, policy: NetworkPolicy) -> list[Cmd]:
    """The sandbox's address set, chain, rules, map entry and resolver entry, in one
    transaction."""
    return [{"add": {"set": {**_domain_set(link), "type": "ipv4_addr", "flags": ["timeout"],
                             "timeout": DOMAIN_ADDRESS_TIMEOUT_S}}},
            _chain(sandbox_chain_name(link)), *policy_rules(link, policy),
            {"add": {"element": _element(link)}},
            _chain(ingress_chain_name(link)), *ingress_rules(link),
            {"add": {"element": _element(link, INGRESS_MAP)}},
            {"add": {"element": _resolver_element(link)}}]


def update_sandbox(link: Link, policy: NetworkPolicy) -> list[Cmd]:
    """Replace the sandbox chain's rules atomically (one transaction: no packet sees a
    half-updated chain), and forget the addresses of the old policy's domains."""
    name = sandbox_chain_name(link)
    return [{"flush": {"set": _domain_set(link)}},
            {"flush": {"chain": {"family": FAMILY, "table": TABLE, "name": name}}},
            *policy_rules(link, policy)]


def remove_sandbox(link: Link, found: dict[str, set[str]]) -> list[Cmd]:
    """Delete what of the sandbox ``found`` (a listing of the host table: ``chains``,
    ``sets``, and the links in the ``egress``, ``ingress`` and ``resolvers`` entries)
    holds: nothing is asked of nftables that is not there."""
    cmds: list[Cmd] = []
    if link.host_if in found["egress"]:
        cmds.append({"delete": {"element": _element(link)}})
    if link.host_if in found["ingress"]:
        cmds.append({"delete": {"element": _element(link, INGRESS_MAP)}})
    if link.host_if in found["resolvers"]:
        cmds.append({"delete": {"element": _resolver_element(link)}})
    for name in (sandbox_chain_name(link), ingress_chain_name(link)):
        if name in found["chains"]:
            cmds += [{"flush": {"chain": {"family": FAMILY, "table": TABLE, "name": name}}},
                     {"delete": {"chain": {"family": FAMILY, "table": TABLE, "name": name}}}]
    if domain_set_name(link) in found["sets"]:
        cmds.append({"delete": {"set": _domain_set(link)}})
    return cmds


def sandbox_table(link: Link) -> list[Cmd]:
    """The table inside a sandbox's own namespace: the guest NATed onto its link, its DNS
    (to its gateway) sent to its resolver on the host end, its TCP connections to the
    ports in the ``proxied`` set (empty unless its policy names domains) redirected to
    its proxy (:mod:`ember.net.proxy`), nothing else forwarded, nothing else answered by
    the namespace itself."""
    fam, tab = "ip", SANDBOX_TABLE
    accept = {"accept": None}
    return [
        {"add": {"table": {"family": fam, "name": tab}}},
        {"add": {"set": {"family": fam, "table": tab, "name": PROXIED_SET,
                         "type": "inet_service"}}},
        _chain("prerouting", tab, fam, type="nat", hook="prerouting", prio=-100,
               policy="accept"),
        _rule("prerouting", _match(_meta("iifname"), TAP),
              _match(_payload("tcp", "dport"), f"@{PROXIED_SET}"),
              {"redirect": {"port": PROXY_PORT}}, table=tab, family=fam),
        _rule("prerouting", _match(_meta("iifname"), TAP),
              _match(_payload("ip", "daddr"), GATEWAY_IP), *_dns(),
              {"dnat": {"addr": link.host_ip}}, table=tab, family=fam),
        _chain("forward", tab, fam, type="filter", hook="forward", prio=0, policy="drop"),
        _chain("input", tab, fam, type="filter", hook="input", prio=0, policy="drop"),
        _chain("postrouting", tab, fam, type="nat", hook="postrouting", prio=100,
               policy="accept"),
        _rule("forward", _match(_meta("iifname"), TAP), _match(_meta("oifname"), UPLINK),
              _match(_payload("ip", "saddr"), GUEST_IP), accept, table=tab, family=fam),
        _rule("forward", _match(_meta("iifname"), UPLINK), _match(_meta("oifname"), TAP),
              _established(), accept, table=tab, family=fam),
        _rule("forward", _counter(), table=tab, family=fam),  # then the drop policy
        _rule("input", _established(), accept, table=tab, family=fam),
        _rule("input", _match(_meta("iifname"), TAP),
              _match(_payload("tcp", "dport"), PROXY_PORT),
              _match({"ct": {"key": "status"}}, "dnat", "in"), accept,
              table=tab, family=fam),  # redirected connections only, to the proxy
        _rule("input", _counter(), table=tab, family=fam),
        _rule("postrouting", _match(_meta("oifname"), UPLINK), {"masquerade": None},
              table=tab, family=fam),
    ]




def proxied(on: bool) -> list[Cmd]:
    """Send the guest's connections to ports 80 and 443 through its proxy (``on``) or
    straight out, in one transaction (in the sandbox's namespace)."""
    ref = {"family": "ip", "table": SANDBOX_TABLE, "name": PROXIED_SET}
    cmds: list[Cmd] = [{"flush": {"set": ref}}]
    if on:
        cmds.append({"add": {"element": {**ref, "elem": list(PROXIED_PORTS)}}})
    return cmds
