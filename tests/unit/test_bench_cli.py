"""``ember bench`` argument checks (no instance is started)."""

from __future__ import annotations

from click.testing import CliRunner

from ember.cli.main import cli


def test_unknown_tier_is_a_bad_request() -> None:
    r = CliRunner().invoke(cli, ["bench", "--tiers", "microvm,kubernetes"])
    assert r.exit_code == 2
    assert "kubernetes" in r.output


def test_help_lists_the_measures() -> None:
    r = CliRunner().invoke(cli, ["bench", "--help"])
    assert r.exit_code == 0
    for opt in ("--quick", "--json", "--out", "--max-density", "--parallel", "--tiers"):
        assert opt in r.output
