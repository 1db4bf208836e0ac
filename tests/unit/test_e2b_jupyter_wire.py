"""The code interpreter's wire without a guest: request bodies, the bridge's lines (hostile
ones included), the iopub-to-E2B mapping of the kernel bridge, and the lines as the
official ``e2b-code-interpreter`` SDK's parser reads them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.e2b import jupyter_wire as W
from ember.e2b import kernel_bridge as B
from ember.errors import BadRequestError


def test_run_bodies() -> None:
    r = W.parse_run(json.dumps({"code": "x = 1", "context_id": None, "language": None,
                                "env_vars": {"A": "b"}}).encode())
    assert (r.code, r.context_id, r.env) == ("x = 1", None, {"A": "b"})
    assert W.parse_run(b'{"code": "", "language": "python"}').env is None
    with pytest.raises(W.TooLargeError):
        W.parse_run(json.dumps({"code": "x" * (W.MAX_CODE_BYTES + 1)}).encode())
    with pytest.raises(W.TooLargeError):
        W.parse_run(b" " * (W.MAX_BODY_BYTES + 1))
    for bad in (b"[]", b"{", b"{}", b'{"code": 1}', b'{"code": "", "language": "r"}',
                b'{"code": "", "context_id": "../x"}',
                b'{"code": "", "context_id": "a", "language": "python"}',
                b'{"code": "", "env_vars": {"1A": "x"}}',
                b'{"code": "", "env_vars": {"A": 1}}', b'{"code": "", "env_vars": []}',
                b'{"code": "", "env_vars": {"A": "\\u0000"}}'):
        with pytest.raises(BadRequestError):
            W.parse_run(bad)


def test_context_bodies() -> None:
    assert W.parse_context(b"").cwd is None
    assert W.parse_context(b'{"language": "python", "cwd": "/tmp"}').cwd == "/tmp"
    for bad in (b'{"cwd": "tmp"}', b'{"language": "javascript"}', b'{"cwd": 3}'):
        with pytest.raises(BadRequestError):
            W.parse_context(bad)
    assert W.context_json("c1", "/home/user") == {"id": "c1", "language": "python",
                                                 "cwd": "/home/user"}


def test_requests_round_trip_through_the_bridge_parser() -> None:
    req = W.RunRequest("print('é\\n')\n", None, {"K": "v"})
    line = W.run_request(7, req)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert B.parse_request(line) == {"op": "execute", "id": 7, "code": req.code,
                                     "env": {"K": "v"}}
    assert B.parse_request(W.cancel_request(7)) == {"op": "cancel", "id": 7}
    assert B.parse_request(W.RESTART_REQUEST) == {"op": "restart"}
    for bad in (b"1", b'{"op": "execute", "id": true, "code": ""}', b'{"op": "x", "id": 1}',
                b'{"op": "execute", "id": 1, "code": "", "env": {"a": 1}}'):
        with pytest.raises(ValueError):
            B.parse_request(bad)


def test_line_splitter_bounds_lines() -> None:
    s = W.LineSplitter(limit=8)
    assert s.feed(b"ab") == [] and s.feed(b"c\nde\n") == [b"abc", b"de"]
    assert s.feed(b"0123456789") == [] and s.overlong == 1
    assert s.feed(b"more\nok\n") == [b"ok"] and s.overlong == 1
    assert s.feed(b"012345678\nx\n") == [b"x"] and s.overlong == 2


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_line_splitter_keeps_what_fits(chunks: list[bytes]) -> None:
    s = W.LineSplitter(limit=16)
    got = [line for c in chunks for line in s.feed(c)]
    whole = b"".join(chunks).split(b"\n")[:-1]
    assert got == [line for line in whole if len(line) <= 16]
    assert s.overlong >= sum(1 for line in whole if len(line) > 16)


def _iopub(kind: str, **content: Any) -> dict[str, Any]:
    return {"msg_type": kind, "header": {"msg_type": kind}, "content": content,
            "parent_header": {"msg_id": "m"}}


def test_iopub_messages_become_e2b_lines() -> None:
    assert B.e2b_line(_iopub("stream", name="stdout", text="hi\n"), 5) == {
        "type": "stdout", "text": "hi\n", "timestamp": 5}
    assert B.e2b_line(_iopub("stream", name="stderr", text="w"), 5)["type"] == "stderr"
    assert B.e2b_line(_iopub("execute_input", code="1", execution_count=3), 5) == {
        "type": "number_of_executions", "execution_count": 3}
    main = B.e2b_line(_iopub("execute_result", execution_count=3, metadata={},
                             data={"text/plain": "2", "text/html": ["<b>", "2</b>"]}), 5)
    assert main == {"type": "result", "is_main_result": True, "text": "2",
                    "html": "<b>2</b>"}
    shown = B.e2b_line(_iopub("display_data", metadata={}, data={
        "image/png": "iVBOR\n", "text/plain": "<Figure>", "application/json": {"a": 1},
        "application/vnd.custom": {"x": 1}}), 5)
    assert shown == {"type": "result", "is_main_result": False, "png": "iVBOR",
                     "text": "<Figure>", "json": {"a": 1},
                     "extra": {"application/vnd.custom": {"x": 1}}}
    err = B.e2b_line(_iopub("error", ename="ZeroDivisionError", evalue="division by zero",
                            traceback=["Traceback", "ZeroDivisionError: division by zero"]), 5)
    assert err == {"type": "error", "name": "ZeroDivisionError", "value": "division by zero",
                   "traceback": "Traceback\nZeroDivisionError: division by zero"}
    for quiet in (_iopub("status", execution_state="idle"), _iopub("clear_output"),
                  _iopub("display_data", data={}), {"msg_type": "stream", "content": 1}):
        assert B.e2b_line(quiet, 5) is None


def test_env_code_sets_and_restores() -> None:
    ns: dict[str, Any] = {}
    import os

    os.environ["EMBER_T_KEEP"] = "old"
    os.environ.pop("EMBER_T_NEW", None)
    try:
        exec(B.env_code({"EMBER_T_KEEP": "new", "EMBER_T_NEW": "x'\"\n"}), ns)
        assert os.environ["EMBER_T_KEEP"] == "new" and os.environ["EMBER_T_NEW"] == "x'\"\n"
        exec(B.RESTORE_ENV_CODE, ns)
        assert os.environ["EMBER_T_KEEP"] == "old" and "EMBER_T_NEW" not in os.environ
        assert not [k for k in ns if k.startswith("_ember")]
    finally:
        os.environ.pop("EMBER_T_KEEP", None)


def test_bridge_events_are_checked_and_reencoded() -> None:
    assert W.parse_event(b'{"ev": "ready", "pid": 9}') == W.Event("ready")
    assert W.parse_event(b'{"ev": "done", "id": 4}') == W.Event("done", 4)
    assert W.parse_event(b'{"ev": "fatal", "message": "no"}') == W.Event("fatal", message="no")
    out = W.parse_event(json.dumps({"ev": "out", "id": 4, "line": {
        "type": "result", "png": "AA", "is_main_result": "yes", "chart": {"x": 1},
        "evil": 1, "json": [1]}}).encode())
    assert out is not None and out.kind == "out"
    assert json.loads(out.line) == {"type": "result", "is_main_result": False, "png": "AA"}
    for bad in (b"", b"nope", b"[]", b'{"ev": "out", "id": "4", "line": {"type": "stdout"}}',
                b'{"ev": "out", "id": 4, "line": {"type": "stdout", "text": 1}}',
                b'{"ev": "out", "id": 4, "line": {"type": "shell"}}',
                b'{"ev": "done", "id": true}', b'{"ev": "what", "id": 1}', b"\xff\xfe"):
        assert W.parse_event(bad) is None, bad


@settings(deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.sampled_from(
                        ["type", "text", "timestamp", "name", "value", "traceback", "png",
                         "is_main_result", "execution_count", "extra", "json"]) | st.text(
                        max_size=4), kids, max_size=6), max_leaves=20),
       st.sampled_from([*B.LINE_TYPES, "x"]))
def test_hostile_lines_always_parse_in_the_sdk(obj: Any, kind: str) -> None:
    """Whatever the guest sends, a line that passes is one the SDK's parser takes."""
    models = pytest.importorskip("e2b_code_interpreter.models")
    if isinstance(obj, dict):
        obj = {**obj, "type": kind}
    ev = W.parse_event(json.dumps({"ev": "out", "id": 1, "line": obj}).encode())
    if ev is None:
        return
    execution = models.Execution()
    models.parse_output(execution, ev.line.decode())


def test_sdk_parses_what_the_bridge_makes() -> None:
    models = pytest.importorskip("e2b_code_interpreter.models")
    seen: list[Any] = []
    execution = models.Execution()
    for msg in (_iopub("execute_input", execution_count=2),
                _iopub("stream", name="stdout", text="out\n"),
                _iopub("stream", name="stderr", text="err\n"),
                _iopub("display_data", data={"image/png": "iVBOR", "text/plain": "<F>"}),
                _iopub("execute_result", data={"text/plain": "42"}),
                _iopub("error", ename="E", evalue="v", traceback=["t1", "t2"])):
        line = B.e2b_line(msg, 1)
        ev = W.parse_event(json.dumps({"ev": "out", "id": 1, "line": line}).encode())
        assert ev is not None
        models.parse_output(execution, ev.line.decode(), on_stdout=seen.append,
                            on_stderr=seen.append, on_result=seen.append, on_error=seen.append)
    models.parse_output(execution, W.error_line("OutputTooLarge", "x").decode())
    assert execution.execution_count == 2 and execution.text == "42"
    assert execution.logs.stdout == ["out\n"] and execution.logs.stderr == ["err\n"]
    assert execution.results[0].png == "iVBOR" and not execution.results[0].is_main_result
    assert execution.error.name == "OutputTooLarge" and len(seen) == 5


def test_long_streams_are_split() -> None:
    line = {"type": "stdout", "text": "x" * (2 * B.MAX_STREAM_CHARS + 1), "timestamp": 1}
    parts = B.split_stream(line)
    assert [len(p["text"]) for p in parts] == [B.MAX_STREAM_CHARS, B.MAX_STREAM_CHARS, 1]
    assert all(p["type"] == "stdout" for p in parts)
    small = {"type": "result", "text": "x"}
    assert B.split_stream(small) == [small]


def test_openblas_is_told_its_kernels_on_qemu64_only() -> None:
    qemu64 = ("processor\t: 0\nflags\t\t: fpu sse sse2 syscall nx lm pni cx16 hypervisor "
              "lahf_lm svm 3dnowprefetch\n")
    assert B.blas_core_override(qemu64)
    assert not B.blas_core_override(qemu64.replace("pni", "pni ssse3 sse4_1 avx2"))
    assert not B.blas_core_override("processor\t: 0\n")
