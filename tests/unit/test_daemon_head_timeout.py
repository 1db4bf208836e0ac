"""A client that dribbles its request head is cut off; a prompt one is served. A real
uvicorn server with the daemon's protocol class, on a Unix socket of the test's own."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
import uvicorn

from ember.daemon import auth


async def _app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def,type-arg]
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _serve_and_probe(path: Path) -> tuple[float, bytes, bytes]:
    async def main() -> tuple[float, bytes, bytes]:
        config = uvicorn.Config(_app, uds=str(path), http=auth.PeerCredH11, lifespan="off",
                                log_config=None, access_log=False, timeout_keep_alive=60)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)

        def probe() -> tuple[float, bytes, bytes]:
            slow = socket.socket(socket.AF_UNIX)
            slow.connect(str(path))
            t0 = time.monotonic()
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            slow.settimeout(0.1)
            got = b""
            while time.monotonic() - t0 < 10:
                try:
                    chunk = slow.recv(1024)
                except TimeoutError:
                    try:
                        slow.sendall(b"X")  # a byte now and then does not keep it alive
                    except OSError:
                        break
                    continue
                except ConnectionResetError:  # closed with our last bytes unread: cut off
                    break
                if not chunk:
                    break
                got += chunk
            took = time.monotonic() - t0
            slow.close()
            ok = socket.socket(socket.AF_UNIX)
            ok.connect(str(path))
            ok.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            ok.settimeout(10)
            answer = ok.recv(1024)
            ok.close()
            return took, got, answer

        try:
            return await asyncio.to_thread(probe)
        finally:
            server.should_exit = True
            await task

    return asyncio.run(main())


def test_a_dribbling_client_is_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "HEAD_TIMEOUT_S", 0.5)
    took, got, answer = _serve_and_probe(tmp_path / "s.sock")
    assert got == b"" and 0.4 < took < 5, (took, got)  # closed, without an answer
    assert answer.startswith(b"HTTP/1.1 200")
