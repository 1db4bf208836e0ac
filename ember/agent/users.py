"""Accounts of the image, read from its /etc/passwd and /etc/group (no NSS, no pwd module)."""

from __future__ import annotations

import os

from ember.protocol import ErrorKind

from .errors import OpError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

MAX_ACCOUNT_FILE = 4 << 20

# Account and PasswdEntry are immutable values written by hand: the agent does not import
# ``dataclasses``, which costs a TCG-emulated guest tens of milliseconds at boot.


class PasswdEntry:
    __slots__ = ("gid", "home", "name", "uid")

    def __init__(self, name: str, uid: int, gid: int, home: str) -> None:
        self.name: Final = name
        self.uid: Final = uid
        self.gid: Final = gid
        self.home: Final = home

    def _key(self) -> tuple[str, int, int, str]:
        return self.name, self.uid, self.gid, self.home

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, PasswdEntry) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        name, uid, gid, home = self._key()
        return f"PasswdEntry(name={name!r}, uid={uid!r}, gid={gid!r}, home={home!r})"


class Account:
    __slots__ = ("gid", "groups", "home", "name", "uid")

    def __init__(
        self, name: str, uid: int, gid: int, home: str, groups: tuple[int, ...] = ()
    ) -> None:
        self.name: Final = name
        self.uid: Final = uid
        self.gid: Final = gid
        self.home: Final = home
        self.groups: Final = groups
        """Supplementary groups (from /etc/group membership)."""

    def _key(self) -> tuple[str, int, int, str, tuple[int, ...]]:
        return self.name, self.uid, self.gid, self.home, self.groups

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, Account) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        name, uid, gid, home, groups = self._key()
        return f"Account(name={name!r}, uid={uid!r}, gid={gid!r}, home={home!r}, groups={groups!r})"


def parse_passwd(text: str) -> list[PasswdEntry]:
    """Entries of a passwd file; malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or not fields[0] or line.startswith("#"):
            continue
        try:
            uid, gid = int(fields[2]), int(fields[3])
        except ValueError:
            continue
        entries.append(PasswdEntry(fields[0], uid, gid, fields[5] or "/"))
    return entries


def parse_group_members(text: str) -> dict[str, set[int]]:
    """``user name -> gids`` of the groups that list the user as a member."""
    members: dict[str, set[int]] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or line.startswith("#"):
            continue
        try:
            gid = int(fields[2])
        except ValueError:
            continue
        for name in filter(None, fields[3].split(",")):
            members.setdefault(name.strip(), set()).add(gid)
    return members


def lookup_account(
    user: str | int | None, *, passwd: str = "/etc/passwd", group: str = "/etc/group"
) -> Account:
    """The account to run as: by name, by uid, or (``None``) the agent's own.

    A uid missing from passwd is allowed (gid = uid, home /); a missing name is not.
    """
    if isinstance(user, str) and user.isdigit():
        user = int(user)
    entries = parse_passwd(_read(passwd))
    if user is None:
        user = os.getuid()
    if isinstance(user, int):
        entry = next((e for e in entries if e.uid == user), None)
        if entry is None:
            if user == 0:
                return Account("root", 0, 0, "/root")
            return Account(str(user), user, user, "/")
    else:
        entry = next((e for e in entries if e.name == user), None)
        if entry is None:
            raise OpError(ErrorKind.NOT_FOUND, f"no such user: {user}")
    groups = parse_group_members(_read(group)).get(entry.name, set()) | {entry.gid}
    return Account(entry.name, entry.uid, entry.gid, entry.home, tuple(sorted(groups)))


def _read(path: str) -> str:
    try:
        with open(path, "rb") as file:
            return file.read(MAX_ACCOUNT_FILE).decode("utf-8", "replace")
    except OSError:
        return ""
