"""ember: self-hosted microVM sandboxes for untrusted code.

>>> from ember import Sandbox
>>> with Sandbox.create() as sb:
...     print(sb.exec("python3 -c 'print(6*7)'").stdout)
"""

from typing import TYPE_CHECKING, Any

from ember.errors import (
    BadRequestError,
    BuildError,
    BuildStepError,
    CommandNotFoundError,
    CommandTimeoutError,
    DockerfileError,
    EmberError,
    EmberTimeoutError,
    EngineError,
    GuestError,
    GuestPathNotFoundError,
    HostCommandError,
    HostError,
    ImageSourceError,
    MissingDependencyError,
    NetworkError,
    NodeUnavailableError,
    NotFoundError,
    PortNotOpenError,
    ProtocolError,
    QuotaExceededError,
    SandboxLostError,
    SandboxNotFoundError,
    SandboxStateError,
    SnapshotError,
    SnapshotNotFoundError,
    TemplateDigestError,
    TemplateNotFoundError,
    TemplateTransferError,
    TierUnavailableError,
    UnauthorizedError,
    UnsafeLayerError,
)

if TYPE_CHECKING:
    from ember.net.policy import NetworkPolicy
    from ember.sdk.async_sandbox import AsyncSandbox
    from ember.sdk.files import AsyncFiles
    from ember.sdk.process import AsyncProcess
    from ember.sdk.pty import AsyncPty
    from ember.sdk.results import (
        CommandFailedError,
        EntryInfo,
        ExecResult,
        ExposedPort,
        OutputChunk,
        PoolInfo,
        ProcessInfo,
        SandboxInfo,
        SandboxUsage,
        SnapshotInfo,
        TemplateInfo,
        TemplateSnapshotInfo,
    )
    from ember.sdk.sandbox import Files, Process, Pty, Sandbox
    from ember.sdk.watch import AsyncWatch, FsEvent, Watch

# The SDK is imported on first use, so that `import ember.errors` (and the CLI's start-up)
# stays light and lower layers can be imported without the SDK.
_LAZY = {
    "AsyncSandbox": "ember.sdk.async_sandbox",
    "AsyncFiles": "ember.sdk.files",
    "AsyncProcess": "ember.sdk.process",
    "AsyncPty": "ember.sdk.pty",
    "CommandFailedError": "ember.sdk.results",
    "NetworkPolicy": "ember.net.policy",
    "EntryInfo": "ember.sdk.results",
    "ExecResult": "ember.sdk.results",
    "ExposedPort": "ember.sdk.results",
    "OutputChunk": "ember.sdk.results",
    "PoolInfo": "ember.sdk.results",
    "ProcessInfo": "ember.sdk.results",
    "SandboxInfo": "ember.sdk.results",
    "SandboxUsage": "ember.sdk.results",
    "SnapshotInfo": "ember.sdk.results",
    "TemplateInfo": "ember.sdk.results",
    "TemplateSnapshotInfo": "ember.sdk.results",
    "Files": "ember.sdk.sandbox",
    "Process": "ember.sdk.sandbox",
    "Pty": "ember.sdk.sandbox",
    "Sandbox": "ember.sdk.sandbox",
    "AsyncWatch": "ember.sdk.watch",
    "FsEvent": "ember.sdk.watch",
    "Watch": "ember.sdk.watch",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ember' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

__version__ = "0.1.0"

__all__ = [
    "AsyncFiles",
    "AsyncProcess",
    "AsyncPty",
    "AsyncSandbox",
    "AsyncWatch",
    "BadRequestError",
    "BuildError",
    "BuildStepError",
    "CommandFailedError",
    "CommandNotFoundError",
    "CommandTimeoutError",
    "DockerfileError",
    "EmberError",
    "EmberTimeoutError",
    "EngineError",
    "EntryInfo",
    "ExecResult",
    "ExposedPort",
    "Files",
    "FsEvent",
    "GuestError",
    "GuestPathNotFoundError",
    "HostCommandError",
    "HostError",
    "ImageSourceError",
    "MissingDependencyError",
    "NetworkError",
    "NetworkPolicy",
    "NodeUnavailableError",
    "NotFoundError",
    "OutputChunk",
    "PoolInfo",
    "PortNotOpenError",
    "Process",
    "ProcessInfo",
    "ProtocolError",
    "Pty",
    "QuotaExceededError",
    "Sandbox",
    "SandboxInfo",
    "SandboxLostError",
    "SandboxNotFoundError",
    "SandboxStateError",
    "SandboxUsage",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotNotFoundError",
    "TemplateDigestError",
    "TemplateInfo",
    "TemplateNotFoundError",
    "TemplateSnapshotInfo",
    "TemplateTransferError",
    "TierUnavailableError",
    "UnauthorizedError",
    "UnsafeLayerError",
    "Watch",
]
