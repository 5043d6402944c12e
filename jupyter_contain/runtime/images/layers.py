"""Unpack one OCI image layer into its own directory, in overlayfs form.

Owns: decompression of a layer blob (gzip, zstd, plain tar) checked against its
media type, the DiffID of the uncompressed stream, the translation of OCI
whiteouts into overlayfs whiteouts (``.wh.NAME`` -> character device 0:0,
``.wh..wh..opq`` -> ``trusted.overlay.opaque=y``, ``user.`` rootless; the
format's names and marks are ``overlay``'s), and every safety check on
the hostile tar input (paths, links, device nodes, xattrs, size). Also the
pure-Python views of unpacked trees that tests and snapshots compare
(``tree_manifest``, ``merged_view_manifest``).

Must not: mount anything, know where the store keeps its layers (the caller
passes ``dest``), touch the network, or resolve paths through the live tree
(``realpath``): the extractor keeps its own map of what it created, so every
parent directory it writes into is known to be a real directory of its own.

Each unpacked layer is one overlay lowerdir; a container stacks them.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import errno
import hashlib
import logging
import os
import queue
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast
from urllib.parse import unquote_to_bytes

import zstandard

from ... import errors
from .. import spec as _spec
from .. import userns
from ..fsutil import remove_tree
from . import deflate
from . import rootless as rootless_store
from .overlay import (
    AUFS_META_PREFIX,
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    is_opaque,
    is_overlay_xattr,
    is_whiteout,
    make_whiteout,
    set_opaque,
)

log = logging.getLogger(__name__)

#: refuse layers that inflate past this many bytes (uncompressed tar stream)
DEFAULT_MAX_LAYER_SIZE = 16 * 1024**3

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

#: layer media type -> compression of the blob (both families: the table lives in ``spec``)
LAYER_MEDIA_TYPES: dict[str, str] = {mt: comp for mt, (comp, _oci) in _spec.LAYER_MEDIA_TYPES.items()}

# kinds of what this layer created, in the extractor's map
_DIR, _FILE, _SYMLINK, _FIFO, _WHITEOUT = 1, 2, 3, 4, 5
_OTHER = 6  # a lower non-directory that is not a symlink (file, fifo, ...)

_MAX_SYMLINK_HOPS = 40
_COPY_CHUNK = 1 << 20
#: compressed bytes read from the blob at a time (inflates to about 1 MiB of tar)
_RAW_CHUNK = 1 << 18
#: uncompressed bytes handed from the inflate thread to the extractor at a time, and how
#: many such chunks may wait: enough to ride out a burst of small files, little memory
_CHUNK = 1 << 20
_QUEUE_CHUNKS = 8
_ALLOWED_XATTR_PREFIXES = ("user.", "trusted.", "security.")
_ALLOWED_XATTR_NAMES = ("system.posix_acl_access", "system.posix_acl_default")


@dataclass(frozen=True)
class UnpackResult:
    diff_id: str  # "sha256:<hex>" of the uncompressed tar stream
    size: int  # bytes of the uncompressed tar stream
    files: int  # entries written


def compression_for(media_type: str, *, layer: str = "") -> str:
    """Return ``"tar"``, ``"gzip"`` or ``"zstd"`` for a layer media type."""
    try:
        return LAYER_MEDIA_TYPES[media_type]
    except KeyError:
        raise errors.ManifestError(
            f"layer {layer}: unsupported layer media type {media_type!r}"
        ) from None


# --- streams ----------------------------------------------------------------

class Readable(Protocol):
    """What a layer source needs to be: a stream read forward (a file, a download being followed)."""

    def read(self, n: int, /) -> bytes: ...


class _SourceError(Exception):
    """Carries an error of ``src.read`` past the handlers meant for the tree."""


class _Prefixed:
    """The blob stream with the bytes peeked for the magic put back in front."""

    def __init__(self, src: Readable, prefix: bytes) -> None:
        self._src = src
        self._prefix = prefix

    def read(self, n: int = -1) -> bytes:
        if self._prefix:
            p = self._prefix
            if n is None or n < 0 or n >= len(p):
                self._prefix = b""
                return p
            self._prefix = p[n:]
            return p[:n]
        try:
            return self._src.read(n)
        except OSError as e:
            raise _SourceError(e) from e


class _GzipReader:
    """Streaming gzip (multi-member) decompression, bounded output per read."""

    def __init__(self, raw: _Prefixed, layer: str) -> None:
        self._raw = raw
        self._layer = layer
        self._d = deflate.decompressobj(31)

    def read(self, n: int) -> bytes:
        d = self._d
        while True:
            if d.eof:
                # at the end of a member zlib leaves the rest in unused_data (and, when a
                # max_length stopped it earlier, a stale copy in unconsumed_tail)
                rest = d.unused_data or self._raw.read(_RAW_CHUNK)
                if not rest:
                    return b""
                # concatenated gzip members are one gzip stream; anything else is garbage
                while len(rest) < 2:
                    more = self._raw.read(_RAW_CHUNK)
                    if not more:
                        break
                    rest += more
                if rest[:2] != _GZIP_MAGIC:
                    raise errors.UnsafeLayer(self._layer, "<stream>", "data after the end of the gzip stream")
                d = self._d = deflate.decompressobj(31)
                out = d.decompress(rest, n)
            elif d.unconsumed_tail:
                out = d.decompress(d.unconsumed_tail, n)
            else:
                chunk = self._raw.read(_RAW_CHUNK)
                if not chunk:
                    raise errors.UnsafeLayer(self._layer, "<stream>", "truncated gzip stream")
                out = d.decompress(chunk, n)
            if out:
                return out


class _Inflow(threading.Thread):
    """Reads, decompresses and hashes the layer stream in a thread of its own.

    The extractor (the calling thread) spends its time in Python parsing tar
    headers and in file-creation syscalls; inflate and sha256 release the GIL,
    so running them here, a few chunks ahead, overlaps them with that work
    instead of adding to it. Chunks of the uncompressed stream go through a
    bounded queue (memory stays at a few MiB however large the layer); an error
    of the source or the decompressor is queued in place of the next chunk and
    raised in the extractor's thread when it gets there.
    """

    def __init__(self, inner: Readable, *, max_size: int, layer: str) -> None:
        super().__init__(name="unpack-inflate", daemon=True)
        self._read = inner.read
        self._max = max_size
        self._layer = layer
        self._hash = hashlib.sha256()
        self.queue: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self._quit = threading.Event()
        self.size = 0

    def run(self) -> None:
        item: BaseException | None = None
        try:
            read, update, limit = self._read, self._hash.update, self._max
            while not self._quit.is_set():
                data = read(_CHUNK)
                if not data:
                    break
                self.size += len(data)
                if self.size > limit:
                    raise errors.LayerTooLarge(
                        self._layer, "<stream>", f"uncompressed layer exceeds the limit of {limit} bytes")
                update(data)
                if not self._put(data):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the extractor's thread
            item = e
        self._put(item)  # None: the end of the stream

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._quit.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def stop(self) -> None:
        """Make the thread end after the read it is in (the extractor gave up); waits for it."""
        self._quit.set()
        with contextlib.suppress(queue.Empty):
            while True:  # make room for a put that waits, so that it sees the flag now
                self.queue.get_nowait()
        if self.ident is not None:
            self.join()

    def hexdigest(self) -> str:
        """The DiffID's hex digest; valid once the end of the stream was taken from the queue."""
        return self._hash.hexdigest()


class _TarStream:
    """The uncompressed layer as the forward-only file ``TarFile`` reads, fed by :class:`_Inflow`.

    Replaces tarfile's own stream adapter, which reads its source 10 KiB at a
    time and re-copies its buffer on every read. Slices of the current chunk
    go to tarfile; file contents go from the chunks to ``os.write`` without a
    copy (:meth:`copy_to`). Keeps the last few chunks so the block that ended
    the archive can be checked (tarfile treats a garbage header as a silent
    end of archive).
    """

    _KEEP = 64 * 1024

    def __init__(self, inflow: _Inflow) -> None:
        self._get: Callable[[], bytes | BaseException | None] = inflow.queue.get
        self._buf = b""
        self._off = 0
        self._eof = False
        self.pos = 0     # what tarfile has consumed
        self.size = 0    # what came out of the queue
        self._tail: collections.deque[tuple[int, bytes]] = collections.deque()
        self._tail_bytes = 0

    def _fill(self) -> bool:
        """Replace the exhausted current chunk with the next one; False at the end."""
        if self._eof:
            return False
        item = self._get()
        if item is None:
            self._eof = True
            self._buf, self._off = b"", 0
            return False
        if isinstance(item, BaseException):
            self._get = _raiser(item)  # every later read fails the same way
            raise item
        self._buf, self._off = item, 0
        tail = self._tail
        tail.append((self.size, item))
        self.size += len(item)
        self._tail_bytes += len(item)
        while self._tail_bytes - len(tail[0][1]) >= self._KEEP:
            self._tail_bytes -= len(tail.popleft()[1])
        return True

    def read(self, n: int = -1) -> bytes:
        buf, off = self._buf, self._off
        if n is None or n < 0:
            n = 1 << 62
        if off + n <= len(buf):
            self._off = off + n
            self.pos += n
            return buf[off:off + n]
        parts = [buf[off:]] if off < len(buf) else []
        got = len(buf) - off
        self._off = len(buf)
        while got < n and self._fill():
            take = min(n - got, len(self._buf))
            parts.append(self._buf if take == len(self._buf) else self._buf[:take])
            self._off = take
            got += take
        self.pos += got
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def copy_to(self, fd: int, n: int) -> int:
        """Write the next ``n`` bytes to ``fd``; returns how many there were (fewer at the end)."""
        done = 0
        write = os.write
        while done < n:
            avail = len(self._buf) - self._off
            if avail <= 0:
                if not self._fill():
                    break
                continue
            k = min(avail, n - done)
            view = memoryview(self._buf)[self._off:self._off + k]
            while view:
                view = view[write(fd, view):]
            self._off += k
            self.pos += k
            done += k
        return done

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self.pos:
            raise tarfile.StreamError("seeking backwards is not allowed")
        while self.pos < pos:
            if not self.read(min(pos - self.pos, _CHUNK)):
                break
        return self.pos

    def block_at(self, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset+length) if still held, else None."""
        parts = []
        for start, data in self._tail:
            end = start + len(data)
            if end <= offset or start >= offset + length:
                continue
            parts.append(data[max(0, offset - start): offset + length - start])
        got = b"".join(parts)
        if not self._tail or self._tail[0][0] > offset:
            return None
        return got

    def drain(self) -> None:
        """Take the rest of the stream (the DiffID covers the padding after the end blocks too)."""
        self._buf, self._off = b"", 0
        while self._fill():
            self._buf, self._off = b"", 0


def _raiser(exc: BaseException) -> Callable[[], bytes]:
    def get() -> bytes:
        raise exc
    return get


#: extended headers (PAX records, GNU long names) are read into memory whole
_MAX_EXTENDED_HEADER = 1 << 20


class _OversizedHeader(Exception):
    pass


class _SafeTarInfo(tarfile.TarInfo):
    """TarInfo that refuses to read a huge extended header into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and self.size > _MAX_EXTENDED_HEADER:
            raise _OversizedHeader(f"extended tar header of {self.size} bytes")
        return super()._proc_member(tarfile_)  # type: ignore[misc]  # private tarfile hook, not in typeshed


def _read_magic(src: Readable, n: int = 4) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = src.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _detect(magic: bytes) -> str:
    if magic[:2] == _GZIP_MAGIC:
        return "gzip"
    # a zstd frame, or a skippable frame (magic 0x184D2A5?) in front of one
    if magic[:4] == _ZSTD_MAGIC or (len(magic) == 4 and magic[1:4] == b"\x2a\x4d\x18" and magic[0] & 0xF0 == 0x50):
        return "zstd"
    return "tar"


# --- extraction -------------------------------------------------------------

def _components(name: str, layer: str, shown: str) -> list[str]:
    """Split an archive path; leading ``/`` and ``.`` parts dropped, ``..`` refused."""
    if not name:
        raise errors.UnsafeLayer(layer, shown, "empty path")
    if "\x00" in name:
        raise errors.UnsafeLayer(layer, shown, "path contains a NUL byte")
    comps = [c for c in name.split("/") if c and c != "."]
    if ".." in comps:
        raise errors.UnsafeLayer(layer, shown, "path has a '..' component")
    return comps


def _pax_time_ns(value: str | None, fallback: float) -> int:
    if value:
        try:
            neg = value.startswith("-")
            sec, _, frac = value.lstrip("-").partition(".")
            if sec.isdigit() and (not frac or frac.isdigit()):
                ns = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
                return -ns if neg else ns
        except ValueError:
            pass
    return int(round(fallback * 1_000_000_000))


def _lower_xattrs(path: str) -> list[tuple[str, bytes]]:
    out = []
    for name in os.listxattr(path, follow_symlinks=False):
        if not is_overlay_xattr(name):
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
    return out


class _Extractor:
    """Applies tar members to a private directory, one at a time, in order."""

    def __init__(self, layer: str, root: str, lowers: Sequence[str], *, rootless: bool) -> None:
        self.layer = layer
        self.root = root
        self.lowers = list(lowers)
        # resolved relative path -> kind; invariant: every key's ancestors are _DIR keys
        self.created: dict[str, int] = {}
        self.symlinks: dict[str, str] = {}
        # directory -> the created paths directly in it, so removing a tree costs its size only
        self.children: dict[str, set[str]] = {}
        self.opaque: set[str] = set()
        self.dir_times: dict[str, tuple[int, int]] = {}
        # rootless (not root): every file stays the caller's (container root
        # in its user namespace), only user.* xattrs can be set, and opaque
        # directories are marked the way overlayfs reads them with userxattr
        self.rootless = rootless
        #: rootless: path -> (container uid, gid, mode, is a symlink) of entries not root's
        self.owners: dict[str, tuple[int, int, int, bool]] = {}
        self._rootless_mapping: userns.IdMapping | None = None
        self._lower_stacks: dict[str, tuple[int, ...]] = {"": tuple(range(len(self.lowers)))}
        self.root_meta = False
        self.files = 0
        self.current = ""

    # -- errors

    def _unsafe(self, reason: str) -> errors.UnsafeLayer:
        return errors.UnsafeLayer(self.layer, self.current, reason)

    # -- lower layers (merged view, read-only, written by us earlier)

    def _lower_stack(self, path: str) -> tuple[int, ...]:
        """Indices of the lower layers in which ``path`` is a directory that shows."""
        cache = self._lower_stacks
        st = cache.get(path)
        if st is not None:
            return st
        # iterative (no recursion limit on deep paths): start at the deepest known ancestor
        missing = [path]
        parent = path.rpartition("/")[0]
        while parent not in cache:
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        st = cache[parent]
        for cur in reversed(missing):
            result = []
            for i in st:
                p = f"{self.lowers[i]}/{cur}"
                try:
                    s = os.lstat(p)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(s.st_mode):
                    break  # whiteout or non-directory: hides everything below
                result.append(i)
                if is_opaque(p):
                    break
            st = cache[cur] = tuple(result)
        return st

    def _hidden_below(self, path: str) -> bool:
        """True if this layer made ``path`` or one of its ancestors opaque."""
        if not self.opaque:
            return False
        if "" in self.opaque or path in self.opaque:
            return True
        i = path.find("/")
        while i != -1:
            if path[:i] in self.opaque:
                return True
            i = path.find("/", i + 1)
        return False

    def _lower_entry(self, parent: str, name: str) -> tuple[int, str] | None:
        """(kind, host path) of ``parent/name`` in the merged lower view, or None."""
        if not self.lowers or self._hidden_below(parent):
            return None
        rel = f"{parent}/{name}" if parent else name
        for i in self._lower_stack(parent):
            p = f"{self.lowers[i]}/{rel}"
            try:
                s = os.lstat(p)
            except FileNotFoundError:
                continue
            m = s.st_mode
            if stat.S_ISDIR(m):
                return _DIR, p
            if stat.S_ISLNK(m):
                return _SYMLINK, p
            if is_whiteout(s):
                return None
            return _OTHER, p
        return None

    def _lower_root_names(self) -> list[str]:
        names: dict[str, bool] = {}
        for i in self._lower_stack(""):
            for name in os.listdir(self.lowers[i]):
                if name in names:
                    continue
                s = os.lstat(f"{self.lowers[i]}/{name}")
                names[name] = not is_whiteout(s)
        return [n for n, shown in names.items() if shown]

    # -- path resolution

    def _resolve_dir(self, comps: list[str], *, create: bool) -> str | None:
        """Resolve directory components chroot-style to a real dir of this layer.

        Follows symlinks of this layer and of the lower layers; creates the
        missing directories in this layer (copying a lower directory's
        metadata) unless ``create`` is false, in which case None is returned
        when the path is not entirely this layer's.
        """
        resolved: list[str] = []
        todo = comps[::-1]
        hops = 0
        created = self.created
        while todo:
            c = todo.pop()
            if c == "..":  # only from symlink targets
                if not resolved:
                    raise self._unsafe("a symlink in its path climbs above the layer root")
                resolved.pop()
                continue
            parent = "/".join(resolved)
            path = f"{parent}/{c}" if parent else c
            kind = created.get(path)
            if kind == _DIR:
                resolved.append(c)
                continue
            if kind == _SYMLINK:
                target = self.symlinks[path]
            elif kind is None:
                low = self._lower_entry(parent, c)
                if low is None or low[0] == _DIR:
                    if not create:
                        return None
                    self._mkdir_implicit(path, low[1] if low else None)
                    resolved.append(c)
                    continue
                if low[0] != _SYMLINK:
                    raise self._unsafe(f"parent {path!r} is not a directory (in a lower layer)")
                target = os.readlink(low[1])
            elif kind == _WHITEOUT:
                if not create:
                    return None
                # deleted by this layer, then used as a parent: a fresh dir hiding the lowers
                os.unlink(f"{self.root}/{path}")
                self._forget(path)
                self._mkdir_implicit(path, None)
                self._set_opaque(path)
                resolved.append(c)
                continue
            else:
                raise self._unsafe(f"parent {path!r} is not a directory")
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                raise self._unsafe("too many levels of symbolic links")
            if not target:
                raise self._unsafe(f"parent {path!r} is an empty symlink")
            if target.startswith("/"):
                resolved = []
            todo.extend(t for t in reversed(target.split("/")) if t and t != ".")
        return "/".join(resolved)

    def _parent_of(self, comps: list[str], *, create: bool = True) -> str | None:
        parent = "/".join(comps[:-1])
        # fast path: the parent is a directory this layer made, at its own name
        if not parent or self.created.get(parent) == _DIR:
            return parent
        return self._resolve_dir(comps[:-1], create=create)

    # -- writing helpers

    def _mkdir_implicit(self, path: str, lower: str | None) -> None:
        full = f"{self.root}/{path}"
        os.mkdir(full, 0o700)
        if lower is not None:
            # an overlay directory shows the topmost layer's attributes: keep the lower's
            s = os.lstat(lower)
            if self.rootless:
                # the lower is ours too: its owner, if restored, is a host (subordinate) id
                self._owner_from_host(path, s)
            else:
                os.lchown(full, s.st_uid, s.st_gid)
            os.chmod(full, stat.S_IMODE(s.st_mode))
            for name, value in _lower_xattrs(lower):
                os.setxattr(full, name, value, follow_symlinks=False)
            self.dir_times[path] = (s.st_atime_ns, s.st_mtime_ns)
        else:
            os.chmod(full, 0o755)
        self._record(path, _DIR)

    def _set_opaque(self, path: str) -> None:
        if path in self.opaque:
            return
        set_opaque(f"{self.root}/{path}", rootless=self.rootless)
        self.opaque.add(path)

    def _owner_from_host(self, path: str, s: os.stat_result) -> None:
        if (s.st_uid, s.st_gid) == (os.geteuid(), os.getegid()):
            return
        if self._rootless_mapping is None:
            self._rootless_mapping = userns.rootless_mapping()
        m = self._rootless_mapping
        uid, gid = m.container_uid(s.st_uid), m.container_gid(s.st_gid)
        if uid is not None and gid is not None:
            self.owners[path] = (uid, gid, stat.S_IMODE(s.st_mode), False)

    def _chown(self, full: str, uid: int, gid: int, *, mode: int = 0, link: bool = False) -> None:
        if self.rootless:
            # root-owned (the usual) is what the user's own files are inside; others are
            # recorded for rootless.restore_owners, which runs once the layer is complete
            rel = full[len(self.root) + 1:]
            if uid or gid:
                self.owners[rel] = (uid, gid, mode, link)
            else:
                self.owners.pop(rel, None)   # a path made again, root's this time
            return
        os.lchown(full, uid, gid)

    def _record(self, path: str, kind: int, target: str | None = None) -> None:
        self.created[path] = kind
        if target is not None:
            self.symlinks[path] = target
        parent = path.rpartition("/")[0]
        kids = self.children.get(parent)
        if kids is None:
            self.children[parent] = {path}
        else:
            kids.add(path)

    def _forget(self, path: str) -> None:
        """Drop ``path`` and everything recorded beneath it from the bookkeeping."""
        self.children.get(path.rpartition("/")[0], set()).discard(path)
        todo = [path]
        while todo:
            p = todo.pop()
            self.created.pop(p, None)
            self.symlinks.pop(p, None)
            self.dir_times.pop(p, None)
            self.opaque.discard(p)
            todo.extend(self.children.pop(p, ()))

    def _clear(self, path: str, new_kind: int) -> int | None:
        """Make room for a new entry at ``path``; returns the old kind."""
        old = self.created.get(path)
        if old is None or (old == _DIR and new_kind == _DIR):
            return old
        full = f"{self.root}/{path}"
        if old == _DIR:
            remove_tree(full)
        else:
            os.unlink(full)
        self._forget(path)
        return old

    def _xattrs(self, m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        out = []
        for key, value in m.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                name = key[13:]
                # tarfile decodes PAX values to str (surrogateescape on bad UTF-8): undo it
                raw = value.encode("utf-8", "surrogateescape")
            elif key.startswith("LIBARCHIVE.xattr."):
                name = unquote_to_bytes(key[17:]).decode("utf-8", "surrogateescape")
                try:
                    raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=False)
                except (binascii.Error, ValueError):
                    raise self._unsafe(f"xattr {name!r} has a malformed base64 value") from None
            else:
                continue
            if not name or "\x00" in name:
                raise self._unsafe("empty or NUL-containing xattr name")
            if is_overlay_xattr(name):
                raise self._unsafe(f"xattr {name!r} is reserved for overlayfs")
            if name == "security.selinux":
                # a label is host policy, set by the runtime, never taken from an image
                log.debug("layer %s: %s: dropping security.selinux", self.layer, self.current)
                continue
            if not (name.startswith(_ALLOWED_XATTR_PREFIXES) or name in _ALLOWED_XATTR_NAMES):
                raise self._unsafe(f"xattr namespace of {name!r} is not allowed")
            if self.rootless and not name.startswith("user."):
                # trusted.* and file capabilities need host root (or CAP_SETFCAP)
                log.debug("layer %s: %s: rootless, dropping %s", self.layer, self.current, name)
                continue
            out.append((name, raw))
        return out

    # -- members

    def apply(self, m: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self.current = m.name
        try:
            self._apply(m, tar)
        except OSError as e:
            raise errors.StoreError(f"layer {self.layer}: {m.name!r}: {e.strerror or e}") from e
        except (ValueError, OverflowError) as e:
            raise self._unsafe(f"invalid header value: {e}") from e

    def _apply(self, m: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        comps = _components(m.name, self.layer, m.name)
        if not comps:
            if not m.isdir():
                raise self._unsafe("the layer root entry is not a directory")
            self._meta_dir("", m, self._xattrs(m))
            self.root_meta = True
            self.files += 1
            return
        name = comps[-1]
        for c in comps[:-1]:
            if c.startswith(WHITEOUT_PREFIX):
                if c.startswith(AUFS_META_PREFIX):
                    log.debug("layer %s: skipping AUFS metadata %r", self.layer, m.name)
                    return
                raise self._unsafe("a whiteout is used as a directory")
        if name.startswith(WHITEOUT_PREFIX):
            if name == OPAQUE_MARKER:
                self._opaque(comps)
            elif name.startswith(AUFS_META_PREFIX):
                log.debug("layer %s: skipping AUFS metadata %r", self.layer, m.name)
                return
            else:
                self._whiteout(comps, name[len(WHITEOUT_PREFIX):])
            self.files += 1
            return

        if m.isreg():
            kind = _FILE
        elif m.isdir():
            kind = _DIR
        elif m.issym():
            kind = _SYMLINK
        elif m.islnk():
            self._hardlink(comps, m)
            self.files += 1
            return
        elif m.isfifo():
            kind = _FIFO
        elif m.ischr() or m.isblk():
            raise self._unsafe("device nodes are not allowed in a layer")
        else:
            raise self._unsafe(f"unsupported tar entry type {m.type!r}")
        xattrs = self._xattrs(m)

        parent = self._parent_of(comps)
        path = f"{parent}/{name}" if parent else name
        old = self._clear(path, kind)
        full = f"{self.root}/{path}"
        if kind == _DIR:
            if old != _DIR:
                os.mkdir(full, 0o700)
                self._record(path, _DIR)
            self._meta_dir(path, m, xattrs)
            if old == _WHITEOUT:
                # the same layer deleted the lower one: the new dir must not merge with it
                self._set_opaque(path)
        elif kind == _FILE:
            self._write_file(full, m, tar, xattrs)
            self._record(path, _FILE)
        elif kind == _SYMLINK:
            target = m.linkname
            if not target or "\x00" in target:
                raise self._unsafe("empty or NUL-containing symlink target")
            os.symlink(target, full)
            self._record(path, _SYMLINK, target)
            self._chown(full, m.uid, m.gid, link=True)
            for xname, value in xattrs:
                if xname.startswith("user."):
                    continue  # the kernel refuses user.* on symlinks
                os.setxattr(full, xname, value, follow_symlinks=False)
            os.utime(full, ns=self._times(m), follow_symlinks=False)
        else:  # fifo
            os.mkfifo(full, 0o600)
            self._record(path, _FIFO)
            self._meta_path(full, m, xattrs)
        self.files += 1

    def _times(self, m: tarfile.TarInfo) -> tuple[int, int]:
        pax = m.pax_headers
        mt = _pax_time_ns(pax.get("mtime"), m.mtime) if pax else int(m.mtime) * 1_000_000_000
        at = _pax_time_ns(pax.get("atime"), mt / 1e9) if pax and "atime" in pax else mt
        return at, mt

    def _meta_dir(self, path: str, m: tarfile.TarInfo, xattrs: list[tuple[str, bytes]]) -> None:
        full = f"{self.root}/{path}" if path else self.root
        if path:
            self._chown(full, m.uid, m.gid, mode=m.mode & 0o7777)
        elif not self.rootless:
            os.lchown(full, m.uid, m.gid)
        os.chmod(full, m.mode & 0o7777)  # after chown, which clears setuid/setgid
        for xname, value in xattrs:
            os.setxattr(full, xname, value, follow_symlinks=False)
        # children change a directory's mtime: set it once they are all written
        self.dir_times[path] = self._times(m)

    def _meta_path(self, full: str, m: tarfile.TarInfo, xattrs: list[tuple[str, bytes]]) -> None:
        self._chown(full, m.uid, m.gid, mode=m.mode & 0o7777)
        os.chmod(full, m.mode & 0o7777)
        for xname, value in xattrs:
            os.setxattr(full, xname, value, follow_symlinks=False)
        os.utime(full, ns=self._times(m), follow_symlinks=False)

    def _write_file(self, full: str, m: tarfile.TarInfo, tar: tarfile.TarFile,
                    xattrs: list[tuple[str, bytes]]) -> None:
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            stream = cast(_TarStream, tar.fileobj)   # the TarFile unpack_layer made over a _TarStream
            stream.seek(m.offset_data)  # a no-op in stream mode unless tarfile lags
            if m.sparse is None:
                self._copy(stream, fd, m.size)
            else:
                # write only the data blocks: a tiny layer must not fill the disk with zeros
                # typeshed types TarInfo.sparse as an int; tarfile sets a list of (offset, size)
                for offset, length in cast("list[tuple[int, int]]", m.sparse):
                    os.lseek(fd, offset, os.SEEK_SET)
                    self._copy(stream, fd, length)
                os.ftruncate(fd, m.size)
            if self.rootless:
                self._chown(full, m.uid, m.gid, mode=m.mode & 0o7777)
            else:
                os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, m.mode & 0o7777)  # after chown, which clears setuid/setgid
            # after chown too: chown drops security.capability
            for xname, value in xattrs:
                os.setxattr(fd, xname, value)
            os.utime(fd, ns=self._times(m))
        finally:
            os.close(fd)

    def _copy(self, stream: _TarStream, fd: int, remaining: int) -> None:
        if stream.copy_to(fd, remaining) < remaining:
            raise self._unsafe("truncated file data")

    def _hardlink(self, comps: list[str], m: tarfile.TarInfo) -> None:
        tcomps = _components(m.linkname, self.layer, m.name)
        if not tcomps:
            raise self._unsafe("hardlink to the layer root")
        tparent = self._parent_of(tcomps, create=False)
        tpath = None if tparent is None else (f"{tparent}/{tcomps[-1]}" if tparent else tcomps[-1])
        tkind = self.created.get(tpath) if tpath is not None else None
        if tkind not in (_FILE, _SYMLINK, _FIFO):
            what = "a directory" if tkind == _DIR else "not an entry of this layer"
            raise self._unsafe(f"hardlink target {m.linkname!r} is {what}")
        assert tpath is not None   # a created entry's path (tkind is one)
        parent = self._parent_of(comps)
        path = f"{parent}/{comps[-1]}" if parent else comps[-1]
        if path == tpath or tpath.startswith(path + "/"):
            raise self._unsafe("hardlink to itself or into the entry it replaces")
        self._clear(path, tkind)
        os.link(f"{self.root}/{tpath}", f"{self.root}/{path}", follow_symlinks=False)
        self._record(path, tkind, self.symlinks[tpath] if tkind == _SYMLINK else None)

    def _whiteout(self, comps: list[str], target: str) -> None:
        if not target or target in (".", ".."):
            raise self._unsafe("whiteout of an invalid name")
        parent = self._parent_of(comps)
        path = f"{parent}/{target}" if parent else target
        old = self.created.get(path)
        if old is None:
            make_whiteout(f"{self.root}/{path}")
            self._record(path, _WHITEOUT)
        elif old == _DIR:
            # image-spec: a whiteout never hides what the same layer adds; it
            # still deletes the lower directory, so ours must not merge with it
            self._set_opaque(path)
        # a same-layer non-directory (or whiteout) already hides the lower entry

    def _opaque(self, comps: list[str]) -> None:
        parent = self._parent_of(comps)
        if parent:
            self._set_opaque(parent)
            return
        # overlayfs ignores the opaque xattr on a layer's root: whiteout each
        # lower top-level name instead (later entries of this layer replace them)
        if "" in self.opaque:
            return
        for name in self._lower_root_names():
            old = self.created.get(name)
            if old is None:
                make_whiteout(f"{self.root}/{name}")
                self._record(name, _WHITEOUT)
            elif old == _DIR:
                self._set_opaque(name)
        self.opaque.add("")

    def finish(self) -> None:
        for path, times in self.dir_times.items():
            os.utime(f"{self.root}/{path}" if path else self.root, ns=times, follow_symlinks=False)
        if not self.root_meta:
            os.chmod(self.root, 0o755)  # mkdtemp made it 0700


def _check_end(tar: tarfile.TarFile, reader: _TarStream, layer: str) -> None:
    """Refuse an archive that tarfile ended on something other than a zero block."""
    end = tar.offset
    if reader.size == end:
        return  # clean EOF without end-of-archive blocks (Go's archive/tar accepts it)
    block = reader.block_at(end, tarfile.BLOCKSIZE)
    if block is None:
        return
    if len(block) < tarfile.BLOCKSIZE:
        raise errors.UnsafeLayer(layer, "<stream>", f"truncated tar header at offset {end}")
    if block.count(0) != tarfile.BLOCKSIZE:
        raise errors.UnsafeLayer(layer, "<stream>", f"invalid tar header at offset {end}")


def unpack_layer(src: Readable, dest: Path, *, media_type: str, layer: str,
                 expected_diff_id: str | None = None, lower_dirs: Sequence[Path] = (),
                 max_size: int = DEFAULT_MAX_LAYER_SIZE, rootless: bool | None = None) -> UnpackResult:
    """Stream one layer blob into the new directory ``dest`` in overlayfs form.

    ``src`` is read to its end; an ``OSError`` it raises comes back unchanged.
    ``lower_dirs`` are the image's already
    unpacked lower layers, topmost first; they are only read, to resolve
    parents this layer does not contain. Works in a private temporary
    directory beside ``dest`` and renames it into place only once the whole
    stream is applied and its DiffID verified; on any failure nothing remains.
    ``rootless``: the store's answer (``Store.rootless``); None asks :func:`userns.rootless`.
    """
    dest = Path(dest)
    rootless_caller = userns.rootless() if rootless is None else rootless
    compression = compression_for(media_type, layer=layer)
    if expected_diff_id is not None and not (
        expected_diff_id.startswith("sha256:") and len(expected_diff_id) == 71
    ):
        raise errors.ManifestError(f"layer {layer}: unsupported DiffID {expected_diff_id!r}")
    if os.path.lexists(dest):
        raise errors.StoreError(f"layer {layer}: {dest} already exists")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent)
    except OSError as e:
        raise errors.StoreError(f"layer {layer}: cannot create a directory beside {dest}: {e.strerror}") from e
    inflow: _Inflow | None = None
    try:
        try:
            magic = _read_magic(src)
        except OSError as e:
            raise _SourceError(e) from e
        found = _detect(magic)
        if found != compression:
            raise errors.ManifestError(
                f"layer {layer}: media type {media_type} says {compression} but the blob is "
                f"{'an uncompressed tar (or not a tar)' if found == 'tar' else found}"
            )
        raw = _Prefixed(src, magic)
        inner: Readable
        if compression == "gzip":
            inner = _GzipReader(raw, layer)
        elif compression == "zstd":
            # zstandard reads only raw.read(n): any forward stream does, though its stubs ask for IO
            inner = zstandard.ZstdDecompressor().stream_reader(cast("IO[bytes]", raw), read_size=_RAW_CHUNK,
                                                               read_across_frames=True)
        else:
            inner = raw
        inflow = _Inflow(inner, max_size=max_size, layer=layer)
        reader = _TarStream(inflow)
        ext = _Extractor(layer, tmp, [str(p) for p in lower_dirs], rootless=rootless_caller)
        inflow.start()
        try:
            # a TarFile over our forward-only stream reads it as tarfile.open(mode="r|")
            # would, without tarfile's own (slow) stream adapter in between
            with tarfile.TarFile(fileobj=cast("IO[bytes]", reader), mode="r", tarinfo=_SafeTarInfo) as tar:
                while True:
                    m = tar.next()
                    if m is None:
                        break
                    ext.apply(m, tar)
                    tar.members.clear()  # type: ignore[attr-defined]  # TarFile keeps every TarInfo otherwise
                _check_end(tar, reader, layer)
            reader.drain()
            inflow.join()  # it ends once it queued the end of the stream, which drain took
        except tarfile.TarError as e:
            after = f" (after {ext.current!r})" if ext.current else ""
            raise errors.UnsafeLayer(layer, "<stream>", f"malformed tar stream{after}: {e}") from e
        except _OversizedHeader as e:
            raise errors.UnsafeLayer(layer, "<stream>", str(e)) from e
        except deflate.errors as e:
            raise errors.UnsafeLayer(layer, "<stream>", f"corrupt gzip stream: {e}") from e
        except zstandard.ZstdError as e:
            raise errors.UnsafeLayer(layer, "<stream>", f"corrupt zstd stream: {e}") from e
        try:
            ext.finish()
        except OSError as e:
            raise errors.StoreError(f"layer {layer}: setting directory times: {e.strerror}") from e
        diff_id = "sha256:" + inflow.hexdigest()
        if expected_diff_id is not None and diff_id != expected_diff_id:
            raise errors.DigestMismatch(f"layer {layer} DiffID", expected_diff_id, diff_id)
        if ext.owners:
            # only what still exists as written: a later entry may have replaced a path
            # (every created path's parents are directories the extractor made)
            rootless_store.restore_owners(Path(tmp), [(p, *o) for p, o in ext.owners.items() if p in ext.created],
                                          what=f"layer {layer}")
        try:
            # rename(2) refuses a non-empty dest; an empty one can only be the
            # same (empty) layer unpacked concurrently
            os.rename(tmp, dest)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise errors.StoreError(f"layer {layer}: {dest} already exists") from e
            raise errors.StoreError(f"layer {layer}: cannot move into {dest}: {e.strerror}") from e
        log.debug("layer %s: unpacked %d entries, %d bytes into %s", layer, ext.files, reader.size, dest)
        return UnpackResult(diff_id=diff_id, size=reader.size, files=ext.files)
    except BaseException as e:
        if inflow is not None:
            inflow.stop()
        try:
            # restored owners may need the user namespace's root
            rootless_store.remove_tree(tmp, rootless=rootless_caller)
        except (OSError, errors.ContainError):
            pass
        if os.path.lexists(tmp):
            log.warning("layer %s: could not remove %s", layer, tmp)
        if isinstance(e, _SourceError):
            raise e.args[0] from None  # the caller's own stream failed: give its error back
        raise


# --- views of unpacked trees ------------------------------------------------

def _entry(path: str, st: os.stat_result) -> tuple:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                h.update(chunk)
        kind, size, digest = "file", st.st_size, h.hexdigest()
    elif stat.S_ISDIR(mode):
        kind, size, digest = "dir", 0, ""
    elif stat.S_ISLNK(mode):
        target = os.fsencode(os.readlink(path))
        kind, size, digest = "symlink", len(target), hashlib.sha256(target).hexdigest()
    elif stat.S_ISFIFO(mode):
        kind, size, digest = "fifo", 0, ""
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "char" if stat.S_ISCHR(mode) else "block"
        size, digest = 0, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    else:
        kind, size, digest = "socket", 0, ""
    xattrs = tuple(sorted(_lower_xattrs(path)))
    return (kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, size, digest, xattrs)


def tree_manifest(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (relative, '/'-separated) ->
    (type, mode, uid, gid, size, sha256 of content or symlink target, xattrs).

    The root itself is not listed. ``xattrs`` is a sorted tuple of
    (name, value) without the ``trusted.overlay.*`` ones.
    """
    out: dict[str, tuple] = {}
    base = os.fspath(root)

    def walk(rel: str) -> None:
        with os.scandir(f"{base}/{rel}" if rel else base) as it:
            entries = list(it)
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            out[r] = _entry(e.path, st)
            if stat.S_ISDIR(st.st_mode):
                walk(r)

    walk("")
    return out


def merged_view_manifest(layer_dirs_topmost_first: Sequence[Path]) -> dict[str, tuple]:
    """``tree_manifest`` of what an overlay mount of these lowerdirs shows.

    Pure Python: whiteouts (char 0:0) hide, ``trusted.overlay.opaque=y`` on a
    directory hides the layers below it (ignored on a layer root, as overlayfs
    does), the topmost entry of a name gives its attributes.
    """
    layers = [os.fspath(p) for p in layer_dirs_topmost_first]
    out: dict[str, tuple] = {}

    def walk(rel: str, stack: list[str]) -> None:
        first: dict[str, tuple[int, os.stat_result]] = {}
        for idx, base in enumerate(stack):
            d = f"{base}/{rel}" if rel else base
            with os.scandir(d) as it:
                for e in it:
                    if e.name not in first:
                        first[e.name] = (idx, e.stat(follow_symlinks=False))
        for name, (idx, st) in first.items():
            if is_whiteout(st):
                continue
            r = f"{rel}/{name}" if rel else name
            top = f"{stack[idx]}/{r}"
            out[r] = _entry(top, st)
            if not stat.S_ISDIR(st.st_mode):
                continue
            sub = [stack[idx]]
            if not is_opaque(top):
                for base in stack[idx + 1:]:
                    try:
                        s = os.lstat(f"{base}/{r}")
                    except FileNotFoundError:
                        continue
                    if not stat.S_ISDIR(s.st_mode):
                        break
                    sub.append(base)
                    if is_opaque(f"{base}/{r}"):
                        break
            walk(r, sub)

    walk("", layers)
    return out
