"""The image store: OCI layout on disk, verified atomic blobs, locked index, gc, pins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_rootfs_tar

from jupyter_contain.errors import DigestMismatch, ImageInUse, ImageNotFound, StoreError
from jupyter_contain.runtime.images import archive
from jupyter_contain.runtime.images.store import Store, default_root
from jupyter_contain.runtime.spec import digest_hex, sha256_digest


def _import(store: Store, tmp_path: Path, name: str, content: bytes = b"hello") -> object:
    tar = make_rootfs_tar(tmp_path / f"{name.replace(':', '_').replace('/', '_')}.tar", {"etc/msg": content})
    return archive.import_rootfs(store, tar, name, unpack=False)


def test_layout_files(store: Store):
    assert json.loads((store.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert json.loads((store.root / "index.json").read_text())["manifests"] == []


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTER_CONTAIN_ROOT", str(tmp_path / "r"))
    assert default_root() == tmp_path / "r"
    monkeypatch.delenv("JUPYTER_CONTAIN_ROOT")
    assert default_root() == Path("/var/lib/jupyter-contain")  # tests run as root


def test_import_list_resolve(store: Store, tmp_path: Path):
    rec = _import(store, tmp_path, "demo:1")
    assert rec.name == "localhost/demo:1"
    assert [r.name for r in store.images()] == ["localhost/demo:1"]
    assert store.resolve("demo:1").digest == rec.digest             # localhost fallback
    assert store.resolve("localhost/demo:1").digest == rec.digest
    assert store.resolve(digest_hex(rec.id)[:12]).digest == rec.digest  # id prefix
    assert store.resolve(f"localhost/demo@{rec.digest}").digest == rec.digest
    with pytest.raises(ImageNotFound, match="no such image: nope"):
        store.resolve("nope")
    # the tag is an OCI ref.name annotation in index.json
    entry = json.loads((store.root / "index.json").read_text())["manifests"][0]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "localhost/demo:1"
    assert entry["digest"] == rec.digest


def test_retag_replaces(store: Store, tmp_path: Path):
    a = _import(store, tmp_path, "x:1", b"a")
    b = _import(store, tmp_path, "x:1", b"b")
    assert a.digest != b.digest
    assert [r.digest for r in store.images()] == [b.digest]


def test_blob_verification(store: Store):
    data = b"some bytes"
    good = sha256_digest(data)
    with pytest.raises(DigestMismatch):
        store.write_blob(data, expected_digest="sha256:" + "0" * 64)
    assert not store.has_blob(good)
    assert list(store.tmp_dir.iterdir()) == []
    import io
    with pytest.raises(DigestMismatch, match="size"):
        store.ingest(io.BytesIO(data), expected_digest=good, expected_size=3)
    with pytest.raises(DigestMismatch, match="size"):
        store.ingest(io.BytesIO(data), expected_digest=good, expected_size=100)
    assert not store.has_blob(good) and list(store.tmp_dir.iterdir()) == []
    assert store.ingest(io.BytesIO(data), expected_digest=good, expected_size=len(data)) == good
    assert store.blob_path(good).read_bytes() == data


def test_corrupt_blob_detected(store: Store, tmp_path: Path):
    rec = _import(store, tmp_path, "c:1")
    path = store.blob_path(rec.manifest.config.digest)
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes().replace(b"amd64", b"AMD64"))
    with pytest.raises(DigestMismatch, match="corrupt"):
        store.config(rec.manifest.config.digest)
    assert store.images() == []  # a damaged image is skipped, the store still lists


def test_crash_debris_is_harmless(store: Store, tmp_path: Path):
    rec = _import(store, tmp_path, "d:1")
    # what a crash can leave: a half-written blob, a half-written index, a half-unpacked layer
    (store.tmp_dir / "blob-half").write_bytes(b"partial")
    (store.root / ".index.json.crash.tmp").write_bytes(b'{"manifests": [')
    (store.layers_dir / ".tmp-unpack-x").mkdir()
    reopened = Store(store.root)
    assert [r.digest for r in reopened.images()] == [rec.digest]
    report = reopened.gc()
    assert not (store.tmp_dir / "blob-half").exists()
    assert report.blobs_removed == 0  # everything the image needs is kept
    assert [r.digest for r in Store(store.root).images()] == [rec.digest]


def test_concurrent_importers(store: Store, tmp_path: Path):
    script = (
        "import sys; sys.path.insert(0, sys.argv[3]); sys.path.insert(0, sys.argv[4])\n"
        "from helpers import make_rootfs_tar\n"
        "from jupyter_contain.runtime.images import archive\n"
        "from jupyter_contain.runtime.images.store import Store\n"
        "from pathlib import Path\n"
        "s = Store(sys.argv[1])\n"
        "for i in range(6):\n"
        "    t = make_rootfs_tar(Path(sys.argv[1]).parent / f'{sys.argv[2]}{i}.tar', {'f': f'{sys.argv[2]}{i}'.encode()})\n"
        "    archive.import_rootfs(s, t, f'{sys.argv[2]}:{i}', unpack=False)\n"
    )
    here = str(Path(__file__).parent)
    repo = str(Path(__file__).parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(store.root), who, here, repo])
             for who in ("alpha", "beta", "gamma")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    names = sorted(r.name for r in store.images())
    assert names == sorted(f"localhost/{w}:{i}" for w in ("alpha", "beta", "gamma") for i in range(6))
    json.loads((store.root / "index.json").read_text())


def test_pins_gc_and_rmi(store: Store, tmp_path: Path):
    keep = _import(store, tmp_path, "keep:1", b"k")
    used = _import(store, tmp_path, "used:1", b"u")
    gone = _import(store, tmp_path, "gone:1", b"g")
    store.pin("c1", used)
    with pytest.raises(ImageInUse, match="c1"):
        store.rmi("used:1")
    store.rmi("used:1", force=True)   # untagged, but the pin keeps its blobs
    store.rmi("gone:1")
    report = store.gc()
    assert report.blobs_removed == 3  # gone's manifest, config and layer
    assert not store.has_blob(gone.digest)
    for rec in (keep, used):
        for d in (rec.digest, rec.manifest.config.digest, rec.manifest.layers[0].digest):
            assert store.has_blob(d)
    store.unpin("c1")
    assert store.gc().blobs_removed == 3
    assert [r.name for r in store.images()] == ["localhost/keep:1"]


def test_bad_index_is_a_clear_error(store: Store):
    (store.root / "index.json").write_text("{nope")
    with pytest.raises(StoreError, match="index.json is not valid JSON"):
        store.images()


def test_unwritable_root_is_a_clear_error(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot use image store"):
        Store(tmp_path / "file" / "store")


def test_disk_usage(store: Store, tmp_path: Path):
    _import(store, tmp_path, "du:1")
    du = store.disk_usage()
    assert du.blobs_bytes > 0
    assert du.images[0][0] == "localhost/du:1"
