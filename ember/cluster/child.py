"""How a daemon asks Ray without becoming a Ray driver: each question runs in a short-lived
child process, ``python -m ember.cluster.<module> ARGS`` (JSON on stdin where it needs
more), which answers with one JSON object on the last line of its stdout and leaves with
``os._exit`` (Ray's client threads never hold anyone waiting). Both sides of that
convention live here: :func:`answer` in the child, :func:`ask` in the daemon.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from ember.errors import HostError
from ember.proc import run

#: How much of an error a child reports (its message, not a traceback).
MAX_ERROR_CHARS = 2000


def answer(compute: Callable[[], dict[str, Any]]) -> NoReturn:
    """The child's side: print what ``compute`` returns, or ``{"error": ...}`` when it
    raises, as one JSON line, and leave at once."""
    try:
        out = compute()
    except Exception as err:  # told to the asking daemon, which raises it
        out = {"error": f"{type(err).__name__}: {err}"[:MAX_ERROR_CHARS]}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)


def ask(module: str, *args: str, what: str, timeout: float, stdin: bytes | None = None,
        error_is_failure: bool = True) -> dict[str, Any]:
    """The daemon's side: run ``python -m ember.cluster.<module> ARGS`` (killed past
    ``timeout``) and return its JSON object. :class:`HostError` naming ``what`` when the
    child fails, answers no JSON object, or (with ``error_is_failure``) answers an error."""
    out = run([sys.executable, "-m", f"ember.cluster.{module}", *args], input=stdin,
              what=what, timeout=timeout)
    try:
        got = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as err:
        raise HostError(f"{what} failed: no answer ({err})") from err
    if not isinstance(got, dict):
        raise HostError(f"{what} answered {str(got)[:200]}")
    if error_is_failure and "error" in got:
        raise HostError(f"{what} failed: {str(got['error'])[:MAX_ERROR_CHARS]}")
    return got


__all__ = ("answer", "ask")
