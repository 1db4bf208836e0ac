"""Where ember keeps its state: one root directory (``EMBER_HOME``) and a shareable cache.

Layout under ``EMBER_HOME`` (default ``/var/lib/ember`` for root, else
``~/.local/share/ember``)::

    ember.db            SQLite registry (templates, sandboxes)
    sandboxes/<id>/     per-sandbox overlay, sockets, console log, pid file
    logs/ember.log      ember's own log
    tmp/                staging area (same filesystem, for atomic renames)

Heavy artifacts (kernels, template base images) live in the cache, ``EMBER_CACHE``
(default ``$EMBER_HOME/cache``), keyed by content hash so that several homes (tests, users)
can share one cache.
"""

from __future__ import annotations

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

    @classmethod
    def from_env(cls) -> Paths:
        home = Path(os.environ.get("EMBER_HOME") or _default_home()).absolute()
        cache = Path(os.environ.get("EMBER_CACHE") or home / "cache").absolute()
        return cls(home=home, cache=cache)

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
        for d in (self.home, self.sandboxes, self.logs, self.tmp, self.kernels, self.images,
                  self.cache_tmp):
            d.mkdir(parents=True, exist_ok=True)
        return self
