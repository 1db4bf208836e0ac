"""emberd: one daemon per ember home owns its sandboxes and serves them over HTTP.

The API layer only translates requests into calls on the runtime (as Firecracker's API
server does): ``models`` validates what comes in, ``live`` holds the agent connections
and background processes the daemon owns, ``app`` maps routes onto them, ``streams``
encodes command output as NDJSON, ``server`` binds the socket and runs uvicorn, and
``control`` starts, stops and finds a daemon from another process.
"""

from __future__ import annotations

API_VERSION = "v1"

__all__ = ["API_VERSION"]
