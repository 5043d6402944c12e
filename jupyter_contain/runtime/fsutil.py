"""Small file-system helpers shared by the runtime's rooms (file I/O only, no syscalls beyond it)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


def fsync_dir(path: Path | str) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path | str, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write a file so readers see the old or the new content, never half of it.

    Yields a binary file in the same folder; on success it is fsynced, given
    ``mode`` and renamed over ``path``; on any error it is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o644) -> None:
    """:func:`atomic_writer` for bytes in hand."""
    with atomic_writer(path, mode=mode) as f:
        f.write(data)


def remove_tree(path: Path | str) -> None:
    """Remove a tree we own, without recursion (hostile layers can be thousands of levels deep).

    Never follows symlinks; tolerates entries vanishing underneath; for a
    non-root owner, makes read-only directories writable first.
    """
    top = os.fspath(path)
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(top)
        return
    stack = [top]
    while stack:
        d = stack[-1]
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            stack.pop()
            continue
        except PermissionError:
            os.chmod(d, 0o700)
            continue
        subdirs = []
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.path)
                continue
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass
            except PermissionError:
                os.chmod(d, 0o700)
                os.unlink(e.path)
        if subdirs:
            stack.extend(subdirs)
            continue
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except PermissionError:
            os.chmod(os.path.dirname(d), 0o700)
            os.rmdir(d)
        stack.pop()
