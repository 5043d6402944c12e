"""Offline ways in and out of the store: rootfs tarballs, OCI layouts and archives.

Owns the formats that move images without a registry: a root filesystem
tarball (imported as a one-layer image), an OCI image layout directory, an
``oci-archive`` (a tar of a layout) and a ``docker-archive`` (what
``docker save``/``podman save`` write, and ``docker load``/``podman load`` read).
Must not talk to registries or start containers; everything it stores goes
through :class:`Store`, which verifies every blob.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ...errors import DigestMismatch, ImageError, ManifestError
from ..fsutil import atomic_writer
from ..spec import (
    ANNOTATION_REF_NAME,
    DOCKER_MANIFEST,
    FOREIGN_LAYER_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_LAYOUT_VERSION,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    Reference,
    canonical_json,
    digest_hex,
    local_name,
    parse_document,
    sha256_digest,
)
from . import deflate
from .store import ANNOTATION_MANIFEST, MAX_DOCUMENT_SIZE, ImageRecord, Staging, Store, now_rfc3339

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _HashingReader:
    """Reads a stream while hashing (and counting) what passes through."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


def _open_decompressed(f: BinaryIO) -> BinaryIO:
    """The uncompressed stream of a tar that may be gzip- or zstd-compressed."""
    head = f.read(4)
    f.seek(0)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    if head.startswith(_ZSTD_MAGIC):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(f)
    return f


def store_layer_from_tar(store: Store, src: BinaryIO, *, compress: bool = True,
                         progress: Callable[[int], None] | None = None) -> tuple[Descriptor, str]:
    """Store an uncompressed tar stream as a layer blob; returns (descriptor, diff_id).

    The DiffID and the compressed digest come out of one streaming pass.
    gzip level 1: a store-local layer is read far more often than it is pushed,
    and level 1 is several times faster than the default for little size.
    """
    diff_hash = hashlib.sha256()
    with store.blob_writer(what="layer") as w:
        comp = deflate.compressobj(1, 31) if compress else None  # 31: gzip framing
        while chunk := src.read(_CHUNK):
            diff_hash.update(chunk)
            w.write(comp.compress(chunk) if comp else chunk)
            if progress:
                progress(len(chunk))
        if comp:
            w.write(comp.flush())
        digest = w.commit()
        return Descriptor(OCI_LAYER_GZIP if compress else OCI_LAYER, digest, w.size), "sha256:" + diff_hash.hexdigest()


def image_config(*, diff_ids: Sequence[str], env: Sequence[str] = (), cmd: Sequence[str] = (),
                 entrypoint: Sequence[str] = (), workdir: str = "", user: str = "",
                 labels: Mapping[str, str] | None = None, created_by: str = "jupyter-contain import",
                 comment: str = "", platform: Platform | None = None, created: str | None = None) -> dict[str, Any]:
    """A fresh OCI image config, made now unless ``created`` (RFC 3339) says when (reproducible images)."""
    plat = platform or Platform.host()
    created = created or now_rfc3339()
    cfg: dict[str, Any] = {}
    if env:
        cfg["Env"] = list(env)
    if cmd:
        cfg["Cmd"] = list(cmd)
    if entrypoint:
        cfg["Entrypoint"] = list(entrypoint)
    if workdir:
        cfg["WorkingDir"] = workdir
    if user:
        cfg["User"] = user
    if labels:
        cfg["Labels"] = dict(labels)
    doc: dict[str, Any] = {
        "created": created,
        "architecture": plat.architecture,
        "os": plat.os,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": created, "created_by": created_by, **({"comment": comment} if comment else {})}],
    }
    if plat.variant:
        doc["variant"] = plat.variant
    return doc


DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)


def import_rootfs(store: Store, tarball: Path | BinaryIO, name: str, *, env: Sequence[str] = DEFAULT_ENV,
                  cmd: Sequence[str] = ("/bin/sh",), entrypoint: Sequence[str] = (), workdir: str = "",
                  user: str = "", labels: Mapping[str, str] | None = None, unpack: bool = True,
                  progress: Callable[[int], None] | None = None, created: str | None = None) -> ImageRecord:
    """Import a root filesystem tarball (plain, gzip or zstd) as a one-layer image tagged ``name``.

    ``created`` (RFC 3339, default: now) fixes the config's creation time: with it, the
    same tarball gives the same image digest on every machine.
    """
    local_name(name)  # a bad name fails before any work
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(tarball, "rb")) if isinstance(tarball, (str, Path)) else tarball
        raw = _open_decompressed(f)
        with store.writing():
            desc, diff_id = store_layer_from_tar(store, raw, progress=progress)
            cfg = image_config(diff_ids=[diff_id], env=env, cmd=cmd, entrypoint=entrypoint, workdir=workdir,
                               user=user, labels=labels, created=created)
            rec = store.add_image(name=name, config=cfg, layers=[desc])
    if unpack:
        store.ensure_unpacked(rec)
    return rec


def _target_name(given: str | None, embedded: str | None, *, source: str) -> Reference:
    """The name to tag an imported image with: the caller's, else the one it carries.

    A layout's ``ref.name`` is often a bare tag (``skopeo copy ... oci:DIR:v1``):
    names without a registry are local ones.
    """
    if given or embedded:
        return local_name(given or embedded or "")
    raise ImageError(f"{source}: the image has no name: give one")


# --- OCI layouts -----------------------------------------------------------------------


def _layout_entries(index_doc: bytes) -> list[Descriptor]:
    doc = parse_document(index_doc, media_type=OCI_INDEX)
    if not isinstance(doc, Index):
        raise ManifestError("index.json is not an image index")
    return list(doc.manifests)


def _pick_entry(entries: list[Descriptor], ref: str | None, *, source: str) -> Descriptor:
    if ref:
        hits = [e for e in entries if e.annotations.get(ANNOTATION_REF_NAME) == ref]
        if not hits:
            names = sorted(e.annotations.get(ANNOTATION_REF_NAME, "") for e in entries) or ["none"]
            raise ImageError(f"{source} has no image named {ref!r} (it has: {', '.join(n for n in names if n)})")
        return hits[0]
    if len(entries) != 1:
        raise ImageError(f"{source} holds {len(entries)} images: name the one to import ({source}:NAME)")
    return entries[0]


def _copy_image_blobs(store: Store, top: Descriptor, *, read_doc: Callable[[Descriptor], bytes],
                      put_blob: Callable[[Descriptor], None], source_size: Callable[[str], int | None],
                      platform: Platform | None) -> tuple[Descriptor, str | None]:
    """Store a manifest (choosing from an index) and every blob it names.

    Returns the descriptor of the manifest as its source served it and the digest
    of the (stored) index it was chosen from, if any. ``read_doc`` returns a
    document's bytes; ``put_blob`` moves a blob into the store, verifying its size
    and digest; ``source_size`` gives a blob's size in the source (None: absent). An entry
    that is the OCI form of a Docker manifest (as our store and our oci-archives
    keep them, see ``store.ANNOTATION_MANIFEST``) gives back the Docker manifest
    when the source holds it and it names the same blobs.
    """
    docs: list[tuple[Descriptor, bytes]] = []

    def fetch_doc(desc: Descriptor) -> bytes:
        data = read_doc(desc)
        if len(data) != desc.size:
            raise ManifestError(f"{desc.digest}: size {len(data)} differs from the announced {desc.size}")
        if sha256_digest(data) != desc.digest:
            raise DigestMismatch(f"manifest {desc.digest}", desc.digest, sha256_digest(data))
        docs.append((desc, data))
        return data

    desc = top
    index_digest = None
    doc = parse_document(fetch_doc(desc), media_type=desc.media_type)
    while isinstance(doc, Index):
        index_digest = desc.digest
        desc = doc.select(platform or Platform.host())
        doc = parse_document(fetch_doc(desc), media_type=desc.media_type)
    served = top.annotations.get(ANNOTATION_MANIFEST)
    served_size = source_size(served) if served and desc is top and served != desc.digest else None
    if served and served_size is not None and served_size <= MAX_DOCUMENT_SIZE:
        data = read_doc(Descriptor(DOCKER_MANIFEST, served, served_size))
        original = parse_document(data) if sha256_digest(data) == served else None
        if isinstance(original, Manifest) and original.oci_form() == doc.oci_form():
            desc = Descriptor(original.media_type, served, len(data))
            docs.append((desc, data))
        else:
            log.warning("%s: the manifest %s its entry names as served does not match it; importing the "
                        "OCI form", top.digest, served)
    for blob in (doc.config, *doc.layers):
        if not store.has_blob(blob.digest):
            if blob.media_type in FOREIGN_LAYER_TYPES and source_size(blob.digest) is None:
                where = f" (the image says it is at {', '.join(blob.urls)})" if blob.urls else ""
                raise ImageError(f"layer {blob.digest} is a non-distributable (foreign) layer ({blob.media_type}) "
                                 f"that this archive does not include{where}: jupyter-contain does not fetch "
                                 "layers from URLs; save the image with its foreign layers included")
            put_blob(blob)
    ImageConfig.parse(store.read_blob(doc.config.digest))
    for d, data in docs:  # the documents go in last: nothing names a blob that is not there
        store.write_blob(data, expected_digest=d.digest, what=f"manifest {d.digest}")
    return Descriptor(desc.media_type, desc.digest, desc.size), index_digest


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def import_oci_layout(store: Store, layout: Path, *, ref: str | None = None, name: str | None = None,
                      platform: Platform | None = None, unpack: bool = True) -> ImageRecord:
    """Import image ``ref`` (its ``ref.name``) from an OCI layout directory, tagged ``name``."""
    layout = Path(layout)
    if not (layout / "oci-layout").is_file() or not (layout / "index.json").is_file():
        raise ImageError(f"{layout} is not an OCI image layout (no oci-layout or index.json)")
    top = _pick_entry(_layout_entries((layout / "index.json").read_bytes()), ref, source=str(layout))

    def open_blob(digest: str) -> BinaryIO:
        try:
            return open(layout / "blobs" / "sha256" / digest_hex(digest), "rb")
        except FileNotFoundError:
            raise ImageError(f"{layout}: blob {digest} is missing") from None

    def read_doc(desc: Descriptor) -> bytes:
        with open_blob(desc.digest) as f:
            return f.read(desc.size + 1)

    def put_blob(desc: Descriptor) -> None:
        with open_blob(desc.digest) as f:
            store.ingest(f, expected_digest=desc.digest, expected_size=desc.size, what=f"blob {desc.digest}")

    target = _target_name(name, ref or top.annotations.get(ANNOTATION_REF_NAME), source=str(layout))
    with store.writing():
        desc, index_digest = _copy_image_blobs(
            store, top, read_doc=read_doc, put_blob=put_blob, platform=platform,
            source_size=lambda d: _size_of(layout / "blobs" / "sha256" / digest_hex(d)))
        store.tag(target, desc, index_digest=index_digest)
    rec = store.resolve(str(target))
    if unpack:
        store.ensure_unpacked(rec)
    return rec


def _stage_archive(staging: Staging, archive: Path) -> dict[str, str]:
    """Stream every regular file of an archive into staging; member name -> digest.

    One pass over the archive (it may be compressed, and is read as a stream);
    nothing reaches the store until the caller commits what the image needs.
    """
    names: dict[str, str] = {}
    try:
        with open(archive, "rb") as f, tarfile.open(fileobj=_open_decompressed(f), mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                src = tar.extractfile(member)
                assert src is not None
                names[os.path.normpath(member.name).lstrip("/")] = staging.add(src)[0]
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ImageError(f"{archive}: not a readable tar archive ({exc})") from None
    return names


def _staged_put(staging: Staging, source: Path) -> Callable[[Descriptor], None]:
    def put_blob(desc: Descriptor) -> None:
        if not staging.has(desc.digest):
            raise ImageError(f"{source}: blob {desc.digest} is missing")
        with staging.open(desc.digest) as f:
            size = os.fstat(f.fileno()).st_size
        if size != desc.size:
            raise ImageError(f"{source}: blob {desc.digest} has {size} bytes, the manifest says {desc.size}")
        staging.commit(desc.digest)
    return put_blob


def import_oci_archive(store: Store, archive: Path, *, ref: str | None = None, name: str | None = None,
                       platform: Platform | None = None, unpack: bool = True) -> ImageRecord:
    """Import from an oci-archive (a tar of an OCI layout)."""
    with store.staging() as staging:
        members = _stage_archive(staging, archive)
        if "index.json" not in members:
            raise ImageError(f"{archive} is not an oci-archive (no index.json)")
        for n, d in members.items():
            if n.startswith("blobs/sha256/") and d != f"sha256:{Path(n).name}":
                raise ImageError(f"{archive}: {n} does not match its digest (its content hashes to {d})")
        top = _pick_entry(_layout_entries(staging.read(members["index.json"])), ref, source=str(archive))
        target = _target_name(name, ref or top.annotations.get(ANNOTATION_REF_NAME), source=str(archive))

        def read_doc(desc: Descriptor) -> bytes:
            if not staging.has(desc.digest):
                raise ImageError(f"{archive}: blob {desc.digest} is missing")
            return staging.read(desc.digest)

        desc, index_digest = _copy_image_blobs(store, top, read_doc=read_doc, put_blob=_staged_put(staging, archive),
                                               source_size=staging.size, platform=platform)
        store.tag(target, desc, index_digest=index_digest)
    rec = store.resolve(str(target))
    if unpack:
        store.ensure_unpacked(rec)
    return rec


def import_docker_archive(store: Store, archive: Path, *, name: str | None = None,
                          unpack: bool = True) -> ImageRecord:
    """Import from a docker-archive (``docker save`` output; the first image in it)."""
    with store.staging() as staging:
        members = _stage_archive(staging, archive)
        if "manifest.json" not in members:
            raise ImageError(f"{archive} is not a docker-archive (no manifest.json)")
        try:
            entries = json.loads(staging.read(members["manifest.json"]))
            entry = entries[0]
            config_name, layer_names = entry["Config"], list(entry["Layers"])
            tags = list(entry.get("RepoTags") or [])
        except (ValueError, LookupError, TypeError):
            raise ManifestError(f"{archive}: manifest.json is malformed") from None
        # docker-archive tags follow Docker's rules: "busybox:latest" is Docker Hub's busybox
        target = local_name(name) if name else Reference.parse(tags[0]) if tags else None
        if target is None:
            raise ImageError(f"{archive}: the image has no tag: give a name")

        def member(n: str) -> str:
            key = os.path.normpath(n).lstrip("/")
            if key not in members:
                raise ImageError(f"{archive}: {n} is missing")
            return members[key]

        cfg_digest = member(config_name)
        cfg_bytes = staging.read(cfg_digest)
        config = ImageConfig.parse(cfg_bytes)
        if len(config.diff_ids) != len(layer_names):
            raise ManifestError(f"{archive}: {len(layer_names)} layers but {len(config.diff_ids)} diff_ids")
        layers = []
        for n, diff_id in zip(layer_names, config.diff_ids):
            digest = member(n)
            with staging.open(digest) as f:
                head = f.read(4)
                size = os.fstat(f.fileno()).st_size
            if head.startswith(_GZIP_MAGIC):
                mt = OCI_LAYER_GZIP
            elif head.startswith(_ZSTD_MAGIC):
                mt = OCI_LAYER_ZSTD
            else:
                mt = OCI_LAYER
                if digest != diff_id:
                    raise ImageError(f"{archive}: layer {n} does not match its diff_id {diff_id}")
            layers.append(Descriptor(mt, digest, size))
        for d in (cfg_digest, *(layer.digest for layer in layers)):
            staging.commit(d)
        manifest = Manifest(OCI_MANIFEST, Descriptor(OCI_CONFIG, cfg_digest, len(cfg_bytes)), tuple(layers))
        m_bytes = canonical_json(manifest.to_json())
        m_digest = store.write_blob(m_bytes, what="manifest")
        store.tag(target, Descriptor(OCI_MANIFEST, m_digest, len(m_bytes)))
    rec = store.resolve(str(target))
    if unpack:
        store.ensure_unpacked(rec)
    return rec


def detect_format(path: Path) -> str:
    """``oci`` (layout dir), ``oci-archive``, ``docker-archive`` or ``rootfs`` (a plain rootfs tarball)."""
    path = Path(path)
    if path.is_dir():
        return "oci"
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=_open_decompressed(f), mode="r|") as tar:
            for i, member in enumerate(tar):
                n = os.path.normpath(member.name).lstrip("/")
                if n == "manifest.json":
                    return "docker-archive"
                if n in ("oci-layout", "index.json"):
                    return "oci-archive"
                if i > 64:  # archives put their documents among the first few members
                    break
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ImageError(f"{path}: not a tar archive or OCI layout ({exc})") from None
    return "rootfs"


# --- saving -----------------------------------------------------------------------------


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_blob(tar: tarfile.TarFile, store: Store, name: str, digest: str) -> None:
    path = store.blob_path(digest)
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode = 0o644
    with open(path, "rb") as f:
        tar.addfile(info, f)


def save_oci_archive(store: Store, image: ImageRecord, dest: Path) -> None:
    """Write ``image`` as an oci-archive (read by ``podman load``, ``skopeo``, ``docker load``).

    The archive's ``index.json`` names an OCI manifest, as peers need (skopeo's
    ``oci:`` transport skips other entries): for a Docker schema2 image its OCI
    form, with the Docker manifest beside it and named by an annotation, so that
    importing the archive here gives back the image with its registry digest.
    """
    ref = Reference.parse(image.name)
    entry = store.oci_form(image.digest, image.manifest)
    annotations = {ANNOTATION_REF_NAME: str(ref)}
    if entry.digest != image.digest:
        annotations[ANNOTATION_MANIFEST] = image.digest
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [entry.with_annotations(annotations).to_json()],
    }

    def write(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode())
            _add_bytes(tar, "index.json", json.dumps(index).encode())
            for d in dict.fromkeys([entry.digest, image.digest, image.manifest.config.digest,
                                    *(layer.digest for layer in image.manifest.layers)]):
                _add_blob(tar, store, f"blobs/sha256/{digest_hex(d)}", d)

    with atomic_writer(dest) as f:
        write(f)


def save_docker_archive(store: Store, image: ImageRecord, dest: Path) -> None:
    """Write ``image`` as a docker-archive (``docker load``/``podman load``/``skopeo`` read it).

    Layers are written uncompressed, as ``docker save`` does, so that every
    version of ``docker load`` accepts them; their digests are then the DiffIDs.
    """
    ref = Reference.parse(image.name)
    tag = ref.familiar if ref.tag else None
    layer_names = [f"blobs/sha256/{digest_hex(d)}" for d in image.config.diff_ids]
    config_name = f"blobs/sha256/{digest_hex(image.id)}"
    manifest = [{
        "Config": config_name,
        "RepoTags": [tag] if tag else [],
        "Layers": layer_names,
    }]

    def write(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add_blob(tar, store, config_name, image.id)
            written: set[str] = set()
            for desc, diff_id, n in zip(image.manifest.layers, image.config.diff_ids, layer_names):
                if n in written:
                    continue
                written.add(n)
                if desc.media_type == OCI_LAYER or desc.digest == diff_id:
                    _add_blob(tar, store, n, desc.digest)
                    continue
                _add_decompressed_layer(tar, store, n, desc.digest, diff_id)
            _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
            if tag:
                _add_bytes(tar, "repositories", json.dumps(
                    {tag.rsplit(":", 1)[0]: {ref.tag: digest_hex(image.config.diff_ids[-1])}}).encode())

    with atomic_writer(dest) as f:
        write(f)


def _add_decompressed_layer(tar: tarfile.TarFile, store: Store, name: str, digest: str, diff_id: str) -> None:
    # tar needs the size before the data: decompress to a temp file first (verifying the DiffID)
    with store.writing(), store.open_blob(digest) as src:
        raw = _open_decompressed(src)
        h = hashlib.sha256()
        with tempfile.TemporaryFile(dir=store.tmp_dir) as tmp:
            while chunk := raw.read(_CHUNK):
                h.update(chunk)
                tmp.write(chunk)
            if "sha256:" + h.hexdigest() != diff_id:
                raise ImageError(f"layer {digest} does not match its DiffID {diff_id}")
            info = tarfile.TarInfo(name)
            info.size = tmp.tell()
            info.mode = 0o644
            tmp.seek(0)
            tar.addfile(info, tmp)


__all__ = [
    "DEFAULT_ENV", "detect_format", "image_config", "import_docker_archive", "import_oci_archive",
    "import_oci_layout", "import_rootfs", "save_docker_archive", "save_oci_archive", "store_layer_from_tar",
]
