"""Operation failures, and how OS errors map to the protocol's error kinds."""

from __future__ import annotations

import errno

from ember.protocol import ErrorKind


class OpError(Exception):
    """An operation failed in a way the host should hear about as ``error {kind, message}``."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


ERRNO_KINDS = {
    errno.ENOENT: ErrorKind.NOT_FOUND,
    errno.EACCES: ErrorKind.PERMISSION,
    errno.EPERM: ErrorKind.PERMISSION,
    errno.EROFS: ErrorKind.PERMISSION,
    errno.EEXIST: ErrorKind.EXISTS,
    errno.ENOTDIR: ErrorKind.NOT_A_DIRECTORY,
    errno.EISDIR: ErrorKind.IS_A_DIRECTORY,
    errno.ENOTEMPTY: ErrorKind.NOT_EMPTY,
    errno.EINVAL: ErrorKind.BAD_REQUEST,
    errno.ENAMETOOLONG: ErrorKind.BAD_REQUEST,
    errno.ELOOP: ErrorKind.BAD_REQUEST,
}


def os_error(err: OSError, what: str) -> OpError:
    """An :class:`OpError` for ``err``, e.g. ``os_error(err, "cannot open /x")``."""
    kind = ERRNO_KINDS.get(err.errno or 0, ErrorKind.IO)
    reason = err.strerror or str(err)
    return OpError(kind, f"{what}: {reason}")
