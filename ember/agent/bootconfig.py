"""Pure helpers of init: the kernel command line, and the image's digest for checks."""

from __future__ import annotations

import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

DEFAULT_HOSTNAME = "ember"
MODES = ("agent", "check")
IMAGE_INFO_PATH = "/.ember/image.json"
MAX_IMAGE_INFO = 1 << 20

# Patterns, not compiled objects: ``re`` compiles (and caches) one only when it is used,
# so that an agent boot never compiles the digest pattern (a check boot's).
_HOSTNAME = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
_DIGEST = r"^[A-Za-z0-9][A-Za-z0-9:._+-]{0,199}$"


class BootConfig:
    """What init takes from the ``ember.*`` kernel parameters (an immutable value; not a
    dataclass, whose import costs a TCG-emulated guest tens of milliseconds at boot)."""

    __slots__ = ("hostname", "mode", "problems")

    def __init__(
        self, mode: str = "agent", hostname: str = DEFAULT_HOSTNAME, problems: tuple[str, ...] = ()
    ) -> None:
        self.mode: Final = mode
        self.hostname: Final = hostname
        self.problems: Final = problems
        """Parameters that were ignored, and why (init logs them)."""

    def _key(self) -> tuple[str, str, tuple[str, ...]]:
        return self.mode, self.hostname, self.problems

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, BootConfig) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        mode, hostname, problems = self._key()
        return f"BootConfig(mode={mode!r}, hostname={hostname!r}, problems={problems!r})"


def parse_cmdline(text: str) -> dict[str, str]:
    """Split a kernel command line into ``name -> value`` (``""`` for bare words).

    Double quotes group words as the kernel does (``a="b c"``); parsing stops at ``--``
    (what follows is for init's argv). Later parameters override earlier ones.
    """
    params: dict[str, str] = {}
    for word in _split(text):
        if word == "--":
            break
        name, _, value = word.partition("=")
        if name:
            params[name] = value
    return params


def boot_config(params: dict[str, str]) -> BootConfig:
    """Read ``ember.mode`` and ``ember.hostname``, falling back to defaults when invalid."""
    problems: list[str] = []
    mode = params.get("ember.mode", "agent")
    if mode not in MODES:
        problems.append(f"unknown ember.mode={mode!r}, using agent")
        mode = "agent"
    hostname = params.get("ember.hostname", DEFAULT_HOSTNAME)
    if not re.match(_HOSTNAME, hostname):
        problems.append(f"invalid ember.hostname={hostname!r}, using {DEFAULT_HOSTNAME}")
        hostname = DEFAULT_HOSTNAME
    return BootConfig(mode, hostname, tuple(problems))


def read_image_digest(path: str = IMAGE_INFO_PATH) -> str:
    """The ``digest`` of the image description, or ``"none"`` if missing or unusable."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_IMAGE_INFO + 1)
    except OSError:
        return "none"
    if len(raw) > MAX_IMAGE_INFO:
        return "none"
    import json  # only a check boot reads the image description

    try:
        info = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return "none"
    digest = info.get("digest") if isinstance(info, dict) else None
    if not isinstance(digest, str) or not re.match(_DIGEST, digest):
        return "none"
    return digest


def check_line(kernel_release: str, digest: str) -> str:
    """The one line a ``check`` boot prints (without the newline)."""
    kernel = "".join(c for c in kernel_release if c.isprintable() and not c.isspace()) or "?"
    return f"EMBER-CHECK kernel={kernel} digest={digest}"


def _split(text: str) -> list[str]:
    if '"' not in text:
        return text.split()  # the same words, without a Python loop per character
    words: list[str] = []
    current: list[str] = []
    quoted = False
    started = False
    for char in text:
        if char == '"':
            quoted = not quoted
            started = True
        elif char.isspace() and not quoted:
            if started:
                words.append("".join(current))
                current.clear()
                started = False
        else:
            current.append(char)
            started = True
    if started:
        words.append("".join(current))
    return words
