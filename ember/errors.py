"""One error hierarchy for everything ember raises.

Every public failure is an :class:`EmberError`. Each class carries a stable ``code``: the
daemon's API sends it with the message, and the client raises the same class again from it
(:func:`error_for_code`), so that a caller sees one set of exceptions locally and remotely.
Subclasses say *what kind* of failure it is so that callers can react (retry, report to
their own user, clean up); the message says *what* failed and why, including the tail of
a failing command's stderr.
"""

from __future__ import annotations

from typing import ClassVar


class EmberError(Exception):
    """Base class of every error ember raises on purpose."""

    code: ClassVar[str] = "internal"


class BadRequestError(EmberError, ValueError):
    """The caller asked for something invalid (bad name, impossible limits, bad path)."""

    code: ClassVar[str] = "bad_request"


class NotFoundError(EmberError, LookupError):
    """A named thing (template, sandbox, guest path, process) does not exist."""

    code: ClassVar[str] = "not_found"


class TemplateNotFoundError(NotFoundError):
    """No template with that name is registered."""

    code: ClassVar[str] = "template_not_found"


class SandboxNotFoundError(NotFoundError):
    """No sandbox with that id exists (or it was destroyed)."""

    code: ClassVar[str] = "sandbox_not_found"


class SnapshotNotFoundError(NotFoundError):
    """No snapshot with that name or id exists."""

    code: ClassVar[str] = "snapshot_not_found"


class SnapshotError(EmberError):
    """A snapshot cannot be taken or restored: corrupt, truncated or incompatible (another
    kernel, template, VMM build or machine size). Nothing half-restored is left behind."""

    code: ClassVar[str] = "snapshot_invalid"


class GuestPathNotFoundError(NotFoundError):
    """A path inside the guest does not exist."""

    code: ClassVar[str] = "guest_path_not_found"


class EmberTimeoutError(EmberError, TimeoutError):
    """An operation did not finish within its deadline."""

    code: ClassVar[str] = "timeout"


class HostError(EmberError):
    """The host cannot do what was asked (missing tool, device, permission, disk space)."""

    code: ClassVar[str] = "host"


class MissingDependencyError(HostError):
    """A host program, package or file ember needs is missing; the message says how to fix it."""

    code: ClassVar[str] = "missing_dependency"


class HostCommandError(HostError):
    """An external command failed; the message names the step and the tail of its stderr."""

    code: ClassVar[str] = "host_command_failed"

    def __init__(self, message: str, *, argv: list[str] | None = None,
                 returncode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.argv = argv or []
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class BuildError(EmberError):
    """Building a kernel or an image failed."""

    code: ClassVar[str] = "build_failed"


class ImageSourceError(BuildError):
    """An image source is unknown, unreachable, corrupt or truncated."""

    code: ClassVar[str] = "image_source"


class UnsafeLayerError(ImageSourceError):
    """An image layer tries to escape the root or create what a template may not hold."""

    code: ClassVar[str] = "unsafe_layer"


class DockerfileError(BadRequestError):
    """A Dockerfile ember cannot build (syntax, an unsupported instruction, a COPY source
    outside the context); the message names the line. ``line`` is 1-based, 0 for the whole
    file."""

    code: ClassVar[str] = "dockerfile_invalid"
    line: int = 0


class BuildStepError(BuildError):
    """A step of a Dockerfile build failed (a RUN exited non-zero): the message names the
    line, the exit code and the tail of the step's output."""

    code: ClassVar[str] = "build_step_failed"
    line: int = 0
    exit_code: int | None = None
    output_tail: str = ""


class EngineError(EmberError):
    """The VMM failed to start, answer or stop."""

    code: ClassVar[str] = "engine"


class GuestError(EmberError):
    """The guest misbehaved: broke the protocol, stopped answering or died."""

    code: ClassVar[str] = "guest"


class ProtocolError(GuestError):
    """Bytes from the guest (or host) violate the agent protocol."""

    code: ClassVar[str] = "protocol"


class PortNotOpenError(NotFoundError):
    """Nothing listens on that port in the guest (its connection was refused)."""

    code: ClassVar[str] = "port_not_open"


class SandboxStateError(EmberError):
    """The sandbox is not in a state that allows the operation (failed, stopped, busy)."""

    code: ClassVar[str] = "sandbox_state"


class CommandNotFoundError(NotFoundError):
    """The program given to ``exec`` does not exist in the guest."""

    code: ClassVar[str] = "command_not_found"


class CommandTimeoutError(EmberTimeoutError):
    """A command ran past its timeout and was killed; ``result`` holds its partial output."""

    code: ClassVar[str] = "command_timeout"

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class UnauthorizedError(EmberError):
    """The daemon does not know the caller: no API key, or a wrong or revoked one."""

    code: ClassVar[str] = "unauthorized"


class QuotaExceededError(EmberError):
    """The caller's tenant is at one of its limits (running sandboxes, vCPUs, memory);
    ``retry_after`` says when trying again makes sense (seconds)."""

    code: ClassVar[str] = "quota_exceeded"
    retry_after: float = 5.0


class TierUnavailableError(HostError):
    """The isolation tier asked for (``gvisor``, ``container``) cannot run on this host:
    its runtime is missing or the host lacks what it needs. The message names the cause
    and the fix."""

    code: ClassVar[str] = "tier_unavailable"


class NetworkError(HostError):
    """A sandbox's network could not be set up, changed or removed on this host (a
    namespace, link, tap device or nftables rule); the message names the step."""

    code: ClassVar[str] = "network_error"


class NodeUnavailableError(HostError):
    """The sandbox lives on another node of the cluster whose daemon does not answer (the
    node is down, cut off, or its daemon stopped); the message names the node."""

    code: ClassVar[str] = "node_unavailable"


class TemplateTransferError(HostError):
    """A template could not be fetched from another node of the cluster (no node holds
    it, the holder does not answer, or what it sent does not fit what it announced)."""

    code: ClassVar[str] = "template_transfer"


class TemplateDigestError(TemplateTransferError):
    """A template fetched from another node does not have the digest it should have (the
    holder's copy or the transfer is corrupt): it was refused and nothing was kept."""

    code: ClassVar[str] = "template_digest_mismatch"


class SandboxLostError(EmberError):
    """The sandbox lived on a node of the cluster that Ray reports dead (it died, or was
    cut off past Ray's health checks): it is gone for good, and that node kills it if it
    still runs (fencing). The message names the node and when and why it died."""

    code: ClassVar[str] = "sandbox_lost"


def _all_classes(root: type[EmberError]) -> list[type[EmberError]]:
    out = [root]
    for sub in root.__subclasses__():
        out += _all_classes(sub)
    return out


def error_codes() -> dict[str, type[EmberError]]:
    """Every stable code and the class it stands for: the classes that name a code of
    their own (a subclass without one, such as JailError, travels as its parent's)."""
    return {cls.code: cls for cls in _all_classes(EmberError) if "code" in cls.__dict__}


def error_for_code(code: str, message: str) -> EmberError:
    """The exception a peer reported with ``code``; an unknown code gives the base class,
    the code kept in the message."""
    cls = error_codes().get(code)
    if cls is None:
        return EmberError(f"{message} ({code[:64]})")
    if cls is CommandTimeoutError:
        return CommandTimeoutError(message)
    if cls is HostCommandError:
        return HostCommandError(message)
    try:
        return cls(message)
    except TypeError:  # a subclass with another constructor
        return EmberError(f"{message} ({code})")
