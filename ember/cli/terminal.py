"""The local terminal attached to a sandbox's PTY (``ember shell``, ``ember exec -it``).

The local terminal goes raw (every key, Ctrl-C included, goes to the guest as a byte; the
guest's terminal does the echo and the signals), its size follows SIGWINCH, and the
original mode is restored whatever happens. Works through the public SDK only, in
process or through a daemon alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import termios
import tty
from collections.abc import Sequence

from ember.sdk.async_sandbox import AsyncSandbox
from ember.sdk.pty import AsyncPty

READ_CHUNK = 64 * 1024


def _size() -> tuple[int, int]:
    """The terminal's own size (not COLUMNS/LINES from the environment, which go stale
    on the first resize); the environment's, or 80x24, without a terminal."""
    try:
        cols, rows = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        cols, rows = shutil.get_terminal_size((80, 24))
    return max(1, min(rows, 1000)), max(1, min(cols, 1000))


async def attach(sandbox_id: str, cmd: str | Sequence[str] | None) -> int:
    """Run ``cmd`` (None: a login shell) on a terminal in the sandbox, wired to this one;
    return its exit code."""
    sb = await AsyncSandbox.connect(sandbox_id)
    try:
        rows, cols = _size()
        term = await sb.pty(cmd, rows=rows, cols=cols)
        try:
            return await _pump(term)
        finally:
            await term.close()
    finally:
        await sb.close()


async def _pump(term: AsyncPty) -> int:
    loop = asyncio.get_running_loop()
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    saved = termios.tcgetattr(fd_in) if os.isatty(fd_in) else None
    keys: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)

    def readable() -> None:
        try:
            data = os.read(fd_in, READ_CHUNK)
        except OSError:
            data = b""
        if not data:  # stdin ended (a pipe): stop reading it, the session goes on
            loop.remove_reader(fd_in)
            return
        with contextlib.suppress(asyncio.QueueFull):
            keys.put_nowait(data)

    async def send_keys() -> None:
        while True:
            await term.write(await keys.get())

    resizing: set[asyncio.Task[None]] = set()

    def resized() -> None:
        task = loop.create_task(term.resize(*_size()))
        resizing.add(task)
        task.add_done_callback(resizing.discard)

    if saved is not None:
        tty.setraw(fd_in, termios.TCSANOW)
    loop.add_reader(fd_in, readable)
    loop.add_signal_handler(signal.SIGWINCH, resized)
    sender = loop.create_task(send_keys())
    try:
        async for chunk in term.output():
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd_out, view):]
        return await term.wait()
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        loop.remove_reader(fd_in)
        loop.remove_signal_handler(signal.SIGWINCH)
        if saved is not None:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
