"""The agent wire protocol (docs/protocol.md): frames, messages, schema. No I/O, stdlib only.

Shared by the host (ember.runtime) and the guest agent (ember.agent), so this package
imports nothing else of ember.
"""

from __future__ import annotations

from .errors import ProtocolViolation
from .fields import (
    get_bool,
    get_int,
    get_opt_int,
    get_opt_number,
    get_opt_str,
    get_str,
    get_str_list,
    get_str_map,
)
from .frames import Frame, FrameDecoder, encode_frame, encode_msg
from .jsonmsg import Message, dump_msg, parse_msg
from .limits import (
    ALL_KINDS,
    CONNECT_FRAME_CHARGE,
    ERROR_KINDS,
    FILE_TYPES,
    GUEST_TO_HOST_KINDS,
    HEADER_SIZE,
    HOST_TO_GUEST_KINDS,
    MAGIC,
    MAX_DATA_PAYLOAD,
    MAX_FRAME_SIZE,
    MAX_JSON_DEPTH,
    MAX_MSG_PAYLOAD,
    MAX_STREAM,
    MAX_WATCH_BATCH,
    PROTOCOL_VERSION,
    WATCH_EVENT_TYPES,
    ErrorKind,
    Kind,
    max_payload,
)
from .messages import MAX_ERROR_MESSAGE, error, hello, hello_ok
from .scanner import Handshake, HelloScanner, MessageScanner
from .schema import (
    REPLY_OPS,
    REQUEST_OPS,
    STREAM_CONTROL_OPS,
    check_reply,
    check_request,
    is_final_reply,
)

__all__ = [
    "ALL_KINDS",
    "CONNECT_FRAME_CHARGE",
    "ERROR_KINDS",
    "FILE_TYPES",
    "GUEST_TO_HOST_KINDS",
    "HEADER_SIZE",
    "HOST_TO_GUEST_KINDS",
    "MAGIC",
    "MAX_DATA_PAYLOAD",
    "MAX_ERROR_MESSAGE",
    "MAX_FRAME_SIZE",
    "MAX_JSON_DEPTH",
    "MAX_MSG_PAYLOAD",
    "MAX_STREAM",
    "MAX_WATCH_BATCH",
    "PROTOCOL_VERSION",
    "REPLY_OPS",
    "REQUEST_OPS",
    "STREAM_CONTROL_OPS",
    "WATCH_EVENT_TYPES",
    "ErrorKind",
    "Frame",
    "FrameDecoder",
    "Handshake",
    "HelloScanner",
    "Kind",
    "Message",
    "MessageScanner",
    "ProtocolViolation",
    "check_reply",
    "check_request",
    "dump_msg",
    "encode_frame",
    "encode_msg",
    "error",
    "get_bool",
    "get_int",
    "get_opt_int",
    "get_opt_number",
    "get_opt_str",
    "get_str",
    "get_str_list",
    "get_str_map",
    "hello",
    "hello_ok",
    "is_final_reply",
    "max_payload",
    "parse_msg",
]
