"""Where ember keeps its state: one root directory (``EMBER_HOME``) and a shareable cache.

Layout under ``EMBER_HOME`` (default ``/var/lib/ember`` for root, else
``~/.local/share/ember``)::

    ember.db            SQLite registry (templates, sandboxes, snapshots, pools)
    sandboxes/<id>/     per-sandbox overlay, sockets, console log, pid file
    snapshots/<digest>/ content-addressed snapshots (device state, RAM, disk, manifest)
    logs/ember.log      ember's own log
    tmp/                staging area (same filesystem, for atomic renames)

Heavy artifacts (kernels, template base images) live in the cache, ``EMBER_CACHE``
(default ``$EMBER_HOME/cache``), keyed by content hash so that several homes (tests, users)
can share one cache.

A booted sandbox's guest RAM is a file in a per-home directory on tmpfs (``EMBER_RAM_DIR``,
default ``/dev/shm/ember-<hash of EMBER_HOME>``), so that a snapshot can copy it and
restored clones can map the copy privately (copy-on-write) instead of loading it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


def _default_home() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/ember")
    return Path.home() / ".local" / "share" / "ember"


@dataclass(frozen=True)
class Paths:
    home: Path
    cache: Path
    ram: Path

    def __init__(self, home: Path, cache: Path, ram: Path | None = None) -> None:
        object.__setattr__(self, "home", home)
        object.__setattr__(self, "cache", cache)
        key = hashlib.sha256(os.fsencode(home)).hexdigest()[:12]
        object.__setattr__(self, "ram", ram or Path("/dev/shm") / f"ember-{key}")

    @classmethod
    def from_env(cls) -> Paths:
        home = Path(os.environ.get("EMBER_HOME") or _default_home()).absolute()
        cache = Path(os.environ.get("EMBER_CACHE") or home / "cache").absolute()
        ram = os.environ.get("EMBER_RAM_DIR")
        return cls(home=home, cache=cache, ram=Path(ram).absolute() if ram else None)

    def ensure_ram(self) -> Path:
        """The guest-RAM directory, created on first use (not by :meth:`ensure`: most
        commands never boot a guest)."""
        self.ram.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.ram

    @property
    def snapshots(self) -> Path:
        return self.home / "snapshots"

    @property
    def db(self) -> Path:
        return self.home / "ember.db"

    @property
    def sandboxes(self) -> Path:
        return self.home / "sandboxes"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    @property
    def daemon_socket(self) -> Path:
        """The daemon's API socket (docs/daemon.md)."""
        return self.home / "emberd.sock"

    @property
    def daemon_lock(self) -> Path:
        """Held by the home's daemon while it runs (its pid inside)."""
        return self.home / "emberd.lock"

    @property
    def kernels(self) -> Path:
        return self.cache / "kernels"

    @property
    def images(self) -> Path:
        return self.cache / "images"

    @property
    def cache_tmp(self) -> Path:
        """Staging directory on the cache's filesystem, for atomic renames into the cache."""
        return self.cache / "tmp"

    def ensure(self) -> Paths:
        for d in (self.home, self.sandboxes, self.snapshots, self.logs, self.tmp, self.kernels,
                  self.images, self.cache_tmp):
            d.mkdir(parents=True, exist_ok=True)
        return self
