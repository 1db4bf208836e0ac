"""The E2B front's I/O-free parts: Connect envelopes, the multipart reader, the mapping of
ember's sandboxes, entries and results onto E2B's JSON."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.e2b import mapping as M
from ember.e2b.connect import (
    ConnectError,
    EnvelopeReader,
    end_stream,
    envelope,
    single_message,
    timeout_of,
)
from ember.e2b.multipart import MultipartReader, boundary_of
from ember.errors import BadRequestError
from ember.sdk.results import EntryInfo, ExecResult, SandboxInfo


def test_envelopes_round_trip_in_pieces_of_any_size() -> None:
    body = envelope({"a": 1}) + envelope({"b": "x" * 1000})
    for step in (1, 2, 5, 7, len(body)):
        reader = EnvelopeReader()
        got: list[bytes] = []
        for i in range(0, len(body), step):
            got += reader.feed(body[i:i + step])
        reader.close()
        assert [json.loads(m) for m in got] == [{"a": 1}, {"b": "x" * 1000}]


@pytest.mark.parametrize(("body", "code"), [
    (b"\x01\x00\x00\x00\x02{}", "unimplemented"),           # compressed
    (b"\x02\x00\x00\x00\x02{}", "invalid_argument"),        # end-stream in a request
    (b"\x80\x00\x00\x00\x02{}", "invalid_argument"),        # unknown flag
    (struct.pack(">BI", 0, (4 << 20) + 1), "resource_exhausted"),
    (b"\x00\x00\x00\x00\x09{}", "invalid_argument"),        # truncated
    (b"\x00\x00", "invalid_argument"),                       # truncated header
    (b"", "invalid_argument"),                               # no message
    (envelope(b"[1]"), "invalid_argument"),                  # not an object
    (envelope(b"\xff"), "invalid_argument"),                 # not JSON
    (envelope({}) + envelope({}), "invalid_argument"),       # two messages
])
def test_malformed_requests_are_connect_errors(body: bytes, code: str) -> None:
    with pytest.raises(ConnectError) as exc:
        single_message(body, "Start")
    assert exc.value.code == code
    closing = end_stream(exc.value)
    assert closing[0] == 2 and json.loads(closing[5:])["error"]["code"] == code


@given(st.binary(max_size=200), st.integers(1, 17))
def test_hostile_bytes_never_hang_or_crash(data: bytes, step: int) -> None:
    reader = EnvelopeReader(max_message=64)
    try:
        for i in range(0, len(data), step):
            for m in reader.feed(data[i:i + step]):
                assert len(m) <= 64
        reader.close()
    except ConnectError as err:
        assert err.http_status in (400, 429, 501)


def test_end_stream_and_timeouts() -> None:
    assert end_stream() == b"\x02\x00\x00\x00\x02{}"
    assert timeout_of("1500") == 1.5 and timeout_of(None) is None
    with pytest.raises(ConnectError):
        timeout_of("-1")
    with pytest.raises(ValueError):
        ConnectError("nope", "x")


def _multipart(boundary: bytes, parts: list[tuple[str, bytes]]) -> bytes:
    out = b""
    for name, data in parts:
        out += (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; '
                b'filename="' + name.encode() + b'"\r\nContent-Type: application/octet-stream'
                b"\r\n\r\n" + data + b"\r\n")
    return out + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize("step", [1, 3, 64, 10_000])
def test_multipart_parts_stream_out(step: int) -> None:
    boundary = b"b0undary"
    data = b"\r\n--b0undar" + b"x" * 5000 + b"\r\n-"
    body = _multipart(boundary, [("/tmp/a", data), ("rel/b", b"")])
    reader = MultipartReader(boundary_of('multipart/form-data; boundary="b0undary"'))
    events = []
    for i in range(0, len(body), step):
        events += reader.feed(body[i:i + step])
    reader.close()
    names = [v for k, v in events if k == "part"]
    assert names == ["/tmp/a", "rel/b"]
    first = b"".join(v for k, v in events[:events.index(("end", b""))] if k == "data")
    assert first == data


def test_multipart_refuses_truncated_and_endless_heads() -> None:
    reader = MultipartReader(b"b")
    reader.feed(b"--b\r\nContent-Disposition: form-data\r\n\r\nabc")
    with pytest.raises(BadRequestError):
        reader.close()
    with pytest.raises(BadRequestError):
        MultipartReader(b"b").feed(b"--b\r\n" + b"x" * 20_000)
    with pytest.raises(BadRequestError):
        boundary_of("multipart/form-data")


def _info(sid: str, at: float, state: str = "running", **meta: str) -> SandboxInfo:
    return SandboxInfo(id=sid, template="debian-python", state=state,  # type: ignore[arg-type]
                       vcpus=1, memory_mib=256, disk_mib=1024, created_at=at,
                       expires_at=None, accel="tcg", metadata={"ember.tenant": "t", **meta})


def test_list_filters_and_pages() -> None:
    infos = [_info(f"sb-{i}", float(i), "paused" if i == 3 else "running", k="v" if i % 2
                   else "w") for i in range(7)]
    got, token = M.page(infos, metadata={}, states={"running", "paused"}, template=None,
                        started_after=None, desc=False, limit=3, next_token=None)
    seen = [i.id for i in got]
    while token is not None:
        got, token = M.page(infos, metadata={}, states={"running", "paused"}, template=None,
                            started_after=None, desc=False, limit=3, next_token=token)
        seen += [i.id for i in got]
    assert seen == [f"sb-{i}" for i in range(7)]
    odd, _ = M.page(infos, metadata=M.metadata_filter("k=v"), states={"running"},
                    template="base", started_after=2.0, desc=True, limit=10, next_token=None)
    assert [i.id for i in odd] == ["sb-5"]
    assert M.listed(infos[0])["metadata"] == {"k": "w"}  # the daemon's keys left out
    with pytest.raises(BadRequestError):
        M.decode_token("!!")
    with pytest.raises(BadRequestError):
        M.states_filter("running,dead")


def test_tokens_entries_and_events() -> None:
    tok = M.access_token(b"k" * 32, "sb-1")
    assert M.token_matches(b"k" * 32, "sb-1", tok)
    assert not M.token_matches(b"k" * 32, "sb-2", tok) and not M.token_matches(
        b"k" * 32, "sb-1", None)
    assert M.sandbox_of_token(tok) == "sb-1" and M.sandbox_of_token(None) == ""
    assert not M.token_matches(b"j" * 32, "sb-1", tok)
    e = M.entry(EntryInfo("d", "/x/d", "dir", 4096, 0o40755, 0.0))
    assert e == {"name": "d", "type": "FILE_TYPE_DIRECTORY", "path": "/x/d", "size": "4096",
                 "mode": 0o755, "permissions": "drwxr-xr-x"}
    killed = ExecResult(137, b"", b"", 0.1, pid=5, signal=9)
    assert M.end_event(killed)["event"]["end"]["status"] == "signal: killed"
    assert M.end_event(ExecResult(3, b"", b"", 0.1))["event"]["end"]["exitCode"] == 3
    assert M.data_event("stdout", b"hi") == {"event": {"data": {"stdout": "aGk="}}}
    assert M.user_of("Basic cm9vdDo=") == "root" and M.user_of(None) is None
    assert M.guest_path("a.txt", None) == "/root/a.txt"
    assert M.guest_path("a", "user") == "/home/user/a" and M.guest_path("/a", "x") == "/a"


def test_the_sdk_decodes_what_envd_answers() -> None:
    """The e2b SDK's own protobuf classes read the JSON the daemon sends."""
    pb = pytest.importorskip("e2b.envd.process.process_pb")
    fs = pytest.importorskip("e2b.envd.filesystem.filesystem_pb")
    end = pb.StartResponse.from_json(json.dumps(M.end_event(ExecResult(2, b"", b"", 0.1))))
    assert end.event.event.value.exit_code == 2
    data = pb.StartResponse.from_json(json.dumps(M.data_event("stderr", b"x")))
    assert data.event.event.value.output.value == b"x"
    entry = fs.StatResponse.from_json(json.dumps(
        {"entry": M.entry(EntryInfo("f", "/f", "file", 5, 0o100644, 1.5e9))}))
    assert entry.entry.size == 5 and entry.entry.type == fs.FileType.FILE


def test_keepalive_interval_is_bounded() -> None:
    from starlette.requests import Request

    from ember.e2b.envd import KEEPALIVE_DEFAULT_S, keepalive_every

    def every(value: str | None) -> float:
        headers = [] if value is None else [(b"keepalive-ping-interval", value.encode())]
        return keepalive_every(Request({"type": "http", "headers": headers}))

    assert every("15") == 15.0 and every("3600") == 3600.0
    for bad in (None, "0", "3601", "-1", "1.5", "x", "9" * 40):
        assert every(bad) == KEEPALIVE_DEFAULT_S, bad
