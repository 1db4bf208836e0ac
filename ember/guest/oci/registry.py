"""Pull an image from a registry over the OCI distribution API (v2), with urllib only.

Plain HTTP for ``localhost`` / ``127.0.0.1`` / ``[::1]``, HTTPS otherwise. A 401 with a
``Bearer`` challenge is answered by fetching an anonymous token from the named realm; the
token is never sent on to a redirect target (blob storage, CDNs). Every manifest and blob
is checked against its digest and size while it streams; sizes and waits are bounded.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

from ember.errors import ImageSourceError
from ember.guest.oci.blobs import copy_verified, read_small, verify_file
from ember.guest.oci.config import PulledImage
from ember.guest.oci.limits import (
    HTTP_BLOB_DEADLINE,
    HTTP_SMALL_DEADLINE,
    HTTP_TIMEOUT,
    MAX_HTTP_SMALL_BYTES,
    MAX_JSON_BYTES,
)
from ember.guest.oci.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    digest_of,
    follow_to_manifest,
)
from ember.guest.oci.reference import RegistryRef, parse_challenge, parse_registry_ref
from ember.guest.oci.unpack import Progress, unpack_image

ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
USER_AGENT = "ember-oci/1"
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,8192}")
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib would also follow ftp)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise ImageSourceError(f"registry redirected {req.full_url} to {newurl[:200]!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class RegistryClient:
    """Anonymous, read-only client for one repository of one registry."""

    def __init__(self, ref: RegistryRef, *, timeout: float = HTTP_TIMEOUT) -> None:
        self.ref = ref
        self._base = f"{ref.base_url}/v2/{ref.repository}"
        self._timeout = timeout
        self._token: str | None = None
        self._opener = urllib.request.build_opener(_HttpOnlyRedirects())

    def _open(self, url: str, what: str, accept: str | None = None) -> Any:
        for _ in range(2):
            req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            if accept:
                req.add_header("Accept", accept)
            if self._token:
                req.add_unredirected_header("Authorization", f"Bearer {self._token}")
            try:
                return self._opener.open(req, timeout=self._timeout)
            except urllib.error.HTTPError as err:
                with err:
                    if err.code == 401 and self._token is None:
                        self._token = self._authenticate(err.headers.get("WWW-Authenticate"), what)
                        continue
                    raise ImageSourceError(_http_error(err, what)) from err
            except _NETWORK_ERRORS as err:
                raise ImageSourceError(
                    f"{what}: cannot reach {self.ref.base_url}: {getattr(err, 'reason', err)}"
                ) from err
        raise ImageSourceError(f"{what}: the registry refused the anonymous token (HTTP 401)")

    def _authenticate(self, challenge: str | None, what: str) -> str:
        scheme, params = parse_challenge(challenge or "")
        if scheme == "basic":
            raise ImageSourceError(
                f"{what}: the registry wants a username and password "
                "(HTTP Basic auth); ember pulls anonymously"
            )
        realm = params.get("realm", "")
        if scheme != "bearer" or urllib.parse.urlsplit(realm).scheme not in ("http", "https"):
            raise ImageSourceError(
                f"{what}: HTTP 401 with an unsupported challenge {(challenge or '')[:200]!r}"
            )
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            with self._opener.open(req, timeout=self._timeout) as resp:
                raw = read_small(
                    resp,
                    MAX_HTTP_SMALL_BYTES,
                    f"{what}: token",
                    time.monotonic() + HTTP_SMALL_DEADLINE,
                )
        except urllib.error.HTTPError as err:
            with err:
                raise ImageSourceError(_http_error(err, f"{what}: token from {realm}")) from err
        except _NETWORK_ERRORS as err:
            raise ImageSourceError(f"{what}: cannot get a token from {realm}: {err}") from err
        try:
            doc = json.loads(raw)
        except ValueError as err:
            raise ImageSourceError(f"{what}: token response is not JSON") from err
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            raise ImageSourceError(f"{what}: token response from {realm} has no usable token")
        return token

    def manifest(self, reference: str, what: str) -> tuple[bytes, str, str]:
        """Fetch a manifest or index by tag or digest: (bytes, media type, digest)."""
        deadline = time.monotonic() + HTTP_SMALL_DEADLINE
        try:
            with self._open(f"{self._base}/manifests/{reference}", what, ACCEPT) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > MAX_JSON_BYTES:
                    raise ImageSourceError(
                        f"{what}: manifest is {length} bytes (at most {MAX_JSON_BYTES} allowed)"
                    )
                raw = read_small(resp, MAX_JSON_BYTES, f"{what}: manifest", deadline)
                media_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
                claimed = resp.headers.get("Docker-Content-Digest") or ""
        except _NETWORK_ERRORS as err:
            raise ImageSourceError(f"{what}: reading the manifest failed: {err}") from err
        algorithm = reference.partition(":")[0] if ":" in reference else "sha256"
        digest = digest_of(raw, algorithm)
        if ":" in reference and digest != reference:
            raise ImageSourceError(f"{what}: registry sent a manifest with digest {digest}")
        if claimed.startswith("sha256:") and claimed != digest_of(raw):
            raise ImageSourceError(
                f"{what}: manifest does not match the digest the registry claims ({claimed})"
            )
        return raw, media_type, digest

    def child_manifest(self, desc: Descriptor) -> bytes:
        raw, _media_type, _digest = self.manifest(desc.digest, f"image {self.ref}")
        if desc.size is not None and len(raw) != desc.size:
            raise ImageSourceError(
                f"image {self.ref}: manifest {desc.digest} is {len(raw)} "
                f"bytes, the index says {desc.size}"
            )
        return raw

    def blob(self, desc: Descriptor, store: Path, progress: Progress) -> Path:
        """Download a blob into ``store/<alg>/<hex>`` (reusing a good earlier copy)."""
        alg, _, hexpart = desc.digest.partition(":")
        path = store / alg / hexpart
        if path.is_file():
            try:
                verify_file(path, desc, where=str(path))
                return path
            except ImageSourceError:
                path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        size = f" ({desc.size / (1 << 20):.1f} MiB)" if desc.size is not None else ""
        progress(f"downloading {desc.digest[:19]}{size} from {self.ref.host}")
        what = f"image {self.ref}: blob {desc.digest}"
        try:
            with self._open(f"{self._base}/blobs/{desc.digest}", what) as resp:
                copy_verified(
                    resp,
                    path,
                    desc,
                    where=str(self.ref),
                    deadline=time.monotonic() + HTTP_BLOB_DEADLINE,
                )
        except _NETWORK_ERRORS as err:
            raise ImageSourceError(f"{what}: download failed: {err}") from err
        return path


def _http_error(err: urllib.error.HTTPError, what: str) -> str:
    detail = ""
    try:
        doc = json.loads(err.read(MAX_HTTP_SMALL_BYTES))
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list):
            detail = "; ".join(
                f"{e.get('code', '')}: {e.get('message', '')}"
                for e in errors[:5]
                if isinstance(e, dict)
            )
    except (ValueError, OSError, http.client.HTTPException):
        pass
    if err.code == 404:
        return f"{what}: not found in the registry (HTTP 404{': ' + detail if detail else ''})"
    return f"{what}: HTTP {err.code} {err.reason}{': ' + detail if detail else ''}"


def extract_registry(text: str, dest: Path, *, work: Path, progress: Progress) -> PulledImage:
    """Pull ``HOST[:PORT]/repo[:tag|@digest]`` into ``dest``; blobs go to ``work/blobs``."""
    ref = parse_registry_ref(text)
    client = RegistryClient(ref)
    what = f"image {ref}"
    progress(f"resolving {ref}")
    raw, media_type, digest = client.manifest(ref.reference, what)
    digest, manifest = follow_to_manifest(raw, media_type, digest, what, client.child_manifest)
    store = work / "blobs"
    return unpack_image(
        digest=digest,
        manifest=manifest,
        fetch=lambda d: client.blob(d, store, progress),
        dest=dest,
        what=what,
        progress=progress,
    )
