"""What the E2B front keeps: the secret that envd access tokens are derived from (one per
home, made on first use, mode 0600) and the domain the SDK is told."""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from ember.errors import HostError

SECRET_BYTES = 32


@dataclass(frozen=True)
class E2bState:
    secret: bytes
    domain: str


def load_secret(path: Path) -> bytes:
    """The home's E2B secret, created once (exclusively, so two daemons agree)."""
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(SECRET_BYTES))
    try:
        data = path.read_bytes()
    except OSError as err:
        raise HostError(f"cannot read the E2B token secret {path}: {err}") from err
    if len(data) != SECRET_BYTES:
        raise HostError(f"{path} is not an E2B token secret ({len(data)} bytes); remove it "
                        "and restart the daemon (envd access tokens given so far change)")
    return data


def e2b_state(request: Request) -> E2bState:
    state: E2bState = request.app.state.e2b
    return state
