"""Errors as the API answers them: a JSON body with the stable code, and an HTTP status."""

from __future__ import annotations

from ember.errors import (
    BadRequestError,
    EmberError,
    EmberTimeoutError,
    NodeUnavailableError,
    NotFoundError,
    QuotaExceededError,
    SandboxLostError,
    SandboxStateError,
    SnapshotError,
    TemplateTransferError,
    TierUnavailableError,
    UnauthorizedError,
)

#: Checked in order: the first class the error is an instance of decides.
_STATUS: list[tuple[type[EmberError], int]] = [
    (BadRequestError, 400),
    (UnauthorizedError, 401),
    (QuotaExceededError, 429),
    (NotFoundError, 404),
    (SandboxStateError, 409),
    (SnapshotError, 409),
    (EmberTimeoutError, 504),
    (TierUnavailableError, 501),
    (NodeUnavailableError, 503),
    (TemplateTransferError, 502),
    (SandboxLostError, 410),
]


def status_for(err: EmberError) -> int:
    for cls, status in _STATUS:
        if isinstance(err, cls):
            return status
    return 500


def headers_for(err: EmberError) -> dict[str, str]:
    if isinstance(err, QuotaExceededError):
        return {"retry-after": str(max(1, round(err.retry_after)))}
    if isinstance(err, UnauthorizedError):
        return {"www-authenticate": 'Bearer realm="ember"'}
    return {}
