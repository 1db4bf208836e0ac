"""One QMP command over a fresh connection, async first and a sync wrapper derived from it.

Each call connects, negotiates, runs one command and disconnects. QEMU's QMP socket
serves one client at a time, so a handle that kept a connection open would block every
other process (a CLI, a supervisor) that wants to talk to the same VM. A call costs a
connect and a greeting round trip on a local socket (about a millisecond).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from ember.errors import EmberTimeoutError, EngineError

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0


async def qmp_execute(
    socket_path: Path,
    cmd: str,
    args: Mapping[str, object] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    who: str = "VM",
) -> Any:
    """Run ``cmd`` on the QMP server at ``socket_path`` and return its ``return`` value."""
    client = QMPClient(who)
    try:
        try:
            await asyncio.wait_for(client.connect(str(socket_path)), timeout)
        except (QMPError, OSError, EOFError) as err:
            raise EngineError(f"{who}: cannot connect to QMP at {socket_path}: {err}") from err
        return await asyncio.wait_for(client.execute(cmd, dict(args) if args else None), timeout)
    except ExecuteError as err:
        raise EngineError(f"{who}: QMP {cmd} failed: {err}") from err
    except TimeoutError as err:
        raise EmberTimeoutError(f"{who}: QMP {cmd} got no answer within {timeout} s") from err
    except (QMPError, OSError, EOFError) as err:
        raise EngineError(f"{who}: QMP {cmd} was interrupted: {err!r}") from err
    finally:
        # A broken connection fails again here; the error raised above says why.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, even inside a running event loop.

    A private loop is used (the thread's current loop, if any, is left untouched); when
    called from a coroutine the work moves to a short-lived thread instead of failing.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_in_private_loop(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_run_in_private_loop, coro).result()


def _run_in_private_loop(coro: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def qmp_execute_sync(
    socket_path: Path,
    cmd: str,
    args: Mapping[str, object] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    who: str = "VM",
) -> Any:
    return run_sync(qmp_execute(socket_path, cmd, args, timeout=timeout, who=who))
