"""``sandbox.files``: move files in and out of a sandbox, streamed in bounded chunks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ember import protocol as P
from ember.errors import BadRequestError, GuestError, ProtocolError
from ember.runtime.agent_client import AgentClient, error_from_reply, reply_of
from ember.sdk.results import EntryInfo
from ember.sdk.watch import AsyncWatch, watch_agent

FILE_TIMEOUT_S = 120.0
#: The most a ``read`` that returns bytes will accept; larger files: ``download``.
MAX_READ_BYTES = 1 << 30


def _check_path(path: str) -> str:
    if not isinstance(path, str) or not path or "\0" in path:
        raise BadRequestError(f"invalid guest path {path!r}")
    if not path.startswith("/"):
        raise BadRequestError(f"guest paths must be absolute, got {path!r}")
    return path


class AsyncFiles:
    """File operations on one sandbox (all paths are absolute guest paths)."""

    def __init__(self, client_getter: Any) -> None:
        self._get = client_getter

    @property
    def _client(self) -> AgentClient:
        client: AgentClient = self._get()
        return client

    async def _req(self, what: str, **msg: Any) -> dict[str, Any]:
        return await self._client.request(msg, timeout=FILE_TIMEOUT_S, what=what)

    # --- streaming -----------------------------------------------------------------------
    async def read_chunks(self, path: str, *, limit: int | None = None) -> AsyncIterator[bytes]:
        """Yield the content of a guest file in chunks as they arrive."""
        client = self._client
        sid = client.open_stream()
        what = f"read path {path!r}"
        try:
            await client.send_msg(sid, {"op": "read", "path": _check_path(path)})
            head = await client.next_frame(sid, FILE_TIMEOUT_S)
            msg = reply_of(sid, head)
            if msg["op"] == "error":
                raise error_from_reply(msg, what)
            if msg["op"] != "file":
                raise ProtocolError(f"expected 'file' from the agent, got {msg['op']!r}")
            got = 0
            while True:
                frame = await client.next_frame(sid, FILE_TIMEOUT_S)
                if frame.kind == P.Kind.FILEDATA:
                    got += len(frame.payload)
                    if limit is not None and got > limit:
                        raise BadRequestError(
                            f"{path} is larger than {limit} bytes: use download() instead")
                    yield frame.payload
                    continue
                end = reply_of(sid, frame)
                if end["op"] == "eof":
                    return
                if end["op"] == "error":
                    raise error_from_reply(end, what)
                raise ProtocolError(f"unexpected {end['op']!r} while reading {path}")
        finally:
            client.close_stream(sid)

    async def write_chunks(self, path: str, chunks: AsyncIterator[bytes], *, mode: int = 0o644,
                           append: bool = False) -> int:
        """Write chunks to a guest file (created or truncated); return the bytes written."""
        if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise BadRequestError(f"invalid file mode {mode!r}")
        client = self._client
        sid = client.open_stream()
        what = f"write path {path!r}"
        try:
            await client.send_msg(sid, {"op": "write", "path": _check_path(path), "mode": mode,
                                        "append": append})
            try:
                async for chunk in chunks:
                    if chunk:
                        await client.send_data(sid, P.Kind.FILEDATA, chunk)
            except BaseException:  # the data stopped coming: the guest drops what it has
                with contextlib.suppress(Exception):
                    await client.send_msg(sid, {"op": "abort"})
                raise
            await client.send_msg(sid, {"op": "eof"})
            frame = await client.next_frame(sid, FILE_TIMEOUT_S)
            msg = reply_of(sid, frame)
            if msg["op"] == "error":
                raise error_from_reply(msg, what)
            if msg["op"] != "ok" or not isinstance(msg.get("size"), int):
                raise ProtocolError(f"unexpected reply {msg['op']!r} to write")
            return int(msg["size"])
        finally:
            client.close_stream(sid)

    # --- whole files ---------------------------------------------------------------------
    async def read(self, path: str) -> bytes:
        parts = [c async for c in self.read_chunks(path, limit=MAX_READ_BYTES)]
        return b"".join(parts)

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> int:
        payload = data.encode() if isinstance(data, str) else bytes(data)

        async def gen() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), P.MAX_DATA_PAYLOAD):
                yield payload[i:i + P.MAX_DATA_PAYLOAD]

        return await self.write_chunks(path, gen(), mode=mode)

    async def download(self, path: str, local: str | os.PathLike[str]) -> int:
        """Copy a guest file to a local path (written atomically); return its size."""
        dest = Path(local)
        tmp = dest.with_name(f".{dest.name}.ember-partial")
        size = 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in self.read_chunks(path):
                    f.write(chunk)
                    size += len(chunk)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    async def upload(self, local: str | os.PathLike[str], path: str, *,
                     mode: int | None = None) -> int:
        """Copy a local file into the guest; return its size."""
        src = Path(local)
        if not src.is_file():
            raise BadRequestError(f"local file {src} does not exist")
        file_mode = mode if mode is not None else src.stat().st_mode & 0o7777

        async def gen() -> AsyncIterator[bytes]:
            with open(src, "rb") as f:
                while chunk := f.read(P.MAX_DATA_PAYLOAD):
                    yield chunk

        return await self.write_chunks(path, gen(), mode=file_mode)

    # --- metadata ------------------------------------------------------------------------
    async def list(self, path: str) -> list[EntryInfo]:
        msg = await self._req(f"list path {path!r}", op="list", path=_check_path(path))
        entries = msg.get("entries")
        if not isinstance(entries, list):
            raise ProtocolError("list_result without entries")
        base = path.rstrip("/") or ""
        return [EntryInfo.from_msg(e, f"{base}/{e.get('name', '')}") for e in entries
                if isinstance(e, dict)]

    async def stat(self, path: str) -> EntryInfo:
        msg = await self._req(f"stat path {path!r}", op="stat", path=_check_path(path))
        return EntryInfo.from_msg(msg, path)

    async def exists(self, path: str) -> bool:
        from ember.errors import NotFoundError

        try:
            await self.stat(path)
        except NotFoundError:
            return False
        return True

    async def mkdir(self, path: str, *, parents: bool = True) -> None:
        await self._req(f"mkdir path {path!r}", op="mkdir", path=_check_path(path),
                        parents=parents)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._req(f"remove path {path!r}", op="remove", path=_check_path(path),
                        recursive=recursive)

    async def rename(self, src: str, dst: str) -> None:
        await self._req(f"rename path {src!r}", op="rename", src=_check_path(src),
                        dst=_check_path(dst))

    # --- changes -------------------------------------------------------------------------
    async def watch(self, path: str, *, recursive: bool = False) -> AsyncWatch:
        """Watch the directory ``path`` (and, ``recursive``, every directory below it,
        those made later too) for changes: returns once the watch is set up (a missing
        directory raises :class:`~ember.errors.GuestPathNotFoundError`); iterate over it
        for :class:`~ember.sdk.watch.FsEvent` s, close it to stop."""
        if not isinstance(recursive, bool):
            raise BadRequestError(f"recursive must be a boolean, not {recursive!r}")
        return await watch_agent(self._client, _check_path(path), recursive)


__all__ = ["AsyncFiles", "GuestError"]
