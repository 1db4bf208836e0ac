"""MSG payloads: one UTF-8 JSON object with a string ``op``, parsed with every bound checked."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from .errors import ProtocolViolation
from .limits import MAX_JSON_DEPTH, MAX_MSG_PAYLOAD

Message = dict[str, object]
"""A decoded MSG payload: a JSON object whose ``op`` is a string."""


def parse_msg(payload: bytes) -> Message:
    """Parse and check a MSG payload; raise :class:`ProtocolViolation` if it is not valid."""
    if len(payload) > MAX_MSG_PAYLOAD:
        raise ProtocolViolation(f"MSG payload of {len(payload)} bytes exceeds {MAX_MSG_PAYLOAD}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProtocolViolation(
            f"MSG payload is not UTF-8 ({err.reason} at byte {err.start})"
        ) from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise ProtocolViolation("MSG payload nests too deeply") from None
    except ValueError as err:
        raise ProtocolViolation(f"MSG payload is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ProtocolViolation(f"MSG payload is a JSON {_json_type(value)}, not an object")
    _check_tree(value)
    if not isinstance(value.get("op"), str):
        raise ProtocolViolation("message has no string 'op'")
    return value


def dump_msg(obj: Mapping[str, object]) -> bytes:
    """Serialize a message to its MSG payload; raise :class:`ProtocolViolation` if impossible."""
    if not isinstance(obj.get("op"), str):
        raise ProtocolViolation("message has no string 'op'")
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        payload = text.encode("utf-8")
    except (TypeError, ValueError) as err:  # UnicodeEncodeError is a ValueError
        raise ProtocolViolation(f"cannot encode message {obj.get('op')!r}: {err}") from None
    if len(payload) > MAX_MSG_PAYLOAD:
        raise ProtocolViolation(
            f"message {obj['op']!r} needs {len(payload)} bytes, more than {MAX_MSG_PAYLOAD}"
        )
    return payload


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else "array"


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ProtocolViolation("JSON object has a duplicate key")
    return obj


def _reject_constant(name: str) -> object:
    raise ProtocolViolation(f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolViolation(f"JSON number {text[:40]} is out of range")
    return value


def _check_tree(root: object) -> None:
    """Bound the depth and reject lone surrogates (not encodable as UTF-8) anywhere."""
    stack: list[tuple[object, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _has_surrogate(value):
                raise ProtocolViolation("JSON string contains a lone surrogate")
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ProtocolViolation(f"JSON nests deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(value, dict):
                stack.extend((key, depth) for key in value)
                stack.extend((item, depth + 1) for item in value.values())
            else:
                stack.extend((item, depth + 1) for item in value)


def _has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a surrogate code point (exactly when strict UTF-8 fails);
    cheaper at boot than compiling a regular expression."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
