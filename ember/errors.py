"""One error hierarchy for everything ember raises.

Every public failure is an :class:`EmberError`. Subclasses say *what kind* of failure it
is so that callers can react (retry, report to their own user, clean up); the message
says *what* failed and why, including the tail of a failing command's stderr.
"""

from __future__ import annotations


class EmberError(Exception):
    """Base class of every error ember raises on purpose."""


class BadRequestError(EmberError, ValueError):
    """The caller asked for something invalid (bad name, impossible limits, bad path)."""


class NotFoundError(EmberError, LookupError):
    """A named thing (template, sandbox, guest path, process) does not exist."""


class TemplateNotFoundError(NotFoundError):
    """No template with that name is registered."""


class SandboxNotFoundError(NotFoundError):
    """No sandbox with that id exists (or it was destroyed)."""


class SnapshotNotFoundError(NotFoundError):
    """No snapshot with that name or id exists."""


class SnapshotError(EmberError):
    """A snapshot cannot be taken or restored: corrupt, truncated or incompatible (another
    kernel, template, VMM build or machine size). Nothing half-restored is left behind."""


class GuestPathNotFoundError(NotFoundError):
    """A path inside the guest does not exist."""


class EmberTimeoutError(EmberError, TimeoutError):
    """An operation did not finish within its deadline."""


class HostError(EmberError):
    """The host cannot do what was asked (missing tool, device, permission, disk space)."""


class MissingDependencyError(HostError):
    """A host program, package or file ember needs is missing; the message says how to fix it."""


class HostCommandError(HostError):
    """An external command failed; the message names the step and the tail of its stderr."""

    def __init__(self, message: str, *, argv: list[str] | None = None,
                 returncode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.argv = argv or []
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class BuildError(EmberError):
    """Building a kernel or an image failed."""


class ImageSourceError(BuildError):
    """An image source is unknown, unreachable, corrupt or truncated."""


class UnsafeLayerError(ImageSourceError):
    """An image layer tries to escape the root or create what a template may not hold."""


class EngineError(EmberError):
    """The VMM failed to start, answer or stop."""


class GuestError(EmberError):
    """The guest misbehaved: broke the protocol, stopped answering or died."""


class ProtocolError(GuestError):
    """Bytes from the guest (or host) violate the agent protocol."""


class SandboxStateError(EmberError):
    """The sandbox is not in a state that allows the operation (failed, stopped, busy)."""


class CommandNotFoundError(NotFoundError):
    """The program given to ``exec`` does not exist in the guest."""


class CommandTimeoutError(EmberTimeoutError):
    """A command ran past its timeout and was killed; ``result`` holds its partial output."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class TierUnavailableError(HostError):
    """The isolation tier asked for (``gvisor``, ``container``) cannot run on this host:
    its runtime is missing or the host lacks what it needs. The message names the cause
    and the fix."""
