"""Image references, manifests and configs: parsing and validation (pure, no I/O)."""

import json

import pytest

from jupyter_contain.errors import InvalidReference, ManifestError
from jupyter_contain.runtime import spec
from jupyter_contain.runtime.spec import Index, Manifest, Platform, Reference, local_alternative, local_name

D = "sha256:" + "a" * 64


@pytest.mark.parametrize("text,expected", [
    ("ubuntu", "docker.io/library/ubuntu:latest"),
    ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
    ("library/ubuntu", "docker.io/library/ubuntu:latest"),
    ("jupyter/base-notebook", "docker.io/jupyter/base-notebook:latest"),
    ("index.docker.io/library/debian:12", "docker.io/library/debian:12"),
    ("localhost/foo", "localhost/foo:latest"),
    ("localhost:5000/a/b/c:v1", "localhost:5000/a/b/c:v1"),
    ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
    ("ghcr.io/o/r:t", "ghcr.io/o/r:t"),
    (f"debian@{D}", f"docker.io/library/debian@{D}"),
    (f"debian:12@{D}", f"docker.io/library/debian:12@{D}"),
])
def test_reference_normalisation(text, expected):
    assert str(Reference.parse(text)) == expected


def test_familiar_form():
    assert Reference.parse("debian").familiar == "debian:latest"
    assert Reference.parse("quay.io/a/b:1").familiar == "quay.io/a/b:1"


@pytest.mark.parametrize("bad", ["", " x", "UPPER", "a//b", "a:", "a:-x", "x@sha256:zz", "a/../b", "a b",
                                 "x:" + "t" * 200])
def test_reference_rejects(bad):
    with pytest.raises(InvalidReference):
        Reference.parse(bad)


def test_local_names():
    assert str(local_name("foo:1")) == "localhost/foo:1"
    assert str(local_name("team/foo")) == "localhost/team/foo:latest"
    assert str(local_name("127.0.0.1:5000/foo")) == "127.0.0.1:5000/foo:latest"
    assert local_alternative("quay.io/x/y") is None
    assert str(local_alternative("debian:bookworm")) == "localhost/debian:bookworm"


def _manifest(**kw):
    doc = {"schemaVersion": 2, "mediaType": spec.OCI_MANIFEST,
           "config": {"mediaType": spec.OCI_CONFIG, "digest": D, "size": 10},
           "layers": [{"mediaType": spec.OCI_LAYER_GZIP, "digest": D, "size": 5}]}
    doc.update(kw)
    return json.dumps(doc).encode()


def test_parse_manifest_and_index():
    m = spec.parse_document(_manifest())
    assert isinstance(m, Manifest) and m.layers[0].size == 5
    idx = {"schemaVersion": 2, "mediaType": spec.OCI_INDEX, "manifests": [
        {"mediaType": spec.OCI_MANIFEST, "digest": D, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": spec.OCI_MANIFEST, "digest": "sha256:" + "b" * 64, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": spec.OCI_MANIFEST, "digest": "sha256:" + "c" * 64, "size": 1,
         "platform": {"os": "unknown", "architecture": "unknown"},
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
    ]}
    doc = spec.parse_document(json.dumps(idx).encode())
    assert isinstance(doc, Index)
    assert len(doc.runnable()) == 2
    assert doc.select(Platform("linux", "amd64")).digest == "sha256:" + "b" * 64
    assert doc.select(Platform.parse("linux/arm64/v8")).digest == D
    with pytest.raises(ManifestError, match="offered: linux/amd64, linux/arm64"):
        doc.select(Platform("linux", "s390x"))


@pytest.mark.parametrize("data,msg", [
    (b"not json", "not valid JSON"),
    (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), "Docker schema1"),
    (_manifest(layers="x"), "no layers"),
    (_manifest(config={"mediaType": "x", "digest": "sha256:zz", "size": 1}), "invalid digest"),
    (_manifest(layers=[{"mediaType": "text/plain", "digest": D, "size": 1}]), "unsupported media type"),
    (_manifest(layers=[{"mediaType": spec.OCI_LAYER, "digest": D, "size": -1}]), "invalid size"),
])
def test_parse_rejects(data, msg):
    with pytest.raises(ManifestError, match=msg):
        spec.parse_document(data)


def test_schema1_media_type_rejected():
    with pytest.raises(ManifestError, match="Docker schema1 .*not supported"):
        spec.parse_document(b"{}", media_type=spec.DOCKER_SCHEMA1[1])


def test_image_config():
    cfg = spec.ImageConfig.parse(json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["A=1"], "Cmd": ["sh"], "WorkingDir": "/w", "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": [D]}}).encode())
    assert cfg.diff_ids == (D,) and cfg.env == ("A=1",) and cfg.cmd == ("sh",)
    assert cfg.working_dir == "/w" and cfg.user == "1000" and str(cfg.platform) == "linux/amd64"
    with pytest.raises(ManifestError, match="diff_ids"):
        spec.ImageConfig.parse(b'{"rootfs": {"type": "layers"}}')


def _docker_manifest(layers):
    return json.dumps({"schemaVersion": 2, "mediaType": spec.DOCKER_MANIFEST,
                       "config": {"mediaType": spec.DOCKER_CONFIG, "digest": D, "size": 10},
                       "layers": [{"mediaType": mt, "digest": D, "size": 5} for mt in layers]}).encode()


def test_docker_manifest_and_its_oci_form():
    m = spec.parse_document(_docker_manifest([spec.DOCKER_LAYER_GZIP, spec.DOCKER_LAYER, spec.DOCKER_LAYER_ZSTD,
                                              spec.DOCKER_FOREIGN_LAYER_GZIP]))
    assert isinstance(m, Manifest) and m.media_type == spec.DOCKER_MANIFEST and not m.is_oci
    oci = m.oci_form()
    assert oci.media_type == spec.OCI_MANIFEST and oci.config.media_type == spec.OCI_CONFIG
    assert [d.media_type for d in oci.layers] == [spec.OCI_LAYER_GZIP, spec.OCI_LAYER, spec.OCI_LAYER_ZSTD,
                                                  spec.OCI_LAYER_ND_GZIP]
    assert [(d.digest, d.size) for d in oci.layers] == [(d.digest, d.size) for d in m.layers]   # the same blobs
    assert oci.oci_form() is oci
    assert [spec.layer_compression(d.media_type) for d in m.layers] == ["gzip", "tar", "zstd", "gzip"]


def test_source_media_type_must_agree_with_the_document():
    data = _docker_manifest([spec.DOCKER_LAYER_GZIP])
    assert spec.parse_document(data, media_type=spec.DOCKER_MANIFEST).media_type == spec.DOCKER_MANIFEST
    assert spec.parse_document(data, media_type="application/json").media_type == spec.DOCKER_MANIFEST
    with pytest.raises(ManifestError, match="differs from"):
        spec.parse_document(data, media_type=spec.OCI_MANIFEST)


def test_artifacts_are_not_images():
    art = json.dumps({"schemaVersion": 2, "mediaType": spec.OCI_MANIFEST,
                      "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": D, "size": 1},
                      "layers": []}).encode()
    with pytest.raises(ManifestError, match="not a container image"):
        spec.parse_document(art)


def test_select_ranks_entries_not_their_order():
    e = lambda c, plat=None, **kw: {"mediaType": spec.DOCKER_MANIFEST, "digest": "sha256:" + c * 64, "size": 1,
                                    **({"platform": plat} if plat else {}), **kw}
    idx = spec.parse_document(json.dumps({"schemaVersion": 2, "mediaType": spec.DOCKER_MANIFEST_LIST, "manifests": [
        e("a", {"os": "unknown", "architecture": "unknown"}),
        e("b", {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        e("c"),                                              # no platform: a last resort
        e("d", {"os": "linux", "architecture": "amd64"}),
        e("f", {"os": "linux", "architecture": "arm", "variant": "v6"}),
        e("9", {"os": "linux", "architecture": "arm", "variant": "v7"}),
    ]}).encode())
    assert idx.select(Platform("linux", "amd64")).digest == "sha256:" + "d" * 64
    assert idx.select(Platform("linux", "arm64", "v8")).digest == "sha256:" + "b" * 64
    assert idx.select(Platform("linux", "arm", "v7")).digest == "sha256:" + "9" * 64
    assert idx.select(Platform("linux", "s390x")).digest == "sha256:" + "c" * 64


def test_descriptor_urls_must_be_strings():
    with pytest.raises(ManifestError, match="invalid urls"):
        spec.Descriptor.from_json({"mediaType": spec.DOCKER_FOREIGN_LAYER_GZIP, "digest": D, "size": 1, "urls": "x"})
