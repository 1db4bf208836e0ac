"""The agent's own /etc/passwd and /etc/group parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ember.agent.errors import OpError
from ember.agent.users import Account, lookup_account, parse_group_members, parse_passwd

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
# a comment
broken line
bad:x:notanumber:0::/:/bin/sh
user:x:1000:1000:A User,,,:/home/user:/bin/bash
nohome:x:1001:1001:::/bin/sh
"""
GROUP = """\
root:x:0:
sudo:x:27:user,other
docker:x:999:user
users:x:100:
weird:x:nan:user
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "passwd").write_text(PASSWD)
    (tmp_path / "group").write_text(GROUP)
    return {"passwd": str(tmp_path / "passwd"), "group": str(tmp_path / "group")}


def test_parse_passwd() -> None:
    names = [e.name for e in parse_passwd(PASSWD)]
    assert names == ["root", "user", "nohome"]


def test_parse_group_members() -> None:
    assert parse_group_members(GROUP) == {"user": {27, 999}, "other": {27}}


def test_lookup_by_name(files: dict[str, str]) -> None:
    assert lookup_account("user", **files) == Account(
        "user", 1000, 1000, "/home/user", (27, 999, 1000)
    )
    assert lookup_account("nohome", **files).home == "/"


def test_lookup_by_uid(files: dict[str, str]) -> None:
    assert lookup_account(1000, **files).name == "user"
    assert lookup_account("1000", **files).name == "user"
    assert lookup_account(4242, **files) == Account("4242", 4242, 4242, "/")
    assert lookup_account(0, **files).home == "/root"


def test_lookup_self(files: dict[str, str]) -> None:
    assert lookup_account(None, **files).uid == os.getuid()


def test_unknown_name(files: dict[str, str]) -> None:
    with pytest.raises(OpError, match="no such user: ghost") as caught:
        lookup_account("ghost", **files)
    assert caught.value.kind == "not_found"


def test_missing_files(tmp_path: Path) -> None:
    account = lookup_account(0, passwd=str(tmp_path / "x"), group=str(tmp_path / "y"))
    assert account == Account("root", 0, 0, "/root")
