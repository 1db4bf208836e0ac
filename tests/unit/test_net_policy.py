"""The egress policy spec and its decision order (ember/net/policy.py), and the nftables
rules compiled from it (ember/net/ruleset.py): pure, no I/O."""

from __future__ import annotations

import pytest

from ember.errors import BadRequestError
from ember.net import ruleset
from ember.net.addressing import MAX_LINKS, Link, host_ifname, netns_name
from ember.net.policy import MAX_RULES, NetworkPolicy


def test_defaults_are_internet_with_private_ranges_denied() -> None:
    p = NetworkPolicy()
    assert p.decide("203.0.113.9")
    for private in ("10.1.2.3", "172.16.0.1", "192.168.1.1", "127.0.0.1", "169.254.169.254",
                    "100.100.0.1", "100.127.255.253", "224.0.0.1", "0.0.0.0"):
        assert not p.decide(private), private
    assert not p.decide("2001:db8::1")  # no IPv6 at all


def test_deny_wins_and_allow_opens_private_ranges() -> None:
    p = NetworkPolicy(internet=False, allow=("10.0.0.0/8", "203.0.113.0/24"),
                      deny=("10.9.0.0/16",))
    assert p.decide("10.1.1.1") and p.decide("203.0.113.5")
    assert not p.decide("10.9.1.1")  # deny wins over a wider allow
    assert not p.decide("198.51.100.1")  # internet off
    assert not NetworkPolicy(deny=("198.51.100.0/24",)).decide("198.51.100.7")


def test_cidrs_are_normalized_and_deduplicated() -> None:
    p = NetworkPolicy(allow=("10.0.0.5", " 10.0.0.7/24", "10.0.0.0/24"))
    assert p.allow == ("10.0.0.5/32", "10.0.0.0/24")
    assert NetworkPolicy.from_json(p.to_json()) == p


@pytest.mark.parametrize("doc, why", [
    ({"allow": ["10.0.0.300"]}, "invalid CIDR"),
    ({"allow": ["exa mple.com"]}, "neither an IPv4 CIDR nor a domain"),
    ({"deny": ["::1/128"]}, "IPv6"),
    ({"allow": "10.0.0.0/8"}, "list of CIDRs"),
    ({"allow": [7]}, "invalid entry"),
    ({"internet": 1}, "true or false"),
    ({"bandwidth": 5}, "unknown network policy field"),
    ([], "is an object"),
])
def test_bad_policies_name_the_cause(doc: object, why: str) -> None:
    with pytest.raises(BadRequestError, match=why):
        NetworkPolicy.from_json(doc)


def test_policy_size_is_bounded() -> None:
    many = tuple(f"10.{i // 256}.{i % 256}.0/24" for i in range(MAX_RULES + 1))
    with pytest.raises(BadRequestError, match=f"at most {MAX_RULES}"):
        NetworkPolicy(allow=many)
    NetworkPolicy(allow=many[:MAX_RULES])


def test_links_are_distinct_and_named_within_kernel_limits() -> None:
    a, b = Link(0, "sb-0123456789ab"), Link(1, "sb-ba9876543210")
    assert (a.host_ip, a.sandbox_ip, b.host_ip) == ("100.100.0.1", "100.100.0.2", "100.100.0.5")
    assert len(host_ifname("sb-0123456789ab")) <= 15
    assert netns_name("sb-0123456789ab") == "ember-sb-0123456789ab"
    with pytest.raises(ValueError):
        Link(MAX_LINKS, "sb-x")


def _rule_exprs(cmds: list[ruleset.Cmd]) -> list[list[dict[str, object]]]:
    return [c["add"]["rule"]["expr"] for c in cmds if "rule" in c.get("add", {})]


def test_sandbox_rules_follow_the_policy_order() -> None:
    link = Link(3, "sb-0123456789ab")
    rules = _rule_exprs(ruleset.policy_rules(link, NetworkPolicy(
        internet=False, allow=("10.0.0.0/8", "10.1.0.0/16"), deny=("10.9.0.0/16",))))
    verdicts = [next(k for k in r[-1]) for r in rules]
    assert verdicts == ["drop", "drop", "reject", "accept", "reject", "accept", "reject"]
    assert rules[1][0]["match"]["right"] == link.sandbox_ip  # anti-spoofing first
    allow_set = rules[3][0]["match"]["right"]["set"]
    assert allow_set == [{"prefix": {"addr": "10.0.0.0", "len": 8}}]  # overlaps collapsed
    last = _rule_exprs(ruleset.policy_rules(link, NetworkPolicy()))[-1]
    assert "accept" in last[-1]


def test_update_is_one_flush_then_the_rules() -> None:
    link = Link(0, "sb-0123456789ab")
    cmds = ruleset.update_sandbox(link, NetworkPolicy())
    assert [list(c) for c in cmds[:2]] == [["flush"], ["flush"]]
    assert "set" in cmds[0]["flush"] and all("add" in c for c in cmds[2:])
    none: dict[str, set[str]] = {k: set() for k in ("chains", "sets", "egress", "ingress",
                                                    "resolvers")}
    assert ruleset.remove_sandbox(link, none) == []
    every = ruleset.remove_sandbox(link, {
        "chains": {ruleset.sandbox_chain_name(link), ruleset.ingress_chain_name(link)},
        "sets": {ruleset.domain_set_name(link)}, "egress": {link.host_if},
        "ingress": {link.host_if}, "resolvers": {link.host_if}})
    assert [next(iter(c["delete"] if "delete" in c else c["flush"])) for c in every] == [
        "element", "element", "element", "chain", "chain", "chain", "chain", "set"]


def test_domains_are_normalized_and_resolved_by_policy() -> None:
    p = NetworkPolicy(internet=False, allow=("Allowed.TEST.", "*.sub.test", "10.0.0.1"),
                      deny=("bad.sub.test",))
    assert p.allow == ("allowed.test", "*.sub.test", "10.0.0.1/32")
    assert p.allow_domains == ("allowed.test", "*.sub.test") and p.allow_cidrs == (
        "10.0.0.1/32",)
    assert p.resolves("allowed.test") and p.resolves("a.sub.test")
    assert not p.resolves("x.allowed.test")  # exact
    assert not p.resolves("sub.test")  # a wildcard covers subdomains only
    assert not p.resolves("bad.sub.test") and not p.resolves("x.bad.sub.test")  # deny wins
    assert not p.resolves("other.test")  # internet off
    assert NetworkPolicy(deny=("other.test",)).resolves("else.test")  # internet on
    assert p.decide("203.0.113.1", resolved_for_allowed=True)
    assert not p.decide("10.1.1.1", resolved_for_allowed=True)  # rebinding stays refused


@pytest.mark.parametrize("entry", ["-x.com", "a..b", "*.", "*x.com", "x" * 64 + ".com",
                                   "exa mple.com", "1.2.3", "10.0.0.0/33"])
def test_bad_entries_are_refused(entry: str) -> None:
    with pytest.raises(BadRequestError, match="network allow"):
        NetworkPolicy(allow=(entry,))


def test_resolver_config_follows_the_policy() -> None:
    from pathlib import Path

    from ember.net.resolver import dnsmasq_argv, upstreams

    assert upstreams("# x\nnameserver 192.0.2.53\nnameserver ::1\nnameserver 192.0.2.53\n"
                     "search example\nnameserver 192.0.2.54") == ["192.0.2.53", "192.0.2.54"]
    link = Link(2, "sb-0123456789ab")
    argv = dnsmasq_argv(link, NetworkPolicy(internet=False, allow=(
        "allowed.test", "*.sub.test", "*.no.test"), deny=("no.test",)), ["192.0.2.53"],
        pidfile=Path("/run/x.pid"), nft_set=("inet", "ember", "dom-x"))
    assert f"--listen-address={link.host_ip}" in argv and "--pid-file=/run/x.pid" in argv
    assert "--server=/allowed.test/192.0.2.53" in argv
    assert "--address=/*.allowed.test/" in argv  # exact: subdomains do not exist
    assert "--server=/*.sub.test/192.0.2.53" in argv
    assert "--nftset=/sub.test/4#inet#ember#dom-x" in argv
    assert "--address=/no.test/" in argv
    assert not any("/no.test/192" in a or "*.no.test/192" in a for a in argv)  # denied
    assert "--server=192.0.2.53" not in argv  # internet off: nothing else is forwarded
    on = dnsmasq_argv(link, NetworkPolicy(allow=("allowed.test",)), ["192.0.2.53"],
                      pidfile=Path("/run/x.pid"), nft_set=("inet", "ember", "dom-x"))
    assert "--server=192.0.2.53" in on and "--address=/*.allowed.test/" not in on


def test_the_sandbox_namespace_table_sends_dns_to_its_resolver() -> None:
    link = Link(5, "sb-0123456789ab")
    cmds = ruleset.sandbox_table(link)
    dnat = [r for r in _rule_exprs(cmds) if any("dnat" in e for e in r)]
    assert len(dnat) == 1 and dnat[0][-1] == {"dnat": {"addr": link.host_ip}}
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"].get("policy")
              for c in cmds if "chain" in c.get("add", {})}
    assert chains["forward"] == "drop" and chains["input"] == "drop"


def test_the_base_table_is_versioned_and_rebuilds_its_chains_in_one_go() -> None:
    cmds = ruleset.base_table()
    flushed = [c["flush"]["chain"]["name"] for c in cmds if "flush" in c]
    assert flushed == ["forward", "input", "postrouting"]
    sets = [c["add"]["set"]["name"] for c in cmds if "set" in c.get("add", {})]
    assert ruleset.LAYOUT_SET in sets and ruleset.RESOLVERS_SET in sets
    # nothing new into a sandbox link, and the host answers only DNS to the link's resolver
    inputs = [r for r in _rule_exprs(cmds) if r and "match" in r[0]]
    assert any(r[-1] == {"drop": None} for r in inputs)
