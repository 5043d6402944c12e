"""Offline import/export, and interop with skopeo and umoci reading and writing our store."""

from __future__ import annotations

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
