"""The public surface of ember.protocol, pinned; and its isolation from the rest of ember."""

from __future__ import annotations

import ast
from pathlib import Path

import ember.protocol

EXPECTED = {
    "ALL_KINDS", "CONNECT_FRAME_CHARGE", "ERROR_KINDS", "FILE_TYPES", "GUEST_TO_HOST_KINDS",
    "HEADER_SIZE",
    "HOST_TO_GUEST_KINDS", "MAGIC", "MAX_DATA_PAYLOAD", "MAX_ERROR_MESSAGE", "MAX_FRAME_SIZE",
    "MAX_JSON_DEPTH", "MAX_MSG_PAYLOAD", "MAX_STREAM", "MAX_WATCH_BATCH", "PROTOCOL_VERSION",
    "REPLY_OPS", "REQUEST_OPS", "STREAM_CONTROL_OPS", "WATCH_EVENT_TYPES", "ErrorKind", "Frame",
    "FrameDecoder", "Handshake",
    "HelloScanner", "Kind", "Message", "MessageScanner", "ProtocolViolation", "check_reply",
    "check_request", "dump_msg", "encode_frame", "encode_msg", "error", "get_bool", "get_int",
    "get_opt_int", "get_opt_number", "get_opt_str", "get_str", "get_str_list", "get_str_map",
    "hello", "hello_ok", "is_final_reply", "max_payload", "parse_msg",
}  # fmt: skip


def test_public_surface() -> None:
    assert set(ember.protocol.__all__) == EXPECTED
    for name in EXPECTED:
        assert hasattr(ember.protocol, name), name


def _imports(package: str) -> set[str]:
    found = set()
    for path in Path(__file__).parents[2].joinpath("ember", package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return found


def test_protocol_imports_nothing_of_ember() -> None:
    assert not [m for m in _imports("protocol") if m.split(".")[0] == "ember"]


def test_agent_imports_only_the_protocol() -> None:
    assert {m for m in _imports("agent") if m.split(".")[0] == "ember"} <= {"ember.protocol"}
