"""``owner_gone``: when a pid-named staging leftover may be removed."""

from __future__ import annotations

import os
import subprocess

from ember.locks import owner_gone


def test_owner_gone_only_for_a_pid_that_no_longer_runs() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert owner_gone(str(dead.pid))
    assert not owner_gone(str(os.getpid()))
    assert not owner_gone("")
    assert not owner_gone("12x")
    assert not owner_gone("-1")
