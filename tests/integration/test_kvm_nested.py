"""The KVM layer: ember's KVM path tested for real on hosts without a usable KVM (issue 17).

One outer VM (TCG emulating AMD SVM, no NIC; ``tests/nested/outer.py``) boots Debian's
generic kernel, whose kvm-amd gives it a real ``/dev/kvm``, set to ``0660 root:kvm`` as on
a stock Debian 12 host. The tests of ``tests/nested/selection.py`` run inside with pytest;
each comes back here as its own pass or fail, with the inside's log. On a host whose own
KVM is usable those tests run in the main suite instead, and this layer is skipped.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ember.engine import detect_accel
from tests.nested import outer
from tests.nested.selection import SELECTION, junit_key

pytestmark = [pytest.mark.integration, pytest.mark.kvm_layer]
OUTER_TIMEOUT_S = 1200


@pytest.fixture(scope="module")
def inside(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[tuple[str, str], str], Path]:
    """Run the selection in the outer VM once: outcome by JUnit key, and the results dir."""
    if os.geteuid() != 0:
        pytest.skip("the nested KVM layer runs ember as root inside its VM")
    if detect_accel().accel == "kvm":
        pytest.skip("this host's KVM is usable: test_kvm_path.py runs in the main suite")
    results = tmp_path_factory.mktemp("kvm-layer")
    ids = " ".join(shlex.quote(node) for node in SELECTION)
    command = (f"EMBER_TEST_NESTED=1 EMBER_TEST_KEEP_LOG=\"$RESULTS/ember.log\" "
               f".venv/bin/python -m pytest -p no:cacheprovider -v -rA "
               f"--junitxml=\"$RESULTS/junit.xml\" {ids}")
    try:
        rc = outer.run(command, results, timeout=OUTER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        rc = 124  # killed: what finished inside is still reported below
    status = outer.inside_status(results)
    outcomes: dict[tuple[str, str], str] = {}
    junit = results / "junit.xml"
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            key = (case.get("classname", ""), case.get("name", ""))
            kinds = [child.tag for child in case if child.tag in ("failure", "error",
                                                                     "skipped")]
            detail = next((child.get("message", "") + "\n" + (child.text or "")
                           for child in case if child.tag in kinds), "")
            outcomes[key] = f"{kinds[0] if kinds else 'passed'}\n{detail}".strip()
    if not outcomes:
        pytest.fail(f"the nested KVM layer produced no results (outer VM exit {rc}, inside "
                    f"status {status}); see {results}:\n{_tail(results / 'output.log')}\n"
                    f"{_tail(results / 'outer-console.log')}")
    return outcomes, results


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"({path.name} missing)"


@pytest.mark.parametrize("node_id", SELECTION,
                         ids=[n.removeprefix("tests/integration/") for n in SELECTION])
def test_inside_the_nested_kvm_vm(inside: tuple[dict[tuple[str, str], str], Path],
                                  node_id: str) -> None:
    outcomes, results = inside
    got = outcomes.get(junit_key(node_id))
    assert got is not None, f"{node_id} did not run inside (see {results}/output.log)"
    assert got == "passed", f"{node_id} inside the nested KVM VM: {got[:6000]}"
