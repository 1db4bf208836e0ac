"""A TCP connection to a port on a guest's loopback, carried by its agent (the agent's
``connect`` op, docs/protocol.md): a guest port is reachable from the host with no network
device, on every isolation tier, through the same channel as commands and files.

Flow control: the agent sends no more than the bytes granted; this side grants more as its
reader consumes, so the stream's queue never holds more than :data:`WINDOW` bytes and a
slow reader holds back the guest's server, not the sandbox's other operations.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ember import protocol as P
from ember.errors import EmberError, PortNotOpenError, ProtocolError
from ember.runtime.agent_client import AgentClient, error_from_reply, reply_of

#: Bytes in flight from the guest at most; each frame costs at least
#: ``CONNECT_FRAME_CHARGE`` of it, so at most 33 frames (and the final reply) are queued,
#: within the stream's queue (``STREAM_QUEUE_FRAMES``): the agent's reader never waits.
WINDOW = 1 << 20
#: How long the agent gets to answer a connect (its own connect gives up after 5 s).
CONNECT_WAIT_S = 15.0


class GuestConnection:
    """One carried connection; :meth:`read` returns ``b""`` once the guest's side ended."""

    def __init__(self, client: AgentClient, sid: int, port: int) -> None:
        self._client = client
        self._sid = sid
        self.port = port
        self._unacked = 0
        self._done = False

    @classmethod
    async def open(cls, client: AgentClient, port: int) -> GuestConnection:
        """Connect to ``port`` on the guest's loopback; :class:`PortNotOpenError`
        when nothing listens there."""
        sid = client.open_stream()
        try:
            await client.send_msg(sid, {"op": "connect", "port": port, "window": WINDOW})
            reply = reply_of(sid, await client.next_frame(sid, CONNECT_WAIT_S))
            if reply["op"] == "error":
                raise _connect_error(reply, port)
            if reply["op"] != "connected":
                raise ProtocolError(f"expected 'connected' from the agent, got {reply['op']!r}")
        except BaseException:
            client.close_stream(sid)
            raise
        return cls(client, sid, port)

    async def read(self) -> bytes:
        """The next bytes the guest's server sent; ``b""`` at its end."""
        if self._done:
            return b""
        frame = await self._client.next_frame(self._sid, None)
        if frame.kind is P.Kind.STDOUT:
            self._unacked += max(len(frame.payload), P.CONNECT_FRAME_CHARGE)
            if self._unacked >= WINDOW // 2:
                grant, self._unacked = self._unacked, 0
                await self._client.send_msg(self._sid, {"op": "credit", "bytes": grant})
            return frame.payload
        reply = reply_of(self._sid, frame)
        self._finish()
        if reply["op"] == "error":
            raise error_from_reply(reply, f"the connection to port {self.port} in the guest")
        if reply["op"] != "closed":
            raise ProtocolError(f"unexpected {reply['op']!r} on a carried connection")
        return b""

    def readable(self) -> bool:
        """Whether a read would not wait (data, the end, or an error is there): an idle
        kept-alive connection that is readable was closed by the guest's server."""
        return self._done or self._client.has_frames(self._sid)

    async def write(self, data: bytes) -> None:
        if data and not self._done:
            await self._client.send_data(self._sid, P.Kind.STDIN, data)

    async def write_eof(self) -> None:
        """No more input: the guest's server reads end of file; its answer still comes."""
        if not self._done:
            await self._client.send_msg(self._sid, {"op": "stdin_eof"})

    async def aclose(self) -> None:
        """Close it (the guest's server sees the connection go) and forget the stream."""
        if not self._done:
            with contextlib.suppress(EmberError):
                await self._client.send_msg(self._sid, {"op": "abort"})
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self._client.close_stream(self._sid)


def _connect_error(reply: dict[str, Any], port: int) -> EmberError:
    text = str(reply.get("message", ""))
    if reply.get("kind") in ("io", "timeout") and (
            "refused" in text.lower() or "no answer" in text.lower()):
        return PortNotOpenError(f"port {port} is not open in the sandbox ({text})")
    return error_from_reply(reply, f"connect to port {port} in the guest")
