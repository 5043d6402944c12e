"""The image store: an OCI image layout on disk, plus unpacked layers beside it.

Owns the store's directory (``ROOT``): the OCI layout (``oci-layout``,
``index.json``, ``blobs/sha256/``) that ``skopeo`` and ``umoci`` read as is; the
unpacked layers (``layers/<diffid-hex>/``, extracted once, shared read-only by
every container); pins (``pins/<owner>.json``: which image a container holds);
and the locks and temp space that keep it consistent. Must not start
containers, talk to registries or know about Jupyter.

Images keep the documents their source served, byte for byte (a Docker schema2
manifest, the index or manifest list a platform was chosen from), so that their
digests stay the registry's: ``NAME@sha256:...`` keeps matching and a push of an
unchanged image gives the registry the same digest. ``index.json`` must still be
readable by peers that know OCI manifests only (skopeo's ``oci:`` transport
skips other entries, umoci refuses them), so a tag of a Docker manifest points
at its OCI form (same config and layer blobs, OCI media types, written here),
and the entry's annotations name what was served (``ANNOTATION_MANIFEST``,
``ANNOTATION_INDEX``). Stores written before this kept Docker manifests in
``index.json`` directly: they are read as they are and upgraded on open.

Consistency rules, so that a crash at any point leaves a store that opens and
lists correctly:
- a blob is written to ``tmp/``, verified (size, sha256), fsynced, then renamed
  into ``blobs/``; nothing refers to a blob before it is in place;
- ``index.json`` is replaced atomically (write, fsync, rename) under an
  exclusive lock, after the blobs it names are in place;
- a layer is unpacked into a temp directory and renamed when complete;
- every writer holds the store's shared lock; ``gc`` holds it exclusively, so
  it never removes what a writer is about to reference, and whatever it finds in
  ``tmp/`` then is debris of a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, BinaryIO

from ...errors import DigestMismatch, ImageInUse, ImageNotFound, ManifestError, StoreError
from .. import userns
from ..fsutil import atomic_write, file_lock, fsync_dir, read_small
from ..spec import (
    ANNOTATION_REF_NAME,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYOUT_VERSION,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    Reference,
    canonical_json,
    check_digest,
    digest_hex,
    local_alternative,
    local_name,
    parse_document,
    sha256_digest,
)
from .rootless import remove_tree  # fsutil's, with the rootless fallback

log = logging.getLogger(__name__)

#: index.json entry annotations: the manifest as served, when the entry is its OCI form
ANNOTATION_MANIFEST = "io.jupyter-contain.manifest.digest"
#: ... and the index (or manifest list) the manifest was chosen from, stored as served
ANNOTATION_INDEX = "io.jupyter-contain.index.digest"
_OWN_ANNOTATIONS = (ANNOTATION_MANIFEST, ANNOTATION_INDEX)

#: largest manifest/config/index we read into memory
MAX_DOCUMENT_SIZE = 8 << 20
_CHUNK = 1 << 20


def default_root() -> Path:
    """``$JUPYTER_CONTAIN_ROOT``, else ``/var/lib/jupyter-contain`` for root, else XDG data."""
    env = os.environ.get("JUPYTER_CONTAIN_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/jupyter-contain")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "jupyter-contain"


@dataclass(frozen=True)
class ImageRecord:
    """One tagged image in the store."""

    name: str                  # full reference, e.g. "docker.io/library/debian:bookworm"
    descriptor: Descriptor     # of the manifest as served (OCI or Docker schema2)
    manifest: Manifest
    config: ImageConfig
    #: the index or manifest list the manifest was chosen from (stored as served), if any
    index_digest: str | None = None

    @property
    def digest(self) -> str:
        return self.descriptor.digest

    @property
    def id(self) -> str:
        """The image id, as Docker defines it: the config's digest."""
        return self.manifest.config.digest

    @property
    def size(self) -> int:
        """Compressed size: config plus layers (what a pull would move)."""
        return self.manifest.config.size + sum(layer.size for layer in self.manifest.layers)

    @property
    def familiar(self) -> str:
        try:
            return Reference.parse(self.name).familiar
        except Exception:  # names written by other tools may not parse; show them as they are
            return self.name


@dataclass(frozen=True)
class GcReport:
    blobs_removed: int
    layers_removed: int
    bytes_freed: int


@dataclass(frozen=True)
class DiskUsage:
    blobs_bytes: int
    layers_bytes: int
    containers_bytes: int
    images: tuple[tuple[str, int, int], ...]   # (name, unique bytes, shared bytes) of unpacked layers


class BlobWriter:
    """Streams one blob into ``tmp/``; ``commit()`` verifies it and moves it into place."""

    def __init__(self, store: Store, *, expected_digest: str | None, expected_size: int | None,
                 what: str) -> None:
        self._store = store
        self.expected_digest = check_digest(expected_digest) if expected_digest else None
        self.expected_size = expected_size
        self.what = what
        self._hash = hashlib.sha256()
        self.size = 0
        fd, self._tmp = tempfile.mkstemp(dir=store.tmp_dir, prefix="blob-")
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")
        self.digest: str | None = None

    def write(self, data: bytes) -> int:
        assert self._file is not None, "blob writer already closed"
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            raise DigestMismatch(f"{self.what}: size", str(self.expected_size), f"more than {self.expected_size}")
        self._hash.update(data)
        return self._file.write(data)

    @property
    def path(self) -> Path:
        """The temp file being written: another reader may follow it (call ``flush()`` first)."""
        return Path(self._tmp)

    def flush(self) -> None:
        """Push buffered bytes to the file so a reader of ``path`` sees all of ``size``."""
        assert self._file is not None, "blob writer already closed"
        self._file.flush()

    def verify(self) -> str:
        """Check what was written so far against the expected size and digest, without committing."""
        digest = "sha256:" + self._hash.hexdigest()
        if self.expected_size is not None and self.size != self.expected_size:
            raise DigestMismatch(f"{self.what}: size", str(self.expected_size), str(self.size))
        if self.expected_digest is not None and digest != self.expected_digest:
            raise DigestMismatch(self.what, self.expected_digest, digest)
        return digest

    def commit(self) -> str:
        assert self._file is not None, "blob writer already closed"
        digest = "sha256:" + self._hash.hexdigest()
        if self.expected_size is not None and self.size != self.expected_size:
            raise DigestMismatch(f"{self.what}: size", str(self.expected_size), str(self.size))
        if self.expected_digest is not None and digest != self.expected_digest:
            raise DigestMismatch(self.what, self.expected_digest, digest)
        self._file.flush()
        os.fchmod(self._file.fileno(), 0o644)
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        dest = self._store.blob_path(digest)
        if dest.exists():  # another writer got there first: same content by definition
            os.unlink(self._tmp)
        else:
            os.rename(self._tmp, dest)
            fsync_dir(dest.parent)
        self.digest = digest
        return digest

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None or self.digest is None:
            self.abort()


class Staging:
    """A private folder in ``tmp/`` for blobs not yet known to be wanted.

    Importers stream whole archives here, read the documents, verify, and then
    ``commit`` only the blobs the image needs; on failure (or for blobs nobody
    needs) the folder goes away and the store is exactly as before.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self.dir = Path(tempfile.mkdtemp(dir=store.tmp_dir, prefix="stage-"))

    def add(self, src: IO[bytes], *, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
        """Copy a stream in; returns its (digest, size)."""
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.dir)
        with os.fdopen(fd, "wb") as f:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                f.write(chunk)
                size += len(chunk)
                if progress:
                    progress(len(chunk))
        digest = "sha256:" + h.hexdigest()
        os.rename(tmp, self.dir / digest_hex(digest))
        return digest, size

    def has(self, digest: str) -> bool:
        return (self.dir / digest_hex(digest)).is_file()

    def open(self, digest: str) -> BinaryIO:
        return open(self.dir / digest_hex(digest), "rb")

    def size(self, digest: str) -> int | None:
        """The staged blob's size, None if it is not staged."""
        try:
            return (self.dir / digest_hex(digest)).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, digest: str, *, max_size: int = MAX_DOCUMENT_SIZE) -> bytes:
        path = self.dir / digest_hex(digest)
        if path.stat().st_size > max_size:
            raise ManifestError(f"document {digest} is larger than {max_size} bytes")
        return path.read_bytes()

    def commit(self, digest: str) -> None:
        """Move a staged blob into the store (its name is its verified digest)."""
        if self._store.has_blob(digest):
            return
        src = self.dir / digest_hex(digest)
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(src, 0o644)
        os.rename(src, self._store.blob_path(digest))
        fsync_dir(self._store.blobs_dir)

    def remove(self) -> None:
        remove_tree(self.dir)


class Store:
    """An image store rooted at ``root`` (created on first use)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        #: this process is not root (decided once): unpacks keep the caller's ids, opaque
        #: directories carry the user.* xattr, removal may need the user namespace's root
        self.rootless = userns.rootless()
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.layers_dir = self.root / "layers"
        self.containers_dir = self.root / "containers"
        self.pins_dir = self.root / "pins"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        # parsed images by manifest digest, to spare every container create and
        # start from reading and hashing them again (blobs are content-addressed:
        # a digest's document never changes)
        # (descriptor, manifest, config, the document's media type, index digest)
        self._records: dict[tuple[str, Platform | None],
                            tuple[Descriptor, Manifest, ImageConfig, str, str | None]] = {}
        self._records_lock = threading.Lock()
        self._ensure_layout()
        self._upgrade_index()

    # --- layout and locks ------------------------------------------------------

    def _ensure_layout(self) -> None:
        try:
            for d in (self.blobs_dir, self.layers_dir, self.containers_dir, self.pins_dir, self.tmp_dir,
                      self.locks_dir):
                d.mkdir(parents=True, exist_ok=True)
            layout = self.root / "oci-layout"
            if not layout.exists():
                atomic_write(layout, json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode())
            if not (self.root / "index.json").exists():
                with self._lock("index", exclusive=True):
                    if not (self.root / "index.json").exists():
                        self._write_index([])
        except PermissionError as exc:
            raise StoreError(f"cannot use image store at {self.root}: {exc.strerror} "
                             "(set JUPYTER_CONTAIN_ROOT or --root to a folder you can write)") from None
        except OSError as exc:
            raise StoreError(f"cannot use image store at {self.root}: {exc}") from None

    @contextlib.contextmanager
    def _lock(self, name: str, *, exclusive: bool) -> Iterator[None]:
        with file_lock(self.locks_dir / f"{name}.lock", shared=not exclusive):
            yield

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold while adding content that is not yet referenced (keeps ``gc`` away)."""
        with self._lock("gc", exclusive=False):
            yield

    # --- blobs -------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / digest_hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the store at {self.root}") from None

    def read_blob(self, digest: str, *, max_size: int = MAX_DOCUMENT_SIZE) -> bytes:
        """Read a small blob (a manifest, a config) and verify it against its digest."""
        with self.open_blob(digest) as f:
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise ManifestError(f"blob {digest} is larger than {max_size} bytes")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DigestMismatch(f"stored blob {digest} is corrupt", digest, actual)
        return data

    def blob_writer(self, *, expected_digest: str | None = None, expected_size: int | None = None,
                    what: str = "blob") -> BlobWriter:
        return BlobWriter(self, expected_digest=expected_digest, expected_size=expected_size, what=what)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Staging]:
        """A private staging folder, removed on exit whatever happens (see :class:`Staging`)."""
        with self.writing():
            st = Staging(self)
            try:
                yield st
            finally:
                st.remove()

    def write_blob(self, data: bytes, *, expected_digest: str | None = None, what: str = "blob") -> str:
        with self.blob_writer(expected_digest=expected_digest, expected_size=None, what=what) as w:
            w.write(data)
            return w.commit()

    def ingest(self, src: BinaryIO, *, expected_digest: str | None = None, expected_size: int | None = None,
               what: str = "blob", progress: Callable[[int], None] | None = None) -> str:
        """Copy a stream into the store, verifying it; returns the digest."""
        if expected_digest and self.has_blob(expected_digest):
            return expected_digest
        with self.blob_writer(expected_digest=expected_digest, expected_size=expected_size, what=what) as w:
            while chunk := src.read(_CHUNK):
                w.write(chunk)
                if progress:
                    progress(len(chunk))
            return w.commit()

    # --- index -------------------------------------------------------------------

    def _read_index(self) -> list[dict[str, Any]]:
        path = self.root / "index.json"
        try:
            doc = json.loads(read_small(path))
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise StoreError(f"{path} is not valid JSON: {exc}") from None
        entries = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise StoreError(f"{path} has no manifests list")
        return entries

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        atomic_write(self.root / "index.json", json.dumps(doc, indent=2).encode() + b"\n")

    def tag(self, name: str | Reference, descriptor: Descriptor, *, index_digest: str | None = None) -> str:
        """Point tag ``name`` at the manifest ``descriptor`` (whose blob must be stored).

        A plain string without a registry names a local image (``localhost/``),
        as Podman does; pass a :class:`Reference` to store a name exactly.
        ``descriptor`` names the manifest as served (OCI or Docker schema2); a
        Docker one is entered as its OCI form (see the module text).
        ``index_digest`` names the stored index it was chosen from.
        """
        ref = name if isinstance(name, Reference) else local_name(name)
        if ref.tag is None:
            raise StoreError(f"cannot tag by digest: {ref}")
        ref_name = str(ref)
        if not self.has_blob(descriptor.digest):
            raise StoreError(f"cannot tag {ref_name}: manifest {descriptor.digest} is not stored")
        if index_digest is not None and not self.has_blob(index_digest):
            raise StoreError(f"cannot tag {ref_name}: index {index_digest} is not stored")
        entry = self._entry(descriptor, index_digest=index_digest)
        doc = entry.with_annotations({**entry.annotations, ANNOTATION_REF_NAME: ref_name}).to_json()
        with self._lock("index", exclusive=True):
            entries = [e for e in self._read_index() if _ref_name(e) != ref_name]
            entries.append(doc)
            self._write_index(entries)
        log.info("tagged %s -> %s", ref_name, descriptor.digest)
        return ref_name

    def _entry(self, descriptor: Descriptor, *, index_digest: str | None) -> Descriptor:
        """The ``index.json`` descriptor for a manifest as served (its OCI form for a Docker one)."""
        kept = {k: v for k, v in descriptor.annotations.items() if k not in _OWN_ANNOTATIONS}
        own: dict[str, str] = {ANNOTATION_INDEX: index_digest} if index_digest else {}
        doc = parse_document(self.read_blob(descriptor.digest))
        if doc.media_type != descriptor.media_type:
            raise ManifestError(f"manifest {descriptor.digest} is a {doc.media_type}, "
                                f"not the {descriptor.media_type} its descriptor says")
        if isinstance(doc, Manifest) and not doc.is_oci:
            view = self.oci_form(descriptor.digest, doc)
            return Descriptor(view.media_type, view.digest, view.size, {**kept, ANNOTATION_MANIFEST:
                                                                        descriptor.digest, **own})
        return Descriptor(descriptor.media_type, descriptor.digest, descriptor.size, {**kept, **own},
                          descriptor.platform)

    def oci_form(self, digest: str, doc: Manifest | None = None) -> Descriptor:
        """The descriptor of manifest ``digest`` as OCI peers read it: itself, or its stored OCI form.

        The OCI form of a Docker manifest is written on first need; its bytes are
        canonical JSON, so the same manifest always gets the same OCI form.
        """
        if doc is None:
            parsed = parse_document(self.read_blob(digest))
            if not isinstance(parsed, Manifest):
                raise ManifestError(f"{digest} is an index, not an image manifest")
            doc = parsed
        if doc.is_oci:
            return Descriptor(OCI_MANIFEST, digest, self.blob_path(digest).stat().st_size)
        data = canonical_json(doc.oci_form().to_json())
        view = sha256_digest(data)
        if not self.has_blob(view):
            with self.writing():
                self.write_blob(data, expected_digest=view, what=f"OCI form of manifest {digest}")
        return Descriptor(OCI_MANIFEST, view, len(data))

    def untag(self, name: str) -> Descriptor:
        rec = self.resolve(name)
        with self._lock("index", exclusive=True):
            entries = [e for e in self._read_index() if _ref_name(e) != rec.name]
            self._write_index(entries)
        return rec.descriptor

    def _upgrade_index(self) -> None:
        """Give Docker manifests that an earlier version tagged directly their OCI form.

        Nothing is lost: the entries keep their names, and the Docker manifests stay
        (named by the entries' annotations), so digests and pins are unchanged.
        Without write access the store is read as it is (peers then miss those images).
        """
        # every open pays this check: a substring test first (measured 30 us with 50 tags, most of
        # it reading the file; parsing the JSON as well took 70 us)
        try:
            if DOCKER_MANIFEST.encode() not in read_small(self.root / "index.json"):
                return
            entries = self._read_index()
        except (OSError, StoreError):   # a damaged index.json: the reads that need it say so
            return
        if not any(isinstance(e, dict) and e.get("mediaType") == DOCKER_MANIFEST for e in entries):
            return
        upgraded: list[str] = []
        try:
            with self.writing(), self._lock("index", exclusive=True):
                entries = []
                for e in self._read_index():
                    name = _ref_name(e) if isinstance(e, dict) else None
                    if name and e.get("mediaType") == DOCKER_MANIFEST:
                        try:
                            entry = self._entry(Descriptor.from_json(e), index_digest=None)
                        except (ManifestError, StoreError, DigestMismatch) as exc:
                            log.warning("image %s: cannot write the OCI form of its Docker manifest: %s", name, exc)
                        else:
                            e = entry.with_annotations({**entry.annotations, ANNOTATION_REF_NAME: name}).to_json()
                            upgraded.append(name)
                    entries.append(e)
                self._write_index(entries)
        except OSError as exc:
            log.warning("image store %s holds Docker manifests tagged by an earlier version, and cannot be "
                        "upgraded now (%s): jupyter-contain reads them as they are; for skopeo's oci: "
                        "transport and umoci to see them, run `jupyter contain images` once as a user who "
                        "may write the store", self.root, exc)
            return
        log.info("image store %s: %d Docker manifests tagged by an earlier version now have their OCI form "
                 "(%s)", self.root, len(upgraded), ", ".join(upgraded))

    # --- reading images ------------------------------------------------------------

    def manifest(self, digest: str) -> Manifest:
        doc = parse_document(self.read_blob(digest))
        if not isinstance(doc, Manifest):
            raise ManifestError(f"{digest} is an index, not an image manifest")
        return doc

    def config(self, digest: str) -> ImageConfig:
        return ImageConfig.parse(self.read_blob(digest))

    def _record(self, name: str, digest: str, *, media_type: str | None = None, platform: Platform | None = None,
                index_digest: str | None = None) -> ImageRecord:
        """The image of manifest (or index) ``digest``; ``media_type``, if given, must be the document's."""
        key = (digest, platform)
        hit = self._records.get(key)
        if hit is None:
            hit = self._read_record(name, digest, media_type=media_type, platform=platform)
            with self._records_lock:   # a server starts kernels from several threads
                if len(self._records) >= 64:
                    self._records.pop(next(iter(self._records)))
                self._records[key] = hit
        elif media_type and hit[3] != media_type:
            raise ManifestError(f"{digest} is a {hit[3]}, not the {media_type} its descriptor says")
        return ImageRecord(name=name, descriptor=hit[0], manifest=hit[1], config=hit[2],
                           index_digest=index_digest or hit[4])

    def _read_record(self, name: str, digest: str, *, media_type: str | None, platform: Platform | None
                     ) -> tuple[Descriptor, Manifest, ImageConfig, str, str | None]:
        """(descriptor, manifest, config, the document's media type, index digest), read and verified."""
        data = self.read_blob(digest)
        doc = parse_document(data, media_type=media_type)
        if isinstance(doc, Index):
            # an index stored whole (e.g. from an oci layout): pick this machine's entry
            chosen = doc.select(platform or Platform.host())
            rec = self._record(name, chosen.digest, media_type=chosen.media_type, platform=platform)
            return rec.descriptor, rec.manifest, rec.config, doc.media_type, digest
        config = self.config(doc.config.digest)
        if len(config.diff_ids) != len(doc.layers):
            raise ManifestError(f"image {name}: {len(doc.layers)} layers but {len(config.diff_ids)} diff_ids")
        return Descriptor(doc.media_type, digest, len(data)), doc, config, doc.media_type, None

    def _entry_record(self, name: str, entry: dict[str, Any], *, fresh: bool = False) -> ImageRecord:
        """The image an ``index.json`` entry names: the manifest as served, where the entry is its OCI form."""
        desc = Descriptor.from_json(entry)
        served = desc.annotations.get(ANNOTATION_MANIFEST)
        index = desc.annotations.get(ANNOTATION_INDEX)
        if served is not None and not self.has_blob(check_digest(served)):
            # a peer's gc (umoci gc) sees only the OCI form and may remove what was served:
            # the image is still whole, under the OCI form's digest
            log.warning("image %s: its manifest as served (%s) is gone from the store; using its OCI form %s",
                        name, served, desc.digest)
            served = None
        if index is not None and not self.has_blob(check_digest(index)):
            index = None
        digest, media_type = (served, None) if served else (desc.digest, desc.media_type)
        if fresh:   # read and verified again (not the cache): a listing shows what is on disk
            d, m, c, _, idx = self._read_record(name, digest, media_type=media_type, platform=None)
            return ImageRecord(name=name, descriptor=d, manifest=m, config=c, index_digest=index or idx)
        return self._record(name, digest, media_type=media_type, index_digest=index)

    def record(self, name: str, digest: str) -> ImageRecord:
        """The image with manifest ``digest`` (tagged or not), reported under ``name``."""
        if not self.has_blob(digest):
            raise ImageNotFound(f"image {name} ({digest}) is no longer in the store")
        return self._record(name, digest)

    def images(self) -> list[ImageRecord]:
        """Every tagged image; an entry whose blobs are damaged is logged and skipped."""
        out = []
        for e in self._read_index():
            name = _ref_name(e)
            if not name:
                continue
            try:
                out.append(self._entry_record(name, e, fresh=True))
            except (ManifestError, StoreError, DigestMismatch) as exc:
                log.warning("skipping damaged image %s: %s", name, exc)
        return out

    def resolve(self, text: str) -> ImageRecord:
        """Find an image by name (Docker rules, ``localhost/`` fallback), digest or id prefix.

        ``NAME@DIGEST`` matches the digest of the manifest as served, or of the
        index it was chosen from.
        """
        entries = [(n, e) for e in self._read_index() if (n := _ref_name(e))]
        wanted: list[str] = []
        try:
            ref = Reference.parse(text)
        except Exception:
            ref = None
        if ref is not None:
            if ref.digest and not ref.tag and "@" in text:
                for n, e in entries:
                    ann = e["annotations"]   # a dict: _ref_name found the name in it
                    if ref.digest in (e.get("digest"), ann.get(ANNOTATION_MANIFEST), ann.get(ANNOTATION_INDEX)) \
                            and n.startswith(ref.name + ":"):
                        return self._entry_record(n, e)
                if self.has_blob(ref.digest):
                    return self._record(str(ref), ref.digest)
            wanted.append(str(Reference(ref.registry, ref.repository, ref.tag)))
            alt = local_alternative(text)
            if alt is not None:
                wanted.append(str(Reference(alt.registry, alt.repository, alt.tag)))
        by_name = dict(entries)
        for w in wanted:
            if w in by_name:
                return self._entry_record(w, by_name[w])
        if text in by_name:  # a name written by another tool, taken literally
            return self._entry_record(text, by_name[text])
        # an image id or manifest digest (prefix of at least 12 hex digits, like Docker)
        short = text.removeprefix("sha256:")
        if len(short) >= 12 and all(c in "0123456789abcdef" for c in short):
            matches = {}
            for rec in self.images():
                if digest_hex(rec.id).startswith(short) or digest_hex(rec.digest).startswith(short):
                    matches[rec.digest] = rec
            if len(matches) == 1:
                return next(iter(matches.values()))
            if len(matches) > 1:
                raise ImageNotFound(f"image id {text!r} is ambiguous")
        raise ImageNotFound(f"no such image: {text} (see `jupyter contain images`)")

    # --- writing images ------------------------------------------------------------

    def add_image(self, *, name: str, config: dict[str, Any], layers: Sequence[Descriptor],
                  annotations: dict[str, str] | None = None) -> ImageRecord:
        """Store a config and an OCI manifest for already-stored layer blobs, and tag it."""
        with self.writing():
            for layer in layers:
                if not self.has_blob(layer.digest):
                    raise StoreError(f"layer blob {layer.digest} is not stored")
            cfg_bytes = canonical_json(config)
            ImageConfig.parse(cfg_bytes)
            cfg_digest = self.write_blob(cfg_bytes, what="image config")
            manifest = Manifest(OCI_MANIFEST, Descriptor(OCI_CONFIG, cfg_digest, len(cfg_bytes)), tuple(layers),
                                annotations or {})
            m_bytes = canonical_json(manifest.to_json())
            m_digest = self.write_blob(m_bytes, what="manifest")
            ref_name = self.tag(name, Descriptor(OCI_MANIFEST, m_digest, len(m_bytes)))
        return self.resolve(ref_name)

    # --- unpacked layers -----------------------------------------------------------

    def layer_dir(self, diff_id: str) -> Path:
        return self.layers_dir / digest_hex(diff_id)

    def unpacked(self, diff_id: str) -> bool:
        return self.layer_dir(diff_id).is_dir()

    @contextlib.contextmanager
    def layer_lock(self, diff_id: str) -> Iterator[None]:
        """The per-layer lock ``ensure_unpacked`` takes: hold it to move an unpacked layer into place."""
        with self._lock(f"layer-{digest_hex(diff_id)}", exclusive=True):
            yield

    def layer_dirs(self, image: ImageRecord) -> list[Path]:
        """Lower directories of ``image`` for overlayfs, topmost first (all must be unpacked)."""
        return [self.layer_dir(d) for d in reversed(image.config.diff_ids)]

    def ensure_unpacked(self, image: ImageRecord, *,
                        progress: Callable[[str, int, int], None] | None = None) -> list[Path]:
        """Unpack any layer of ``image`` not yet unpacked; returns the lower dirs, topmost first.

        Each layer is extracted once, under a per-layer lock, so concurrent callers
        (two kernels starting from one fresh image) share the work.
        """
        done: list[Path] = []
        n = len(image.manifest.layers)
        with self.writing():
            for i, (desc, diff_id) in enumerate(zip(image.manifest.layers, image.config.diff_ids)):
                dest = self.layer_dir(diff_id)
                if not dest.is_dir():
                    with self._lock(f"layer-{digest_hex(diff_id)}", exclusive=True):
                        if not dest.is_dir():
                            if progress:
                                progress(desc.digest, i, n)
                            # only here: layers pulls in tarfile and the compression libraries
                            # (about 20 ms of every `jupyter contain run` whose layers are unpacked)
                            from .layers import unpack_layer

                            with self.open_blob(desc.digest) as f:
                                unpack_layer(f, dest, media_type=desc.media_type, layer=desc.digest,
                                             expected_diff_id=diff_id, lower_dirs=list(reversed(done)),
                                             rootless=self.rootless)
                done.append(dest)
        return list(reversed(done))

    # --- pins (which images containers hold) -------------------------------------------

    def pin(self, owner: str, image: ImageRecord) -> None:
        """Record that ``owner`` (a container id) uses ``image``: gc and rmi respect it."""
        _check_owner(owner)
        doc = {"name": image.name, "manifest": image.digest, "diff_ids": list(image.config.diff_ids)}
        # as durable as the container state it protects (not fsynced either: a container
        # start pays two fsyncs, about a millisecond, for nothing a power cut would keep)
        atomic_write(self.pins_dir / f"{owner}.json", json.dumps(doc).encode(), durable=False)

    def unpin(self, owner: str) -> None:
        _check_owner(owner)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pins_dir / f"{owner}.json")

    def pins(self) -> dict[str, dict[str, Any]]:
        out = {}
        for p in self.pins_dir.glob("*.json"):
            try:
                out[p.stem] = json.loads(p.read_bytes())
            except (OSError, ValueError):
                log.warning("ignoring unreadable pin %s", p)
        return out

    # --- removal ---------------------------------------------------------------------

    def rmi(self, name: str, *, force: bool = False) -> ImageRecord:
        """Remove tag ``name``; refuse while a container uses the image unless ``force``."""
        rec = self.resolve(name)
        users = [o for o, p in self.pins().items() if p.get("manifest") == rec.digest]
        if users and not force:
            raise ImageInUse(f"image {rec.familiar} is used by container(s) {', '.join(sorted(users))}: "
                             "remove them first or use --force")
        self.untag(rec.name)
        return rec

    def _referenced(self) -> tuple[set[str], set[str]]:
        """Blob digests and diff_ids reachable from tags and pins."""
        blobs: set[str] = set()
        diff_ids: set[str] = set()

        def walk(digest: str) -> None:
            if digest in blobs or not self.has_blob(digest):
                return
            blobs.add(digest)
            try:
                doc = parse_document(self.read_blob(digest))
            except (ManifestError, DigestMismatch, StoreError):
                return
            if isinstance(doc, Index):
                for m in doc.manifests:
                    walk(m.digest)
                return
            blobs.add(doc.config.digest)
            blobs.update(layer.digest for layer in doc.layers)
            with contextlib.suppress(ManifestError, DigestMismatch, StoreError):
                diff_ids.update(self.config(doc.config.digest).diff_ids)

        for e in self._read_index():
            raw = e.get("annotations")
            ann = raw if isinstance(raw, dict) else {}
            # the entry's manifest, and what was served: the Docker manifest, the index
            for d in (e.get("digest"), ann.get(ANNOTATION_MANIFEST), ann.get(ANNOTATION_INDEX)):
                if isinstance(d, str):
                    with contextlib.suppress(ManifestError):
                        walk(check_digest(d))
        for pin in self.pins().values():
            with contextlib.suppress(ManifestError):
                walk(check_digest(pin.get("manifest", "")))
            diff_ids.update(d for d in pin.get("diff_ids", ()) if isinstance(d, str))
        return blobs, diff_ids

    def gc(self) -> GcReport:
        """Remove blobs, unpacked layers and temp debris nothing references."""
        freed = blobs_removed = layers_removed = 0
        with self._lock("gc", exclusive=True):
            blobs, diff_ids = self._referenced()
            keep_blobs = {digest_hex(d) for d in blobs}
            keep_layers = {digest_hex(d) for d in diff_ids}
            for p in self.blobs_dir.iterdir():
                if p.name not in keep_blobs:
                    freed += p.lstat().st_size
                    p.unlink()
                    blobs_removed += 1
            for p in self.layers_dir.iterdir():
                if p.name not in keep_layers:
                    freed += _tree_size(p)
                    remove_tree(p, rootless=self.rootless)
                    layers_removed += 1
            for p in self.tmp_dir.iterdir():  # no writer runs now: this is crash debris
                freed += _tree_size(p)
                remove_tree(p)
        log.info("gc: removed %d blobs, %d layers, %d bytes", blobs_removed, layers_removed, freed)
        return GcReport(blobs_removed, layers_removed, freed)

    def disk_usage(self) -> DiskUsage:
        layer_sizes = {p.name: _tree_size(p) for p in self.layers_dir.iterdir()}
        images = self.images()
        users: dict[str, int] = {}
        for rec in images:
            for d in set(rec.config.diff_ids):
                users[digest_hex(d)] = users.get(digest_hex(d), 0) + 1
        rows = []
        for rec in images:
            hexes = {digest_hex(d) for d in rec.config.diff_ids}
            unique = sum(layer_sizes.get(h, 0) for h in hexes if users.get(h) == 1)
            shared = sum(layer_sizes.get(h, 0) for h in hexes if users.get(h, 0) > 1)
            rows.append((rec.name, unique, shared))
        return DiskUsage(
            blobs_bytes=sum(p.lstat().st_size for p in self.blobs_dir.iterdir()),
            layers_bytes=sum(layer_sizes.values()),
            containers_bytes=_tree_size(self.containers_dir),
            images=tuple(rows),
        )


def _ref_name(entry: dict[str, Any]) -> str | None:
    ann = entry.get("annotations")
    if isinstance(ann, dict):
        name = ann.get(ANNOTATION_REF_NAME)
        if isinstance(name, str) and name:
            return name
    return None


def _check_owner(owner: str) -> None:
    if not owner or "/" in owner or owner.startswith(".") or "\0" in owner:
        raise StoreError(f"invalid pin owner {owner!r}")


def _tree_size(path: Path) -> int:
    """Bytes used by a tree (hardlinked files counted once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
