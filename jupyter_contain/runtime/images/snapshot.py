"""Snapshots: a container's writable layer -> a new image layer on top of its image.

Owns reading a container's overlay upper dir (whiteouts, opaque directories,
hardlinks, xattrs), the runtime stubs that must never enter an image (the
``/etc`` files, bind-mount targets and the mount points made for them, the
kernel's sockets and guest module), the ``docker diff``-like preview
(:func:`diff`), the deterministic OCI layer tar (:func:`write_layer_tar`), its
compression (parallel gzip or zstd) and the new image (:func:`snapshot`).

Must not: mount anything, start or stop containers (it only freezes and thaws
one), or write to the container's directory. Everything it stores goes
through :class:`~.store.Store` (blobs verified and committed whole, the
unpacked layer renamed into place complete, the tag written last).

How a snapshot runs, and why in this order:
1. freeze the container (if it runs), so the writable layer holds still;
2. scan the upper dir once (the stubs left out), then, side by side:
   - write the tar of the scanned entries, hashing it (DiffID) and
     compressing it into a blob in one streaming pass (zlib threads);
   - copy the same entries, in overlay form, into a private directory beside
     ``layers/``: the unpacked new layer, so a container from the snapshot
     starts without extracting anything (creating inodes is the slow part of
     that, spent in the kernel with the GIL released: it overlaps the
     compression; unpacking the finished tar instead measured slower);
3. thaw; then sync the blob and rename the copy to ``layers/<diffid>``;
4. write config and manifest, and the tag last (``Store.add_image``).

The tar is deterministic (same content, same DiffID): entries in a fixed
order (depth first, names sorted by their bytes), PAX format, no atime or
ctime, empty uname/gname, whole-second mtimes as in the files; whiteouts and
opaque markers have fixed metadata (overlayfs shares one inode between all
whiteouts, so theirs means nothing).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import stat
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ... import errors
from ..fsutil import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, openat2
from ..spec import OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor, Reference, local_name
from . import deflate
from . import rootless as rootless_mod
from .store import ImageRecord, Store, now_rfc3339, remove_tree

if TYPE_CHECKING:  # containers sit beside images in the runtime; import for types only
    from ..containers.container import Container, Runtime

log = logging.getLogger(__name__)

ChangeKind = Literal["A", "C", "D"]
Compression = Literal["gzip", "zstd"]
#: progress(stage, done, total) in bytes of file data: stage "archive" (tar + compression, the
#: container frozen), then "commit" once (the blob is synced and the image written)
Progress = Callable[[str, int, int], None]

CREATED_BY = "jupyter-contain snapshot"
LABEL_CREATED = "org.opencontainers.image.created"
LABEL_BASE_NAME = "org.opencontainers.image.base.name"
LABEL_BASE_DIGEST = "org.opencontainers.image.base.digest"
LABEL_SOURCE_CONTAINER = "io.jupyter-contain.source-container"
LABEL_KERNEL_ID = "io.jupyter-contain.kernel-id"
#: the container label the kernel provisioner sets
CONTAINER_KERNEL_LABEL = "jupyter-contain.kernel-id"

#: files the runtime bind-mounts over, whatever the image holds there
ETC_STUBS = ("etc/hosts", "etc/hostname", "etc/resolv.conf")
#: runtime-owned trees (kernel sockets, the guest module): never part of an image
RUNTIME_TREES = ("run/jupyter-contain", ".jupyter-contain")
#: API filesystems mounted by the runtime: their mount points count only if the image has them
API_MOUNT_POINTS = ("proc", "sys", "dev")

#: gzip level: 1 is several times faster than 6 for a little size (as for imports)
GZIP_LEVEL = 1
ZSTD_LEVEL = 3
#: gzip is deflated in independent blocks of this size (pigz-style), so the
#: output is the same whatever the number of threads
_GZIP_BLOCK = 1 << 20
_CHUNK = 1 << 20

_WHITEOUT_PREFIX = ".wh."
_OPAQUE_MARKER = ".wh..wh..opq"
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_XWHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
#: overlayfs features that keep data or names outside the upper dir: a copy of
#: the upper dir alone would be wrong, so refuse rather than write a bad layer
_UNSUPPORTED_XATTRS = {
    "trusted.overlay.redirect": "redirect_dir", "user.overlay.redirect": "redirect_dir",
    "trusted.overlay.metacopy": "metacopy", "user.overlay.metacopy": "metacopy",
}

# kinds of scanned entries
_DIR, _FILE, _SYMLINK, _FIFO, _WHITEOUT = "dir", "file", "symlink", "fifo", "whiteout"


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


# --- the image's merged view (read-only lookups in the lower layers) -------------------


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _getxattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _is_opaque(path: str) -> bool:
    return any(_getxattr(path, n) == b"y" for n in _OPAQUE_XATTRS)


#: directories whose layer stacks a lower view remembers
_MAX_STACKS = 100_000


class _LowerView:
    """What the image's layers (topmost first) show at a path, without mounting them.

    The layers are the store's (never a container's): plain paths are safe
    here, and :meth:`stack` checks every component is a real directory.
    """

    def __init__(self, lowers: Sequence[Path]) -> None:
        self.lowers = [os.fspath(p) for p in lowers]
        self._stacks: dict[str, tuple[int, ...]] = {"": tuple(range(len(self.lowers)))}

    def stack(self, rel: str) -> tuple[int, ...]:
        """Indices of the layers in which directory ``rel`` shows (empty: not a directory)."""
        got = self._stacks.get(rel)
        if got is not None:
            return got
        if len(self._stacks) > _MAX_STACKS:   # a layer of a million directories: memory stays bounded
            self._stacks = {"": self._stacks[""]}
        # the nearest known ancestor, then down (no recursion: a path may be thousands deep)
        todo = [rel]
        parent = posixpath.dirname(rel)
        while parent not in self._stacks:
            todo.append(parent)
            parent = posixpath.dirname(parent)
        below = self._stacks[parent]
        for d in reversed(todo):
            out: list[int] = []
            for i in below:
                p = f"{self.lowers[i]}/{d}"
                try:
                    st = os.lstat(p)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    break   # a whiteout or a non-directory hides everything below it
                out.append(i)
                if _is_opaque(p):
                    break
            self._stacks[d] = below = tuple(out)
        return below

    def lookup(self, rel: str) -> os.stat_result | None:
        """The stat of what the image shows at ``rel``, or None if it shows nothing there."""
        for i in self.stack(posixpath.dirname(rel)):
            try:
                st = os.lstat(f"{self.lowers[i]}/{rel}")
            except (FileNotFoundError, NotADirectoryError):
                continue
            return None if _is_whiteout(st) else st
        return None

    def names(self, rel: str) -> list[str]:
        """Names the image shows in directory ``rel``."""
        seen: dict[str, bool] = {}
        for i in self.stack(rel):
            with os.scandir(f"{self.lowers[i]}/{rel}" if rel else self.lowers[i]) as it:
                for e in it:
                    if e.name not in seen:
                        seen[e.name] = not _is_whiteout(e.stat(follow_symlinks=False))
        return [n for n, shown in seen.items() if shown]


# --- scanning the upper dir ----------------------------------------------------------------
#
# The writable layer belongs to the container, which may be running and swapping a directory
# and a symlink (renameat2 RENAME_EXCHANGE) while the host walks it: the walk never resolves a
# path string through the layer. Each directory is opened beneath the layer's root fd with
# openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS) or relative to its parent's fd with
# O_NOFOLLOW|O_DIRECTORY, entries are stat'ed relative to that fd, and a file's xattrs are
# read through the held fd's /proc/self/fd link (the last component not followed).

#: directories of the walk held open at once (a hostile layer may be thousands deep): beyond,
#: the shallower ones are closed and opened again, beneath the root, when the walk comes back
_MAX_OPEN_DIRS = 48
_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
#: errors that mean "changed while we looked" for a tolerant walk (a running container)
_RACES = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV, errno.EAGAIN, errno.ESTALE)


@dataclass(frozen=True)
class _Item:
    rel: str
    kind: str
    st: os.stat_result
    opaque: bool = False
    xattrs: tuple[tuple[str, bytes], ...] = ()
    #: the names in an opaque directory (a diff reports what the image had there and the layer has not)
    names: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Excludes:
    always: frozenset[str]      # skipped with everything beneath
    if_new: frozenset[str]      # skipped unless the image has them
    parents: frozenset[str]     # mount-point parents: skipped when empty and made by the runtime


def _container_excludes(state: dict[str, Any]) -> _Excludes:
    always = set(ETC_STUBS) | set(RUNTIME_TREES)
    for b in state.get("binds") or ():
        target = posixpath.normpath("/" + str(b.get("target", ""))).lstrip("/")
        if target:
            always.add(target)
    parents = set()
    for p in always | set(API_MOUNT_POINTS):
        d = posixpath.dirname(p)
        while d:
            parents.add(d)
            d = posixpath.dirname(d)
    return _Excludes(frozenset(always), frozenset(API_MOUNT_POINTS), frozenset(parents))


def _open_beneath(root_fd: int, rel: str, flags: int) -> int:
    """Open ``rel`` (a path the walk found) beneath ``root_fd``: never through a symlink, never out.

    ``O_NOFOLLOW`` is added: a symlink as the last component is opened only
    with ``O_PATH`` (to read its target), else refused (ELOOP).
    """
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if not rel:
        return os.open(".", flags, dir_fd=root_fd)
    for _ in range(3):   # EAGAIN: a rename elsewhere raced the check; the kernel asks for a retry
        try:
            return openat2(root_fd, rel, flags, _BENEATH)
        except OSError as e:
            if e.errno == errno.ENOSYS:
                break
            if e.errno != errno.EAGAIN:
                raise
    else:
        raise OSError(errno.EAGAIN, "the layer kept changing", rel)
    # before Linux 5.6: one component at a time, each a real directory opened beneath the last
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise OSError(errno.EXDEV, "path leaves the layer", rel)
    fd = os.dup(root_fd)
    try:
        for p in parts[:-1]:
            nxt = os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


def _open_root(path: Path | str) -> int:
    return os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _readlink_beneath(root_fd: int, rel: str) -> str:
    fd = _open_beneath(root_fd, rel, os.O_PATH)
    try:
        return os.readlink("", dir_fd=fd)
    finally:
        os.close(fd)


def _fd_xattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


def _layer_xattrs(target: int | str, rel: str) -> tuple[tuple[tuple[str, bytes], ...], bool]:
    """(xattrs worth keeping, is an xwhiteout) of an upper entry; refuses unsupported overlay forms.

    ``target``: an open directory's fd, or a path through a held fd's ``/proc/self/fd`` link.
    """
    try:
        names = os.listxattr(target) if isinstance(target, int) else os.listxattr(target, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return (), False
        raise
    keep = []
    xwhiteout = False
    for n in sorted(names):
        if n in _UNSUPPORTED_XATTRS:
            raise errors.ContainerError(
                f"/{rel}: the writable layer uses the overlayfs {_UNSUPPORTED_XATTRS[n]} feature, "
                "which snapshots do not support")
        if n in _XWHITEOUT_XATTRS:
            xwhiteout = True
        if n.startswith(("trusted.overlay.", "user.overlay.")):
            continue
        value = _fd_xattr(target, n) if isinstance(target, int) else _getxattr(target, n)
        if value is not None:
            keep.append((n, value))
    return tuple(keep), xwhiteout


class _Frame:
    """One directory of the walk: its entries, the next one to look at, and its fd (or -1: closed)."""

    __slots__ = ("rel", "fd", "names", "i", "pending")

    def __init__(self, rel: str, fd: int, names: list[str], pending: _Item | None) -> None:
        self.rel, self.fd, self.names, self.i, self.pending = rel, fd, names, 0, pending


def _walk(root_fd: int, view: _LowerView, excl: _Excludes, *, tolerant: bool = False) -> Iterator[_Item]:
    """The entries beneath ``root_fd`` that belong in a layer, parents before children, names sorted.

    Streams (constant memory but the current path's listings) and iterates
    (no recursion: a layer may be deeper than Python's stack). ``tolerant``:
    skip what vanishes or changes while we look (a preview of a running
    container); otherwise such a change is an error.
    """
    def listing(fd: int) -> list[str]:
        # byte order, so that the order does not depend on the locale or on undecodable names
        return sorted(os.listdir(fd), key=os.fsencode)

    def raced(e: OSError) -> bool:
        return tolerant and e.errno in _RACES

    stack: list[_Frame] = [_Frame("", root_fd, listing(root_fd), None)]
    # mount-point parents held back until something beneath them is kept (else they were made by the runtime)
    held: list[_Item] = []
    # entries left out, by reason: said once per walk (a layer can hold 100,000 sockets: not as many log lines)
    skipped: dict[str, list[str]] = {}

    def skip(why: str, r: str) -> None:
        got = skipped.setdefault(why, [])
        if len(got) < 3:
            got.append("/" + r)
        else:
            got.append("")

    try:
        while stack:
            top = stack[-1]
            if top.i >= len(top.names):
                stack.pop()
                if top.fd >= 0 and top.fd != root_fd:
                    os.close(top.fd)
                if top.pending is not None and held and held[-1] is top.pending:
                    held.pop()
                    it = top.pending
                    if not _runtime_made(it.st, view.lookup(it.rel)):
                        yield from held
                        held.clear()
                        yield it
                continue
            name = top.names[top.i]
            top.i += 1
            r = f"{top.rel}/{name}" if top.rel else name
            if r in excl.always:
                continue
            if top.fd < 0:   # closed to bound the fds held: open it again, beneath the root
                try:
                    top.fd = _open_beneath(root_fd, top.rel, os.O_RDONLY | os.O_DIRECTORY)
                except OSError as e:
                    if raced(e):
                        top.i = len(top.names)
                        continue
                    raise
            try:
                st = os.stat(name, dir_fd=top.fd, follow_symlinks=False)
                if r in excl.if_new and view.lookup(r) is None:
                    continue
                mode = st.st_mode
                if _is_whiteout(st):
                    item = _Item(r, _WHITEOUT, st)
                elif name.startswith(_WHITEOUT_PREFIX):
                    skip("their names would read as whiteouts in a layer", r)
                    continue
                elif stat.S_ISDIR(mode):
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top.fd)
                    try:
                        st = os.fstat(fd)   # what was opened, whatever was swapped in meanwhile
                        xattrs, _ = _layer_xattrs(fd, r)
                        opaque = any(_fd_xattr(fd, n) == b"y" for n in _OPAQUE_XATTRS)
                        names = listing(fd)
                    except BaseException:
                        os.close(fd)
                        raise
                    item = _Item(r, _DIR, st, opaque, xattrs, frozenset(names) if opaque else frozenset())
                    pending = item if r in excl.parents and not opaque else None
                    if pending is not None:
                        held.append(pending)
                    else:
                        if held:
                            yield from held
                            held.clear()
                        yield item
                    stack.append(_Frame(r, fd, names, pending))
                    if len(stack) > _MAX_OPEN_DIRS:
                        shallow = next(f for f in stack[1:] if f.fd >= 0)
                        os.close(shallow.fd)
                        shallow.fd = -1
                    continue
                elif not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISFIFO(mode)):
                    skip("device nodes and sockets do not go into layers", r)
                    continue
                else:
                    xattrs, xwhiteout = _layer_xattrs(f"/proc/self/fd/{top.fd}/{name}", r)
                    if xwhiteout and stat.S_ISREG(mode) and st.st_size == 0:
                        item = _Item(r, _WHITEOUT, st)
                    else:
                        kind = _FILE if stat.S_ISREG(mode) else _SYMLINK if stat.S_ISLNK(mode) else _FIFO
                        item = _Item(r, kind, st, False, xattrs)
            except OSError as e:
                if raced(e):
                    continue
                raise
            if held:
                yield from held
                held.clear()
            yield item
    finally:
        for f in stack:
            if f.fd >= 0 and f.fd != root_fd:
                os.close(f.fd)
        for why, paths in skipped.items():
            log.warning("snapshot: skipping %d entries (%s%s): %s", len(paths), ", ".join(p for p in paths if p),
                        ", ..." if len(paths) > 3 else "", why)


def _scan(upper: Path, view: _LowerView, excl: _Excludes, *, tolerant: bool = False) -> list[_Item]:
    """The upper dir's entries that belong in the layer, parents before children (see :func:`_walk`)."""
    root_fd = _open_root(upper)
    try:
        return list(_walk(root_fd, view, excl, tolerant=tolerant))
    finally:
        os.close(root_fd)


def _runtime_made(st: os.stat_result, lower: os.stat_result | None) -> bool:
    """An empty mount-point parent: new, or a copy-up of the image's directory that changed nothing."""
    if lower is None:
        return True
    return (stat.S_ISDIR(lower.st_mode) and stat.S_IMODE(lower.st_mode) == stat.S_IMODE(st.st_mode)
            and lower.st_uid == st.st_uid and lower.st_gid == st.st_gid)


# --- diff --------------------------------------------------------------------------------

#: distinct top-level folders a diff summary counts one by one; the rest are counted under "/*"
MAX_SUMMARY_FOLDERS = 500


def _resolve(runtime: Runtime, container: Container | str) -> Container:
    c = runtime.get(container) if isinstance(container, str) else container
    c.state  # noqa: B018 - raises ContainerNotFound for a removed container
    return c


def _path_key(ch: Change) -> bytes:
    return ch.path.encode("utf-8", "surrogateescape")


def _changes(container: Container) -> Iterator[Change]:
    """The container's changes against its image, streamed in walk order (not sorted)."""
    store = container.runtime.store
    view = _LowerView(store.layer_dirs(container.image()))
    excl = _container_excludes(container.state)
    root_fd = _open_root(container.upper)
    try:
        for it in _walk(root_fd, view, excl, tolerant=True):
            in_image = view.lookup(it.rel) is not None
            if it.kind == _WHITEOUT:
                if in_image:
                    yield Change("D", "/" + it.rel)
                continue
            yield Change("C" if in_image else "A", "/" + it.rel, it.st.st_size if it.kind == _FILE else 0)
            if it.kind == _DIR and it.opaque and in_image:
                # an opaque directory hides all the image had in it: those are deletions
                for name in view.names(it.rel):
                    r = f"{it.rel}/{name}"
                    if name not in it.names and r not in excl.always:
                        yield Change("D", "/" + r)
    finally:
        os.close(root_fd)


def diff(container: Container, *, runtime: Runtime | None = None) -> list[Change]:
    """What the container changed against its image (``docker diff``), sorted by path.

    A preview: the container keeps running (a snapshot freezes it). Runtime
    stubs are left out, as a snapshot leaves them out. The whole list: for a
    bounded answer about a layer of any size, :func:`diff_summary`.
    """
    if runtime is not None:
        container = _resolve(runtime, container)
    changes = list(_changes(container))
    changes.sort(key=_path_key)
    return changes


@dataclass(frozen=True)
class DiffSummary:
    """A diff in bounded memory: totals, per-folder counts, and the first changes by path."""

    total: int
    bytes: int
    folders: tuple[FolderSummary, ...]
    changes: tuple[Change, ...]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.changes)


def diff_summary(container: Container, *, limit: int = 100, runtime: Runtime | None = None) -> DiffSummary:
    """:func:`diff` of a layer of any size in memory bounded by ``limit``: what the host channel answers.

    Keeps the ``limit`` first changes by path (a buffer of at most twice that,
    cut back as it fills) and counts per top-level folder (at most
    ``MAX_SUMMARY_FOLDERS`` of them, the rest under ``/*``). Measured on a
    300,000-file layer: the full list held 380 MiB at its peak, this holds
    what one directory's listing needs.
    """
    if limit < 0:
        raise ValueError("limit must not be negative")
    if runtime is not None:
        container = _resolve(runtime, container)
    total = size = 0
    folders: dict[str, list[int]] = {}
    first: list[Change] = []
    for ch in _changes(container):
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
    return DiffSummary(total, size, tuple(FolderSummary(k, c, b) for k, (c, b) in sorted(folders.items())),
                       tuple(first[:limit]))


# --- the unpacked copy ---------------------------------------------------------------------


def _whole_seconds(st: os.stat_result) -> tuple[int, int]:
    ns = (st.st_mtime_ns // 1_000_000_000) * 1_000_000_000   # what the tar can say
    return ns, ns


def _set_xattrs(target: str | int, xattrs: Sequence[tuple[str, bytes]]) -> None:
    for name, value in xattrs:
        if isinstance(target, int):
            os.setxattr(target, name, value)
        else:
            os.setxattr(target, name, value, follow_symlinks=False)


class _Stopped(Exception):
    """The copy was told to stop (the archive beside it failed)."""


def _copy_data(src: int, dst: int) -> int:
    """Copy a whole file between fds; in-kernel where the filesystem allows."""
    total = 0
    try:
        while True:
            n = os.copy_file_range(src, dst, 1 << 30)
            if n == 0:
                return total
            total += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or total:
            raise
    while chunk := os.read(src, _CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]
        total += len(chunk)
    return total


def _copy_items(upper: Path, items: Sequence[_Item], dest: str, stop: threading.Event | None = None,
                ids: IdView | None = None) -> None:
    """Write ``items`` of ``upper`` into the empty directory ``dest`` in overlay (lowerdir) form.

    Gives up early (raising) once ``stop`` is set. Reads beneath a held fd of
    ``upper`` (see :func:`_open_beneath`), never through a path.
    """
    root_fd = _open_root(upper)
    try:
        _copy_items_beneath(root_fd, items, dest, stop, ids)
    finally:
        os.close(root_fd)


def _same_file(fd: int, st: os.stat_result, rel: str) -> None:
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
        raise errors.StoreError(f"/{rel} was replaced while the layer was being read")


def _copy_items_beneath(root_fd: int, items: Sequence[_Item], dest: str, stop: threading.Event | None,
                        ids: IdView | None) -> None:
    first_link: dict[tuple[int, int], str] = {}
    dir_times: list[tuple[str, tuple[int, int]]] = []
    # rootless: the copy stays the caller's (as a rootless unpack leaves a
    # layer), with the opaque mark overlayfs reads under userxattr
    rootless = os.geteuid() != 0
    opaque_xattr = "user.overlay.opaque" if rootless else "trusted.overlay.opaque"

    owners: list[rootless_mod.Owner] = []
    current = ""

    def chown(target: str | int, st: os.stat_result) -> None:
        if rootless:
            # the copy is the user's; others' files get their owners back below
            uid, gid = ids(st.st_uid, st.st_gid) if ids else (0, 0)
            if uid or gid:
                owners.append((current, uid, gid, stat.S_IMODE(st.st_mode), stat.S_ISLNK(st.st_mode)))
            return
        if isinstance(target, int):
            os.fchown(target, st.st_uid, st.st_gid)
        else:
            os.lchown(target, st.st_uid, st.st_gid)

    for it in items:
        if stop is not None and stop.is_set():
            raise _Stopped()
        dst = f"{dest}/{it.rel}"
        current = it.rel
        st = it.st
        if it.kind == _WHITEOUT:
            os.mknod(dst, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        elif it.kind == _DIR:
            os.mkdir(dst, 0o700)
            chown(dst, st)
            os.chmod(dst, stat.S_IMODE(st.st_mode))   # after chown, which clears setgid
            _set_xattrs(dst, it.xattrs)
            if it.opaque:
                os.setxattr(dst, opaque_xattr, b"y", follow_symlinks=False)
            dir_times.append((dst, _whole_seconds(st)))
        elif it.kind == _FILE:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in first_link:
                os.link(first_link[key], dst, follow_symlinks=False)
                continue
            if st.st_nlink > 1:
                first_link[key] = dst
            fin = _open_beneath(root_fd, it.rel, os.O_RDONLY | os.O_NONBLOCK)
            try:
                _same_file(fin, st, it.rel)
                fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    _copy_data(fin, fout)
                    chown(fout, st)
                    os.fchmod(fout, stat.S_IMODE(st.st_mode))   # after chown: it clears setuid
                    _set_xattrs(fout, it.xattrs)                 # after chown: it drops security.capability
                    os.utime(fout, ns=_whole_seconds(st))
                finally:
                    os.close(fout)
            finally:
                os.close(fin)
        elif it.kind == _SYMLINK:
            os.symlink(_readlink_beneath(root_fd, it.rel), dst)
            chown(dst, st)
            _set_xattrs(dst, it.xattrs)
            os.utime(dst, ns=_whole_seconds(st), follow_symlinks=False)
        else:  # fifo
            os.mkfifo(dst, 0o600)
            chown(dst, st)
            os.chmod(dst, stat.S_IMODE(st.st_mode))
            _set_xattrs(dst, it.xattrs)
            os.utime(dst, ns=_whole_seconds(st))
    # children changed each directory's mtime: set them last, deepest first
    for dst, times in reversed(dir_times):
        os.utime(dst, ns=times, follow_symlinks=False)
    os.chmod(dest, 0o755)   # the layer root, as unpack_layer leaves it
    rootless_mod.restore_owners(Path(dest), owners, what="snapshot layer")


# --- the tar --------------------------------------------------------------------------------


def _octal(n: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, n)


def _pax_record(key: str, value: bytes) -> bytes:
    body = key.encode() + b"=" + value + b"\n"
    n = len(body) + 2
    while len(str(n)) + 1 + len(body) != n:
        n = len(str(n)) + 1 + len(body)
    return str(n).encode() + b" " + body


def _header(name: bytes, *, mode: int, uid: int, gid: int, size: int, mtime: int, typeflag: bytes,
            linkname: bytes = b"") -> bytes:
    h = bytearray(512)
    h[0:len(name[:100])] = name[:100]
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(uid, 8)
    h[116:124] = _octal(gid, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:157 + len(linkname[:100])] = linkname[:100]
    h[257:265] = b"ustar\x0000"
    h[329:337] = _octal(0, 8)
    h[337:345] = _octal(0, 8)
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _entry(name: bytes, *, mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0, mtime: int = 0,
           typeflag: bytes = b"0", linkname: bytes = b"", xattrs: Sequence[tuple[str, bytes]] = ()) -> bytes:
    """A PAX tar header (with an extended header only when a field needs one)."""
    pax: list[tuple[str, bytes]] = []

    def fits(b: bytes) -> bool:
        return len(b) <= 100 and b.isascii()

    if not fits(name):
        pax.append(("path", name))
    if not fits(linkname):
        pax.append(("linkpath", linkname))
    for key, val, width in (("uid", uid, 8), ("gid", gid, 8), ("size", size, 12), ("mtime", mtime, 12)):
        if not 0 <= val < 8 ** (width - 1):
            pax.append((key, str(val).encode()))
    pax.extend((f"SCHILY.xattr.{k}", v) for k, v in xattrs)
    out = b""
    if pax:
        records = b"".join(_pax_record(k, v) for k, v in sorted(pax))
        out = _header(b"././@PaxHeader", mode=0o644, uid=0, gid=0, size=len(records), mtime=0, typeflag=b"x")
        out += records + b"\0" * (-len(records) % 512)

    def clamp(v: int, width: int) -> int:
        return v if 0 <= v < 8 ** (width - 1) else 0

    return out + _header(name, mode=mode, uid=clamp(uid, 8), gid=clamp(gid, 8), size=clamp(size, 12),
                         mtime=clamp(mtime, 12), typeflag=typeflag, linkname=linkname)


_NO_EXCLUDES = _Excludes(frozenset(), frozenset(), frozenset())


def write_layer_tar(root: Path, write: Callable[[bytes], Any], *,
                    progress: Callable[[int], None] | None = None) -> None:
    """Write the OCI layer tar of ``root``, a layer directory in overlay form.

    Whiteouts (char 0:0) become ``.wh.NAME``, opaque directories get a
    ``.wh..wh..opq`` entry after their own; hardlinks between regular files
    stay hardlinks (a whiteout never does); xattrs other than overlayfs's go
    in ``SCHILY.xattr`` records. Deterministic: see the module docstring.
    """
    _write_tar(root, _scan(root, _LowerView([]), _NO_EXCLUDES), write, progress=progress)


#: host (uid, gid) of a file in a writable layer -> the owner the container sees
IdView = Callable[[int, int], tuple[int, int]]


def _id_view(state: dict[str, Any]) -> IdView | None:
    """A rootless container's upper holds host ids (the caller's, subordinate ones): undo that.

    (A root user-namespace container's upper keeps container ids on disk
    already, through its idmapped mount; a container without one has host
    ids inside as well: both need nothing.) An id outside the mapping
    (impossible for files the container made) becomes 65534, like the
    kernel's overflow id.
    """
    if not state.get("rootless") or not state.get("userns"):
        return None
    from ..containers.idmap import IdMapping
    m = IdMapping.from_json(state["userns"])

    def view(uid: int, gid: int) -> tuple[int, int]:
        u, g = m.container_uid(uid), m.container_gid(gid)
        return (65534 if u is None else u, 65534 if g is None else g)
    return view


def _write_tar(root: Path, items: Sequence[_Item], write: Callable[[bytes], Any], *,
               progress: Callable[[int], None] | None = None, ids: IdView | None = None) -> None:
    """The tar of scanned ``items`` of ``root`` (see :func:`write_layer_tar`); reads beneath a held fd."""
    root_fd = _open_root(root)
    try:
        _write_tar_beneath(root_fd, items, write, progress=progress, ids=ids)
    finally:
        os.close(root_fd)


def _write_tar_beneath(root_fd: int, items: Sequence[_Item], write: Callable[[bytes], Any], *,
                       progress: Callable[[int], None] | None, ids: IdView | None) -> None:
    first_link: dict[tuple[int, int], bytes] = {}
    pending = bytearray()

    def emit(data: bytes) -> None:
        pending.extend(data)
        if len(pending) >= _CHUNK:
            write(bytes(pending))
            pending.clear()

    def put(data: bytes) -> None:   # file data: no copy into ``pending`` when it is big
        if len(data) >= _CHUNK // 4:
            if pending:
                write(bytes(pending))
                pending.clear()
            write(data)
        else:
            emit(data)

    for it in items:
        rb = os.fsencode(it.rel)
        st = it.st
        if it.kind == _WHITEOUT:
            head, _, name = rb.rpartition(b"/")
            emit(_entry((head + b"/" if head else b"") + b".wh." + name))
            continue
        uid, gid = ids(st.st_uid, st.st_gid) if ids else (st.st_uid, st.st_gid)
        meta = {"mode": stat.S_IMODE(st.st_mode), "uid": uid, "gid": gid,
                "mtime": st.st_mtime_ns // 1_000_000_000}
        if it.kind == _DIR:
            emit(_entry(rb + b"/", typeflag=b"5", xattrs=it.xattrs, **meta))
            if it.opaque:
                emit(_entry(rb + b"/" + _OPAQUE_MARKER.encode()))
        elif it.kind == _FILE:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1:
                if key in first_link:
                    emit(_entry(rb, typeflag=b"1", linkname=first_link[key], **meta))
                    continue
                first_link[key] = rb
            emit(_entry(rb, typeflag=b"0", size=st.st_size, xattrs=it.xattrs, **meta))
            written = 0
            fd = _open_beneath(root_fd, it.rel, os.O_RDONLY | os.O_NONBLOCK)
            try:
                _same_file(fd, st, it.rel)
                while written < st.st_size:
                    chunk = os.read(fd, min(_CHUNK, st.st_size - written))
                    if not chunk:
                        raise errors.StoreError(f"/{it.rel} shrank while it was being archived")
                    put(chunk)
                    written += len(chunk)
            finally:
                os.close(fd)
            emit(b"\0" * (-st.st_size % 512))
            if progress:
                progress(st.st_size)
        elif it.kind == _SYMLINK:
            target = os.fsencode(_readlink_beneath(root_fd, it.rel))
            emit(_entry(rb, typeflag=b"2", linkname=target, xattrs=it.xattrs, **meta))
        else:
            emit(_entry(rb, typeflag=b"6", xattrs=it.xattrs, **meta))
    emit(b"\0" * 1024)   # end of archive
    if pending:
        write(bytes(pending))


# --- compression ------------------------------------------------------------------------------

#: gzip member header: no name, mtime 0, no extra flags, OS "unknown": the same bytes everywhere
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


#: a block whose samples deflate to more than this fraction of their size is stored as is
_INCOMPRESSIBLE = 0.9
_SAMPLES, _SAMPLE_SIZE = 4, 8 << 10


def _incompressible(block: bytes, level: int) -> bool:
    """Guess from a few samples whether deflating ``block`` is a waste of time.

    Already-compressed files (wheels' zips, images, archives) are common in a
    writable layer; zlib spends as long on them as on text and saves nothing.
    The guess depends only on the block's bytes, so the output stays
    deterministic.
    """
    if len(block) < _SAMPLES * _SAMPLE_SIZE * 2:
        return False
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    step = len(block) // _SAMPLES
    out = sum(len(c.compress(block[i * step:i * step + _SAMPLE_SIZE])) for i in range(_SAMPLES))
    out += len(c.flush())
    return out > _INCOMPRESSIBLE * _SAMPLES * _SAMPLE_SIZE


def _deflate_block(block: bytes, level: int, final: bool) -> bytes:
    if _incompressible(block, level):
        c = zlib.compressobj(0, zlib.DEFLATED, -15)   # zlib's level 0: stored blocks, a copy
    else:
        c = deflate.compressobj(level, -15)
    return c.compress(block) + c.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


class _ParallelGzip:
    """One gzip member deflated in independent fixed-size blocks on a thread pool (like pigz).

    zlib releases the GIL while it deflates, so the blocks compress on every
    core; each block ends on a byte boundary (sync flush) and only the last
    one is final, so their concatenation is one valid deflate stream. The
    output depends only on the input, the block size and the level.
    """

    def __init__(self, out: Callable[[bytes], Any], *, level: int = GZIP_LEVEL, workers: int | None = None) -> None:
        self._out = out
        self._level = level
        self._crc = 0
        self._size = 0
        self._buf = bytearray()
        n = workers if workers is not None else min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="jc-gzip") if n > 1 else None
        self._max_pending = 2 * n
        self._pending: collections.deque[Future[bytes]] = collections.deque()
        out(_GZIP_HEADER)

    def _submit(self, block: bytes, final: bool) -> None:
        if self._pool is None:
            self._out(_deflate_block(block, self._level, final))
            return
        self._pending.append(self._pool.submit(_deflate_block, block, self._level, final))
        while len(self._pending) > self._max_pending:
            self._out(self._pending.popleft().result())

    def write(self, data: bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        buf = self._buf
        buf.extend(data)
        if len(buf) >= _GZIP_BLOCK:
            whole = len(buf) - len(buf) % _GZIP_BLOCK
            view = memoryview(buf)
            for i in range(0, whole, _GZIP_BLOCK):
                self._submit(bytes(view[i:i + _GZIP_BLOCK]), False)
            view.release()
            del buf[:whole]

    def close(self) -> None:
        self._submit(bytes(self._buf), True)
        self._buf.clear()
        while self._pending:
            self._out(self._pending.popleft().result())
        self._out(struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))
        self.abort()

    def abort(self) -> None:
        if self._pool is not None:
            for f in self._pending:
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None


class _Zstd:
    def __init__(self, out: Callable[[bytes], Any], *, level: int = ZSTD_LEVEL) -> None:
        import zstandard

        self._out = out
        self._c = zstandard.ZstdCompressor(level=level).compressobj()

    def write(self, data: bytes) -> None:
        if out := self._c.compress(data):
            self._out(out)

    def close(self) -> None:
        self._out(self._c.flush())

    def abort(self) -> None:
        pass


def _compressor(kind: str, out: Callable[[bytes], Any]) -> _ParallelGzip | _Zstd:
    if kind == "gzip":
        return _ParallelGzip(out)
    if kind == "zstd":
        return _Zstd(out)
    raise errors.InvalidSpec(f"unknown compression {kind!r} (gzip or zstd)")


def _media_type(compress: str) -> str:
    try:
        return {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}[compress]
    except KeyError:
        raise errors.InvalidSpec(f"unknown compression {compress!r} (gzip or zstd)") from None


def _archive(root: Path, items: Sequence[_Item], out: Callable[[bytes], Any], *, compress: str,
             progress: Callable[[int], None] | None = None, ids: IdView | None = None) -> str:
    """Tar ``items`` of ``root``, compressed, into ``out``; returns the DiffID (one streaming pass)."""
    diff_hash = hashlib.sha256()
    comp = _compressor(compress, out)
    try:
        def feed(data: bytes) -> None:
            diff_hash.update(data)
            comp.write(data)

        _write_tar(root, items, feed, progress=progress, ids=ids)
        comp.close()
    except BaseException:
        comp.abort()
        raise
    return "sha256:" + diff_hash.hexdigest()


def store_layer_dir(store: Store, root: Path, *, compress: Compression = "gzip",
                    progress: Callable[[int], None] | None = None) -> tuple[Descriptor, str]:
    """Archive a layer directory (overlay form) into a committed blob; returns (descriptor, DiffID)."""
    media_type = _media_type(compress)
    items = _scan(root, _LowerView([]), _NO_EXCLUDES)
    with store.blob_writer(what="layer") as w:
        diff_id = _archive(root, items, w.write, compress=compress, progress=progress)
        digest = w.commit()
        return Descriptor(media_type, digest, w.size), diff_id


# --- snapshot ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _frozen(container: Container):
    """Freeze a running container's cgroup for the duration; thaw whatever happens."""
    cg = container.cgroups() if container.status() == "running" else None
    if cg is None:
        if container.status() == "running":
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


def _new_config(base: ImageRecord, diff_id: str, *, container: Container, message: str,
                created: str) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads(json.dumps(base.config.raw))  # a deep copy
    cfg["created"] = created
    rootfs = cfg.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = list(rootfs.get("diff_ids") or []) + [diff_id]
    inner = cfg.get("config") or {}
    labels = dict(inner.get("Labels") or {})
    labels.pop(LABEL_KERNEL_ID, None)   # the base's kernel, if it was a snapshot too, is not ours
    labels.update({
        LABEL_CREATED: created,
        LABEL_BASE_NAME: base.name,
        LABEL_BASE_DIGEST: base.digest,
        LABEL_SOURCE_CONTAINER: container.id,
    })
    kernel_id = (container.state.get("labels") or {}).get(CONTAINER_KERNEL_LABEL)
    if kernel_id:
        labels[LABEL_KERNEL_ID] = str(kernel_id)
    inner["Labels"] = labels
    cfg["config"] = inner
    entry = {"created": created, "created_by": CREATED_BY}
    if message:
        entry["comment"] = message
    cfg["history"] = list(cfg.get("history") or []) + [entry]
    return cfg


def snapshot(runtime: Runtime, container: Container | str, tag: str, *, message: str = "",
             compress: Compression = "gzip", progress: Progress | None = None,
             unpack: bool = False) -> ImageRecord:
    """Commit ``container``'s writable layer as a new image tagged ``tag``; returns it.

    The container is frozen (if it runs) while its writable layer is archived
    (and, with ``unpack``, copied into the store's unpacked layers), and
    thawed whatever happens. Without ``unpack`` the new layer is unpacked from
    its blob by the first container that uses it (the base layers are never
    extracted again either way): creating a snapshot's inodes a second time
    costs about as long as archiving it, and doing that while the user's
    kernel is frozen is the wrong place. Raises ``InvalidReference`` for a bad
    tag (before any work), ``ContainerNotFound``; on failure nothing is tagged
    and nothing half-written remains (debris of a crash is ``gc``'s).
    """
    ref = _check_tag(tag)
    media_type = _media_type(compress)
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
        view = _LowerView(lowers)
        excl = _container_excludes(c.state)
        ids = _id_view(c.state)
        tmp = tempfile.mkdtemp(dir=store.layers_dir, prefix=".snapshot-") if unpack else None
        try:
            with store.blob_writer(what="snapshot layer") as w:
                with _frozen(c):
                    items = _scan(c.upper, view, excl)
                    total = sum(it.st.st_size for it in items if it.kind == _FILE)
                    if tmp is None:
                        diff_id = _archive(c.upper, items, w.write, compress=compress, progress=on_file,
                                           ids=ids)
                    else:
                        # the unpacked copy (creating inodes is slow, in the kernel) runs beside the
                        # archive (compression, in deflate threads): both read the frozen upper dir
                        stop = threading.Event()
                        with ThreadPoolExecutor(1, thread_name_prefix="jc-snapshot-copy") as pool:
                            copy = pool.submit(_copy_items, c.upper, items, tmp, stop, ids)
                            try:
                                diff_id = _archive(c.upper, items, w.write, compress=compress,
                                                   progress=on_file, ids=ids)
                            except BaseException:
                                stop.set()
                                raise
                            copy.result()
                if progress:
                    progress("commit", total, total)
                digest = w.commit()   # fsync of the blob: after the thaw
            desc = Descriptor(media_type, digest, w.size)
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
        cfg = _new_config(base, diff_id, container=c, message=message, created=created)
        annotations = {LABEL_CREATED: created, LABEL_BASE_NAME: base.name, LABEL_BASE_DIGEST: base.digest}
        # an OCI manifest, whatever the base's form: a Docker schema2 base's layers keep their
        # blobs (and digests) under the OCI media types of the same compression
        rec = store.add_image(name=ref, config=cfg, layers=[*base.manifest.oci_form().layers, desc],
                              annotations=annotations)
    log.info("snapshot of container %s: %s (layer %s, %d bytes)", c.id[:12], rec.name, diff_id, desc.size)
    return rec


__all__ = [
    "Change", "ChangeKind", "Compression", "DiffSummary", "FolderSummary", "diff", "diff_summary", "snapshot",
    "store_layer_dir", "summarize", "write_layer_tar",
]
