"""Reading what the nested-KVM layer's pytest runs inside the outer VM reported (pure)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

Outcomes = dict[tuple[str, str], str]


def read_junit(path: Path) -> Outcomes:
    """Outcome by (classname, name): "passed", or the kind of failure with its text. A
    missing or unreadable report reads as no outcome at all."""
    out: Outcomes = {}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return out
    for case in root.iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        detail = next((child.get("message", "") + "\n" + (child.text or "")
                       for child in case if child.tag in kinds), "")
        out[key] = f"{kinds[0] if kinds else 'passed'}\n{detail}".strip()
    return out


def merge_retry(first: Outcomes, retry: Outcomes) -> tuple[Outcomes, Outcomes]:
    """The outcomes after a retry of what failed: a test that failed and then passed
    counts as passed, and its first failure is returned beside; anything else keeps its
    first outcome (a retry never turns a pass into a failure, nor adds a test)."""
    merged = dict(first)
    flaky: Outcomes = {}
    for key, got in retry.items():
        if key in first and first[key] != "passed" and got == "passed":
            flaky[key] = first[key]
            merged[key] = got
    return merged, flaky
