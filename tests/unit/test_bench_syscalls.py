"""ember.bench.syscalls: reading ``strace -c`` summaries (pure) and the process tree."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from ember.bench.syscalls import parse_strace_summary, process_tree

SAMPLE = """\
strace: Process 4242 attached with 3 threads
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 61.20    0.001234          12       100           ppoll
 20.00    0.000400           4       100        50 read
 10.00    0.000200           2       100           write
  8.80    0.000176          17        10           rt_sigreturn
------ ----------- ----------- --------- --------- ----------------
100.00    0.002010           6       310        50 total
"""


def test_parse_reads_every_row_but_total() -> None:
    assert parse_strace_summary(SAMPLE) == {"ppoll": 100, "read": 100, "write": 100,
                                            "rt_sigreturn": 10}


def test_parse_ignores_noise() -> None:
    assert parse_strace_summary("") == {}
    assert parse_strace_summary("strace: attach: ptrace(PTRACE_SEIZE, 1): Operation not "
                                "permitted\n") == {}
    assert parse_strace_summary(" 1.0 0.1 1 x y z\n 1.0 0.1 1 2 a;b\n") == {}


@given(st.text(max_size=2000))
def test_parse_never_raises(text: str) -> None:
    out = parse_strace_summary(text)
    assert all(isinstance(v, int) for v in out.values())


def test_process_tree_holds_the_root_first() -> None:
    tree = process_tree(os.getpid())
    assert tree[0] == os.getpid()
    assert process_tree(2**22 + 12345) == []


def test_attach_failures_are_counted() -> None:
    from ember.bench.syscalls import attach_failures

    err = ("strace: Process 1 attached\n"
           "strace: attach: ptrace(PTRACE_SEIZE, 7): Operation not permitted\n"
           "strace: attach: ptrace(PTRACE_SEIZE, 8): Operation not permitted\n")
    assert attach_failures(err) == 2
    assert attach_failures("") == 0
