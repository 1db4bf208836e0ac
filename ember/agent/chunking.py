"""Split a long listing into several replies that each fit one MSG frame."""

from __future__ import annotations

import json

from ember.protocol import MAX_MSG_PAYLOAD, Message

BUDGET = MAX_MSG_PAYLOAD - 1024
"""Bytes of items per reply; the rest is room for the envelope."""


def chunked(op: str, key: str, items: list[Message], budget: int = BUDGET) -> list[Message]:
    """``{op, key: [...], more}`` replies; every one but the last has ``more: true``."""
    replies: list[Message] = []
    current: list[Message] = []
    size = 0
    for item in items:
        length = len(json.dumps(item, ensure_ascii=False).encode("utf-8", "replace")) + 1
        if current and size + length > budget:
            replies.append({"op": op, key: current, "more": True})
            current, size = [], 0
        current.append(item)
        size += length
    replies.append({"op": op, key: current, "more": False})
    return replies
