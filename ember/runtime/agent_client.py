"""Host side of the agent protocol over one connection (asyncio).

Every byte from the guest is hostile: frames are decoded by the bounded, I/O-free
:mod:`ember.protocol` core; each stream's queue is bounded (a slow consumer slows the
guest down instead of growing host memory); every wait has a deadline. A protocol
violation or a lost connection fails every pending operation with :class:`GuestError`
and calls ``on_broken`` once, so that the owner can mark the sandbox failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ember import protocol as P
from ember.agent import AGENT_VERSION
from ember.errors import (
    BadRequestError,
    EmberError,
    EmberTimeoutError,
    GuestError,
    GuestPathNotFoundError,
    NotFoundError,
    ProtocolError,
    SandboxStateError,
)

STREAM_QUEUE_FRAMES = 64
#: A lossy stream (a command's output, which nobody may be reading) buffers at most this
#: much data; beyond it data frames are dropped (and counted) instead of stalling the
#: connection for every other operation.
LOSSY_STREAM_BYTES = 8 << 20
#: ... and at most this many data frames, whatever their size: each one costs the host about
#: 150 bytes besides its payload, even an empty one, which costs the guest 12 bytes. The
#: bound only bites on frames averaging under 1 KiB; it adds at most ~1.2 MiB to the above.
LOSSY_STREAM_FRAMES = LOSSY_STREAM_BYTES // 1024
#: Messages on one lossy stream are few (started, exit); more than this many waiting to be
#: read is a hostile guest.
LOSSY_STREAM_MSGS = 256
#: The most payload a reply to :meth:`AgentClient.request` may total over all its parts
#: (``more: true``); about 150,000 directory entries.
REQUEST_REPLY_BYTES = 16 << 20
READ_CHUNK = 256 * 1024
#: Bytes that complete any partial frame a dead client left in the agent's decoder and
#: then break its framing (no valid magic), so that it goes back to scanning for a hello.
RESYNC_PAD = bytes(P.MAX_FRAME_SIZE)
#: How often a caller waiting on the guest checks that the sandbox is still there to answer.
WATCH_INTERVAL_S = 2.0


def error_from_reply(msg: dict[str, Any], what: str) -> EmberError:
    kind = str(msg.get("kind", "internal"))[:32]
    text = str(msg.get("message", ""))[:2000]
    full = f"{what}: {text}" if text else f"{what}: {kind}"
    if kind == "not_found":
        return GuestPathNotFoundError(full) if "path" in what else NotFoundError(full)
    if kind in ("bad_request", "exists", "not_a_directory", "is_a_directory", "permission"):
        return BadRequestError(full + f" ({kind})")
    if kind == "timeout":
        return EmberTimeoutError(full)
    return GuestError(full + f" ({kind})")


@dataclass
class _Stream:
    queue: asyncio.Queue[P.Frame | BaseException]
    lossy: bool = False
    # what is queued, and what was dropped, on a lossy stream:
    buffered: int = 0  # data bytes queued
    data_frames: int = 0  # data frames queued
    msgs: int = 0  # MSG frames queued
    dropped: int = 0  # data bytes dropped

    def add(self, frame: P.Frame) -> None:
        """Account for ``frame`` entering the queue (lossy streams)."""
        if frame.kind is P.Kind.MSG:
            self.msgs += 1
        else:
            self.data_frames += 1
            self.buffered += len(frame.payload)

    def remove(self, frame: P.Frame) -> None:
        """Account for ``frame`` leaving the queue (lossy streams)."""
        if frame.kind is P.Kind.MSG:
            self.msgs -= 1
        else:
            self.data_frames -= 1
            self.buffered -= len(frame.payload)


class AgentClient:
    """One session with a guest agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_broken: Callable[[str], str | None] | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self._on_broken = on_broken
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.broken: str | None = None
        #: Asked every :data:`WATCH_INTERVAL_S` while a caller waits on the guest: a reason
        #: the sandbox cannot answer (paused, destroyed elsewhere), or None to keep waiting.
        self.watch: Callable[[], str | None] | None = None
        self.hello: dict[str, Any] = {}
        self._decoder = P.FrameDecoder(P.GUEST_TO_HOST_KINDS)

    # --- connection ----------------------------------------------------------------------
    @classmethod
    async def connect(cls, socket_path: str, *, timeout: float,
                      on_broken: Callable[[str], str | None] | None = None,
                      hostname: str | None = None, resync: bool = False) -> AgentClient:
        """Connect to the agent socket and complete the hello within ``timeout`` seconds.

        ``resync``: the agent has been serving (another client may have died mid-frame, and
        the agent may not have seen it go): if the first hello goes unanswered, send one
        frame's worth of padding so that the agent's decoder finishes the dead client's
        frame, fails on the padding and scans for our hello again.

        The hello carries the host's clock, fresh entropy for the guest's kernel RNG and,
        if given, the hostname the guest must have (a restored clone takes them on).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(socket_path, limit=READ_CHUNK), timeout)
        except (OSError, TimeoutError) as err:
            raise GuestError(f"cannot connect to the agent socket {socket_path}: {err}") from err
        return await cls.over(reader, writer, timeout=max(0.0, deadline - loop.time()),
                              on_broken=on_broken, hostname=hostname, resync=resync)

    @classmethod
    async def over(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                   timeout: float,
                   on_broken: Callable[[str], str | None] | None = None,
                   hostname: str | None = None, resync: bool = False) -> AgentClient:
        """Run the hello over an already open stream (any transport)."""
        client = cls(reader, writer, on_broken)
        try:
            await client._handshake(asyncio.get_running_loop().time() + timeout, hostname,
                                    resync)
        except BaseException:
            await client.close()
            raise
        return client

    async def _handshake(self, deadline: float, hostname: str | None,
                         resync: bool = False) -> None:
        loop = asyncio.get_running_loop()
        nonce = secrets.randbelow(1 << 62)
        scanner = P.HelloScanner(nonce, kinds=P.GUEST_TO_HOST_KINDS)
        request: dict[str, Any] = {"op": "hello", "version": P.PROTOCOL_VERSION, "nonce": nonce,
                                   "time": time.time(), "entropy": secrets.token_hex(32)}
        if hostname is not None:
            request["hostname"] = hostname
        try:  # the agent would answer a bad hello and then ignore everything that follows
            P.check_request(0, request)
        except P.ProtocolViolation as err:
            raise BadRequestError(f"cannot greet the guest agent: {err}") from err
        hello = P.encode_msg(0, request)
        # The agent may still be booting, or may have missed a hello sent while it was not
        # yet reading: repeat the hello until an answer arrives.
        next_send = 0.0
        sent = 0
        while True:
            now = loop.time()
            if now >= deadline:
                raise EmberTimeoutError("the guest agent did not answer the hello in time")
            try:
                if now >= next_send:
                    if resync and sent == 1:
                        self._writer.write(RESYNC_PAD)
                    self._writer.write(hello)
                    await asyncio.wait_for(self._writer.drain(), max(0.01, deadline - now))
                    next_send = now + 1.0
                    sent += 1
                data = await asyncio.wait_for(self._reader.read(READ_CHUNK),
                                              min(next_send, deadline) - now)
            except TimeoutError:
                continue
            except (OSError, ConnectionError) as err:
                raise GuestError(f"lost the agent connection during the hello (the VM "
                                 f"stopped?): {err}") from err
            if not data:
                raise GuestError("the guest agent closed the connection during the hello")
            try:
                found = scanner.feed(data)
            except P.ProtocolViolation as err:
                raise ProtocolError(f"guest agent broke the protocol in its hello: {err}") from err
            if found is not None:
                break
        self.hello = dict(found.message)
        agent = str(self.hello.get("agent", ""))[:64]
        if agent != AGENT_VERSION:
            raise GuestError(f"the guest runs ember agent {agent!r} but this ember needs "
                             f"{AGENT_VERSION!r}: the template was built by another ember "
                             "version; rebuild it with `ember image build NAME --force`")
        self._decoder = found.decoder
        self._task = asyncio.create_task(self._read_loop(found.frames))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            self._writer.close()
            await self._writer.wait_closed()
        self._fail_all(GuestError("connection to the guest agent closed"))

    # --- reading -------------------------------------------------------------------------
    async def _read_loop(self, first: list[P.Frame]) -> None:
        try:
            for f in first:
                await self._route(f)
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    self._break("the guest closed the agent connection (the VM died or "
                                "the agent crashed)")
                    return
                for f in self._decoder.feed(data):
                    await self._route(f)
        except P.ProtocolViolation as err:
            self._break(f"the guest agent broke the protocol: {err}")
        except (OSError, ConnectionError) as err:
            self._break(f"lost the agent connection (the VM died or the agent crashed): {err}")

    async def _route(self, frame: P.Frame) -> None:
        st = self._streams.get(frame.stream)
        if st is None:
            return  # late output of a finished or abandoned operation: dropped, bounded
        if not st.lossy:
            # Backpressure: its consumer is reading. Should it close the stream instead,
            # close_stream() empties the queue, which lets this put() finish.
            await st.queue.put(frame)
            return
        if frame.kind is P.Kind.MSG:
            if st.msgs >= LOSSY_STREAM_MSGS:
                raise P.ProtocolViolation("the guest flooded an operation with messages")
        elif (st.data_frames >= LOSSY_STREAM_FRAMES
              or st.buffered + len(frame.payload) > LOSSY_STREAM_BYTES):
            st.dropped += len(frame.payload)
            return
        st.add(frame)
        st.queue.put_nowait(frame)

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why  # set first: on_broken may look at the client
            better = self._on_broken(why) if self._on_broken is not None else None
            if better:
                self.broken = f"{better} ({why})"
            self._fail_all(ProtocolError(self.broken) if "protocol" in why
                           else GuestError(self.broken))

    def _fail_all(self, err: BaseException) -> None:
        for st in self._streams.values():
            with contextlib.suppress(asyncio.QueueFull):
                st.queue.put_nowait(err)

    # --- writing -------------------------------------------------------------------------
    def open_stream(self, *, lossy: bool = False) -> int:
        if self.broken is not None:
            raise GuestError(f"the sandbox's agent connection is broken: {self.broken}")
        sid = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        queue: asyncio.Queue[P.Frame | BaseException] = asyncio.Queue(
            0 if lossy else STREAM_QUEUE_FRAMES)
        self._streams[sid] = _Stream(queue, lossy)
        return sid

    def dropped_bytes(self, sid: int) -> int:
        """Output bytes a lossy stream dropped because nobody consumed them in time."""
        st = self._streams.get(sid)
        return st.dropped if st is not None else 0

    def has_frames(self, sid: int) -> bool:
        """Whether the stream has something to take now (a closed one: its error)."""
        st = self._streams.get(sid)
        return st is None or not st.queue.empty() or self.broken is not None

    def close_stream(self, sid: int) -> None:
        """Forget the stream: its later frames are dropped, and what it had queued is freed.

        Emptying the queue also releases the reader if it waits to put a frame into it
        (a full queue whose consumer gave up): it must never wait for a closed stream.
        """
        st = self._streams.pop(sid, None)
        if st is not None:
            while not st.queue.empty():
                st.queue.get_nowait()  # wakes a put() waiting for room

    async def send_msg(self, sid: int, msg: dict[str, Any]) -> None:
        await self._send(P.encode_msg(sid, msg))

    async def send_data(self, sid: int, kind: P.Kind, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, max(len(view), 1), P.MAX_DATA_PAYLOAD):
            await self._send(P.encode_frame(kind, sid, bytes(view[i:i + P.MAX_DATA_PAYLOAD])))

    async def _send(self, frame: bytes) -> None:
        if self.broken is not None:
            raise GuestError(f"the sandbox's agent connection is broken: {self.broken}")
        async with self._write_lock:
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except (OSError, ConnectionError) as err:
                self._break(f"lost the agent connection (the VM died or the agent crashed): "
                            f"{err}")
                raise GuestError(self.broken or str(err)) from err

    async def next_frame(self, sid: int, timeout: float | None) -> P.Frame:
        frame = await self._take(sid, timeout)
        if frame is None:
            raise self._stopped_answering(timeout)
        return frame

    async def _take(self, sid: int, timeout: float | None) -> P.Frame | None:
        """The stream's next frame, or None if none came within ``timeout`` seconds."""
        st = self._streams.get(sid)
        if st is None:
            raise GuestError("operation stream already closed")
        if st.queue.empty():
            if self.broken is not None:
                # the error that closed the stream may not have fitted in a full queue
                raise GuestError(f"the sandbox's agent connection is broken: {self.broken}")
            if timeout is not None and timeout <= 0:
                return None  # a deadline already past (request()'s last part)
            item = await self._wait(st, timeout)
            if item is None:
                return None
        else:
            item = st.queue.get_nowait()
        if isinstance(item, BaseException):
            raise item
        if st.lossy:
            st.remove(item)
        return item

    async def _wait(self, st: _Stream, timeout: float | None) -> P.Frame | BaseException | None:
        """The stream's next item within ``timeout`` (None: no limit), asking :attr:`watch`
        every few seconds meanwhile; None on timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            if self.watch is None:
                step = left
            else:
                step = WATCH_INTERVAL_S if left is None else min(left, WATCH_INTERVAL_S)
            try:
                return await asyncio.wait_for(st.queue.get(), step)
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    return None
            why = await asyncio.to_thread(self.watch) if self.watch is not None else None
            if why:
                raise SandboxStateError(why)

    def _stopped_answering(self, timeout: float | None) -> EmberTimeoutError:
        """Break the session: a guest that missed a wait it had to meet stopped answering.

        Every bounded wait is one the guest must meet (replies, command ends past their own
        timeout, file data).
        """
        why = f"the guest agent stopped answering (nothing within {timeout} s)"
        self._break(why)
        return EmberTimeoutError(why)

    # --- simple request/response ---------------------------------------------------------
    async def request(self, msg: dict[str, Any], *, timeout: float | None = 30.0,
                      what: str = "") -> dict[str, Any]:
        """Send one request and return its final reply (raising typed errors for ``error``).

        ``timeout`` bounds the whole exchange, however many parts the reply comes in. No
        reply at all within it breaks the session (the guest stopped answering); a reply
        still unfinished at it (endless ``more: true``), or whose parts total more than
        ``REQUEST_REPLY_BYTES``, fails this request only: its later parts are dropped.
        """
        sid = self.open_stream()
        try:
            await self.send_msg(sid, msg)
            return await self._reply(sid, timeout, what or str(msg["op"]))
        finally:
            self.close_stream(sid)

    async def _reply(self, sid: int, timeout: float | None, what: str) -> dict[str, Any]:
        """Take the parts of a reply until the final one, within ``timeout`` in all."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        merged: dict[str, Any] | None = None
        parts = size = 0
        while True:
            wait = None if deadline is None else deadline - loop.time()
            frame = await self._take(sid, wait)
            if frame is None and merged is None:
                raise self._stopped_answering(timeout)
            if frame is None:
                raise EmberTimeoutError(f"{what}: the guest agent did not finish its reply "
                                        f"within {timeout} s (sent {parts} parts)")
            size += len(frame.payload)
            if size > REQUEST_REPLY_BYTES:
                raise GuestError(f"{what}: the guest agent's reply exceeds "
                                 f"{REQUEST_REPLY_BYTES} bytes (after {parts} parts)")
            reply = reply_of(sid, frame)
            if reply["op"] == "error":
                raise error_from_reply(reply, what)
            merged = merge_reply(merged, reply)
            parts += 1
            if P.is_final_reply(reply):
                return merged


_PARTED = ("entries", "processes")


def merge_reply(merged: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """A long listing arrives in parts ("more": true on all but the last): concatenate.

    The lists are extended in place (copied from the first part), so merging stays linear in
    the number of parts, which the guest chooses.
    """
    if merged is None:
        return {k: list(v) if k in _PARTED and isinstance(v, list) else v
                for k, v in part.items()}
    for key in _PARTED:
        if isinstance(part.get(key), list) and isinstance(merged.get(key), list):
            merged[key].extend(part[key])
    return merged


def reply_of(sid: int, frame: P.Frame) -> dict[str, Any]:
    """The frame's message, validated against the reply schema (hostile guest input)."""
    if frame.kind != P.Kind.MSG:
        raise ProtocolError(f"expected a message from the guest agent, got a {frame.kind.name} "
                            "frame")
    try:
        msg = frame.msg()
        P.check_reply(sid, msg)
    except P.ProtocolViolation as err:
        raise ProtocolError(f"invalid reply from the guest agent: {err}") from err
    return dict(msg)
