"""The network options of ``ember run`` and ``ember create``: limits given at create are
the same options, parsed the same way, as ``ember network set`` takes."""

from __future__ import annotations

import click
import pytest

from ember.cli.main import cli
from ember.cli.sandbox_cmds import network_policy
from ember.errors import BadRequestError
from ember.net.policy import NetworkPolicy


def test_limits_go_into_the_policy() -> None:
    got = network_policy("off", ("10.0.0.0/8",), (), 4.0, 8.0, 16)
    assert got == NetworkPolicy(internet=False, allow=("10.0.0.0/8",), rate_out_mbit=4.0,
                                rate_in_mbit=8.0, max_connections=16)
    assert network_policy("internet", (), (), 0, None, 0) == NetworkPolicy()  # 0: no limit
    with pytest.raises(BadRequestError, match="need --network"):
        network_policy("none", (), (), None, 2.0, None)
    assert network_policy("none", (), ()) is None


@pytest.mark.parametrize("command", ["run", "create"])
def test_run_and_create_take_the_options_network_set_takes(command: str) -> None:
    assert isinstance(cli, click.Group)
    network = cli.commands["network"]
    assert isinstance(network, click.Group)

    def limits(cmd: click.Command) -> dict[str, tuple[object, ...]]:
        return {p.name or "": (tuple(p.opts), p.type.name, p.metavar) for p in cmd.params
                if p.name in ("rate_in", "rate_out", "max_connections")}

    assert limits(cli.commands[command]) == limits(network.commands["set"])
    assert len(limits(cli.commands[command])) == 3
