"""``owner_gone`` and ``sweep_abandoned``: when a staging leftover may be removed."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_sweep_abandoned_removes_only_directories_no_writer_holds(tmp_path: Path) -> None:
    dead, live = tmp_path / "stage-dead", tmp_path / "stage-live"
    for d in (dead, live):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_text("x")
    holder = FileLock(live / ".lock")
    assert holder.try_acquire()
    try:
        # another process's view: the live one's lock is held, the dead one's is free
        code = ("import sys; from pathlib import Path; from ember.locks import sweep_abandoned;"
                f"print(sweep_abandoned(sorted(Path({str(tmp_path)!r}).glob('stage-*'))))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    finally:
        holder.release()
    assert out.strip() == "['stage-dead']"
    assert not dead.exists() and (live / "sub" / "f").exists()
