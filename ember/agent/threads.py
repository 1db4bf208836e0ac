"""Worker threads of the agent, and its log."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable


def start_thread(name: str, target: Callable[[], None]) -> threading.Thread:
    """Start a daemon thread with SIGIO unblocked (the reader thread blocks it for
    ``sigtimedwait``; programs exec'd from this thread must not inherit that mask)."""

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGIO})
        try:
            target()
        except BaseException as exc:  # a worker must not die silently
            log(f"thread {name} failed: {exc!r}")

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def log(message: str) -> None:
    """One line on the agent's stderr (the guest console); never raises."""
    with contextlib.suppress(OSError):
        os.write(2, f"ember-agent: {message}\n".encode(errors="replace"))
