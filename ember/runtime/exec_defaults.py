"""What a template's image says about how its commands run (no I/O).

A template built from an OCI image or a Dockerfile carries that image's run metadata in
``config["oci"]`` (``env``, ``working_dir``, ``user``, ``cmd``, ``entrypoint``,
``exposed_ports``). Every command run in a sandbox of it gets, as with ``docker run``:

* the image's environment, under the sandbox's (``create(env=...)``) and the command's own;
* the image's working directory, unless the command names one;
* the image's user (``name``, ``uid``, ``name:group``: the group part is not applied, the
  user runs with its own groups), unless the command names one.

:func:`exec_defaults` reads them once from a template's config; :meth:`ExecDefaults.apply`
is called where every exec request is built (``AsyncSandbox._spawn``), so the SDK, the CLI,
the daemon's exec and terminal routes and the E2B envd process API all get the same
defaults. The config came from an image (registry content): every value is checked and
bounded here, and what does not fit is ignored rather than trusted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Bounds on what an image's metadata may give (the agent bounds a request as well).
MAX_ENV = 1024
MAX_ENV_BYTES = 256 << 10
MAX_PATH = 4096
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,255}")
_USER = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}")


@dataclass(frozen=True)
class ExecDefaults:
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | int | None = None
    #: ENTRYPOINT + CMD: what ``ember run -t TEMPLATE`` runs without a command (empty: none).
    command: tuple[str, ...] = ()

    def apply(self, env: Mapping[str, str] | None, cwd: str | None,
              user: str | int | None) -> tuple[dict[str, str], str | None, str | int | None]:
        """The caller's env over the image's; the caller's cwd and user when given."""
        return ({**self.env, **(env or {})}, cwd if cwd is not None else self.cwd,
                user if user is not None else self.user)


NONE = ExecDefaults()


def exec_defaults(config: Mapping[str, Any] | None) -> ExecDefaults:
    """The defaults of a template whose config is ``config`` (a TemplateRecord's)."""
    oci = config.get("oci") if isinstance(config, Mapping) else None
    if not isinstance(oci, Mapping):
        return NONE
    return ExecDefaults(env=_env(oci.get("env")), cwd=_cwd(oci.get("working_dir")),
                        user=parse_user(oci.get("user")),
                        command=image_command(oci))


def image_command(oci: Mapping[str, Any]) -> tuple[str, ...]:
    """ENTRYPOINT followed by CMD, as ``docker run IMAGE`` runs them."""
    out: list[str] = []
    for key in ("entrypoint", "cmd"):
        value = oci.get(key)
        if isinstance(value, list | tuple):
            out.extend(v for v in value if isinstance(v, str) and "\0" not in v)
    return tuple(out[:4096])


def parse_user(value: object) -> str | int | None:
    """An image's ``User`` as the agent takes it: a name, a uid, or None (``""``)."""
    if not isinstance(value, str) or not value:
        return None
    name = value.split(":", 1)[0]
    if name.isdigit():
        return int(name) if len(name) <= 10 and int(name) < 1 << 32 else None
    return name if _USER.fullmatch(name) else None


def _env(value: object) -> dict[str, str]:
    out: dict[str, str] = {}
    if not isinstance(value, list | tuple):
        return out
    total = 0
    for item in value[:MAX_ENV]:
        if not isinstance(item, str) or "\0" in item:
            continue
        name, eq, val = item.partition("=")
        total += len(item)
        if not eq or not _ENV_NAME.fullmatch(name) or total > MAX_ENV_BYTES:
            continue
        out[name] = val
    return out


def _cwd(value: object) -> str | None:
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_PATH \
            or "\0" in value:
        return None
    return value


__all__ = ("NONE", "ExecDefaults", "exec_defaults", "image_command", "parse_user")
