"""Stable error codes: every class has its own, and a code gives back the same class."""

from __future__ import annotations

import inspect

import pytest

import ember.errors as E


def _classes() -> list[type[E.EmberError]]:
    return [c for _, c in inspect.getmembers(E, inspect.isclass)
            if issubclass(c, E.EmberError)]


def test_every_error_class_has_its_own_code() -> None:
    codes = [c.__dict__.get("code") for c in _classes()]
    assert None not in codes, "an error class in ember.errors without a code of its own"
    assert len(codes) == len(set(codes)), f"codes repeat: {sorted(codes)}"  # type: ignore[type-var]


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_a_code_gives_back_its_class(cls: type[E.EmberError]) -> None:
    err = E.error_for_code(cls.code, "what happened")
    assert type(err) is cls
    assert str(err) == "what happened"


def test_an_unknown_code_gives_the_base_class_naming_it() -> None:
    err = E.error_for_code("from_the_future", "something new")
    assert type(err) is E.EmberError
    assert "from_the_future" in str(err)


def test_subclasses_elsewhere_travel_as_their_parent() -> None:
    from ember.host.jail import JailError

    assert JailError.code == E.HostError.code
    assert E.error_codes()[JailError.code] is E.HostError
