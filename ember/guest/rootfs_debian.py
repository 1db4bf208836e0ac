"""Debian root filesystems with debootstrap (minbase plus named packages)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ember import proc
from ember.errors import HostCommandError, ImageSourceError

DEFAULT_MIRROR = "http://deb.debian.org/debian"
SCRIPTS_DIR = Path("/usr/share/debootstrap/scripts")
_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,99}$")


def check_suite(suite: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", suite) or not (SCRIPTS_DIR / suite).exists():
        raise ImageSourceError(
            f"unknown Debian release {suite!r} (debootstrap has no script for it; "
            f"known examples: bookworm, trixie, bullseye)"
        )


def check_packages(packages: Sequence[str]) -> None:
    for p in packages:
        if not _PKG_RE.fullmatch(p):
            raise ImageSourceError(f"invalid Debian package name {p!r}")


def debootstrap(
    suite: str,
    dest: Path,
    *,
    packages: Sequence[str] = (),
    mirror: str = DEFAULT_MIRROR,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Install a Debian ``suite`` minbase plus ``packages`` into the empty directory ``dest``."""
    proc.require("debootstrap")
    check_suite(suite)
    check_packages(packages)
    if progress:
        extra = f" + {', '.join(packages)}" if packages else ""
        progress(f"debootstrap {suite} minbase{extra} (downloads from {mirror})")
    argv = ["debootstrap", "--variant=minbase"]
    if packages:
        argv.append("--include=" + ",".join(packages))
    argv += [suite, str(dest), mirror]
    try:
        proc.run(argv, what=f"debootstrap {suite}", timeout=3600)
    except HostCommandError as err:
        raise ImageSourceError(_explain(err, dest)) from err
    # apt caches and debootstrap's own leftovers are not part of a template
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        d = dest / leftover
        if d.is_dir():
            for child in d.iterdir():
                if child.is_file() and child.name != "lock":
                    child.unlink()


def _explain(err: HostCommandError, dest: Path) -> str:
    text = err.stderr_tail
    logf = dest / "debootstrap" / "debootstrap.log"
    if logf.exists():
        text += "\n" + logf.read_text("utf-8", "replace")[-2000:]
    m = re.search(r"Couldn't find these debs: (.*)", text)
    if m:
        return f"debootstrap: unknown Debian package(s): {m.group(1).strip()}"
    if "Failed getting release file" in text or "Couldn't download" in text:
        return f"debootstrap: cannot download from the Debian mirror: {proc.tail(text, 600)}"
    if "No space left on device" in text:
        return "debootstrap: disk full (No space left on device)"
    return f"debootstrap failed: {proc.tail(text, 1200)}"


def quick_login(rootfs: Path) -> None:
    """Login shells that run no program: E2B's SDK runs every command in ``bash -l``, and
    Debian's /etc/profile (``$(id -u)``) and root's .profile (``mesg n``) each start one,
    which a TCG-emulated guest pays for on every command. bash knows its ``EUID``; ``mesg``
    only matters on a terminal. Other shells and terminals behave as before."""
    edits = (("etc/profile", '"$(id -u)"', '"${EUID:-$(id -u)}"'),
             ("root/.profile", "mesg n 2> /dev/null || true",
              "if [ -t 0 ]; then mesg n 2> /dev/null || true; fi"))
    for rel, old, new in edits:
        f = rootfs / rel
        if f.is_file() and not f.is_symlink():
            text = f.read_text()
            if old in text:
                f.write_text(text.replace(old, new))

