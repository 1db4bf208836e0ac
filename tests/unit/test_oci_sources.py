"""extract_oci from OCI layouts and docker save tarballs; parsing of references and documents."""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ember.guest.oci as oci
from ember.errors import BadRequestError, ImageSourceError
from ember.guest.oci import ImageConfig, PulledImage, extract_oci
from ember.guest.oci.manifest import (
    Descriptor,
    Platform,
    parse_index,
    parse_manifest,
    pick_platform,
)
from ember.guest.oci.reference import parse_challenge, parse_registry_ref
from ember.guest.oci.source import parse_source, split_path_ref
from tests.oci_fixtures import (
    assert_sample_config,
    assert_sample_rootfs,
    blob_path,
    busybox_applets,
    gz,
    image_config,
    layout_manifest,
    make_busybox_docker_archive,
    make_busybox_oci_layout,
    make_docker_archive,
    make_oci_layout,
    sample_config,
    sample_layers,
    sha256,
)


def test_public_surface() -> None:
    assert sorted(oci.__all__) == ["ImageConfig", "PulledImage", "apply_layer", "extract_oci"]


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "rootfs"
    d.mkdir()
    return d


def empty_dir(path: Path) -> Path:
    path.mkdir()
    return path


def extract(source: str | Path, dest: Path) -> PulledImage:
    messages: list[str] = []
    pulled = extract_oci(str(source), dest, work=dest.parent / "work", progress=messages.append)
    assert any("applying layer" in m for m in messages)
    return pulled


def gz_sample() -> tuple[list[bytes], dict[str, Any]]:
    layers = [gz(b) for b in sample_layers()]
    return layers, sample_config(layers)


# --- OCI layouts ---------------------------------------------------------------------------------
def test_layout_two_layers_with_whiteouts(tmp_path: Path, dest: Path) -> None:
    layers, config = gz_sample()
    layout = make_oci_layout(tmp_path / "layout", layers, config)
    pulled = extract(f"oci-layout:{layout}", dest)
    assert_sample_rootfs(dest)
    assert_sample_config(pulled.config)
    index = json.loads((layout / "index.json").read_text())
    assert pulled.digest == index["manifests"][0]["digest"]
    assert pulled.layers == tuple(sha256(b) for b in layers)


def test_layout_by_tag_and_plain_path(tmp_path: Path, dest: Path) -> None:
    layers, config = gz_sample()
    layout = make_oci_layout(tmp_path / "layout", layers, config, tag="v1")
    extract(f"{layout}:v1", dest)
    assert_sample_rootfs(dest)
    with pytest.raises(ImageSourceError, match=r"no image tagged 'v2' \(tags: v1\)"):
        extract_oci(f"oci-layout:{layout}:v2", empty_dir(tmp_path / "x"), work=tmp_path / "w")


def test_layout_index_picks_linux_amd64(tmp_path: Path, dest: Path) -> None:
    layers, config = gz_sample()
    layout = make_oci_layout(tmp_path / "layout", layers, config, platform_index=True)
    pulled = extract(f"oci-layout:{layout}:latest", dest)
    assert_sample_rootfs(dest)
    assert pulled.digest == sha256(json.dumps(layout_manifest(layout)).encode())


def test_layout_with_uncompressed_layers(tmp_path: Path, dest: Path) -> None:
    layers = sample_layers()
    extract(make_oci_layout(tmp_path / "layout", layers, sample_config(layers)), dest)
    assert_sample_rootfs(dest)


def test_layout_missing_manifest_blob(tmp_path: Path, dest: Path) -> None:
    layers, config = gz_sample()
    layout = make_oci_layout(tmp_path / "layout", layers, config)
    top = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    blob_path(layout, top).unlink()
    with pytest.raises(ImageSourceError, match=f"blob {top} is missing"):
        extract(f"oci-layout:{layout}", dest)


def test_layout_blob_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path, dest: Path) -> None:
    layers, config = gz_sample()
    layout = make_oci_layout(tmp_path / "layout", layers, config)
    victim = blob_path(layout, sha256(layers[0]))
    victim.unlink()
    os.mkfifo(victim)
    with pytest.raises(ImageSourceError, match="not a regular file"):
        extract(f"oci-layout:{layout}", dest)


def test_layout_without_index_json(tmp_path: Path, dest: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError, match=r"no index.json"):
        extract(f"oci-layout:{tmp_path / 'empty'}", dest)


def test_layout_layer_with_wrong_digest(tmp_path: Path, dest: Path) -> None:
    layers, config = gz_sample()
    layout = make_oci_layout(tmp_path / "layout", layers, config)
    victim = blob_path(layout, sha256(layers[1]))
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    with pytest.raises(ImageSourceError, match="wrong digest"):
        extract(f"oci-layout:{layout}", dest)


def test_layout_truncated_blob(tmp_path: Path, dest: Path) -> None:
    layers, config = gz_sample()
    layout = make_oci_layout(tmp_path / "layout", layers, config)
    victim = blob_path(layout, sha256(layers[0]))
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ImageSourceError, match="truncated"):
        extract(f"oci-layout:{layout}", dest)


def test_layout_config_diff_id_mismatch(tmp_path: Path, dest: Path) -> None:
    layers, config = gz_sample()
    config["rootfs"]["diff_ids"][1] = sha256(b"something else")
    layout = make_oci_layout(tmp_path / "layout", layers, config)
    with pytest.raises(ImageSourceError, match="the config says"):
        extract(f"oci-layout:{layout}", dest)


def test_layout_for_another_architecture(tmp_path: Path, dest: Path) -> None:
    layers = [gz(sample_layers()[0])]
    layout = make_oci_layout(tmp_path / "l", layers, image_config(layers, arch="arm64"))
    with pytest.raises(ImageSourceError, match="linux/arm64"):
        extract(f"oci-layout:{layout}", dest)


# --- docker save -----------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["legacy", "oci"])
def test_docker_archive(tmp_path: Path, dest: Path, style: str) -> None:
    layers = sample_layers()
    archive = make_docker_archive(
        tmp_path / "image.tar", layers, sample_config(layers), style=style
    )
    pulled = extract(f"docker-archive:{archive}", dest)
    assert_sample_rootfs(dest)
    assert_sample_config(pulled.config)
    assert pulled.layers == tuple(sha256(b) for b in layers)
    assert [p.name for p in (tmp_path / "work").iterdir() if p.stat().st_size > 10_000] == []


@pytest.mark.parametrize("style", ["legacy", "oci"])
def test_docker_archive_by_name(tmp_path: Path, dest: Path, style: str) -> None:
    layers = sample_layers()
    archive = make_docker_archive(
        tmp_path / "image.tar",
        layers,
        sample_config(layers),
        repo_tag="test/image:1.0",
        style=style,
    )
    extract(f"docker-archive:{archive}:test/image:1.0", dest)
    assert_sample_rootfs(dest)
    with pytest.raises(ImageSourceError, match=r"no image tagged 'test/image:2.0'"):
        extract_oci(
            f"docker-archive:{archive}:test/image:2.0",
            empty_dir(tmp_path / "x"),
            work=tmp_path / "w",
        )


def test_docker_archive_repeated_layer_saved_as_symlink(tmp_path: Path, dest: Path) -> None:
    layers = [sample_layers()[0]] * 2
    archive = make_docker_archive(tmp_path / "image.tar", layers, sample_config(layers))
    with tarfile.open(archive) as tf:
        assert any(m.issym() for m in tf)
    extract(archive, dest)
    assert (dest / "etc/remove-me").exists()


def test_docker_archive_diff_id_mismatch(tmp_path: Path, dest: Path) -> None:
    layers = sample_layers()
    config = sample_config(layers)
    config["rootfs"]["diff_ids"].reverse()
    archive = make_docker_archive(tmp_path / "image.tar", layers, config)
    with pytest.raises(ImageSourceError, match="the config says"):
        extract(archive, dest)


def test_docker_archive_truncated(tmp_path: Path, dest: Path) -> None:
    layers = sample_layers()
    archive = make_docker_archive(tmp_path / "image.tar", layers, sample_config(layers))
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageSourceError, match=r"corrupt or truncated|missing"):
        extract(archive, dest)


def test_docker_archive_missing_manifest(tmp_path: Path, dest: Path) -> None:
    with tarfile.open(tmp_path / "x.tar", "w") as tf:
        tf.add(__file__, arcname="README")
    with pytest.raises(ImageSourceError, match=r"no manifest.json or index.json"):
        extract(f"docker-archive:{tmp_path / 'x.tar'}", dest)


def test_busybox_fixtures(tmp_path: Path) -> None:
    for i, source in enumerate(
        [make_busybox_oci_layout(tmp_path / "bb"), make_busybox_docker_archive(tmp_path / "bb.tar")]
    ):
        root = empty_dir(tmp_path / f"root{i}")
        pulled = extract(source, root)
        assert pulled.config.cmd == ("/bin/sh",)
        assert (root / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
        assert os.readlink(root / "bin/sh") == "busybox"
        assert len(os.listdir(root / "bin")) == len(busybox_applets()) + 1


# --- sources ----------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["ftp://example.com/x", "s3:bucket/image"])
def test_unknown_scheme_is_named(dest: Path, source: str) -> None:
    scheme = source.split(":")[0]
    with pytest.raises(ImageSourceError, match=f"unknown image source scheme '{scheme}:'"):
        extract(source, dest)


def test_unknown_plain_source(dest: Path) -> None:
    with pytest.raises(ImageSourceError, match="unknown image source '/no/such/dir'"):
        extract("/no/such/dir", dest)


def test_destination_must_be_empty(tmp_path: Path, dest: Path) -> None:
    (dest / "junk").write_text("x")
    with pytest.raises(BadRequestError):
        extract("ftp://x", dest)


def test_parse_source_kinds(tmp_path: Path) -> None:
    layers, config = gz_sample()
    layout = make_oci_layout(tmp_path / "layout", layers, config)
    archive = make_docker_archive(tmp_path / "a.tar", sample_layers(), config)
    assert parse_source(str(layout)).kind == "layout"
    assert parse_source(f"{layout}:latest").kind == "layout"
    assert parse_source(str(archive)).kind == "archive"
    assert parse_source("oci-archive:/x.tar").kind == "archive"
    assert parse_source("docker://alpine").kind == "registry"
    assert parse_source("registry:localhost:5000/a").target == "localhost:5000/a"


def test_split_path_ref(tmp_path: Path) -> None:
    (tmp_path / "img.tar").write_bytes(b"")
    assert split_path_ref(f"{tmp_path}/img.tar") == (tmp_path / "img.tar", None)
    assert split_path_ref(f"{tmp_path}/img.tar:repo/x:1") == (tmp_path / "img.tar", "repo/x:1")
    assert split_path_ref("/nope:tag") == (Path("/nope:tag"), None)


# --- references and challenges --------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "host", "repo", "tag", "digest", "url"),
    [
        (
            "127.0.0.1:5000/test/busy:1.0",
            "127.0.0.1:5000",
            "test/busy",
            "1.0",
            None,
            "http://127.0.0.1:5000",
        ),
        ("localhost/app", "localhost", "app", "latest", None, "http://localhost"),
        ("[::1]:5000/a/b", "[::1]:5000", "a/b", "latest", None, "http://[::1]:5000"),
        ("ghcr.io/org/img:v2", "ghcr.io", "org/img", "v2", None, "https://ghcr.io"),
        (
            "alpine",
            "registry-1.docker.io",
            "library/alpine",
            "latest",
            None,
            "https://registry-1.docker.io",
        ),
        (
            "docker.io/user/app:3",
            "registry-1.docker.io",
            "user/app",
            "3",
            None,
            "https://registry-1.docker.io",
        ),
        (
            "quay.io/a/b@sha256:" + "a" * 64,
            "quay.io",
            "a/b",
            None,
            "sha256:" + "a" * 64,
            "https://quay.io",
        ),
    ],
)
def test_parse_registry_ref(
    text: str, host: str, repo: str, tag: str | None, digest: str | None, url: str
) -> None:
    ref = parse_registry_ref(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest, ref.base_url) == (
        host,
        repo,
        tag,
        digest,
        url,
    )


@pytest.mark.parametrize(
    "text",
    ["", "host.io/UPPER", "host.io/a:bad tag", "h.io/a@sha256:xyz", "h.io/a/../b", "bad host!/x"],
)
def test_bad_registry_refs(text: str) -> None:
    with pytest.raises(ImageSourceError):
        parse_registry_ref(text)


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


@given(st.text(max_size=300))
def test_parse_challenge_never_crashes(header: str) -> None:
    scheme, params = parse_challenge(header)
    assert isinstance(scheme, str) and isinstance(params, dict)


# --- documents ---------------------------------------------------------------------------------
@settings(max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda c: (
                st.lists(c, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "layers",
                            "config",
                            "manifests",
                            "mediaType",
                            "digest",
                            "size",
                            "platform",
                            "schemaVersion",
                        ]
                    ),
                    c,
                    max_size=5,
                )
            ),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_hostile_documents_only_raise_image_source_error(raw: bytes) -> None:
    for parse in (parse_manifest, parse_index):
        with contextlib.suppress(ImageSourceError):
            parse(raw, "doc")


def test_too_many_layers_and_too_big_documents() -> None:
    layer = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar",
        "size": 1,
        "digest": "sha256:" + "0" * 64,
    }
    doc = {"schemaVersion": 2, "config": {**layer, "mediaType": ""}, "layers": [layer] * 257}
    with pytest.raises(ImageSourceError, match="257 layers"):
        parse_manifest(json.dumps(doc).encode(), "m")
    with pytest.raises(ImageSourceError, match="larger than"):
        parse_manifest(b" " * (5 << 20), "m")


def test_pick_platform_prefers_baseline_amd64() -> None:
    def d(arch: str, variant: str = "") -> Descriptor:
        return Descriptor("", "sha256:" + "0" * 64, 1, Platform("linux", arch, variant))

    assert pick_platform([d("arm64"), d("amd64", "v3"), d("amd64")], "i") == d("amd64")
    with pytest.raises(ImageSourceError, match="linux/arm64"):
        pick_platform([d("arm64")], "i")


def test_image_config_json_round_trip() -> None:
    config = ImageConfig(
        env=("A=1",), working_dir="/w", user="u", cmd=("c",), entrypoint=("e", "f")
    )
    assert ImageConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert ImageConfig.from_json({}) == ImageConfig()
    with pytest.raises(ImageSourceError, match="unknown fields: extra"):
        ImageConfig.from_json({"extra": 1})
    with pytest.raises(ImageSourceError):
        ImageConfig.from_json({"cmd": "not a list"})
