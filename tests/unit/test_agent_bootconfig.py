"""Pure parts of the guest init: kernel command line, image digest, the check line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.agent import INIT_SCRIPT, SHUTDOWN_EXIT_CODE
from ember.agent.bootconfig import (
    BootConfig,
    boot_config,
    check_line,
    parse_cmdline,
    read_image_digest,
)

CMDLINE = (
    "console=ttyS0 reboot=t panic=-1 root=/dev/vda rw quiet ember.mode=check "
    "ember.hostname=sbx-1 virtio_mmio.device=4K@0xfeb00000:12 init=/.ember/init "
    'note="a b  c" -- ember.mode=agent single\n'
)


def test_parse_cmdline() -> None:
    params = parse_cmdline(CMDLINE)
    assert params["console"] == "ttyS0"
    assert params["rw"] == "" and params["quiet"] == ""
    assert params["ember.mode"] == "check"  # the one after "--" belongs to init's argv
    assert params["ember.hostname"] == "sbx-1"
    assert params["virtio_mmio.device"] == "4K@0xfeb00000:12"
    assert params["note"] == "a b  c"
    assert "single" not in params


def test_parse_cmdline_without_quotes_agrees() -> None:
    plain = CMDLINE.replace('note="a b  c" ', "")  # no quote at all: split in one call
    expected = {k: v for k, v in parse_cmdline(CMDLINE).items() if k != "note"}
    assert parse_cmdline(plain) == expected
    assert parse_cmdline("a\tb=1\x0bc\u3000d") == {"a": "", "b": "1", "c": "", "d": ""}


def test_later_parameters_win_and_empty_lines_work() -> None:
    assert parse_cmdline("a=1 a=2")["a"] == "2"
    assert parse_cmdline("") == {} and parse_cmdline("  \n") == {}
    assert parse_cmdline('x="unterminated') == {"x": "unterminated"}
    assert parse_cmdline('=novalue "" ""=') == {}


def test_boot_config() -> None:
    assert boot_config(parse_cmdline(CMDLINE)) == BootConfig("check", "sbx-1")
    assert boot_config({}) == BootConfig("agent", "ember")


@pytest.mark.parametrize(
    "params",
    [
        {"ember.mode": "rescue"},
        {"ember.hostname": "bad host"},
        {"ember.hostname": "-x"},
        {"ember.hostname": "a" * 64},
        {"ember.hostname": ""},
    ],
)
def test_boot_config_falls_back(params: dict[str, str]) -> None:
    config = boot_config(params)
    assert (config.mode, config.hostname) == ("agent", "ember")
    assert len(config.problems) == 1


def _write(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "image.json"
    path.write_bytes(content)
    return str(path)


def test_image_digest(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    path = _write(tmp_path, json.dumps({"digest": digest, "name": "x"}).encode())
    assert read_image_digest(path) == digest


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1]",
        b'{"name": "x"}',
        b'{"digest": 5}',
        b'{"digest": "two words"}',
        b'{"digest": "line\\nbreak"}',
        b'{"digest": ""}',
        b"[" * 100_000,
    ],
)
def test_image_digest_unusable(tmp_path: Path, content: bytes) -> None:
    assert read_image_digest(_write(tmp_path, content)) == "none"


def test_image_digest_missing(tmp_path: Path) -> None:
    assert read_image_digest(str(tmp_path / "absent.json")) == "none"
    assert read_image_digest(str(tmp_path)) == "none"  # a directory


def test_check_line() -> None:
    assert (
        check_line("6.1.0-ember", "sha256:ab") == "EMBER-CHECK kernel=6.1.0-ember digest=sha256:ab"
    )
    assert check_line("6.1 weird\n", "none") == "EMBER-CHECK kernel=6.1weird digest=none"


def test_init_script() -> None:
    assert INIT_SCRIPT == (
        "#!/.ember/runtime/bin/python3 -IS\n"
        "import sys\n"
        'sys.path.insert(0, "/.ember/lib")\n'
        "from ember.agent.init import main\n"
        "main()\n"
    )
    compile(INIT_SCRIPT, "/.ember/init", "exec")
    assert SHUTDOWN_EXIT_CODE not in (0, 1)


def test_init_refuses_to_run_unless_pid_1() -> None:
    from ember.agent import init

    init.main()  # logs and returns: never mounts, kills or reboots on a host
