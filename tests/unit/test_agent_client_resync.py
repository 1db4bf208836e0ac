"""A client that died mid-frame leaves the agent's decoder inside that frame when the agent
did not see it go (a virtio port reconnected at once). ``resync=True`` recovers; without
it the next hello would be eaten as the dead frame's payload (the integration test
``test_kill_recovery`` hits that with a real guest)."""

from __future__ import annotations

import asyncio
import socket

from ember.protocol import MAX_DATA_PAYLOAD, Kind, encode_frame
from ember.runtime.agent_client import AgentClient

from .test_agent_harness import AgentHarness


def _dead_client_left_half_a_frame(agent: AgentHarness) -> None:
    agent.handshake(7)
    frame = encode_frame(Kind.STDIN, 1, b"x" * MAX_DATA_PAYLOAD)
    agent.send_raw(frame[: len(frame) // 3])  # the client was killed here


async def _connect(sock: socket.socket, *, resync: bool, timeout: float) -> AgentClient:
    reader, writer = await asyncio.open_connection(sock=sock)
    return await AgentClient.over(reader, writer, timeout=timeout, resync=resync)


def test_reconnect_after_a_client_died_mid_frame() -> None:
    agent = AgentHarness()
    _dead_client_left_half_a_frame(agent)
    host = agent.host.dup()

    async def main() -> None:
        client = await _connect(host, resync=True, timeout=10.0)
        try:
            reply = await client.request({"op": "ping"}, timeout=5.0, what="ping")
            assert reply["op"] == "pong"
        finally:
            await client.close()

    asyncio.run(main())
    agent.host.close()
    agent.guest.close()
