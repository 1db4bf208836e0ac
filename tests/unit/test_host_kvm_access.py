"""Whether a jailed VMM can open /dev/kvm: judged from the mode, and probed as a jail uid.

The probe is real (a child process with an unprivileged uid and the device's group opens
the file); the "device" is a regular file, so the open tells the permission story and the
KVM ioctl that follows fails as it must on a non-KVM file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.host.kvm_access import FIX, judge_mode, kvm_access, probe_as_jail

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="probing as another uid needs root")
GID = 4242
UID = 2_000_065_535


@pytest.fixture
def dev() -> Iterator[Path]:
    """A fake device in a directory every uid can traverse (pytest's tmp is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="ember-kvm-access-"))
    os.chmod(d, 0o755)
    f = d / "kvm"
    f.write_text("")
    yield f
    shutil.rmtree(d)


def _set(f: Path, mode: int, gid: int) -> os.stat_result:
    os.chown(f, 0, gid)
    os.chmod(f, mode)
    return f.stat()


def test_group_read_writable_device_gives_the_jail_that_group(dev: Path) -> None:
    a = judge_mode(_set(dev, 0o660, GID))
    assert a.ok and a.groups == (GID,) and a.fix is None
    assert a.detail.startswith(f"0660 root:{GID}")


@pytest.mark.parametrize(("mode", "gid"), [(0o600, GID), (0o660, 0), (0o640, GID),
                                           (0o604, 0)])
def test_no_access_for_an_unprivileged_uid_is_refused_with_the_fix(
        dev: Path, mode: int, gid: int) -> None:
    a = judge_mode(_set(dev, mode, gid))
    assert not a.ok and a.fix == FIX and "cannot open it" in a.detail


def test_the_probe_opens_as_the_jail_would(dev: Path) -> None:
    _set(dev, 0o660, GID)
    ok, said = probe_as_jail(dev, (GID,), UID)
    # Opened (the group works), then the KVM ioctl fails: a regular file is no KVM.
    assert not ok and said.startswith("KVM ioctl failed"), said
    ok, said = probe_as_jail(dev, (), UID)  # without the group: no access
    assert not ok and said == "open failed: Permission denied", said


def test_kvm_access_with_probe_reports_what_the_probe_saw(dev: Path) -> None:
    _set(dev, 0o660, GID)
    assert kvm_access(dev).ok  # the mode alone allows it
    probed = kvm_access(dev, probe=True)
    assert not probed.ok and "KVM ioctl failed" in probed.detail and probed.groups == (GID,)
    assert not kvm_access(dev.with_name("missing")).ok
