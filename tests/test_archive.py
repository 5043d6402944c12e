"""Offline import/export, and interop with skopeo and umoci reading and writing our store."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers import make_rootfs_tar

from jupyter_contain.errors import ContainError, ImageError
from jupyter_contain.runtime.images import archive
from jupyter_contain.runtime.images.store import Store

needs_skopeo = pytest.mark.skipif(not shutil.which("skopeo"), reason="skopeo not installed")
needs_umoci = pytest.mark.skipif(not shutil.which("umoci"), reason="umoci not installed")


def run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{cmd}: {res.stderr}"
    return res.stdout


@pytest.fixture
def image(store: Store, tmp_path: Path):
    tar = make_rootfs_tar(tmp_path / "root.tar", {"etc/msg": b"hello", "bin/tool": b"#!x"})
    return archive.import_rootfs(store, tar, "demo:1", env=["A=1", "PATH=/bin"], cmd=["/bin/tool"],
                                 workdir="/etc", unpack=False)


def test_rootfs_config(image):
    assert image.config.env == ("A=1", "PATH=/bin")
    assert image.config.cmd == ("/bin/tool",)
    assert image.config.working_dir == "/etc"
    assert image.manifest.layers[0].media_type.endswith("tar+gzip")


@needs_skopeo
def test_skopeo_inspects_our_store(store: Store, image):
    out = json.loads(run("skopeo", "inspect", f"oci:{store.root}:{image.name}"))
    assert out["Digest"] == image.digest
    assert out["Layers"] == [image.manifest.layers[0].digest]
    assert "A=1" in out["Env"]


@needs_umoci
def test_umoci_unpacks_our_store(store: Store, image, tmp_path: Path):
    run("umoci", "unpack", "--image", f"{store.root}:{image.name}", str(tmp_path / "bundle"))
    assert (tmp_path / "bundle" / "rootfs" / "etc" / "msg").read_bytes() == b"hello"


@needs_skopeo
@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_save_is_read_by_skopeo_and_imported_back(store: Store, image, tmp_path: Path, fmt: str):
    out = tmp_path / f"img.{fmt}.tar"
    (archive.save_oci_archive if fmt == "oci-archive" else archive.save_docker_archive)(store, image, out)
    info = json.loads(run("skopeo", "inspect", f"{fmt}:{out}"))
    assert "A=1" in info["Env"]
    other = Store(tmp_path / "other")
    rec = archive.import_oci_archive(other, out, unpack=False) if fmt == "oci-archive" else \
        archive.import_docker_archive(other, out, name="back:1", unpack=False)
    assert rec.id == image.id  # same config, byte for byte
    assert rec.config.diff_ids == image.config.diff_ids
    if fmt == "oci-archive":
        assert rec.digest == image.digest and rec.name == image.name


@needs_skopeo
def test_import_what_skopeo_wrote(store: Store, image, tmp_path: Path):
    layout = tmp_path / "layout"
    run("skopeo", "copy", f"oci:{store.root}:{image.name}", f"oci:{layout}:v1")
    run("skopeo", "copy", f"oci:{store.root}:{image.name}", f"docker-archive:{tmp_path / 'd.tar'}:x/y:2")
    other = Store(tmp_path / "other")
    rec = archive.import_oci_layout(other, layout, ref="v1", name="copied:1", unpack=False)
    assert rec.digest == image.digest
    assert archive.detect_format(tmp_path / "d.tar") == "docker-archive"
    rec2 = archive.import_docker_archive(other, tmp_path / "d.tar", unpack=False)
    assert rec2.name == "docker.io/x/y:2"
    assert rec2.config.diff_ids == image.config.diff_ids


@needs_umoci
def test_import_what_umoci_wrote(store: Store, tmp_path: Path):
    layout = tmp_path / "u"
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    (src / "data" / "f").write_text("umoci")
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:t")
    run("umoci", "insert", "--image", f"{layout}:t", str(src / "data"), "/data")
    assert archive.detect_format(layout) == "oci"
    rec = archive.import_oci_layout(store, layout, ref="t", unpack=False)
    assert rec.name == "localhost/t:latest"
    assert len(rec.manifest.layers) == 1


def test_bad_inputs_change_nothing(store: Store, image, tmp_path: Path):
    before = (store.root / "index.json").read_bytes()
    blobs_before = sorted(p.name for p in store.blobs_dir.iterdir())
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(ImageError, match="not a tar archive"):
        archive.detect_format(junk)
    # an oci-archive whose blob does not match its name
    bad = tmp_path / "bad.tar"
    archive.save_oci_archive(store, image, tmp_path / "good.tar")
    with tarfile.open(tmp_path / "good.tar") as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.startswith("blobs/") and len(data) > 100:
                data = data[:-1] + bytes([data[-1] ^ 1])
            import io
            dst.addfile(m, io.BytesIO(data))
    other = Store(tmp_path / "other")
    with pytest.raises(ContainError):
        archive.import_oci_archive(other, bad, unpack=False)
    assert other.images() == []
    with pytest.raises(ImageError, match="no image named 'nope'"):
        archive.import_oci_archive(store, tmp_path / "good.tar", ref="nope", unpack=False)
    with pytest.raises(ImageError, match="not an OCI image layout"):
        archive.import_oci_layout(store, tmp_path)
    assert (store.root / "index.json").read_bytes() == before
    other.gc()
    assert sorted(p.name for p in store.blobs_dir.iterdir()) == blobs_before


@pytest.mark.skipif(not shutil.which("podman"), reason="podman not installed")
@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_podman_loads_what_we_save(store: Store, image, tmp_path: Path, fmt: str):
    out = tmp_path / "img.tar"
    (archive.save_oci_archive if fmt == "oci-archive" else archive.save_docker_archive)(store, image, out)
    # podman in its own throw-away storage; `load` creates no containers or cgroups
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pm-", dir="/tmp") as short:  # podman wants a runroot < 50 chars
        pm = ["podman", "--root", str(tmp_path / "pm-root"), "--runroot", short, "--storage-driver", "vfs"]
        res = subprocess.run([*pm, "load", "-i", str(out)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "localhost/demo:1" in res.stdout
        listing = json.loads(run(*pm, "images", "--format", "json"))
        assert any("localhost/demo:1" in (i.get("Names") or []) for i in listing)


def _docker_form(store: Store, image, layout: Path, tag: str) -> bytes:
    """Write ``image`` as a Docker schema2 manifest in an OCI layout (as `docker save` of Docker 25+ does)."""
    from jupyter_contain.runtime import spec

    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for d in (image.manifest.config.digest, *(layer.digest for layer in image.manifest.layers)):
        shutil.copy(store.blob_path(d), blobs / d[7:])
    doc = json.dumps({"schemaVersion": 2, "mediaType": spec.DOCKER_MANIFEST,
                      "config": {"mediaType": spec.DOCKER_CONFIG, "digest": image.manifest.config.digest,
                                 "size": image.manifest.config.size},
                      "layers": [{"mediaType": spec.DOCKER_LAYER_GZIP, "digest": d.digest, "size": d.size}
                                 for d in image.manifest.layers]}, indent=3).encode()
    digest = spec.sha256_digest(doc)
    (blobs / digest[7:]).write_bytes(doc)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": spec.DOCKER_MANIFEST, "digest": digest, "size": len(doc),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return doc


@needs_skopeo
def test_docker_form_round_trips_through_both_archives(store: Store, image, tmp_path: Path):
    from jupyter_contain.runtime import spec
    from jupyter_contain.runtime.images.store import ANNOTATION_MANIFEST

    doc = _docker_form(store, image, tmp_path / "layout", "docker-form:1")
    other = Store(tmp_path / "other")
    rec = archive.import_oci_layout(other, tmp_path / "layout", unpack=False)
    assert rec.digest == spec.sha256_digest(doc) and rec.descriptor.media_type == spec.DOCKER_MANIFEST
    assert other.blob_path(rec.digest).read_bytes() == doc   # as written, not re-serialised
    for fmt, save in (("oci-archive", archive.save_oci_archive), ("docker-archive", archive.save_docker_archive)):
        out = tmp_path / f"d.{fmt}.tar"
        save(other, rec, out)
        info = json.loads(run("skopeo", "inspect", f"{fmt}:{out}"))
        assert info["Layers"][0] in (image.manifest.layers[0].digest, image.config.diff_ids[0])
        assert "A=1" in info["Env"]
    with tarfile.open(tmp_path / "d.oci-archive.tar") as tar:
        index = json.load(tar.extractfile("index.json"))
    entry = index["manifests"][0]
    assert entry["mediaType"] == spec.OCI_MANIFEST and entry["annotations"][ANNOTATION_MANIFEST] == rec.digest
    back = archive.import_oci_archive(Store(tmp_path / "third"), tmp_path / "d.oci-archive.tar", unpack=False)
    assert back.digest == rec.digest and back.descriptor.media_type == spec.DOCKER_MANIFEST


def test_oci_form_that_disagrees_with_the_served_manifest_is_imported_as_oci(store: Store, image, tmp_path: Path):
    from jupyter_contain.runtime import spec
    from jupyter_contain.runtime.images.store import ANNOTATION_MANIFEST

    _docker_form(store, image, tmp_path / "layout", "x:1")
    other = Store(tmp_path / "other")
    rec = archive.import_oci_layout(other, tmp_path / "layout", unpack=False)
    out = tmp_path / "a.tar"
    archive.save_oci_archive(other, rec, out)
    # an archive whose annotation names a Docker manifest of other blobs: that one is not trusted
    bogus = json.dumps({"schemaVersion": 2, "mediaType": spec.DOCKER_MANIFEST,
                        "config": {"mediaType": spec.DOCKER_CONFIG, "digest": "sha256:" + "1" * 64, "size": 2},
                        "layers": []}).encode()
    with tarfile.open(out) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    index = json.loads(members["index.json"])
    index["manifests"][0]["annotations"][ANNOTATION_MANIFEST] = spec.sha256_digest(bogus)
    members["index.json"] = json.dumps(index).encode()
    members[f"blobs/sha256/{spec.sha256_digest(bogus)[7:]}"] = bogus
    tampered = tmp_path / "t.tar"
    with tarfile.open(tampered, "w") as tar:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    back = archive.import_oci_archive(Store(tmp_path / "third"), tampered, unpack=False)
    assert back.descriptor.media_type == spec.OCI_MANIFEST and back.digest == index["manifests"][0]["digest"]
