"""The nested-KVM layer's report reading: JUnit outcomes and the one retry of failures."""

from __future__ import annotations

from pathlib import Path

from tests.nested.results import merge_retry, read_junit

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.integration.test_a" name="test_ok" time="1.0"/>
<testcase classname="tests.integration.test_a" name="test_bad[x]" time="1.0">
  <failure message="AssertionError: boom">trace</failure></testcase>
<testcase classname="tests.integration.test_b" name="test_setup" time="0.1">
  <error message="fixture broke">trace</error></testcase>
<testcase classname="tests.integration.test_b" name="test_skip" time="0.0">
  <skipped message="needs KVM"/></testcase>
</testsuite></testsuites>"""


def test_outcomes_by_key(tmp_path: Path) -> None:
    (tmp_path / "j.xml").write_text(JUNIT)
    got = read_junit(tmp_path / "j.xml")
    assert got[("tests.integration.test_a", "test_ok")] == "passed"
    assert got[("tests.integration.test_a", "test_bad[x]")].startswith("failure\nAssertionError")
    assert got[("tests.integration.test_b", "test_setup")].startswith("error\nfixture broke")
    assert got[("tests.integration.test_b", "test_skip")].startswith("skipped")  # not a pass
    assert read_junit(tmp_path / "missing.xml") == {}
    (tmp_path / "cut.xml").write_text(JUNIT[:200])  # killed mid-write
    assert read_junit(tmp_path / "cut.xml") == {}


def test_a_retry_only_rescues_what_failed_and_passed_then() -> None:
    first = {("a", "ok"): "passed", ("a", "flaky"): "error\nhang", ("a", "bad"): "failure\nx",
             ("a", "skip"): "skipped\nno"}
    retry = {("a", "flaky"): "passed", ("a", "bad"): "failure\ny", ("a", "ok"): "failure\nz",
             ("a", "new"): "passed"}
    merged, flaky = merge_retry(first, retry)
    assert merged == {("a", "ok"): "passed", ("a", "flaky"): "passed", ("a", "bad"): "failure\nx",
                      ("a", "skip"): "skipped\nno"}
    assert flaky == {("a", "flaky"): "error\nhang"}
    assert merge_retry(first, {}) == (first, {})
