"""The daemon's wire format, fed what a hostile or newer peer could send."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.errors import EmberError, ProtocolError, SandboxNotFoundError
from ember.sdk import wire
from ember.sdk.results import EntryInfo, ProcessInfo, SandboxInfo


def test_results_round_trip_and_ignore_unknown_fields() -> None:
    info = SandboxInfo(id="sb-1", template="t", state="running", vcpus=1, memory_mib=256,
                       disk_mib=1024, created_at=1.0, expires_at=None, accel="tcg",
                       metadata={"a": "b"})
    raw = {**wire.to_json(info), "from_a_newer_daemon": 1}
    assert wire.sandbox_info(raw) == info
    p = ProcessInfo(stream=3, pid=42, argv=("ls", "-l"), running=True)
    assert wire.process_info(wire.to_json(p)) == p


@pytest.mark.parametrize("raw", [None, [], "x", {"name": "a"}])
def test_malformed_results_are_protocol_errors(raw: object) -> None:
    with pytest.raises(ProtocolError):
        wire.from_json(EntryInfo, raw)


def test_output_events_round_trip() -> None:
    ev = wire.parse_event(wire.output_event("stderr", b"\x00\xffdata").rstrip(b"\n"))
    assert ev == {"event": "stderr", "data": b"\x00\xffdata"}


@pytest.mark.parametrize("line", [
    b"", b"not json", b"[1,2]", b'{"no_event": 1}', b'{"event": 7}',
    b'{"event": "stdout", "data": "***"}', b'{"event":"stdout","data":"' + b"A" * 300000 + b'"}',
])
def test_bad_event_lines_are_protocol_errors(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.parse_event(line)


@given(st.binary(max_size=2000))
def test_any_bytes_give_an_event_or_a_protocol_error(line: bytes) -> None:
    try:
        ev = wire.parse_event(line)
    except ProtocolError:
        return
    assert isinstance(ev["event"], str)


def test_error_bodies_map_back_to_classes() -> None:
    body = wire.error_body(SandboxNotFoundError("no sandbox 'x'"))
    err = wire.error_from_body(body, 404)
    assert type(err) is SandboxNotFoundError and "no sandbox" in str(err)
    odd = wire.error_from_body("<html>proxy error</html>", 502)
    assert type(odd) is EmberError and "502" in str(odd)
    ev = {"event": "error", "code": "command_timeout", "message": "too slow"}
    assert type(wire.error_for_event(ev)).__name__ == "CommandTimeoutError"
    assert base64  # imported for the fixtures above
