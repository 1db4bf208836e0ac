"""Registry image references and auth challenges: strings in, values out, no I/O.

``HOST[:PORT]/repo[:tag][@sha256:...]``; a first component without ``.`` or ``:`` (and not
``localhost``) means Docker Hub, as ``docker pull`` reads it (``alpine`` is
``registry-1.docker.io/library/alpine:latest``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ember.errors import ImageSourceError
from ember.guest.oci.manifest import check_digest

DOCKER_HUB = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_PLAIN_HTTP_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
_REPO_PART_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_MAX_REF = 1024


@dataclass(frozen=True)
class RegistryRef:
    host: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def base_url(self) -> str:
        name = self.host.rsplit(":", 1)[0] if not self.host.endswith("]") else self.host
        scheme = "http" if name in _PLAIN_HTTP_HOSTS else "https"
        return f"{scheme}://{self.host}"

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_registry_ref(text: str) -> RegistryRef:
    """Parse ``HOST[:PORT]/repo[:tag][@digest]`` (Docker Hub shorthand allowed)."""
    if not text or len(text) > _MAX_REF:
        raise ImageSourceError(f"bad registry reference {text[:100]!r}")
    name, _, digest = text.partition("@")
    if digest:
        check_digest(digest, f"registry reference {text!r}")
    host, _, rest = name.partition("/")
    if not rest or not ("." in host or ":" in host or host == "localhost"):
        host, rest = DOCKER_HUB, name
    if host in _HUB_ALIASES:
        host = DOCKER_HUB
        if "/" not in rest:
            rest = "library/" + rest
    repo, tag = rest, None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        repo, _, tag = rest.rpartition(":")
        if not _TAG_RE.fullmatch(tag):
            raise ImageSourceError(f"bad tag {tag!r} in registry reference {text!r}")
    if not _HOST_RE.fullmatch(host):
        raise ImageSourceError(f"bad registry host {host!r} in reference {text!r}")
    if not all(_REPO_PART_RE.fullmatch(p) for p in repo.split("/")):
        raise ImageSourceError(f"bad repository name {repo!r} in registry reference {text!r}")
    if tag is None and not digest:
        tag = "latest"
    return RegistryRef(host, repo, tag, digest or None)


_PARAM_RE = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split a ``WWW-Authenticate`` value into its scheme and parameters.

    ``Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull"``
    gives ``("bearer", {"realm": ..., "service": ..., "scope": ...})``.
    """
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return scheme.lower(), params
