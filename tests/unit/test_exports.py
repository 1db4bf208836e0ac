"""The public surface of `ember` is chosen in ember/__init__.py and pinned here."""

import ember

PUBLIC = {
    "AsyncFiles", "AsyncProcess", "AsyncPty", "AsyncSandbox", "BadRequestError", "BuildError",
    "CommandFailedError", "CommandNotFoundError", "CommandTimeoutError", "EmberError",
    "EmberTimeoutError", "EngineError", "EntryInfo", "ExecResult", "ExposedPort", "Files",
    "GuestError",
    "GuestPathNotFoundError", "HostCommandError", "HostError", "ImageSourceError",
    "MissingDependencyError", "NetworkError", "NetworkPolicy",
    "NodeUnavailableError", "NotFoundError", "OutputChunk",
    "PoolInfo", "PortNotOpenError", "Process", "ProcessInfo",
    "ProtocolError", "Pty", "Sandbox", "SandboxInfo", "SandboxNotFoundError", "SandboxStateError",
    "SandboxUsage",
    "SnapshotError", "SnapshotInfo", "SnapshotNotFoundError", "TemplateNotFoundError",
    "TierUnavailableError", "UnsafeLayerError", "QuotaExceededError", "UnauthorizedError",
    "TemplateInfo", "TemplateSnapshotInfo", "AsyncWatch", "FsEvent", "Watch",
    "BuildStepError", "DockerfileError", "SandboxLostError",
    "TemplateDigestError", "TemplateTransferError",
}


def test_public_names_are_pinned() -> None:
    assert set(ember.__all__) == PUBLIC


def test_every_public_name_resolves() -> None:
    for name in ember.__all__:
        assert getattr(ember, name) is not None


def test_the_whole_error_tree_is_exported() -> None:
    import ember.errors

    tree = {name for name, obj in vars(ember.errors).items()
            if isinstance(obj, type) and issubclass(obj, ember.errors.EmberError)}
    assert tree <= set(ember.__all__), tree - set(ember.__all__)


def test_errors_share_one_root() -> None:
    for name in ember.__all__:
        obj = getattr(ember, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ember.EmberError), name


def test_sync_and_async_sandboxes_offer_the_same_methods() -> None:
    def public(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_")}

    assert public(ember.AsyncSandbox) - {"files"} == public(ember.Sandbox) - {"files"}


def test_package_is_typed() -> None:
    from pathlib import Path

    assert (Path(ember.__file__).parent / "py.typed").exists()
