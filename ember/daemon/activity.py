"""What keeps a daemon started on demand from stopping: work in progress.

A daemon started on demand (``--idle-exit``) stops once nothing was left to watch for a
while (:func:`ember.runtime.reaper.supervise`). No sandbox and no pool is not enough to
call it idle: a request may be streaming (a template build's progress, a long upload),
and a template job goes on after its client left. Each holds an :class:`Activity` while
it runs; the supervisor asks :meth:`Activity.busy` before it counts the daemon idle.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class Activity:
    """A thread-safe count of work in progress (requests, background jobs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1

    def busy(self) -> bool:
        with self._lock:
            return self._held > 0
