"""Shared CLI plumbing: logging to the home's log file, error rendering, JSON, progress."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from rich.console import Console

from ember.errors import BadRequestError, EmberError, NotFoundError

err_console = Console(stderr=True)
# Not a terminal (pipes, CI logs): do not wrap tables and messages at 80 columns.
out_console = Console() if sys.stdout.isatty() else Console(width=200, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def exit_code_for(err: EmberError) -> int:
    if isinstance(err, BadRequestError):
        return 2
    if isinstance(err, NotFoundError):
        return 3
    return 1


def handle_errors(fn: F) -> F:
    """Render EmberError as one red line (plus the log path) and a typed exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EmberError as err:
            err_console.print(f"[bold red]error:[/] {type(err).__name__}: {err}",
                              markup=True, highlight=False)
            logging.getLogger("ember.cli").exception("command failed")
            sys.exit(exit_code_for(err))
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextmanager
def progress(enabled: bool, title: str,
             plain: bool = True) -> Iterator[Callable[[str], None]]:
    """A spinner with the latest status line on stderr when it is a terminal; otherwise
    plain lines (``plain``, for long builds) or only the log (for commands whose stderr
    belongs to the user's program, such as ``ember run``)."""
    log = logging.getLogger("ember.progress")
    if not enabled or (not err_console.is_terminal and not plain):
        def quiet(msg: str) -> None:
            log.info("%s", msg)

        yield quiet
        return
    if not err_console.is_terminal:
        def plain_line(msg: str) -> None:
            log.info("%s", msg)
            click.echo(f"{title}: {msg}", err=True)

        yield plain_line
        return
    with err_console.status(title) as status:
        def update(msg: str) -> None:
            log.info("%s", msg)
            status.update(f"{title}: {msg}")

        yield update
