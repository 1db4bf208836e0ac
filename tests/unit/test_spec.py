import pytest

from ember.engine.base import host_memory_mib
from ember.errors import BadRequestError
from ember.runtime.spec import SandboxSpec


def test_defaults_are_valid() -> None:
    s = SandboxSpec()
    assert (s.template, s.vcpus, s.memory_mib, s.timeout) == ("debian-python", 1, 256, 300.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vcpus": 0}, r"vcpus=0 is impossible"),
        ({"vcpus": 10_000}, r"vcpus=10000 is impossible.*CPU"),
        ({"vcpus": True}, r"vcpus must be an integer"),
        ({"memory_mib": 8}, r"memory_mib=8 is impossible"),
        ({"memory_mib": 10**9}, r"impossible.*host has \d+ MiB"),
        ({"timeout": 0}, r"timeout"),
        ({"timeout": -5}, r"timeout"),
        ({"env": {"1BAD": "x"}}, r"invalid environment variable"),
        ({"env": {"OK": "a\0b"}}, r"invalid environment variable"),
        ({"metadata": {"k k": "v"}}, r"invalid metadata"),
        ({"template": ""}, r"template"),
    ],
)
def test_impossible_specs_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(BadRequestError, match=match):
        SandboxSpec(**kwargs)  # type: ignore[arg-type]


def test_host_memory_is_read() -> None:
    assert host_memory_mib() > 256
