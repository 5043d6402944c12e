"""Build OCI layer tars (and tiny OCI layouts) in tests, with Python's tarfile.

Owns nothing of the package; test-only helpers. Must not touch the network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

MEDIA = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}

MTIME = 1_600_000_000


@dataclass
class Entry:
    info: tarfile.TarInfo
    data: bytes | None = None


def _info(name: str, type_: bytes, *, mode: int, uid: int = 0, gid: int = 0,
          mtime: float = MTIME, xattrs: dict[str, bytes] | None = None,
          pax: dict[str, str] | None = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    headers: dict[str, str] = {}
    for k, v in (xattrs or {}).items():
        # tarfile writes PAX values as UTF-8 of the str; surrogateescape keeps raw bytes
        headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
    headers.update(pax or {})
    ti.pax_headers = headers
    return ti


def reg(name: str, data: bytes = b"", *, mode: int = 0o644, **kw) -> Entry:
    ti = _info(name, tarfile.REGTYPE, mode=mode, **kw)
    ti.size = len(data)
    return Entry(ti, data)


def dir_(name: str, *, mode: int = 0o755, **kw) -> Entry:
    return Entry(_info(name, tarfile.DIRTYPE, mode=mode, **kw))


def sym(name: str, target: str, **kw) -> Entry:
    ti = _info(name, tarfile.SYMTYPE, mode=0o777, **kw)
    ti.linkname = target
    return Entry(ti)


def hard(name: str, target: str, **kw) -> Entry:
    ti = _info(name, tarfile.LNKTYPE, mode=0o644, **kw)
    ti.linkname = target
    return Entry(ti)


def fifo(name: str, *, mode: int = 0o640, **kw) -> Entry:
    return Entry(_info(name, tarfile.FIFOTYPE, mode=mode, **kw))


def dev(name: str, *, block: bool = False, major: int = 1, minor: int = 3) -> Entry:
    ti = _info(name, tarfile.BLKTYPE if block else tarfile.CHRTYPE, mode=0o666)
    ti.devmajor, ti.devminor = major, minor
    return Entry(ti)


def wh(path: str) -> Entry:
    """OCI whiteout of ``path``."""
    parent, _, name = path.rpartition("/")
    return reg(f"{parent}/.wh.{name}" if parent else f".wh.{name}", mode=0o600)


def opq(dirpath: str) -> Entry:
    """OCI opaque marker for ``dirpath`` ('' = layer root)."""
    return reg(f"{dirpath}/.wh..wh..opq" if dirpath else ".wh..wh..opq", mode=0o600)


def make_tar(entries: list[Entry], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=fmt) as t:
        for e in entries:
            t.addfile(e.info, io.BytesIO(e.data) if e.data is not None else None)
    return bio.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_oci_layout(root: Path, tag: str, layer_tars: list[bytes]) -> None:
    """A minimal OCI image layout with uncompressed layers (bottom first), for umoci."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        d = sha256(data)
        (blobs / d.split(":")[1]).write_bytes(data)
        return d

    layers = [{"mediaType": MEDIA["tar"], "digest": put(t), "size": len(t)} for t in layer_tars]
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in layer_tars]},
        "history": [{"created_by": "test"} for _ in layer_tars],
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config), "size": len(config)},
        "layers": layers,
    }).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": put(manifest), "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
