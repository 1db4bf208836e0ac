"""Interactive terminals: a command on a pseudo-terminal in the guest (``sb.pty()``).

Raw bytes both ways: what is written is what a keyboard sends (``b"\\x03"`` is Ctrl-C,
which the guest's line discipline turns into SIGINT for the foreground job), what comes
out is what the terminal shows, escape sequences included. ``resize`` changes the size
and the guest's programs get SIGWINCH. ``ember shell`` and ``ember exec -it`` are this
class driven by the local terminal (``ember.cli.terminal``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ember.errors import EmberError
from ember.sdk.process import AsyncProcess

#: What ``pty()`` runs by default: the guest's bash, or its sh.
LOGIN_SHELL = "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"


class AsyncPty:
    """A command on a terminal in a sandbox."""

    def __init__(self, proc: AsyncProcess) -> None:
        self._proc = proc
        self.pid = proc.pid

    async def write(self, data: bytes | str) -> None:
        """Keys for the terminal (raw: ``b"\\r"`` is Enter, ``b"\\x03"`` Ctrl-C)."""
        await self._proc.write_stdin(data)

    async def resize(self, rows: int, cols: int) -> None:
        await self._proc.resize(rows, cols)

    async def signal(self, signum: int) -> None:
        await self._proc.signal(signum)

    async def kill(self) -> None:
        await self._proc.kill()

    async def output(self) -> AsyncIterator[bytes]:
        """What the terminal shows, as it comes, until the command ends."""
        async for chunk in self._proc.output():
            yield chunk.data

    async def close(self) -> None:
        """End the session: its command is killed if it still runs."""
        if self._proc.result is None:
            with contextlib.suppress(EmberError):
                await self._proc.kill()

    async def wait(self) -> int:
        """Read the output to the end (discarding it) and return the exit code."""
        async for _ in self.output():
            pass
        result = self._proc.result
        assert result is not None
        return result.exit_code
