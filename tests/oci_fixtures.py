"""Test images built in-process: layer tars, OCI layouts, ``docker save`` tarballs, a registry.

Reusable by other tests: :func:`make_busybox_oci_layout` / :func:`make_busybox_docker_archive`
give "a busybox OCI image" (Debian's static busybox plus its applet symlinks in /bin);
:func:`start_registry` runs Debian's ``docker-registry`` on a free local port and
:func:`push_layout_to_registry` pushes a layout into it (plain distribution API v2 calls).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember import proc
from tests.serving import serving

MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
BUSYBOX = Path("/bin/busybox")


# --- layer tars ------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    name: str
    kind: str = "file"  # file | dir | symlink | hardlink | fifo | chardev | blockdev
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    pax: Mapping[str, str] = field(default_factory=dict)


def file(
    name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0, **kw: Any
) -> Entry:
    return Entry(name, "file", data=data, mode=mode, uid=uid, gid=gid, **kw)


def directory(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0, **kw: Any) -> Entry:
    return Entry(name, "dir", mode=mode, uid=uid, gid=gid, **kw)


def symlink(name: str, target: str, **kw: Any) -> Entry:
    return Entry(name, "symlink", target=target, mode=0o777, **kw)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, "hardlink", target=target)


def fifo(name: str, mode: int = 0o600) -> Entry:
    return Entry(name, "fifo", mode=mode)


def chardev(name: str) -> Entry:
    return Entry(name, "chardev", mode=0o666)


def whiteout(path: str) -> Entry:
    head, _, base = path.rpartition("/")
    return file(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opaque(dir_path: str) -> Entry:
    return file(f"{dir_path}/.wh..wh..opq")


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
}


def tar_bytes(entries: Sequence[Entry]) -> bytes:
    """An uncompressed PAX tar holding ``entries`` in order (names used verbatim)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.kind]
            ti.mode, ti.uid, ti.gid, ti.mtime = e.mode, e.uid, e.gid, e.mtime
            ti.linkname = e.target
            ti.pax_headers = dict(e.pax)
            if e.kind in ("chardev", "blockdev"):
                ti.devmajor, ti.devminor = 1, 3
            if e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def write_layer(path: Path, entries: Sequence[Entry], *, compress: bool = True) -> Path:
    raw = tar_bytes(entries)
    path.write_bytes(gz(raw) if compress else raw)
    return path


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- image configs and the sample image ---------------------------------------------------
def image_config(
    layers: Sequence[bytes],
    *,
    env: Sequence[str] = (),
    cmd: Sequence[str] = (),
    entrypoint: Sequence[str] | None = None,
    working_dir: str = "",
    user: str = "",
    arch: str = "amd64",
) -> dict[str, Any]:
    """An OCI image config for ``layers`` (tar bytes, gzip or not) with matching diff ids."""
    diff_ids = [sha256(gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b) for b in layers]
    run: dict[str, Any] = {
        "Env": list(env),
        "Cmd": list(cmd),
        "WorkingDir": working_dir,
        "User": user,
    }
    if entrypoint is not None:
        run["Entrypoint"] = list(entrypoint)
    return {
        "architecture": arch,
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


def sample_layers() -> list[bytes]:
    """Two uncompressed layers; the second deletes a file and makes a directory opaque."""
    lower = tar_bytes(
        [
            directory("etc"),
            file("etc/hostname", b"base\n"),
            file("etc/remove-me", b"x"),
            directory("usr"),
            directory("usr/bin"),
            file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
            directory("opt"),
            directory("opt/dir"),
            file("opt/dir/old", b"old"),
            directory("srv", mode=0o750, uid=1000, gid=1000),
        ]
    )
    upper = tar_bytes(
        [
            directory("etc"),
            whiteout("etc/remove-me"),
            file("etc/hostname", b"top\n"),
            directory("opt/dir"),
            opaque("opt/dir"),
            file("opt/dir/new", b"new"),
        ]
    )
    return [lower, upper]


def sample_config(layers: Sequence[bytes]) -> dict[str, Any]:
    return image_config(
        layers,
        env=["PATH=/usr/bin:/bin", "FOO=bar"],
        cmd=["/usr/bin/tool", "--serve"],
        entrypoint=["/bin/sh", "-c"],
        working_dir="/srv",
        user="1000:1000",
    )


def assert_sample_rootfs(root: Path) -> None:
    assert (root / "etc/hostname").read_bytes() == b"top\n"
    assert not (root / "etc/remove-me").exists()
    assert sorted(os.listdir(root / "opt/dir")) == ["new"]
    assert (root / "usr/bin/tool").stat().st_mode & 0o7777 == 0o755
    st = (root / "srv").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o750)
    assert not any(
        n.startswith(".wh.") for _d, dirs, files in os.walk(root) for n in (*dirs, *files)
    )


def assert_sample_config(config: Any) -> None:
    assert config.env == ("PATH=/usr/bin:/bin", "FOO=bar")
    assert config.working_dir == "/srv"
    assert config.user == "1000:1000"
    assert config.cmd == ("/usr/bin/tool", "--serve")
    assert config.entrypoint == ("/bin/sh", "-c")


# --- OCI layouts ---------------------------------------------------------------------------
def _put_blob(root: Path, data: bytes) -> str:
    digest = sha256(data)
    path = root / "blobs" / "sha256" / digest.split(":")[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def _desc(media_type: str, data: bytes, digest: str, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def make_oci_layout(
    root: Path,
    layers: Sequence[bytes],
    config: Mapping[str, Any],
    *,
    tag: str | None = "latest",
    platform_index: bool = False,
    image_name: str | None = None,
) -> Path:
    """Write an OCI image layout at ``root``; layers are stored as given (gzip or plain).

    With ``platform_index`` the tag points to an index listing an (empty) arm64 decoy
    image first and then the amd64 one.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config_raw = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _desc(OCI_CONFIG, config_raw, _put_blob(root, config_raw)),
        "layers": [
            _desc(OCI_LAYER_GZIP if b[:2] == b"\x1f\x8b" else OCI_LAYER_TAR, b, _put_blob(root, b))
            for b in layers
        ],
    }
    raw = json.dumps(manifest).encode()
    top = _desc(OCI_MANIFEST, raw, _put_blob(root, raw))
    if platform_index:
        arm_raw = json.dumps(
            {"architecture": "arm64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        ).encode()
        decoy = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "layers": [],
                "config": _desc(OCI_CONFIG, arm_raw, _put_blob(root, arm_raw)),
            }
        ).encode()
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                _desc(
                    OCI_MANIFEST,
                    decoy,
                    _put_blob(root, decoy),
                    platform={"os": "linux", "architecture": "arm64", "variant": "v8"},
                ),
                {**top, "platform": {"os": "linux", "architecture": "amd64"}},
            ],
        }
        iraw = json.dumps(index).encode()
        top = _desc(OCI_INDEX, iraw, _put_blob(root, iraw))
    notes = {}
    if tag:
        notes["org.opencontainers.image.ref.name"] = tag
    if image_name:
        notes["io.containerd.image.name"] = image_name
    if notes:
        top["annotations"] = notes
    index_json = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]}
    (root / "index.json").write_text(json.dumps(index_json))
    return root


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def layout_manifest(layout: Path) -> dict[str, Any]:
    """The (first, non-index) manifest of a layout written by :func:`make_oci_layout`."""
    desc = json.loads((layout / "index.json").read_text())["manifests"][0]
    doc = json.loads(blob_path(layout, desc["digest"]).read_text())
    if doc.get("mediaType") == OCI_INDEX:
        amd64 = next(m for m in doc["manifests"] if m["platform"]["architecture"] == "amd64")
        doc = json.loads(blob_path(layout, amd64["digest"]).read_text())
    return dict(doc)


# --- docker save tarballs ------------------------------------------------------------------
def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), MTIME, 0o644
    tf.addfile(ti, io.BytesIO(data))


def make_docker_archive(
    path: Path,
    layers: Sequence[bytes],
    config: Mapping[str, Any],
    *,
    repo_tag: str = "test/image:latest",
    style: str = "legacy",
) -> Path:
    """Write a ``docker save`` tarball: ``legacy`` (<id>/layer.tar, duplicate layers as
    symlinks) or ``oci`` (Docker 25+: an OCI layout plus manifest.json)."""
    config_raw = json.dumps(config).encode()
    with tarfile.open(path, "w") as tf:
        if style == "oci":
            with tempfile.TemporaryDirectory(prefix="ember-oci-") as d:
                tmp = Path(d)
                make_oci_layout(
                    tmp,
                    layers,
                    config,
                    tag=repo_tag.rsplit(":", 1)[1],
                    image_name=f"docker.io/{repo_tag}",
                )
                manifest = layout_manifest(tmp)
                for p in sorted(tmp.rglob("*")):
                    if p.is_file():
                        _add(tf, str(p.relative_to(tmp)), p.read_bytes())
            entries = [
                {
                    "Config": "blobs/sha256/" + manifest["config"]["digest"][7:],
                    "RepoTags": [repo_tag],
                    "Layers": ["blobs/sha256/" + d["digest"][7:] for d in manifest["layers"]],
                }
            ]
            _add(tf, "manifest.json", json.dumps(entries).encode())
            return path
        config_name = sha256(config_raw)[7:] + ".json"
        _add(tf, config_name, config_raw)
        names: list[str] = []
        seen: dict[bytes, str] = {}
        for i, layer in enumerate(layers):
            name = f"{i:064x}/layer.tar"
            names.append(name)
            if layer in seen:  # docker saves a repeated layer as a symlink
                ti = tarfile.TarInfo(name)
                ti.type, ti.linkname = tarfile.SYMTYPE, f"../{seen[layer]}"
                tf.addfile(ti)
                continue
            seen[layer] = name
            _add(tf, f"{i:064x}/VERSION", b"1.0")
            _add(tf, name, layer)
        entries = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": names}]
        _add(tf, "manifest.json", json.dumps(entries).encode())
    return path


# --- the busybox image ---------------------------------------------------------------------
def busybox_applets() -> list[str]:
    out = proc.run([str(BUSYBOX), "--list"], what="list busybox applets").stdout
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def busybox_layer() -> bytes:
    """One uncompressed layer: /bin/busybox (Debian's static build), its applets as symlinks
    in /bin, and the few files and directories a shell expects."""
    entries = [directory("bin"), file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)]
    entries += [symlink(f"bin/{a}", "busybox") for a in busybox_applets()]
    entries += [directory(d) for d in ("dev", "proc", "sys", "root", "etc", "var", "run")]
    entries += [
        directory("tmp", mode=0o1777),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        file("etc/group", b"root:x:0:\n"),
        file("etc/hostname", b"busybox\n"),
    ]
    return tar_bytes(entries)


def busybox_config(layers: Sequence[bytes]) -> dict[str, Any]:
    return image_config(
        layers, env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], cmd=["/bin/sh"], working_dir="/"
    )


def make_busybox_oci_layout(dir: Path, *, tag: str = "latest") -> Path:
    """An OCI layout at ``dir`` holding a one-layer busybox image tagged ``tag``."""
    layer = gz(busybox_layer())
    return make_oci_layout(dir, [layer], busybox_config([layer]), tag=tag)


def make_busybox_docker_archive(path: Path) -> Path:
    """A classic ``docker save`` tarball of the busybox image, tagged ``busybox:latest``."""
    layer = busybox_layer()
    return make_docker_archive(path, [layer], busybox_config([layer]), repo_tag="busybox:latest")


# --- a local registry ----------------------------------------------------------------------
@dataclass(frozen=True)
class RegistryHandle:
    host: str  # "127.0.0.1:PORT", for references: registry:{host}/repo:tag
    url: str  # "http://127.0.0.1:PORT"
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def start_registry(tmp: Path) -> Iterator[RegistryHandle]:
    """Run Debian's ``docker-registry`` on 127.0.0.1 with its storage under ``tmp``."""
    exe = proc.require("docker-registry")
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "registry.yml"
    conf.write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = tmp / "registry.log"
    with open(log, "wb") as logf:
        process = subprocess.Popen(
            [exe, "serve", str(conf)], stdout=logf, stderr=logf, stdin=subprocess.DEVNULL
        )
    handle = RegistryHandle(f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_ready(handle)
        yield handle
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(h: RegistryHandle, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if h.process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {h.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{h.url}/v2/", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"docker-registry did not answer on {h.url}/v2/ within {timeout} s")


def _http(
    method: str, url: str, data: bytes | None = None, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
            return resp.status, resp.headers
    except urllib.error.HTTPError as err:
        with err:
            if method == "HEAD" and err.code == 404:
                return 404, err.headers
            raise AssertionError(f"{method} {url}: HTTP {err.code}: {err.read()[:500]!r}") from err


def _push_blob(url: str, name: str, data: bytes) -> None:
    digest = sha256(data)
    if _http("HEAD", f"{url}/v2/{name}/blobs/{digest}")[0] == 200:
        return
    status, headers = _http("POST", f"{url}/v2/{name}/blobs/uploads/", b"")
    assert status == 202, status
    location = urllib.parse.urljoin(url, headers["Location"])
    sep = "&" if "?" in location else "?"
    status, _ = _http(
        "PUT",
        f"{location}{sep}digest={urllib.parse.quote(digest)}",
        data,
        {"Content-Type": "application/octet-stream"},
    )
    assert status == 201, status


def _push_manifest(
    layout: Path, url: str, name: str, desc: Mapping[str, Any], reference: str
) -> None:
    raw = blob_path(layout, desc["digest"]).read_bytes()
    doc = json.loads(raw)
    media_type = doc.get("mediaType") or desc["mediaType"]
    if media_type == OCI_INDEX:
        for child in doc["manifests"]:
            if blob_path(layout, child["digest"]).is_file():
                _push_manifest(layout, url, name, child, child["digest"])
    else:
        for blob in (doc["config"], *doc["layers"]):
            _push_blob(url, name, blob_path(layout, blob["digest"]).read_bytes())
    status, _ = _http(
        "PUT", f"{url}/v2/{name}/manifests/{reference}", raw, {"Content-Type": media_type}
    )
    assert status == 201, status


def push_layout_to_registry(layout: Path, url: str, name: str, tag: str) -> str:
    """Push the (first) image of an OCI layout to ``url`` as ``name:tag``; return its digest.

    An index is pushed with those of its manifests the layout holds. ``url`` is the
    registry's base URL, e.g. ``http://127.0.0.1:5000``.
    """
    desc = json.loads((layout / "index.json").read_text())["manifests"][0]
    _push_manifest(layout, url.rstrip("/"), name, desc, tag)
    return str(desc["digest"])


# --- a token-auth front for the registry ----------------------------------------------------
TOKEN = "ember-test-token"


@dataclass
class TokenProxy:
    """Seen by the client as a registry that demands an anonymous Bearer token, and that
    redirects blob downloads to a "CDN" path which refuses requests carrying the token."""

    host: str
    token_requests: list[str] = field(default_factory=list)
    cdn_requests: int = 0


@contextlib.contextmanager
def start_token_proxy(upstream: str) -> Iterator[TokenProxy]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
    state = TokenProxy(f"127.0.0.1:{server.server_address[1]}")
    server.upstream = upstream.rstrip("/")  # type: ignore[attr-defined]
    server.state = state  # type: ignore[attr-defined]
    with serving(server):
        yield state


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        state: TokenProxy = self.server.state  # type: ignore[attr-defined]
        upstream: str = self.server.upstream  # type: ignore[attr-defined]
        path = urllib.parse.urlsplit(self.path)
        if path.path == "/token":
            state.token_requests.append(path.query)
            self._reply(
                200, json.dumps({"token": TOKEN}).encode(), {"Content-Type": "application/json"}
            )
        elif path.path.startswith("/cdn/"):
            state.cdn_requests += 1
            if self.headers.get("Authorization"):
                self._reply(400, b"two auth mechanisms", {})
            else:
                self._forward(upstream + self.path[len("/cdn") :])
        elif self.headers.get("Authorization") != f"Bearer {TOKEN}":
            name = path.path.split("/manifests/")[0].split("/blobs/")[0][len("/v2/") :]
            realm = f"http://{state.host}/token"
            self._reply(
                401,
                b"{}",
                {
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="ember-test",'
                    f'scope="repository:{name}:pull"'
                },
            )
        elif "/blobs/" in path.path:
            self._reply(307, b"", {"Location": f"/cdn{self.path}"})
        else:
            self._forward(upstream + self.path)

    def _forward(self, url: str) -> None:
        req = urllib.request.Request(url, headers={"Accept": self.headers.get("Accept", "*/*")})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                body, status, headers = resp.read(), resp.status, resp.headers
        except urllib.error.HTTPError as err:
            with err:
                body, status, headers = err.read(), err.code, err.headers
        keep = ("Content-Type", "Docker-Content-Digest")
        self._reply(status, body, {k: headers[k] for k in keep if headers.get(k)})

    def _reply(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
