"""COPY/ADD: plan what lands where, hash it for the cache, write it as a layer folder.

Owns the copy semantics (a folder source copies its contents, a file into a
folder destination keeps its name, ``--chown``/``--chmod``, destinations
resolved through the image's symlinks as a container would see them, parent
folders keeping the image's metadata), the content hash a cache key uses, and
writing the planned entries into a private folder in overlay form that
``store_layer_dir`` archives. Must not start containers or touch the store
beyond the private folder it is given.

Determinism (same inputs, same DiffID): entries are written in a fixed order
and the layer tar sorts them again; files keep their source's mode and
whole-second mtime (Docker's and BuildKit's COPY keep source mtimes too);
what the build makes itself (parent folders that did not exist, heredoc
files, downloads without Last-Modified) gets the time ``SOURCE_DATE_EPOCH``
names, else 0, never the clock. Owners are 0:0 for the context unless
``--chown``; files from a stage or an extracted tar keep theirs.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import BuildError
from ..fsutil import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, openat2
from .context import Entry

_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

_CHUNK = 1 << 20


def fixed_mtime() -> int:
    """The time of what the build makes itself: ``SOURCE_DATE_EPOCH`` or 0."""
    try:
        return max(0, int(os.environ.get("SOURCE_DATE_EPOCH", "0")))
    except ValueError:
        return 0


@dataclass(frozen=True)
class Planned:
    """One entry to write: where, what, with which metadata, and where its bytes come from."""

    dest: str                       # path in the image, no leading slash
    kind: str                       # file, dir, symlink
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int = 0
    link: str = ""
    tree: object | None = None      # read entry from this tree...
    entry: Entry | None = None
    data: bytes | None = None       # ... or these bytes (heredocs)
    path: Path | None = None        # ... or this host file (a download)

    def open(self) -> int:
        if self.path is not None:
            return os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        assert self.tree is not None and self.entry is not None
        return self.tree.open_file(self.entry)  # type: ignore[attr-defined]


def plan_entries(tree: object, entries: Sequence[Entry], *, src_root: str, dest: str, is_dir_source: bool,
                 dest_is_dir: bool, owner: tuple[int, int] | None, keep_owner: bool, chmod: int | None
                 ) -> list[Planned]:
    """Entries of one source (its walk) -> planned writes under ``dest``."""
    out = []
    for e in entries:
        if is_dir_source:
            sub = e.rel[len(src_root):].lstrip("/") if src_root else e.rel
            if not sub:
                continue   # the folder itself: its contents are copied, not the folder
            target = posixpath.join(dest, sub) if dest else sub
        else:
            target = posixpath.join(dest, posixpath.basename(e.rel)) if dest_is_dir else dest
        uid, gid = owner if owner is not None else ((e.uid, e.gid) if keep_owner else (0, 0))
        mode = e.mode
        if chmod is not None and e.kind != "symlink":
            mode = chmod
        out.append(Planned(target, e.kind, mode, uid, gid, e.mtime, e.size, e.link, tree, e))
    return out


def content_hash(plan: Sequence[Planned], *, extra: bytes = b"",
                 known: MutableMapping[str, str] | None = None) -> str:
    """A hash of what the layer will hold (names, kinds, modes, owners, sizes, link targets, bytes).

    Mtimes are left out, as Docker's content checksums leave them out: a
    touched file with the same bytes hits the cache. ``known``: file digests
    by stat stamp (device, inode, size, mtime and ctime in ns, as git's index
    recognises unchanged files): a file whose stamp is known is not read
    again (a 20 MB context: 15 of a cached rebuild's 22 ms).
    """
    h = hashlib.sha256(extra)
    for p in plan:
        h.update(f"{p.dest}\0{p.kind}\0{p.mode:o}\0{p.uid}:{p.gid}\0{p.size}\0{p.link}\0".encode(
            "utf-8", "surrogateescape"))
        if p.kind == "file":
            if p.data is not None:
                h.update(hashlib.sha256(p.data).digest())
                continue
            stamp = ":".join(map(str, p.entry.stamp)) if p.entry is not None and p.entry.stamp else ""
            got = known.get(stamp) if known is not None and stamp else None
            if got is None:
                fd = p.open()
                try:
                    fh = hashlib.sha256()
                    while chunk := os.read(fd, _CHUNK):
                        fh.update(chunk)
                finally:
                    os.close(fd)
                got = fh.hexdigest()
                if known is not None and stamp:
                    known[stamp] = got
            h.update(bytes.fromhex(got))
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class ParentMeta:
    mode: int
    uid: int
    gid: int
    mtime: int


def write_layer(stage: Path, plan: Sequence[Planned], *, parent_meta: Callable[[str], ParentMeta | None],
                new_dir_owner: tuple[int, int] = (0, 0), progress: Callable[[int], None] | None = None) -> None:
    """Write ``plan`` into ``stage`` (a fresh private folder) in overlay form, in the plan's order.

    ``parent_meta(rel)``: what the image has at a parent folder (its
    metadata is kept in the layer), None where the build creates it. A later
    entry replaces an earlier one at the same path, as Docker's copy of one
    source after another does. The plan comes from untrusted input (a
    context may hold a symlink ``x -> /etc`` in one source and ``x/file`` in
    another): every entry is made relative to its parent folder opened
    beneath ``stage`` with no symlink followed, so nothing lands outside it.
    """
    made_dirs: dict[str, tuple[int, int, int, int]] = {}   # rel -> mode, uid, gid, mtime (set at the end)
    fixed = fixed_mtime()
    root = os.open(stage, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def open_dir(rel: str, flags: int = os.O_PATH) -> int:
        if not rel:
            return os.dup(root)
        try:
            return openat2(root, rel, flags | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, _BENEATH)
        except OSError as e:
            raise BuildError(f"/{rel}: not a folder where the copy needs one ({e.strerror})") from None

    def forget_below(rel: str) -> None:
        for d in [d for d in made_dirs if d == rel or d.startswith(rel + "/")]:
            del made_dirs[d]

    def ensure_parent(rel: str) -> None:
        parent = posixpath.dirname(rel)
        chain = []
        while parent and parent not in made_dirs:
            chain.append(parent)
            parent = posixpath.dirname(parent)
        for d in reversed(chain):
            meta = parent_meta(d)
            made_dirs[d] = (0o755, *new_dir_owner, fixed) if meta is None else \
                (meta.mode, meta.uid, meta.gid, meta.mtime)
            pfd = open_dir(posixpath.dirname(d))
            name = posixpath.basename(d)
            try:
                try:
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        os.unlink(name, dir_fd=pfd)
                        os.mkdir(name, 0o700, dir_fd=pfd)
                except FileNotFoundError:
                    os.mkdir(name, 0o700, dir_fd=pfd)
            finally:
                os.close(pfd)

    try:
        for item in plan:
            if not item.dest:
                continue   # the root itself
            ensure_parent(item.dest)
            pfd = open_dir(posixpath.dirname(item.dest))
            name = posixpath.basename(item.dest)
            try:
                try:
                    st: os.stat_result | None = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                if st is not None and not (stat.S_ISDIR(st.st_mode) and item.kind == "dir"):
                    # a later source replaces an earlier one at the same path (as Docker's copy does)
                    if stat.S_ISDIR(st.st_mode):
                        import shutil
                        shutil.rmtree(name, dir_fd=pfd)  # type: ignore[call-arg]  # fd-based: no symlink followed
                        forget_below(item.dest)
                    else:
                        os.unlink(name, dir_fd=pfd)
                    st = None
                if item.kind == "dir":
                    if st is None:
                        os.mkdir(name, 0o700, dir_fd=pfd)
                    made_dirs[item.dest] = (item.mode, item.uid, item.gid, item.mtime)
                elif item.kind == "symlink":
                    os.symlink(item.link, name, dir_fd=pfd)
                    os.chown(name, item.uid, item.gid, dir_fd=pfd, follow_symlinks=False)
                    os.utime(name, (item.mtime, item.mtime), dir_fd=pfd, follow_symlinks=False)
                else:
                    written = _write_file(pfd, name, item)
                    if progress is not None:
                        progress(written)
            finally:
                os.close(pfd)
        # folders last, deepest first: writing into a folder changes its mtime
        for rel in sorted(made_dirs, key=lambda r: r.count("/"), reverse=True):
            mode, uid, gid, mtime = made_dirs[rel]
            fd = open_dir(rel, os.O_RDONLY)
            try:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
    finally:
        os.close(root)


def _write_file(pfd: int, name: str, item: Planned) -> int:
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
    try:
        if item.data is not None:
            os.write(out, item.data)
            written = len(item.data)
        else:
            src = item.open()
            try:
                written = _copy(src, out)
            finally:
                os.close(src)
        if item.entry is not None and written != item.size:
            raise BuildError(f"{item.entry.rel!r} changed size while the build copied it")
        os.fchown(out, item.uid, item.gid)
        os.fchmod(out, item.mode)
        os.utime(out, (item.mtime, item.mtime))
    finally:
        os.close(out)
    return written


def _copy(src: int, dst: int) -> int:
    total = 0
    try:
        while n := os.copy_file_range(src, dst, 1 << 30):
            total += n
        return total
    except OSError:
        pass   # across file systems on old kernels, or special files: plain reads
    while chunk := os.read(src, _CHUNK):
        os.write(dst, chunk)
        total += len(chunk)
    return total


__all__ = ["ParentMeta", "Planned", "content_hash", "fixed_mtime", "plan_entries", "write_layer"]
