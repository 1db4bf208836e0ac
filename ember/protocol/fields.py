"""Typed access to the fields of a checked message (mypy sees ``object`` values)."""

from __future__ import annotations

from .errors import ProtocolViolation
from .jsonmsg import Message


def get_str(msg: Message, name: str) -> str:
    value = msg.get(name)
    if not isinstance(value, str):
        raise ProtocolViolation(f"{msg.get('op')}: field {name!r} must be a string")
    return value


def get_opt_str(msg: Message, name: str) -> str | None:
    return None if msg.get(name) is None else get_str(msg, name)


def get_int(msg: Message, name: str) -> int:
    value = msg.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolViolation(f"{msg.get('op')}: field {name!r} must be an integer")
    return value


def get_opt_int(msg: Message, name: str) -> int | None:
    return None if msg.get(name) is None else get_int(msg, name)


def get_bool(msg: Message, name: str, default: bool = False) -> bool:
    value = msg.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolViolation(f"{msg.get('op')}: field {name!r} must be a boolean")
    return value


def get_opt_number(msg: Message, name: str) -> float | None:
    value = msg.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolViolation(f"{msg.get('op')}: field {name!r} must be a number")
    return float(value)


def get_str_list(msg: Message, name: str) -> list[str]:
    value = msg.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolViolation(f"{msg.get('op')}: field {name!r} must be a list of strings")
    return [str(v) for v in value]


def get_str_map(msg: Message, name: str) -> dict[str, str]:
    value = msg.get(name, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ProtocolViolation(f"{msg.get('op')}: field {name!r} must be an object of strings")
    return {str(k): str(v) for k, v in value.items()}
