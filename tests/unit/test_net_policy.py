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
    ({"allow": ["example.com"]}, "invalid CIDR"),
    ({"deny": ["::1/128"]}, "IPv6"),
    ({"allow": "10.0.0.0/8"}, "list of CIDRs"),
    ({"allow": [7]}, "invalid CIDR"),
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
    assert verdicts == ["drop", "drop", "reject", "accept", "reject", "reject"]
    assert rules[1][0]["match"]["right"] == link.sandbox_ip  # anti-spoofing first
    allow_set = rules[3][0]["match"]["right"]["set"]
    assert allow_set == [{"prefix": {"addr": "10.0.0.0", "len": 8}}]  # overlaps collapsed
    last = _rule_exprs(ruleset.policy_rules(link, NetworkPolicy()))[-1]
    assert "accept" in last[-1]


def test_update_is_one_flush_then_the_rules() -> None:
    link = Link(0, "sb-0123456789ab")
    cmds = ruleset.update_sandbox(link, NetworkPolicy())
    assert list(cmds[0]) == ["flush"] and all("add" in c for c in cmds[1:])
    assert ruleset.remove_sandbox(link, has_element=False, has_chain=False) == []
    both = ruleset.remove_sandbox(link, has_element=True, has_chain=True)
    assert [next(iter(c["delete"] if "delete" in c else c["flush"])) for c in both] == [
        "element", "chain", "chain"]
