"""The runtime's modules import each other without a cycle (type-only imports aside), and
the lifecycle code names no isolation tier but through its backends."""

from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "ember" / "runtime"


def _imports(path: Path) -> set[str]:
    """ember.runtime modules imported at run time (not under ``if TYPE_CHECKING:``)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    skip = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If)
            and getattr(top.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(top)}
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        if node.module == "ember.runtime":
            out |= {a.name for a in node.names}
        elif node.module.startswith("ember.runtime."):
            out.add(node.module.removeprefix("ember.runtime."))
    return out


def test_no_import_cycle_in_the_runtime() -> None:
    graph = {p.stem: _imports(p) for p in RUNTIME.glob("*.py")}

    def reaches(a: str, b: str, seen: frozenset[str]) -> bool:
        return any(d == b or (d not in seen and reaches(d, b, seen | {d}))
                   for d in graph.get(a, ()))

    assert not [m for m in graph if reaches(m, m, frozenset())]


def test_the_lifecycle_code_has_no_per_tier_branches() -> None:
    text = (RUNTIME / "manager.py").read_text()
    for tier in ('"container"', '"gvisor"'):
        assert tier not in text, f"manager.py branches on {tier}"
