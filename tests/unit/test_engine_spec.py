"""VMSpec validation: every bad field is refused with a cause that names it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ember.engine.base import host_memory_mib
from ember.errors import BadRequestError
from tests.unit import engine_specs

TCG = engine_specs.TCG


make_spec = engine_specs.make_spec


def test_valid_spec() -> None:
    spec = make_spec()
    assert spec.vcpus == 1
    with pytest.raises(AttributeError):
        spec.vcpus = 2  # type: ignore[misc]


def test_agent_socket_is_optional() -> None:
    assert make_spec(agent_socket=None).agent_socket is None


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("vcpus", 0, "vcpus must be between 1 and 64"),
        ("vcpus", 65, "vcpus must be between 1 and 64"),
        ("vcpus", True, "vcpus must be an integer"),
        ("vcpus", 1.5, "vcpus must be an integer"),
        ("memory_mib", 63, "memory_mib must be between 64"),
        ("memory_mib", "256", "memory_mib must be an integer"),
        ("name", "", "VM name"),
        ("name", "a,b", "VM name"),
        ("name", "../x", "VM name"),
        ("name", "x" * 65, "VM name"),
        ("disk_format", "vmdk", "disk_format"),
        ("kernel", Path("bzImage"), "kernel path 'bzImage' must be absolute"),
        ("disk", Path("rel/root.img"), "disk path .* must be absolute"),
        ("console_log", Path("c.log"), "console_log path"),
        ("qmp_socket", Path("q.sock"), "qmp_socket path"),
        ("agent_socket", Path("a.sock"), "agent_socket path"),
        ("pidfile", Path("q.pid"), "pidfile path"),
        ("kernel", "/cache/bzImage", "kernel must be a pathlib.Path"),
        ("disk", Path("/x\ny"), "NUL or newline"),
        ("qmp_socket", Path("/" + "s" * 120), "longer than 107 bytes"),
        ("agent_socket", Path("/" + "s" * 120), "longer than 107 bytes"),
        ("cmdline", "x" * 1025, "longer than 1024"),
        ("cmdline", "init=/init\nfoo", "control characters"),
    ],
)
def test_invalid_fields_are_refused(field: str, value: object, match: str) -> None:
    with pytest.raises(BadRequestError, match=match):
        make_spec(**{field: value})


def test_memory_cannot_exceed_host_ram() -> None:
    host = host_memory_mib()
    assert make_spec(memory_mib=host).memory_mib == host
    with pytest.raises(BadRequestError, match=f"between 64 and {host}"):
        make_spec(memory_mib=host + 1)


def test_replace_revalidates() -> None:
    with pytest.raises(BadRequestError):
        replace(make_spec(), vcpus=0)
