"""Debian templates' login shells run no program (rootfs_debian.quick_login)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ember.guest.rootfs_debian import quick_login

PROFILE = '''if [ "$(id -u)" -eq 0 ]; then
  PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
else
  PATH="/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
fi
export PATH
'''
DOT_PROFILE = '''if [ "$BASH" ]; then
  if [ -f ~/.bashrc ]; then
    . ~/.bashrc
  fi
fi

mesg n 2> /dev/null || true
'''


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "etc/profile").write_text(PROFILE)
    (tmp_path / "root/.profile").write_text(DOT_PROFILE)
    return tmp_path


def test_edits_are_made_once_and_keep_the_meaning(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    quick_login(root)
    quick_login(root)  # idempotent
    profile = (root / "etc/profile").read_text()
    assert '"${EUID:-$(id -u)}"' in profile and '"$(id -u)"' not in profile.replace(
        "${EUID:-$(id -u)}", "")
    assert "if [ -t 0 ]; then mesg n" in (root / "root/.profile").read_text()
    for shell in ("bash", "sh"):  # both shells still pick root's PATH, and parse the file
        out = subprocess.run([shell, "-c", f". {root}/etc/profile; echo $PATH"],
                             capture_output=True, text=True, check=True).stdout
        assert out.startswith("/usr/local/sbin:")
    r = subprocess.run(["sh", "-n", str(root / "root/.profile")], capture_output=True)
    assert r.returncode == 0, r.stderr


def test_missing_or_foreign_files_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/profile").write_text("PATH=/bin\n")
    quick_login(tmp_path)  # no root/.profile: nothing to do there
    assert (tmp_path / "etc/profile").read_text() == "PATH=/bin\n"
