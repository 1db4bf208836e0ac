"""ember.cluster.child: the one-JSON-line convention between a daemon and the child
processes that talk to Ray (real child processes; none of these reaches Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ember.cluster import child
from ember.errors import HostError


def _run_answer(body: str) -> tuple[int, str]:
    code = f"from ember.cluster import child\n{body}\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    return done.returncode, done.stdout


def test_answer_prints_one_json_line_and_leaves() -> None:
    rc, out = _run_answer("child.answer(lambda: {'a': [1, 2]})\nprint('never')")
    assert rc == 0
    assert out.splitlines() == ['{"a": [1, 2]}']


def test_answer_reports_what_went_wrong_bounded() -> None:
    rc, out = _run_answer("def boom():\n    raise ValueError('x' * 5000)\nchild.answer(boom)")
    assert rc == 0
    got = json.loads(out)
    assert got["error"].startswith("ValueError: xxx")
    assert len(got["error"]) == child.MAX_ERROR_CHARS


def test_ask_raises_the_childs_error_naming_the_step() -> None:
    with pytest.raises(HostError, match=r"reading templates failed: ValueError: unknown "
                                        r"command 'bogus'"):
        child.ask("templates", "bogus", "127.0.0.1:1", what="reading templates", timeout=60)


def test_ask_can_return_an_error_answer_as_data() -> None:
    got = child.ask("templates", "bogus", "127.0.0.1:1", what="reading templates",
                    timeout=60, error_is_failure=False)
    assert "unknown command" in got["error"]


def test_ask_refuses_a_child_that_answers_no_json() -> None:
    # ember.cluster.__init__ as a module: it runs and prints nothing
    with pytest.raises(HostError, match="no answer"):
        child.ask("__init__", what="asking nothing", timeout=60)
