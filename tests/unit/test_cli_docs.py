"""docs/cli.md names every command the CLI has (and nothing it lacks)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from ember.cli.main import cli

DOC = Path(__file__).resolve().parents[2] / "docs/cli.md"


def _commands(group: click.Group, prefix: str) -> list[str]:
    out = []
    for name, cmd in group.commands.items():
        full = f"{prefix} {name}"
        if isinstance(cmd, click.Group):
            out += _commands(cmd, full)
        else:
            out.append(full)
    return out


def test_every_command_is_documented() -> None:
    text = DOC.read_text()
    missing = [c for c in _commands(cli, "ember") if f"`{c}" not in text]
    assert not missing, f"docs/cli.md does not mention: {missing}"


def test_the_doc_names_no_command_the_cli_lacks() -> None:
    real = set(_commands(cli, "ember"))
    groups = {c.rsplit(" ", 1)[0] for c in real}
    named = set(re.findall(r"`(ember(?: [a-z]+)+)", DOC.read_text()))
    unknown = []
    for n in named:
        words = n.split()
        # "ember image build NAME": the longest prefix of lower-case words that is a command
        for k in range(len(words), 1, -1):
            if " ".join(words[:k]) in real or " ".join(words[:k]) in groups:
                break
        else:
            unknown.append(n)
    assert not unknown, f"docs/cli.md names commands the CLI lacks: {unknown}"
