"""The build context and the other trees COPY/ADD read from, as untrusted input.

Owns reading the context folder (``.containerignore`` / ``.dockerignore``
patterns with Docker's semantics: ``**``, ``!`` exceptions, the last match
wins, a pattern excludes everything beneath a match), resolving COPY/ADD
sources in it (globs; ``..`` and absolute symlinks that lead out of the
context are refused, never followed), and reading a stage's or an image's
merged root file system from the store's unpacked layers (whiteouts, opaque
directories, symlinks resolved inside that root). Each tree yields
:class:`Entry` records that :mod:`.files` copies and hashes.

Must not write anything. Every path into the context is opened beneath a
held directory fd with ``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`` (a
symlink named directly as a source is resolved with ``RESOLVE_BENEATH``:
inside only), files with ``O_NOFOLLOW|O_NONBLOCK`` and checked to be the
file that was listed; device nodes, sockets and fifos are left out.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import BuildError
from ..fsutil import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, openat2

log = logging.getLogger(__name__)

IGNORE_FILES = (".containerignore", ".dockerignore")
#: entries one COPY source may expand to (a context of millions of files is a mistake, not a build)
MAX_ENTRIES = 1_000_000
_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_GLOB_CHARS = re.compile(r"[*?\[]")


# --- ignore patterns ---------------------------------------------------------------------------


def _glob_regex(pattern: str, *, doublestar: bool = True) -> re.Pattern[str]:
    """A Go ``filepath.Match`` pattern (plus ``**`` for any number of folders) as a regex."""
    out = []
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if doublestar and pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):   # "**/" matches zero or more folders
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                raise BuildError(f"bad pattern {pattern!r}: unterminated [")
            body = pattern[i + 1:j]
            if body.startswith("^"):
                body = "!" + body[1:]
            out.append("[" + ("^" + re.escape(body[1:]).replace(r"\-", "-") if body.startswith("!")
                              else re.escape(body).replace(r"\-", "-")) + "]")
            i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.S)


@dataclass(frozen=True)
class IgnoreRules:
    """Compiled ``.containerignore`` patterns: (regex, exclusion?) in file order."""

    rules: tuple[tuple[re.Pattern[str], bool], ...] = ()
    source: str = ""

    @classmethod
    def parse(cls, text: str, *, source: str = "") -> IgnoreRules:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:].strip()
            line = posixpath.normpath(line).lstrip("/")
            if line in ("", "."):
                continue
            rules.append((_glob_regex(line), negate))
        return cls(tuple(rules), source)

    def excluded(self, rel: str) -> bool:
        """Whether ``rel`` (a path in the context, no leading slash) is left out.

        As moby's patternmatcher: the last pattern that matches the path or
        one of its parent folders decides.
        """
        if not self.rules or not rel:
            return False
        parents = []
        p = rel
        while p:
            parents.append(p)
            p = posixpath.dirname(p)
        out = False
        for rx, negate in self.rules:
            if any(rx.match(q) for q in parents):
                out = not negate
        return out

    def could_include_below(self, rel: str) -> bool:
        """An excluded folder is still walked if an exception pattern may re-include something beneath."""
        return any(negate for _, negate in self.rules)


def load_ignore(context: Path, containerfile_name: str | None = None) -> IgnoreRules:
    """The context's ignore rules: ``<Containerfile>.containerignore`` / ``.dockerignore`` beside it first,
    then ``.containerignore``, then ``.dockerignore`` (the first that exists, as podman reads them)."""
    names = []
    if containerfile_name:
        base = posixpath.basename(containerfile_name)
        names += [f"{base}.containerignore", f"{base}.dockerignore"]
    names += list(IGNORE_FILES)
    fd = os.open(context, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names:
            try:
                f = openat2(fd, name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, _BENEATH)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise BuildError(f"cannot read {name} in the build context: {e.strerror}") from None
            with os.fdopen(f, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise BuildError(f"{name} in the build context is not a regular file")
                data = fh.read(1 << 20)
            return IgnoreRules.parse(data.decode("utf-8", "replace"), source=name)
    finally:
        os.close(fd)
    return IgnoreRules()


# --- entries --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One thing a COPY reads: ``rel`` below the source root, as found (never followed)."""

    rel: str            # path in its tree, no leading slash ("" = the root)
    kind: str           # "file", "dir", "symlink"
    mode: int           # permission bits (and setuid/setgid/sticky)
    uid: int
    gid: int
    size: int
    mtime: int          # whole seconds
    link: str = ""      # symlink target
    ino: tuple[int, int] = (0, 0)
    #: (dev, ino, size, mtime_ns, ctime_ns): what the file hash cache recognises a file by
    stamp: tuple[int, ...] = ()


def _kind(st: os.stat_result) -> str | None:
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return None


def _entry(rel: str, st: os.stat_result, link: str = "") -> Entry:
    kind = _kind(st)
    assert kind is not None
    return Entry(rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size if kind == "file" else 0,
                 int(st.st_mtime), link, (st.st_dev, st.st_ino),
                 (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


class ContextTree:
    """The build context folder, read beneath a held fd (see the module text)."""

    def __init__(self, root: Path, ignore: IgnoreRules) -> None:
        self.root = Path(root)
        self.ignore = ignore
        try:
            self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise BuildError(f"build context {root}: {e.strerror}") from None
        self._real = os.path.realpath(f"/proc/self/fd/{self.fd}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ContextTree:  # noqa: PYI034 - a final class
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # paths -----------------------------------------------------------------------------

    def clean(self, src: str, what: str) -> str:
        """A source as written -> a path in the context; ``..`` out of it is refused."""
        if "\0" in src:
            raise BuildError(f"{what}: source path {src!r} holds a NUL byte")
        norm = posixpath.normpath("/" + src) if src.startswith("/") else posixpath.normpath(src)
        if norm == ".." or norm.startswith("../"):
            raise BuildError(f"{what}: source {src!r} is outside the build context")
        return norm.lstrip("/").removeprefix("./") if norm not in (".", "/") else ""

    def resolve(self, rel: str, what: str) -> str:
        """Follow symlinks of ``rel`` inside the context; refuse one that leads out of it."""
        if not rel:
            return ""
        try:
            fd = openat2(self.fd, rel, os.O_PATH | os.O_CLOEXEC, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        except FileNotFoundError:
            raise BuildError(f"{what}: source {rel!r} not found in the build context") from None
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ELOOP):
                raise BuildError(f"{what}: source {rel!r} leads outside the build context (a symlink or '..'): "
                                 "refused") from None
            raise BuildError(f"{what}: source {rel!r}: {e.strerror}") from None
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if real == self._real:
            return ""
        if not real.startswith(self._real.rstrip("/") + "/"):
            raise BuildError(f"{what}: source {rel!r} leads outside the build context: refused")
        return real[len(self._real.rstrip("/")) + 1:]

    def lstat(self, rel: str) -> os.stat_result | None:
        try:
            if not rel:
                return os.fstat(self.fd)
            fd = openat2(self.fd, rel, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, _BENEATH)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ELOOP):
                return None
            raise
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def open_file(self, e: Entry) -> int:
        """An fd to read file entry ``e`` (the same inode that was listed, else an error)."""
        rel = e.rel
        try:
            fd = openat2(self.fd, rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, _BENEATH)
        except OSError as err:
            raise BuildError(f"cannot read {rel!r} in the build context: {err.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != e.ino:
            os.close(fd)
            raise BuildError(f"{rel!r} in the build context changed while the build read it")
        return fd

    def readlink(self, rel: str) -> str:
        fd = openat2(self.fd, rel, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, _BENEATH)
        try:
            return os.readlink("", dir_fd=fd)
        finally:
            os.close(fd)

    # walking ---------------------------------------------------------------------------

    def walk(self, rel: str, *, excludes: IgnoreRules | None = None) -> Iterator[Entry]:
        """``rel`` and everything beneath (names sorted by bytes), ignored paths left out.

        ``rel`` itself is given as it is (a symlink is not followed here:
        :meth:`resolve` first for a named source).
        """
        st = self.lstat(rel)
        if st is None:
            raise BuildError(f"source {rel!r} not found in the build context")
        count = 0
        # (path, stat, hidden): a hidden folder is excluded but walked for what a '!' pattern re-includes
        stack: list[tuple[str, os.stat_result, bool]] = [(rel, st, False)]
        negations = self.ignore.could_include_below(rel)
        while stack:
            r, st, hidden = stack.pop()
            kind = _kind(st)
            if kind is None:
                log.warning("build context: %s is not a file, folder or symlink: left out", r)
                continue
            count += 1
            if count > MAX_ENTRIES:
                raise BuildError(f"source {rel!r} holds more than {MAX_ENTRIES} entries")
            if not hidden:
                yield _entry(r, st, self.readlink(r) if kind == "symlink" else "")
            if kind != "dir":
                continue
            try:
                dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd) if not r else \
                    openat2(self.fd, r, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, _BENEATH)
            except OSError as e:
                raise BuildError(f"cannot read folder {r or '.'!r} of the build context: {e.strerror}") from None
            children = []
            try:
                for name in sorted(os.listdir(dfd), key=os.fsencode):
                    child = f"{r}/{name}" if r else name
                    if excludes is not None and excludes.excluded(child[len(rel) + 1:] if rel else child):
                        continue
                    try:
                        cst = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    ignored = self.ignore.excluded(child)
                    if ignored and not (negations and stat.S_ISDIR(cst.st_mode)):
                        continue
                    children.append((child, cst, ignored))
            finally:
                os.close(dfd)
            stack.extend(reversed(children))

    def glob(self, pattern: str, what: str) -> list[str]:
        """Context paths (not ignored) matching a COPY source pattern, sorted."""
        rx = _glob_regex(pattern, doublestar=False)
        # walk only below the pattern's fixed leading folders
        fixed = []
        for part in pattern.split("/"):
            if _GLOB_CHARS.search(part):
                break
            fixed.append(part)
        base = "/".join(fixed)
        if base and self.lstat(base) is None:
            return []
        depth = pattern.count("/") + 1
        out = []
        for e in self.walk(base):
            if e.rel.count("/") + 1 > depth:
                continue
            if e.rel and rx.match(e.rel) and not self.ignore.excluded(e.rel):
                out.append(e.rel)
        return out

    def has_glob(self, src: str) -> bool:
        return bool(_GLOB_CHARS.search(src))


# --- an image's (or a stage's) merged root ---------------------------------------------------------


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: str) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


class ImageTree:
    """The merged root of unpacked layers (topmost first), read without mounting them.

    The layers are the store's own, unpacked by ``layers.unpack_layer`` (no
    entry escapes its layer): plain paths are fine here; symlinks are resolved
    inside this root as a container would see them.
    """

    def __init__(self, lowers: Sequence[Path]) -> None:
        self.lowers = [os.fspath(p) for p in lowers]
        self._stacks: dict[str, tuple[int, ...]] = {"": tuple(range(len(self.lowers)))}
        self.ignore = IgnoreRules()

    def _stack(self, rel: str) -> tuple[int, ...]:
        got = self._stacks.get(rel)
        if got is not None:
            return got
        below = self._stack(posixpath.dirname(rel))
        out: list[int] = []
        for i in below:
            p = f"{self.lowers[i]}/{rel}"
            try:
                st = os.lstat(p)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISDIR(st.st_mode):
                break
            out.append(i)
            if _opaque(p):
                break
        self._stacks[rel] = tuple(out)
        return self._stacks[rel]

    def where(self, rel: str) -> tuple[str, os.stat_result] | None:
        """(host path, stat) of what the merged root shows at ``rel`` (not followed), or None."""
        if not rel:
            return (self.lowers[0], os.lstat(self.lowers[0])) if self.lowers else None
        for i in self._stack(posixpath.dirname(rel)):
            p = f"{self.lowers[i]}/{rel}"
            try:
                st = os.lstat(p)
            except (FileNotFoundError, NotADirectoryError):
                continue
            return None if _is_whiteout(st) else (p, st)
        return None

    def lstat(self, rel: str) -> os.stat_result | None:
        w = self.where(rel)
        return w[1] if w else None

    def resolve(self, rel: str, what: str = "", *, follow_last: bool = True) -> str:
        """``rel`` with every symlink followed inside this root (as ``chroot`` would); missing tails kept."""
        parts = [p for p in rel.split("/") if p and p != "."]
        done: list[str] = []
        hops = 0
        while parts:
            p = parts.pop(0)
            if p == "..":
                if done:
                    done.pop()
                continue
            cur = "/".join(done + [p])
            st = self.lstat(cur)
            if st is not None and stat.S_ISLNK(st.st_mode) and (parts or follow_last):
                hops += 1
                if hops > 40:
                    raise BuildError(f"{what}: too many levels of symbolic links at /{cur}")
                target = os.readlink(self.where(cur)[0])  # type: ignore[index]
                if target.startswith("/"):
                    done = []
                parts = [x for x in target.split("/") if x and x != "."] + parts
                continue
            done.append(p)
        return "/".join(done)

    def names(self, rel: str) -> list[str]:
        seen: dict[str, bool] = {}
        for i in self._stack(rel):
            d = f"{self.lowers[i]}/{rel}" if rel else self.lowers[i]
            with os.scandir(d) as it:
                for e in it:
                    if e.name not in seen:
                        seen[e.name] = not _is_whiteout(e.stat(follow_symlinks=False))
        return sorted((n for n, shown in seen.items() if shown), key=os.fsencode)

    def readlink(self, rel: str) -> str:
        w = self.where(rel)
        assert w is not None
        return os.readlink(w[0])

    def open_file(self, e: Entry) -> int:
        w = self.where(e.rel)
        if w is None:
            raise BuildError(f"/{e.rel} vanished from the stage")
        return os.open(w[0], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)

    def walk(self, rel: str, *, excludes: IgnoreRules | None = None) -> Iterator[Entry]:
        st = self.lstat(rel)
        if st is None:
            raise BuildError(f"/{rel} not found")
        stack = [(rel, st)]
        while stack:
            r, st = stack.pop()
            kind = _kind(st)
            if kind is None:
                continue
            yield _entry(r, st, self.readlink(r) if kind == "symlink" else "")
            if kind == "dir":
                kids = []
                for name in self.names(r):
                    child = f"{r}/{name}" if r else name
                    if excludes is not None and excludes.excluded(child[len(rel) + 1:] if rel else child):
                        continue
                    cst = self.lstat(child)
                    if cst is not None:
                        kids.append((child, cst))
                stack.extend(reversed(kids))

    def clean(self, src: str, what: str) -> str:
        return posixpath.normpath("/" + src).lstrip("/")

    def has_glob(self, src: str) -> bool:
        return bool(_GLOB_CHARS.search(src))

    def glob(self, pattern: str, what: str) -> list[str]:
        rx = _glob_regex(pattern, doublestar=False)
        depth = pattern.count("/") + 1
        fixed = []
        for part in pattern.split("/"):
            if _GLOB_CHARS.search(part):
                break
            fixed.append(part)
        base = "/".join(fixed)
        if self.lstat(base) is None:
            return []
        return [e.rel for e in self.walk(base) if e.rel and e.rel.count("/") + 1 <= depth and rx.match(e.rel)]


__all__ = ["ContextTree", "Entry", "IgnoreRules", "ImageTree", "load_ignore"]
