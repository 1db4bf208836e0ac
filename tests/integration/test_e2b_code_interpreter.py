"""E2B's official ``e2b-code-interpreter`` SDK against a real daemon (TCP listener, API
keys) and a real guest of the ``code-interpreter-v1`` template: a Jupyter kernel driven by
ember's kernel bridge. State, streams, charts, errors, contexts, timeouts, bad input."""

from __future__ import annotations

import asyncio
import base64
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ember.daemon import control
from ember.daemon.auth import new_key
from ember.e2b.jupyter_wire import MAX_CODE_BYTES
from ember.paths import Paths
from ember.store import Store
from tests.oci_fixtures import free_port

ci = pytest.importorskip("e2b_code_interpreter")
from e2b import NotFoundException, SandboxException, TimeoutException  # noqa: E402
from e2b_code_interpreter import Sandbox  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ci_template(ember_paths: Paths, kernel: object, store: Store) -> object:
    """The code interpreter's template, built once (Debian's packages; cached by recipe)."""
    from ember.guest.image import build_image

    return build_image(ember_paths, store, "code-interpreter-v1", force=True)


@pytest.fixture(scope="module")
def api(ember_paths: Paths, ci_template: object) -> Iterator[dict[str, Any]]:
    url = f"http://127.0.0.1:{free_port()}"
    control.stop(ember_paths)
    control.start(ember_paths, listen=url.removeprefix("http://"))
    _, key = new_key(Store(ember_paths.db), "alice")
    try:
        yield {"opts": {"api_key": key, "api_url": url, "sandbox_url": url}, "url": url}
    finally:
        control.stop(ember_paths)


@pytest.fixture(scope="module")
def sbx(api: dict[str, Any]) -> Iterator[Sandbox]:
    box = Sandbox.create(timeout=1800, **api["opts"])  # template code-interpreter-v1
    yield box
    box.kill()


def test_state_persists_and_executions_count(sbx: Sandbox) -> None:
    t0 = time.monotonic()
    first = sbx.run_code("x = 41")  # starts the default context's kernel
    started = time.monotonic() - t0
    assert first.error is None and first.results == []
    t0 = time.monotonic()
    second = sbx.run_code("x + 1")
    print(f"first run_code (kernel start) {started:.1f} s, next {time.monotonic() - t0:.2f} s")
    assert sbx.get_info().memory_mb == 1024  # the template's default
    assert second.text == "42" and second.results[0].is_main_result
    assert second.execution_count == first.execution_count + 1


def test_stdout_and_stderr_stream_to_callbacks(sbx: Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    ex = sbx.run_code("import sys\nprint('to out')\nprint('to err', file=sys.stderr)\n"
                      "for i in range(3): print(i, flush=True)",
                      on_stdout=lambda m: out.append(m.line), on_stderr=lambda m: err.append(
                          m.line))
    assert "".join(out) == "to out\n0\n1\n2\n" == "".join(ex.logs.stdout)
    assert "".join(err) == "to err\n" == "".join(ex.logs.stderr)


def test_matplotlib_show_is_a_png_result(sbx: Sandbox) -> None:
    seen: list[Any] = []
    ex = sbx.run_code("import matplotlib.pyplot as plt\n"
                      "plt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\nplt.show()",
                      on_result=seen.append)
    assert ex.error is None, ex.error
    pngs = [r.png for r in ex.results if r.png]
    assert len(pngs) == 1 and seen and seen[0].png == pngs[0]
    assert base64.b64decode(pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")
    assert not ex.results[0].is_main_result
    html = sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
    assert html.results[0].html and "<table" in html.results[0].html


def test_numpy_runs_outside_a_kernel_too(sbx: Sandbox) -> None:
    """A matrix product through plain commands: under TCG the guest CPU is QEMU's ``max``
    (qemu64 sent OpenBLAS down 3DNow! code that TCG cannot run: SIGILL)."""
    r = sbx.commands.run("python3 -c 'import numpy as n; a = n.ones((300, 300)); "
                         "print(int((a @ a).sum()))'", timeout=120)
    assert (r.exit_code, r.stdout) == (0, "27000000\n")


def test_errors_come_with_name_and_traceback(sbx: Sandbox) -> None:
    errors: list[Any] = []
    ex = sbx.run_code("def f():\n    return 1 / 0\nf()", on_error=errors.append)
    assert ex.error is not None and ex.error.name == "ZeroDivisionError"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", ex.error.traceback)  # the kernel's colours
    assert ex.error.value == "division by zero" and "----> 3 f()" in plain
    assert "return 1 / 0" in plain and plain.rstrip().endswith("division by zero")
    assert errors and errors[0].name == "ZeroDivisionError"
    assert sbx.run_code("'still alive'").text == "'still alive'"


def test_env_vars_apply_to_one_run(sbx: Sandbox) -> None:
    code = "import os\nos.environ.get('EMBER_CI_VAR')"
    assert sbx.run_code(code, envs={"EMBER_CI_VAR": "for this run"}).text == "'for this run'"
    assert sbx.run_code(code).text is None  # restored: the cell's value is None


def test_contexts_create_list_restart_remove(sbx: Sandbox) -> None:
    ctx = sbx.create_code_context(cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    assert sbx.run_code("import os\nos.getcwd()", context=ctx).text == "'/tmp'"
    sbx.run_code("only_here = 1", context=ctx)
    assert sbx.run_code("only_here", context=ctx).text == "1"
    assert sbx.run_code("only_here").error.name == "NameError"  # the default context
    listed = {c.id: c for c in sbx.list_code_contexts()}
    assert ctx.id in listed and listed[ctx.id].cwd == "/tmp" and len(listed) >= 2
    sbx.restart_code_context(ctx)
    assert sbx.run_code("only_here", context=ctx).error.name == "NameError"
    sbx.remove_code_context(ctx.id)
    assert ctx.id not in {c.id for c in sbx.list_code_contexts()}
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=ctx)
    with pytest.raises(NotFoundException):
        sbx.restart_code_context(ctx)


def test_timeout_interrupts_the_kernel(sbx: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sbx.run_code("import time\ntime.sleep(600)", timeout=3)
    # the client went away at its deadline: the kernel was interrupted, not left sleeping
    assert sbx.run_code("'free again'", timeout=90).text == "'free again'"


def test_client_gone_mid_stream_leaves_the_context_usable(sbx: Sandbox, api: dict[str, Any]
                                                          ) -> None:
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999",
               "X-Access-Token": sbx._envd_access_token or ""}
    with httpx.Client(base_url=api["url"], timeout=60) as c, c.stream(
            "POST", "/execute", headers=headers,
            json={"code": "import time\nwhile True:\n    print('tick', flush=True)\n"
                          "    time.sleep(0.2)"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if "tick" in line:
                break  # and close the connection in the middle of the run
    assert sbx.run_code("'next'", timeout=90).text == "'next'"


def test_wrong_token_and_bad_input(sbx: Sandbox, api: dict[str, Any]) -> None:
    wrong = Sandbox(sandbox_id=sbx.sandbox_id, envd_version=sbx._envd_version,
                    envd_access_token="wrong", traffic_access_token="wrong",
                    sandbox_domain=None, connection_config=sbx.connection_config)
    for call in (lambda: wrong.run_code("1"), wrong.list_code_contexts,
                 wrong.create_code_context):
        with pytest.raises(SandboxException) as exc:
            call()
        assert "401" in str(exc.value)
    with pytest.raises(SandboxException) as exc:
        sbx.run_code("x = 1\n" * (MAX_CODE_BYTES // 6 + 1))
    assert "413" in str(exc.value)
    with pytest.raises(SandboxException) as exc:
        sbx.run_code("1", language="javascript")
    assert "400" in str(exc.value) and "Python only" in str(exc.value)


def test_runs_on_one_context_queue_in_order(sbx: Sandbox) -> None:
    got: dict[int, Any] = {}

    def go(i: int) -> None:
        got[i] = sbx.run_code(f"import time\ntime.sleep(0.5)\n{i}")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {i: got[i].text for i in range(3)} == {0: "0", 1: "1", 2: "2"}


def test_a_restarted_daemon_ends_the_old_bridges(sbx: Sandbox, api: dict[str, Any],
                                                 ember_paths: Paths) -> None:
    def bridges() -> int:
        ps = sbx.commands.run("ps -eo args").stdout
        return sum("kernel_bridge-" in line for line in ps.splitlines())

    sbx.run_code("before_restart = 1")
    assert bridges() >= 1
    control.stop(ember_paths)  # its sandboxes (and their kernels) keep running
    control.start(ember_paths, listen=api["url"].removeprefix("http://"))
    # the daemon forgot its contexts: the next run starts a new default context, and the
    # bridges nobody drives are ended first
    assert sbx.run_code("before_restart").error.name == "NameError"
    assert [c.cwd for c in sbx.list_code_contexts()] == ["/home/user"]
    assert bridges() == 1


def test_contexts_go_with_their_sandbox(api: dict[str, Any]) -> None:
    box = Sandbox.create(timeout=600, **api["opts"])
    try:
        assert box.run_code("1 + 1").text == "2"
    finally:
        box.kill()
    with pytest.raises((SandboxException, TimeoutException)):
        box.run_code("1 + 1", timeout=30)


def test_a_template_without_jupyter_says_so(api: dict[str, Any], debian_template: object
                                            ) -> None:
    box = Sandbox.create("base", timeout=300, **api["opts"])  # debian-python: no kernel
    try:
        with pytest.raises(SandboxException) as exc:
            box.run_code("1")
        assert "500" in str(exc.value) and "jupyter_client" in str(exc.value)
        assert box.list_code_contexts() == []
        assert box.commands.run("echo fine").stdout == "fine\n"  # the sandbox itself is
    finally:
        box.kill()


def test_the_async_sdk(api: dict[str, Any]) -> None:
    from e2b_code_interpreter import AsyncSandbox

    async def go() -> None:
        box = await AsyncSandbox.create(timeout=600, **api["opts"])
        try:
            seen: list[str] = []

            async def on_stdout(msg: Any) -> None:
                seen.append(msg.line)

            ex = await box.run_code("print('async'); 6 * 7", on_stdout=on_stdout)
            assert ex.text == "42" and seen == ["async\n"]
            ctx = await box.create_code_context()
            assert ctx.cwd == "/home/user"
            assert [c.id for c in await box.list_code_contexts()].count(ctx.id) == 1
            with pytest.raises(TimeoutException):
                await box.run_code("import time\ntime.sleep(600)", context=ctx, timeout=3)
            assert (await box.run_code("'free'", context=ctx, timeout=90)).text == "'free'"
        finally:
            await box.kill()

    asyncio.run(go())
