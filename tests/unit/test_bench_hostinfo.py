"""ember.bench.hostinfo: the pure /proc parsers."""

from __future__ import annotations

from ember.bench.hostinfo import cpu_model, meminfo_bytes


def test_cpu_model_is_the_first_model_name() -> None:
    text = "processor\t: 0\nmodel name\t: AMD  EPYC 7B13\nflags\t: fpu\n\nmodel name\t: other\n"
    assert cpu_model(text) == "AMD EPYC 7B13"
    assert cpu_model("") == "unknown"


def test_meminfo_bytes() -> None:
    text = "MemTotal:       24106 kB\nMemAvailable:   1000 kB\nHugePages_Total:       0\n"
    assert meminfo_bytes(text, "MemTotal") == 24106 * 1024
    assert meminfo_bytes(text, "MemAvailable") == 1000 * 1024
    assert meminfo_bytes(text, "Missing") == 0
