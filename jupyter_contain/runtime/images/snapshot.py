"""Layers from directories: an overlay upper dir -> a deterministic OCI layer tar and its blob.

The image half of a snapshot (``runtime/commit.py`` is the other half, the one
that knows containers). Owns reading a layer directory in overlay form
(whiteouts, opaque directories, hardlinks, xattrs) through held fds
(:func:`walk`, :func:`scan`), what the image's lower layers show at a path
(:class:`LowerView`), the deterministic OCI layer tar (:func:`write_layer_tar`),
its compression (parallel gzip or zstd) in one streaming pass with the DiffID
(:func:`archive`, :func:`store_layer_dir`), and the unpacked copy of scanned
entries (:func:`copy_items`).

Must not: import ``runtime/containers`` (containers use images, never the
reverse), know what a container or a kernel is (what to leave out comes in
as :class:`Excludes`; container ids come in as an :data:`IdView`), mount
anything, or write anywhere but into the store or a directory it is given.

The tar is deterministic (same content, same DiffID): entries in a fixed
order (depth first, names sorted by their bytes), PAX format, no atime or
ctime, empty uname/gname, whole-second mtimes as in the files; whiteouts and
opaque markers have fixed metadata (overlayfs shares one inode between all
whiteouts, so theirs means nothing).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import logging
import os
import posixpath
import re
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ... import errors
from .. import userns
from ..fsutil import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, openat2
from ..spec import OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor
from . import deflate, overlay
from . import rootless as rootless_mod
from .store import Store

log = logging.getLogger(__name__)

Compression = Literal["gzip", "zstd"]

#: gzip level: 1 is several times faster than 6 for a little size (as for imports)
GZIP_LEVEL = 1
ZSTD_LEVEL = 3
#: gzip is deflated in independent blocks of this size (pigz-style), so the
#: output is the same whatever the number of threads
_GZIP_BLOCK = 1 << 20
_CHUNK = 1 << 20

# kinds of scanned entries
DIR, FILE, SYMLINK, FIFO, WHITEOUT = "dir", "file", "symlink", "fifo", "whiteout"


# --- the image's merged view (read-only lookups in the lower layers) -------------------


def _getxattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


#: directories whose layer stacks a lower view remembers
_MAX_STACKS = 100_000


class LowerView:
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
                if overlay.is_opaque(p):
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
            return None if overlay.is_whiteout(st) else st
        return None

    def names(self, rel: str) -> list[str]:
        """Names the image shows in directory ``rel``."""
        seen: dict[str, bool] = {}
        for i in self.stack(rel):
            with os.scandir(f"{self.lowers[i]}/{rel}" if rel else self.lowers[i]) as it:
                for e in it:
                    if e.name not in seen:
                        seen[e.name] = not overlay.is_whiteout(e.stat(follow_symlinks=False))
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
class Item:
    rel: str
    kind: str
    st: os.stat_result
    opaque: bool = False
    xattrs: tuple[tuple[str, bytes], ...] = ()
    #: the names in an opaque directory (a diff reports what the image had there and the layer has not)
    names: frozenset[str] = frozenset()


#: at most this many patterns, each at most this long (they may come from a kernel's request)
MAX_PATTERNS = 64
MAX_PATTERN_LENGTH = 256


def _glob_regex(pattern: str) -> str:
    """A path pattern as a regex over a layer-relative path (no leading ``/``).

    ``*`` matches within one name, ``?`` one character of a name, ``[...]`` a
    class (``[!...]`` negated); a ``**`` component any number of whole
    names, zero included. Everything else is literal.
    """
    parts = pattern.strip("/").split("/")
    out: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        j, piece = 0, []
        while j < len(part):
            ch = part[j]
            if ch == "*":
                piece.append("[^/]*")
            elif ch == "?":
                piece.append("[^/]")
            elif ch == "[" and (k := part.find("]", j + 2 if part[j + 1:j + 2] in ("!", "^") else j + 1)) > j:
                body = part[j + 1:k]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                piece.append("[" + body.replace("\\", "\\\\") + "]")
                j = k
            else:
                piece.append(re.escape(ch))
            j += 1
        out.append("".join(piece) + ("" if last else "/"))
    return "".join(out)


@dataclass(frozen=True)
class PathPatterns:
    """What a layer leaves out by name: paths matching ``exclude`` and no ``include`` pattern.

    Patterns are absolute container paths with shell globs (see
    :func:`_glob_regex`): ``/root/.cache/pip``, ``/**/__pycache__``,
    ``/**/.ipython/profile_*/history.sqlite*``. A match leaves out the entry
    with everything beneath it; ``include`` keeps an entry an ``exclude``
    pattern would leave out (it cannot reach beneath a directory that is
    itself left out). Validated at construction (InvalidSpec): they may come
    from a kernel's request.
    """

    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for what, pats in (("exclude", self.exclude), ("include", self.include)):
            if not isinstance(pats, tuple) or len(pats) > MAX_PATTERNS:
                raise errors.InvalidSpec(f"{what}: at most {MAX_PATTERNS} path patterns, as a tuple")
            for p in pats:
                if not isinstance(p, str) or not p.startswith("/") or len(p) > MAX_PATTERN_LENGTH \
                        or not p.strip("/") or any(ord(c) < 0x20 for c in p) \
                        or any(part in (".", "..") for part in p.split("/")):
                    raise errors.InvalidSpec(
                        f"{what}: {str(p)[:80]!r} is not a path pattern (an absolute container path, "
                        f"at most {MAX_PATTERN_LENGTH} characters, globs * ? [] and ** allowed, no . or ..)")
        object.__setattr__(self, "_ex", re.compile("|".join(f"(?:{_glob_regex(p)})" for p in self.exclude))
                           if self.exclude else None)
        object.__setattr__(self, "_in", re.compile("|".join(f"(?:{_glob_regex(p)})" for p in self.include))
                           if self.include else None)

    def leaves_out(self, rel: str) -> bool:
        """True if the entry at layer-relative path ``rel`` is left out."""
        ex: re.Pattern[str] | None = self._ex   # type: ignore[attr-defined]
        if ex is None or not ex.fullmatch(rel):
            return False
        inc: re.Pattern[str] | None = self._in   # type: ignore[attr-defined]
        return inc is None or not inc.fullmatch(rel)


@dataclass(frozen=True)
class Excludes:
    always: frozenset[str]      # skipped with everything beneath
    if_new: frozenset[str]      # skipped unless the image has them
    parents: frozenset[str]     # mount-point parents: skipped when empty and made by the runtime
    #: left out by name (the caller's list); reported through ``walk``'s ``on_left_out``
    patterns: PathPatterns | None = None


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


def open_root(path: Path | str) -> int:
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
        if n in overlay.UNSUPPORTED_XATTRS:
            raise errors.ContainerError(
                f"/{rel}: the writable layer uses the overlayfs {overlay.UNSUPPORTED_XATTRS[n]} feature, "
                "which snapshots do not support")
        if n in overlay.XWHITEOUT_XATTRS:
            xwhiteout = True
        if overlay.is_overlay_xattr(n):
            continue
        value = _fd_xattr(target, n) if isinstance(target, int) else _getxattr(target, n)
        if value is not None:
            keep.append((n, value))
    return tuple(keep), xwhiteout


class _Frame:
    """One directory of the walk: its entries, the next one to look at, and its fd (or -1: closed)."""

    __slots__ = ("rel", "fd", "names", "i", "pending", "left_out")

    def __init__(self, rel: str, fd: int, names: list[str], pending: Item | None) -> None:
        self.rel, self.fd, self.names, self.i, self.pending = rel, fd, names, 0, pending
        #: something beneath was left out by a pattern (an emptied directory is not worth keeping)
        self.left_out = False


#: on_left_out(rel, stat, is_whiteout): an entry ``Excludes.patterns`` left out (its subtree with it)
LeftOut = Callable[[str, os.stat_result, bool], None]


def walk(root_fd: int, view: LowerView, excl: Excludes, *, tolerant: bool = False,
         on_left_out: LeftOut | None = None) -> Iterator[Item]:
    """The entries beneath ``root_fd`` that belong in a layer, parents before children, names sorted.

    Streams (constant memory but the current path's listings) and iterates
    (no recursion: a layer may be deeper than Python's stack). ``tolerant``:
    skip what vanishes or changes while we look (a preview of a running
    container); otherwise such a change is an error. Entries matching
    ``excl.patterns`` are left out (and told to ``on_left_out``); a directory
    left with nothing but such entries beneath it is left out too when it
    changes nothing else (new, or a copy-up of the image's with the same mode
    and owner), so ``/root/.ipython/profile_default/`` does not stay behind
    as an empty husk of the history it held.
    """
    def listing(fd: int) -> list[str]:
        # byte order, so that the order does not depend on the locale or on undecodable names
        return sorted(os.listdir(fd), key=os.fsencode)

    def raced(e: OSError) -> bool:
        return tolerant and e.errno in _RACES

    patterns = excl.patterns if excl.patterns is not None and excl.patterns.exclude else None
    stack: list[_Frame] = [_Frame("", root_fd, listing(root_fd), None)]
    # mount-point parents held back until something beneath them is kept (else they were made by the runtime)
    held: list[Item] = []
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
                    # held as a mount-point parent: dropped when the runtime made it; held for the
                    # patterns: dropped only when what it held was left out (an empty new folder stays)
                    droppable = it.rel in excl.parents or top.left_out
                    if droppable and _runtime_made(it.st, view.lookup(it.rel)):
                        if top.left_out and stack:
                            stack[-1].left_out = True
                    else:
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
                if patterns is not None and patterns.leaves_out(r):
                    top.left_out = True
                    if on_left_out is not None:
                        on_left_out(r, st, overlay.is_whiteout(st))
                    continue
                mode = st.st_mode
                if overlay.is_whiteout(st):
                    item = Item(r, WHITEOUT, st)
                elif name.startswith(overlay.WHITEOUT_PREFIX):
                    skip("their names would read as whiteouts in a layer", r)
                    continue
                elif stat.S_ISDIR(mode):
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top.fd)
                    try:
                        st = os.fstat(fd)   # what was opened, whatever was swapped in meanwhile
                        xattrs, _ = _layer_xattrs(fd, r)
                        opaque = any(_fd_xattr(fd, n) == b"y" for n in overlay.OPAQUE_XATTRS)
                        names = listing(fd)
                    except BaseException:
                        os.close(fd)
                        raise
                    item = Item(r, DIR, st, opaque, xattrs, frozenset(names) if opaque else frozenset())
                    pending = item if (r in excl.parents or patterns is not None) and not opaque else None
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
                        item = Item(r, WHITEOUT, st)
                    else:
                        kind = FILE if stat.S_ISREG(mode) else SYMLINK if stat.S_ISLNK(mode) else FIFO
                        item = Item(r, kind, st, False, xattrs)
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


def scan(upper: Path, view: LowerView, excl: Excludes, *, tolerant: bool = False,
         on_left_out: LeftOut | None = None) -> list[Item]:
    """The upper dir's entries that belong in the layer, parents before children (see :func:`walk`)."""
    root_fd = open_root(upper)
    try:
        return list(walk(root_fd, view, excl, tolerant=tolerant, on_left_out=on_left_out))
    finally:
        os.close(root_fd)


def _runtime_made(st: os.stat_result, lower: os.stat_result | None) -> bool:
    """An empty mount-point parent: new, or a copy-up of the image's directory that changed nothing."""
    if lower is None:
        return True
    return (stat.S_ISDIR(lower.st_mode) and stat.S_IMODE(lower.st_mode) == stat.S_IMODE(st.st_mode)
            and lower.st_uid == st.st_uid and lower.st_gid == st.st_gid)


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


def copy_items(upper: Path, items: Sequence[Item], dest: str, stop: threading.Event | None = None,
                ids: IdView | None = None, *, rootless: bool | None = None) -> None:
    """Write ``items`` of ``upper`` into the empty directory ``dest`` in overlay (lowerdir) form.

    Gives up early (raising) once ``stop`` is set. Reads beneath a held fd of
    ``upper`` (see :func:`_open_beneath`), never through a path. ``rootless``: the
    store's answer (``Store.rootless``); None asks :func:`userns.rootless`.
    """
    root_fd = open_root(upper)
    try:
        _copy_items_beneath(root_fd, items, dest, stop, ids,
                            rootless=userns.rootless() if rootless is None else rootless)
    finally:
        os.close(root_fd)


def _same_file(fd: int, st: os.stat_result, rel: str) -> None:
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
        raise errors.StoreError(f"/{rel} was replaced while the layer was being read")


def _copy_items_beneath(root_fd: int, items: Sequence[Item], dest: str, stop: threading.Event | None,
                        ids: IdView | None, *, rootless: bool) -> None:
    first_link: dict[tuple[int, int], str] = {}
    dir_times: list[tuple[str, tuple[int, int]]] = []
    # rootless: the copy stays the caller's (as a rootless unpack leaves a
    # layer), with the opaque mark overlayfs reads under userxattr

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
        if it.kind == WHITEOUT:
            overlay.make_whiteout(dst)
        elif it.kind == DIR:
            os.mkdir(dst, 0o700)
            chown(dst, st)
            os.chmod(dst, stat.S_IMODE(st.st_mode))   # after chown, which clears setgid
            _set_xattrs(dst, it.xattrs)
            if it.opaque:
                overlay.set_opaque(dst, rootless=rootless)
            dir_times.append((dst, _whole_seconds(st)))
        elif it.kind == FILE:
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
        elif it.kind == SYMLINK:
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


NO_EXCLUDES = Excludes(frozenset(), frozenset(), frozenset())


def write_layer_tar(root: Path, write: Callable[[bytes], Any], *,
                    progress: Callable[[int], None] | None = None) -> None:
    """Write the OCI layer tar of ``root``, a layer directory in overlay form.

    Whiteouts (char 0:0) become ``.wh.NAME``, opaque directories get a
    ``.wh..wh..opq`` entry after their own; hardlinks between regular files
    stay hardlinks (a whiteout never does); xattrs other than overlayfs's go
    in ``SCHILY.xattr`` records. Deterministic: see the module docstring.
    """
    _write_tar(root, scan(root, LowerView([]), NO_EXCLUDES), write, progress=progress)


#: host (uid, gid) of a file in a writable layer -> the owner the container sees
IdView = Callable[[int, int], tuple[int, int]]


def _write_tar(root: Path, items: Sequence[Item], write: Callable[[bytes], Any], *,
               progress: Callable[[int], None] | None = None, ids: IdView | None = None) -> None:
    """The tar of scanned ``items`` of ``root`` (see :func:`write_layer_tar`); reads beneath a held fd."""
    root_fd = open_root(root)
    try:
        _write_tar_beneath(root_fd, items, write, progress=progress, ids=ids)
    finally:
        os.close(root_fd)


def _write_tar_beneath(root_fd: int, items: Sequence[Item], write: Callable[[bytes], Any], *,
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
        if it.kind == WHITEOUT:
            head, _, name = rb.rpartition(b"/")
            emit(_entry((head + b"/" if head else b"") + overlay.WHITEOUT_PREFIX.encode() + name))
            continue
        uid, gid = ids(st.st_uid, st.st_gid) if ids else (st.st_uid, st.st_gid)
        meta: dict[str, Any] = {"mode": stat.S_IMODE(st.st_mode), "uid": uid, "gid": gid,
                "mtime": st.st_mtime_ns // 1_000_000_000}
        if it.kind == DIR:
            emit(_entry(rb + b"/", typeflag=b"5", xattrs=it.xattrs, **meta))
            if it.opaque:
                emit(_entry(rb + b"/" + overlay.OPAQUE_MARKER.encode()))
        elif it.kind == FILE:
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
        elif it.kind == SYMLINK:
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


def media_type(compress: str) -> str:
    try:
        return {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}[compress]
    except KeyError:
        raise errors.InvalidSpec(f"unknown compression {compress!r} (gzip or zstd)") from None


def archive(root: Path, items: Sequence[Item], out: Callable[[bytes], Any], *, compress: str,
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
    mtype = media_type(compress)
    items = scan(root, LowerView([]), NO_EXCLUDES)
    with store.blob_writer(what="layer") as w:
        diff_id = archive(root, items, w.write, compress=compress, progress=progress)
        digest = w.commit()
        return Descriptor(mtype, digest, w.size), diff_id




__all__ = [
    "DIR", "FIFO", "FILE", "MAX_PATTERNS", "NO_EXCLUDES", "SYMLINK", "WHITEOUT", "Compression", "Excludes", "IdView",
    "Item", "LeftOut", "LowerView", "PathPatterns", "archive", "copy_items", "media_type", "open_root", "scan", "store_layer_dir", "walk",
    "write_layer_tar",
]
