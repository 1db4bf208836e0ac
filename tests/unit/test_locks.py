"""``owner_gone``: when a pid-named staging leftover may be removed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ember.locks import FileLock, owner_gone


def test_owner_gone_only_for_a_pid_that_no_longer_runs() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert owner_gone(str(dead.pid))
    assert not owner_gone(str(os.getpid()))
    assert not owner_gone("")
    assert not owner_gone("12x")
    assert not owner_gone("-1")


def test_a_holder_says_what_it_holds_the_lock_for(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "snapshot.lock")
    other = FileLock(tmp_path / "snapshot.lock")
    assert lock.try_acquire()
    assert not other.marked("recovering")
    lock.mark("recovering")
    assert other.marked("recovering") and not other.marked("writing")
    assert other.holder() == os.getpid()
    assert not other.try_acquire()
    lock.release()
    assert other.try_acquire() and not lock.marked("recovering")  # a new holder, no note
    other.release()
