"""The STDIN of one exec: a bounded buffer, written to the pipe by its own thread."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time

from .threads import log

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at runtime: typing is slow to import on a TCG guest
    from typing import Protocol

    class Sink(Protocol):
        """Where the input goes: a pipe, or a carried connection's sending side."""

        def fileno(self) -> int: ...

        def close(self) -> None: ...

STDIN_BUFFER = 8 << 20
"""Bytes of STDIN buffered per exec. When it is full the agent stops reading the channel
until the program consumes its input, exits, or the session ends ..."""
STDIN_STALL = 30.0
"""... but for no longer than this: then that exec's further input is dropped (and its
stdin closed), so that one stuck program cannot wedge the agent."""


class StdinFeed:
    def __init__(self, limit: int = STDIN_BUFFER, stall: float = STDIN_STALL) -> None:
        self._limit = limit
        self._stall = stall
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._closed = False

    def put(self, data: bytes) -> None:
        """Queue data (blocks while the buffer is full); dropped after eof or abandon."""
        with self._cond:
            deadline = time.monotonic() + self._stall
            while self._size >= self._limit and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log(f"a program left {self._size} bytes of stdin unread; dropping the rest")
                    self._drop()
                    return
                self._cond.wait(remaining)
            if self._closed or self._eof or not data:
                return
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify_all()

    def finish(self) -> None:
        """No more data: the pipe is closed once the buffer is written."""
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def abandon(self) -> None:
        """Drop buffered data, accept no more, and close the pipe soon."""
        with self._cond:
            self._drop()

    def _drop(self) -> None:
        self._closed = True
        self._chunks.clear()
        self._size = 0
        self._cond.notify_all()

    def pump(self, pipe: Sink) -> None:
        """Thread body: write queued data to ``pipe`` until eof, abandon or EPIPE."""
        fd = pipe.fileno()
        try:
            while True:
                with self._cond:
                    while not (self._chunks or self._eof or self._closed):
                        self._cond.wait()
                    if self._closed or not self._chunks:
                        return
                    chunk = self._chunks.popleft()
                    self._size -= len(chunk)
                    self._cond.notify_all()
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        except OSError:  # the program closed its stdin or exited
            self.abandon()
        finally:
            with contextlib.suppress(OSError):
                pipe.close()
