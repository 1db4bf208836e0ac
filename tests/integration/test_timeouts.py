"""Lifetimes end as asked (destroy or pause) and a caller waiting on the guest is told why,
instead of hanging."""

from __future__ import annotations

import time

import pytest

from ember import Sandbox
from ember.errors import EmberError, EmberTimeoutError, SandboxStateError
from ember.paths import Paths
from ember.sdk.async_sandbox import manager


def test_lifetime_end_pauses_when_asked_and_the_waiting_caller_is_told(
        ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    sb = Sandbox.create("debian-python", timeout=600, on_timeout="pause", paths=ember_paths)
    try:
        sb.exec("echo kept > /root/kept")
        sb.set_timeout(2)
        t0 = time.monotonic()
        with pytest.raises(SandboxStateError, match="lifetime ended and it was paused"):
            sb.exec("sleep 120")  # no command timeout: only the pause can end this wait
        assert time.monotonic() - t0 < 30
        rec = manager(ember_paths).get(sb.id)
        assert rec.state == "paused" and rec.expires_at is None
        sb.resume()
        rec = manager(ember_paths).get(sb.id)
        assert rec.state == "running" and rec.error is None
        assert rec.expires_at is not None  # a new lifetime started
        sb.set_timeout(600)  # of timeout_s (2 s here): lengthen it before using it
        assert sb.exec("cat /root/kept").stdout == "kept\n"
    finally:
        sb.kill()


def test_lifetime_end_destroys_and_the_waiting_caller_is_told(
        ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    sb = Sandbox.create("debian-python", timeout=600, paths=ember_paths)
    sb.set_timeout(2)
    t0 = time.monotonic()
    with pytest.raises(EmberError, match="end of its lifetime"):
        sb.exec("sleep 120")
    assert time.monotonic() - t0 < 30
    assert sb.id not in [i.id for i in Sandbox.list(paths=ember_paths)]
    sb.kill()  # idempotent on a destroyed sandbox


def test_a_client_failing_an_expired_sandbox_destroys_it(ember_paths: Paths,
                                                         debian_template) -> None:  # type: ignore[no-untyped-def]
    """The reaper's kill breaks the connection of a client waiting on the guest, and the
    client reports the break (``fail``) while the reaper is still releasing: whichever
    finishes first, an expired sandbox ends destroyed, never kept as a failed row."""
    sb = Sandbox.create("debian-python", timeout=600, paths=ember_paths)
    mgr = manager(ember_paths)
    mgr.store.update_sandbox(sb.id, expires_at=time.time() - 0.1)
    mgr.fail(sb.id, "the guest agent closed the connection")
    assert sb.id not in [r.id for r in mgr.store.list_sandboxes()]
    sb.kill()


def test_command_timeout_is_a_clear_error_and_the_sandbox_lives_on(
        ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    with Sandbox.create("debian-python", timeout=600, paths=ember_paths) as sb:
        t0 = time.monotonic()
        with pytest.raises(EmberTimeoutError):
            sb.exec("sleep 60", timeout=1)
        assert time.monotonic() - t0 < 15
        assert sb.exec("echo ok").stdout == "ok\n"


def test_on_timeout_is_validated(ember_paths: Paths, debian_template) -> None:  # type: ignore[no-untyped-def]
    from ember.errors import BadRequestError

    with pytest.raises(BadRequestError, match="on_timeout"):
        Sandbox.create("debian-python", on_timeout="explode", paths=ember_paths)
    assert Sandbox.list(paths=ember_paths) == [] or all(
        i.state != "creating" for i in Sandbox.list(paths=ember_paths))
