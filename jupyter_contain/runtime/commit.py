"""Commit and diff: a container's writable layer -> a new image on top of its image.

Sits above both halves of the runtime: it takes a container (``containers/``)
and makes an image (``images/``), so neither half imports the other the wrong
way. The coming ``build`` (each RUN step a container, each result a layer)
belongs at this level too, and uses :func:`snapshot` as its commit.

Owns what of a container's upper dir belongs in an image: the runtime stubs
that never do (the ``/etc`` files, bind-mount targets and the mount points made
for them, the API filesystems' mount points), the caller's extra exclusions,
the ``docker diff``-like preview (:func:`diff`, :func:`diff_summary`), the
new image's config and labels, and the order of a commit.

Must not: know about Jupyter or kernels (labels and exclusions come in from
the caller: ``kernel/`` passes the kernel-id label and the kernel's runtime
state), mount anything, start or stop containers (it only freezes and thaws
one), or write to the container's directory. Everything it stores goes
through :class:`~.images.store.Store` (blobs verified and committed whole, the
unpacked layer renamed into place complete, the tag written last).

How a snapshot runs, and why in this order:
1. freeze the container (if it runs), so the writable layer holds still;
2. scan the upper dir once (the stubs left out), then, side by side:
   - write the tar of the scanned entries, hashing it (DiffID) and
     compressing it into a blob in one streaming pass (zlib threads);
   - with ``unpack``, copy the same entries, in overlay form, into a private
     directory beside ``layers/``: the unpacked new layer, so a container from
     the snapshot starts without extracting anything;
3. thaw; then sync the blob and rename the copy to ``layers/<diffid>``;
4. write config and manifest, and the tag last (``Store.add_image``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .. import errors
from .containers.container import Container, Runtime
from .containers.state import ContainerState
from .images import snapshot as layer
from .images.snapshot import Compression, Excludes, IdView, LowerView, PathPatterns
from .images.store import ImageRecord, now_rfc3339, remove_tree
from .spec import Descriptor, Reference, local_name

log = logging.getLogger(__name__)

ChangeKind = Literal["A", "C", "D"]
#: progress(stage, done, total) in bytes of file data: stage "archive" (tar + compression, the
#: container frozen), then "commit" once (the blob is synced and the image written)
Progress = Callable[[str, int, int], None]

CREATED_BY = "jupyter-contain snapshot"
LABEL_CREATED = "org.opencontainers.image.created"
LABEL_BASE_NAME = "org.opencontainers.image.base.name"
LABEL_BASE_DIGEST = "org.opencontainers.image.base.digest"
LABEL_SOURCE_CONTAINER = "io.jupyter-contain.source-container"

#: files the runtime bind-mounts over, whatever the image holds there
ETC_STUBS = ("etc/hosts", "etc/hostname", "etc/resolv.conf")
#: runtime-owned trees (kernel sockets, the guest module): never part of an image, even when a
#: container's binds no longer name them (they are bind targets of every kernel's container)
RUNTIME_TREES = ("run/jupyter-contain", ".jupyter-contain")
#: API filesystems mounted by the runtime: their mount points count only if the image has them
API_MOUNT_POINTS = ("proc", "sys", "dev")


# --- public records ----------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One change of the writable layer against the image, as ``docker diff`` shows it."""

    kind: ChangeKind   # A: added, C: changed (the path exists in the image), D: deleted
    path: str          # absolute container path
    size: int = 0      # bytes of a regular file, else 0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "size": self.size}


@dataclass(frozen=True)
class FolderSummary:
    """Changes beneath one top-level folder (or of one top-level file)."""

    folder: str
    count: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"folder": self.folder, "count": self.count, "bytes": self.bytes}


def summarize(changes: Iterable[Change]) -> list[FolderSummary]:
    """Count and bytes of ``changes`` per top-level folder, sorted by folder."""
    acc: dict[str, list[int]] = {}
    for ch in changes:
        top = "/" + ch.path.lstrip("/").split("/", 1)[0]
        a = acc.setdefault(top, [0, 0])
        a[0] += 1
        a[1] += ch.size
    return [FolderSummary(k, c, b) for k, (c, b) in sorted(acc.items())]


# --- what a container's layer leaves out ---------------------------------------------------


def _container_excludes(state: ContainerState, patterns: PathPatterns | None = None) -> Excludes:
    always = set(ETC_STUBS) | set(RUNTIME_TREES)
    for b in state.binds:
        target = posixpath.normpath("/" + b.target).lstrip("/")
        if target:
            always.add(target)
    parents = set()
    for p in always | set(API_MOUNT_POINTS):
        d = posixpath.dirname(p)
        while d:
            parents.add(d)
            d = posixpath.dirname(d)
    return Excludes(frozenset(always), frozenset(API_MOUNT_POINTS), frozenset(parents), patterns)


def _patterns(exclude: Iterable[str], include: Iterable[str]) -> PathPatterns | None:
    """The caller's exclude/include lists, validated (InvalidSpec) before any work."""
    if isinstance(exclude, str) or isinstance(include, str):
        raise errors.InvalidSpec("exclude and include take lists of path patterns, not one string")
    pats = PathPatterns(tuple(exclude), tuple(include))
    return pats if pats.exclude else None


class _LeftOut:
    """Collects what the patterns left out, as changes (at most ``limit`` listed; all counted)."""

    def __init__(self, view: LowerView, into: list[Change] | None, limit: int | None = None) -> None:
        self.view, self.into, self.limit = view, into, limit
        self.count = self.bytes = 0

    def __call__(self, rel: str, st: os.stat_result, whiteout: bool) -> None:
        in_image = self.view.lookup(rel) is not None
        if whiteout and not in_image:
            return
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        self.count += 1
        self.bytes += size
        if self.into is not None and (self.limit is None or len(self.into) < self.limit):
            self.into.append(Change("D" if whiteout else "C" if in_image else "A", "/" + rel, size))


def _id_view(state: ContainerState) -> IdView | None:
    """A rootless container's upper holds host ids (the caller's, subordinate ones): undo that.

    (A root user-namespace container's upper keeps container ids on disk
    already, through its idmapped mount; a container without one has host
    ids inside as well: both need nothing.) An id outside the mapping
    (impossible for files the container made) becomes 65534, like the
    kernel's overflow id.
    """
    if not state.rootless or state.userns is None:
        return None
    m = state.userns

    def view(uid: int, gid: int) -> tuple[int, int]:
        u, g = m.container_uid(uid), m.container_gid(gid)
        return (65534 if u is None else u, 65534 if g is None else g)
    return view


# --- diff --------------------------------------------------------------------------------

#: distinct top-level folders a diff summary counts one by one; the rest are counted under "/*"
MAX_SUMMARY_FOLDERS = 500
#: left-out entries a diff summary lists (all are counted)
MAX_LEFT_OUT_LISTED = 100


def _resolve(runtime: Runtime, container: Container | str) -> Container:
    c = runtime.get(container) if isinstance(container, str) else container
    c.state  # noqa: B018 - raises ContainerNotFound for a removed container
    return c


def _path_key(ch: Change) -> bytes:
    return ch.path.encode("utf-8", "surrogateescape")


def _changes(container: Container, patterns: PathPatterns | None = None,
             left_out: Callable[[LowerView], layer.LeftOut] | None = None) -> Iterator[Change]:
    """The container's changes against its image, streamed in walk order (not sorted)."""
    store = container.runtime.store
    view = LowerView(store.layer_dirs(container.image()))
    excl = _container_excludes(container.state, patterns)
    root_fd = layer.open_root(container.upper)
    try:
        for it in layer.walk(root_fd, view, excl, tolerant=True,
                             on_left_out=left_out(view) if left_out is not None else None):
            in_image = view.lookup(it.rel) is not None
            if it.kind == layer.WHITEOUT:
                if in_image:
                    yield Change("D", "/" + it.rel)
                continue
            yield Change("C" if in_image else "A", "/" + it.rel, it.st.st_size if it.kind == layer.FILE else 0)
            if it.kind == layer.DIR and it.opaque and in_image:
                # an opaque directory hides all the image had in it: those are deletions
                for name in view.names(it.rel):
                    r = f"{it.rel}/{name}"
                    if name not in it.names and r not in excl.always:
                        yield Change("D", "/" + r)
    finally:
        os.close(root_fd)


def diff(container: Container, *, runtime: Runtime | None = None, exclude: Iterable[str] = (),
         include: Iterable[str] = (), left_out: list[Change] | None = None) -> list[Change]:
    """What the container changed against its image (``docker diff``), sorted by path.

    A preview: the container keeps running (a snapshot freezes it). Runtime
    stubs are left out, as a snapshot leaves them out, and so is what
    ``exclude``/``include`` leave out (:class:`~.images.snapshot.PathPatterns`):
    those go to ``left_out`` (sorted, the top of each left-out tree) if given.
    The whole list: for a bounded answer about a layer of any size,
    :func:`diff_summary`.
    """
    patterns = _patterns(exclude, include)
    if runtime is not None:
        container = _resolve(runtime, container)
    changes = list(_changes(container, patterns,
                            (lambda view: _LeftOut(view, left_out)) if left_out is not None else None))
    changes.sort(key=_path_key)
    if left_out is not None:
        left_out.sort(key=_path_key)
    return changes


@dataclass(frozen=True)
class DiffSummary:
    """A diff in bounded memory: totals, per-folder counts, and the first changes by path."""

    total: int
    bytes: int
    folders: tuple[FolderSummary, ...]
    changes: tuple[Change, ...]
    #: what the exclude list left out: how many entries, their bytes, the first of them by path
    left_out_total: int = 0
    left_out_bytes: int = 0
    left_out: tuple[Change, ...] = ()

    @property
    def truncated(self) -> bool:
        return self.total > len(self.changes)


def diff_summary(container: Container, *, limit: int = 100, runtime: Runtime | None = None,
                 exclude: Iterable[str] = (), include: Iterable[str] = ()) -> DiffSummary:
    """:func:`diff` of a layer of any size in memory bounded by ``limit``: what the host channel answers.

    Keeps the ``limit`` first changes by path (a buffer of at most twice that,
    cut back as it fills) and counts per top-level folder (at most
    ``MAX_SUMMARY_FOLDERS`` of them, the rest under ``/*``). Measured on a
    300,000-file layer: the full list held 380 MiB at its peak, this holds
    what one directory's listing needs.
    """
    if limit < 0:
        raise ValueError("limit must not be negative")
    patterns = _patterns(exclude, include)
    if runtime is not None:
        container = _resolve(runtime, container)
    total = size = 0
    folders: dict[str, list[int]] = {}
    first: list[Change] = []
    # what the patterns leave out is usually a handful of files and folders: the first
    # MAX_LEFT_OUT_LISTED are listed (walk order), all of them counted
    left: list[Change] = []
    got: list[_LeftOut] = []

    def collector(view: LowerView) -> _LeftOut:
        got.append(_LeftOut(view, left, MAX_LEFT_OUT_LISTED))
        return got[0]

    for ch in _changes(container, patterns, collector):
        total += 1
        size += ch.size
        top = "/" + ch.path.lstrip("/").split("/", 1)[0]
        acc = folders.get(top)
        if acc is None:
            acc = folders.setdefault(top if len(folders) < MAX_SUMMARY_FOLDERS else "/*", [0, 0])
        acc[0] += 1
        acc[1] += ch.size
        if limit:
            first.append(ch)
            if len(first) >= 2 * limit + 256:
                first.sort(key=_path_key)
                del first[limit:]
    first.sort(key=_path_key)
    left.sort(key=_path_key)
    return DiffSummary(total, size, tuple(FolderSummary(k, c, b) for k, (c, b) in sorted(folders.items())),
                       tuple(first[:limit]), got[0].count if got else 0, got[0].bytes if got else 0, tuple(left))


# --- snapshot ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _frozen(container: Container) -> Iterator[None]:
    """Freeze a running container's cgroup for the duration; thaw whatever happens."""
    cg = container.cgroups() if container.refresh_status() == "running" else None
    if cg is None:
        if container.refresh_status() == "running":
            log.warning("container %s runs without a cgroup: snapshot without freezing", container.id[:12])
        yield
        return
    ok = False
    try:
        cg.freeze()
        yield
        ok = True
    finally:
        try:
            cg.thaw()
        except errors.CgroupError as e:
            if ok:
                raise
            log.warning("cannot thaw container %s: %s", container.id[:12], e)


def _check_tag(tag: str) -> Reference:
    ref = local_name(tag)   # InvalidReference for a malformed name
    if ref.digest or not ref.tag:
        raise errors.InvalidReference(f"cannot tag a snapshot by digest: {tag!r}")
    return ref


def _check_labels(labels: Mapping[str, str | None]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not k or any(ord(ch) < 0x20 for ch in k):
            raise errors.InvalidSpec(f"invalid image label name {k!r}")
        if v is not None and not isinstance(v, str):
            raise errors.InvalidSpec(f"image label {k!r}: the value must be a string (or None to remove it)")
        out[k] = v
    return out


def _new_config(base: ImageRecord, diff_id: str, *, container: Container, message: str,
                created: str, labels: Mapping[str, str | None]) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads(json.dumps(base.config.raw))  # a deep copy
    cfg["created"] = created
    rootfs = cfg.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = list(rootfs.get("diff_ids") or []) + [diff_id]
    inner = cfg.get("config") or {}
    new = dict(inner.get("Labels") or {})
    for k, v in labels.items():   # the caller's first: None drops what the base carried
        if v is None:
            new.pop(k, None)
        else:
            new[k] = v
    new.update({
        LABEL_CREATED: created,
        LABEL_BASE_NAME: base.name,
        LABEL_BASE_DIGEST: base.digest,
        LABEL_SOURCE_CONTAINER: container.id,
    })
    inner["Labels"] = new
    cfg["config"] = inner
    entry = {"created": created, "created_by": CREATED_BY}
    if message:
        entry["comment"] = message
    cfg["history"] = list(cfg.get("history") or []) + [entry]
    return cfg


def snapshot(runtime: Runtime, container: Container | str, tag: str, *, message: str = "",
             compress: Compression = "gzip", progress: Progress | None = None,
             unpack: bool = False, labels: Mapping[str, str | None] | None = None,
             exclude: Iterable[str] = (), include: Iterable[str] = (),
             left_out: list[Change] | None = None) -> ImageRecord:
    """Commit ``container``'s writable layer as a new image tagged ``tag``; returns it.

    ``labels`` are set on the new image's config (a value of None removes a
    label the base image carried); the OCI created/base labels and the source
    container's id are always set. ``exclude``/``include``: path patterns the
    layer leaves out (:class:`~.images.snapshot.PathPatterns`, beside the
    runtime stubs it always leaves out); what they left out is appended to
    ``left_out`` if given, and logged. The container is frozen (if it runs) while
    its writable layer is archived (and, with ``unpack``, copied into the
    store's unpacked layers), and thawed whatever happens. Without ``unpack``
    the new layer is unpacked from its blob by the first container that uses
    it (the base layers are never extracted again either way): creating a
    snapshot's inodes a second time costs about as long as archiving it, and
    doing that while the user's kernel is frozen is the wrong place. Raises
    ``InvalidReference`` for a bad tag and ``InvalidSpec`` for bad labels or
    patterns (before any work), ``ContainerNotFound``; on failure nothing is tagged and
    nothing half-written remains (debris of a crash is ``gc``'s).
    """
    ref = _check_tag(tag)
    mtype = layer.media_type(compress)
    extra = _check_labels(labels or {})
    patterns = _patterns(exclude, include)
    c = _resolve(runtime, container)
    store = runtime.store
    base = c.image()
    total = archived = 0

    def on_file(n: int) -> None:
        nonlocal archived
        archived += n
        if progress:
            progress("archive", archived, total)

    with store.writing():
        lowers = store.ensure_unpacked(base)
        view = LowerView(lowers)
        excl = _container_excludes(c.state, patterns)
        ids = _id_view(c.state)
        left = _LeftOut(view, [] if left_out is None else left_out)
        tmp = tempfile.mkdtemp(dir=store.layers_dir, prefix=".snapshot-") if unpack else None
        try:
            with store.blob_writer(what="snapshot layer") as w:
                with _frozen(c):
                    items = layer.scan(c.upper, view, excl, on_left_out=left)
                    total = sum(it.st.st_size for it in items if it.kind == layer.FILE)
                    if tmp is None:
                        diff_id = layer.archive(c.upper, items, w.write, compress=compress, progress=on_file,
                                                ids=ids)
                    else:
                        # the unpacked copy (creating inodes is slow, in the kernel) runs beside the
                        # archive (compression, in deflate threads): both read the frozen upper dir
                        stop = threading.Event()
                        with ThreadPoolExecutor(1, thread_name_prefix="jc-snapshot-copy") as pool:
                            copy = pool.submit(layer.copy_items, c.upper, items, tmp, stop, ids,
                                               rootless=store.rootless)
                            try:
                                diff_id = layer.archive(c.upper, items, w.write, compress=compress,
                                                        progress=on_file, ids=ids)
                            except BaseException:
                                stop.set()
                                raise
                            copy.result()
                if progress:
                    progress("commit", total, total)
                digest = w.commit()   # fsync of the blob: after the thaw
            desc = Descriptor(mtype, digest, w.size)
            if tmp is not None:
                dest = store.layer_dir(diff_id)
                with store.layer_lock(diff_id):
                    if dest.is_dir():   # the same content was stored before: keep that one
                        remove_tree(Path(tmp))
                    else:
                        os.rename(tmp, dest)
        except BaseException:
            if tmp is not None:
                remove_tree(Path(tmp))
            raise
        created = now_rfc3339()
        cfg = _new_config(base, diff_id, container=c, message=message, created=created, labels=extra)
        annotations = {LABEL_CREATED: created, LABEL_BASE_NAME: base.name, LABEL_BASE_DIGEST: base.digest}
        # an OCI manifest, whatever the base's form: a Docker schema2 base's layers keep their
        # blobs (and digests) under the OCI media types of the same compression
        rec = store.add_image(name=str(ref), config=cfg, layers=[*base.manifest.oci_form().layers, desc],
                              annotations=annotations)
    log.info("snapshot of container %s: %s (layer %s, %d bytes)", c.id[:12], rec.name, diff_id, desc.size)
    if left.count:
        shown = ", ".join(ch.path for ch in (left.into or [])[:5])
        log.info("snapshot of container %s left out %d entries (%d bytes): %s%s", c.id[:12], left.count, left.bytes,
                 shown, ", ..." if left.count > 5 else "")
    if left_out is not None:
        left_out.sort(key=_path_key)
    return rec


__all__ = [
    "API_MOUNT_POINTS", "ETC_STUBS", "MAX_LEFT_OUT_LISTED", "MAX_SUMMARY_FOLDERS", "RUNTIME_TREES",
    "Change", "ChangeKind", "Compression", "DiffSummary", "FolderSummary", "Progress", "diff", "diff_summary",
    "snapshot", "summarize",
]
