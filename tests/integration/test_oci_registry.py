"""extract_oci against Debian's real docker-registry, pushed to with plain API v2 calls."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember import proc
from ember.errors import ImageSourceError
from ember.guest.oci import PulledImage, extract_oci
from tests.oci_fixtures import (
    RegistryHandle,
    assert_sample_config,
    assert_sample_rootfs,
    file,
    free_port,
    gz,
    make_busybox_oci_layout,
    make_oci_layout,
    push_layout_to_registry,
    sample_config,
    sample_layers,
    sha256,
    start_registry,
    start_token_proxy,
    tar_bytes,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Pushed:
    registry: RegistryHandle
    busybox_digest: str
    sample_digest: str


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    if not Path("/bin/busybox").is_file():
        pytest.skip("needs Debian's busybox-static (/bin/busybox)")
    proc.require("docker-registry")
    tmp = tmp_path_factory.mktemp("registry")
    with start_registry(tmp / "registry") as reg:
        busybox = make_busybox_oci_layout(tmp / "busybox")
        layers = [gz(b) for b in sample_layers()]
        sample = make_oci_layout(tmp / "sample", layers, sample_config(layers), platform_index=True)
        yield Pushed(
            reg,
            push_layout_to_registry(busybox, reg.url, "test/busy", "1.0"),
            push_layout_to_registry(sample, reg.url, "test/sample", "multi"),
        )
    assert reg.process.poll() is not None  # stopped, not leaked


def pull(source: str, tmp_path: Path, name: str = "rootfs") -> tuple[PulledImage, Path]:
    dest = tmp_path / name
    dest.mkdir()
    return extract_oci(source, dest, work=tmp_path / f"work-{name}"), dest


def test_pull_busybox_by_tag(pushed: Pushed, tmp_path: Path) -> None:
    pulled, root = pull(f"registry:{pushed.registry.host}/test/busy:1.0", tmp_path)
    assert pulled.digest == pushed.busybox_digest
    assert pulled.config.cmd == ("/bin/sh",)
    assert pulled.config.env == ("PATH=/usr/sbin:/usr/bin:/sbin:/bin",)
    assert (root / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(root / "bin/sh") == "busybox"
    assert os.readlink(root / "bin/ls") == "busybox"
    out = proc.run([str(root / "bin/busybox"), "echo", "pulled"], what="run pulled busybox")
    assert out.stdout.strip() == "pulled"


def test_pull_by_digest_with_docker_scheme(pushed: Pushed, tmp_path: Path) -> None:
    pulled, root = pull(
        f"docker://{pushed.registry.host}/test/busy@{pushed.busybox_digest}", tmp_path
    )
    assert pulled.digest == pushed.busybox_digest
    assert (root / "bin/busybox").is_file()


def test_pull_index_picks_amd64_and_applies_whiteouts(pushed: Pushed, tmp_path: Path) -> None:
    pulled, root = pull(f"registry:{pushed.registry.host}/test/sample:multi", tmp_path)
    assert pulled.digest != pushed.sample_digest  # the index's digest; this is the manifest's
    assert_sample_rootfs(root)
    assert_sample_config(pulled.config)


def test_unknown_tag_names_the_reference(pushed: Pushed, tmp_path: Path) -> None:
    ref = f"{pushed.registry.host}/test/busy:nope"
    with pytest.raises(ImageSourceError, match=f"{ref}: not found") as info:
        pull(f"registry:{ref}", tmp_path)
    assert "MANIFEST_UNKNOWN" in str(info.value)


def test_unknown_repository(pushed: Pushed, tmp_path: Path) -> None:
    with pytest.raises(ImageSourceError, match="not found"):
        pull(f"registry:{pushed.registry.host}/no/such:1", tmp_path)


def test_anonymous_bearer_token_and_redirected_blobs(pushed: Pushed, tmp_path: Path) -> None:
    with start_token_proxy(pushed.registry.url) as proxy:
        pulled, root = pull(f"registry:{proxy.host}/test/busy:1.0", tmp_path)
    assert pulled.digest == pushed.busybox_digest
    assert (root / "bin/busybox").is_file()
    assert len(proxy.token_requests) == 1
    assert "scope=repository%3Atest%2Fbusy%3Apull" in proxy.token_requests[0]
    assert proxy.cdn_requests == 2  # config and layer, fetched without the token


def test_corrupted_blob_in_the_registry_is_refused(tmp_path: Path) -> None:
    with start_registry(tmp_path / "registry") as reg:
        layer = gz(tar_bytes([file("unique", os.urandom(4096))]))
        layout = make_oci_layout(tmp_path / "img", [layer], sample_config([layer]))
        push_layout_to_registry(layout, reg.url, "test/bad", "1")
        hexpart = sha256(layer)[7:]
        data = next(
            (tmp_path / "registry/storage").rglob(f"blobs/sha256/{hexpart[:2]}/{hexpart}/data")
        )
        data.write_bytes(data.read_bytes()[:-1] + b"!")
        with pytest.raises(ImageSourceError, match="wrong digest"):
            pull(f"registry:{reg.host}/test/bad:1", tmp_path)
        assert not list((tmp_path / "work-rootfs").rglob("*.partial"))
    assert reg.process.poll() is not None


def test_unreachable_registry(tmp_path: Path) -> None:
    with pytest.raises(ImageSourceError, match="cannot reach"):
        pull(f"registry:127.0.0.1:{free_port()}/test/busy:1.0", tmp_path)


def test_manifest_list_in_registry_lists_platforms(pushed: Pushed) -> None:
    import urllib.request

    req = urllib.request.Request(
        f"{pushed.registry.url}/v2/test/sample/manifests/multi",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc = json.loads(resp.read())
    assert {m["platform"]["architecture"] for m in doc["manifests"]} == {"amd64", "arm64"}
