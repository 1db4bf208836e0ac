"""The proxy's decision for one connection, pure: which address it may go to."""

from __future__ import annotations

import pytest

from ember.net.policy import NetworkPolicy
from ember.net.proxy import Refused, choose

ALLOWED = "198.51.100.10"
OTHER = "198.51.100.11"


def policy(**kw: object) -> NetworkPolicy:
    return NetworkPolicy.from_json(kw)


def test_an_allowed_name_goes_to_its_own_address_not_the_one_the_guest_picked() -> None:
    p = policy(internet=False, allow=["allowed.test"])
    assert choose(p, "allowed.test", ALLOWED, [ALLOWED]) == ALLOWED
    assert choose(p, "allowed.test", OTHER, [ALLOWED]) == ALLOWED  # fronting by address


def test_names_the_policy_does_not_resolve_are_refused() -> None:
    p = policy(internet=False, allow=["allowed.test"])
    with pytest.raises(Refused, match=r"other\.test"):
        choose(p, "other.test", OTHER, [OTHER])
    q = policy(internet=True, deny=["*.sub.test", "other.test"])
    for name in ("other.test", "a.sub.test"):
        with pytest.raises(Refused):
            choose(q, name, OTHER, [OTHER])
    assert choose(q, "allowed.test", ALLOWED, [ALLOWED]) == ALLOWED


def test_a_name_resolving_into_a_denied_range_is_refused() -> None:
    p = policy(internet=False, allow=["rebind.test"])
    with pytest.raises(Refused, match=r"10\.77\.0\.10"):
        choose(p, "rebind.test", "10.77.0.10", ["10.77.0.10"])
    with pytest.raises(Refused, match="no IPv4"):
        choose(p, "rebind.test", ALLOWED, [])
    r = policy(internet=True, deny=["198.51.100.11/32"])
    with pytest.raises(Refused):
        choose(r, "other.test", OTHER, [OTHER])


def test_a_connection_naming_nothing_needs_its_address_allowed_by_itself() -> None:
    p = policy(internet=False, allow=["allowed.test", "203.0.113.0/24"])
    with pytest.raises(Refused):
        choose(p, None, ALLOWED, [])
    assert choose(p, None, "203.0.113.7", []) == "203.0.113.7"
    q = policy(internet=True, deny=["other.test"])
    assert choose(q, None, OTHER, []) == OTHER
    with pytest.raises(Refused):
        choose(q, None, "100.127.255.253", [])  # the gateway itself
