"""The public surface of `ember` is chosen in ember/__init__.py and pinned here."""

import ember

PUBLIC = {
    "AsyncProcess", "AsyncSandbox", "BadRequestError", "CommandFailedError",
    "CommandNotFoundError", "CommandTimeoutError", "EmberError", "EmberTimeoutError",
    "EntryInfo", "ExecResult", "Files", "GuestError", "GuestPathNotFoundError", "NotFoundError",
    "OutputChunk", "Process", "ProcessInfo", "Sandbox", "SandboxInfo", "SandboxNotFoundError",
    "SandboxStateError", "SnapshotError", "SnapshotInfo", "SnapshotNotFoundError",
    "TemplateNotFoundError",
    "TierUnavailableError",
}


def test_public_names_are_pinned() -> None:
    assert set(ember.__all__) == PUBLIC


def test_every_public_name_resolves() -> None:
    for name in ember.__all__:
        assert getattr(ember, name) is not None


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
