"""Small file-system helpers shared by the runtime's rooms (file I/O only, no syscalls beyond it)."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: Path | str) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_tmp_counter = itertools.count()


def _open_tmp(path: Path, flags: int) -> tuple[int, Path]:
    """A new temporary file beside ``path``: (fd, its path), mode 0600.

    Named by pid, thread and a counter, without tempfile's random names:
    unique unless a dead process of the same pid left one (then: the next).
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{next(_tmp_counter)}.tmp")
        try:
            return os.open(tmp, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def _replacing(path: Path, flags: int, *, mode: int, durable: bool) -> Iterator[int]:
    """A temporary fd beside ``path``: renamed over it when the block ends well, removed otherwise."""
    fd, tmp = _open_tmp(path, flags)
    try:
        try:
            os.fchmod(fd, mode)
            yield fd
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_writer(path: Path | str, *, mode: int = 0o644, durable: bool = True) -> Iterator[BinaryIO]:
    """Write a file so readers see the old or the new content, never half of it.

    Yields a binary file in the same folder; on success it is given ``mode``
    and renamed over ``path``; on any error it is removed. ``durable`` also
    fsyncs the file and its folder, so the new content survives a power cut:
    the store's documents need that; a container's transient state does not
    (gc recognises a container that lost its state), and skips the cost.
    """
    with _replacing(Path(path), os.O_RDWR, mode=mode, durable=durable) as fd:
        with os.fdopen(fd, "wb", closefd=False) as f:
            yield f


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """:func:`atomic_writer` for bytes in hand (written with plain syscalls: no buffered file)."""
    with _replacing(Path(path), os.O_WRONLY, mode=mode, durable=durable) as fd:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


def read_small(path: Path | str) -> bytes:
    """A small file's bytes with three syscalls (``Path.read_bytes`` makes about seven)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        while True:
            b = os.read(fd, 65536)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    finally:
        os.close(fd)


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
                # most are empty (a container's work dir, a mount point): an
                # rmdir that works saves scanning them
                try:
                    os.rmdir(e.path)
                except FileNotFoundError:
                    pass
                except OSError:
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


class _LockState:
    """In-process bookkeeping for one lock file (see :func:`file_lock`)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.readers = 0
        self.writer = False
        self.ready = False     # the inter-process lock is held for the current readers
        self.fd = -1


_locks: dict[str, _LockState] = {}
_locks_guard = threading.Lock()


def _state(path: str) -> _LockState:
    with _locks_guard:
        st = _locks.get(path)
        if st is None:
            st = _locks[path] = _LockState()
        return st


@contextlib.contextmanager
def file_lock(path: Path | str, *, shared: bool = False) -> Iterator[None]:
    """A lock between processes AND between threads, that child processes do not inherit.

    ``flock`` locks belong to the open file, so a container child cloned by
    another thread (it holds copies of every fd until its execve) would keep
    a lock alive after its owner released it: a deadlock waiting to happen in a
    threaded server. POSIX record locks (``lockf``) are not inherited by
    children, but are per process, so threads are ordered here by a condition
    variable, with the first shared holder taking the file lock for all.
    """
    key = os.fspath(path)
    st = _state(key)
    take = False
    with st.cond:
        if shared:
            while st.writer:
                st.cond.wait()
            st.readers += 1
            take = st.readers == 1
            while not take and not st.ready:
                st.cond.wait()
                if st.readers == 0:   # pragma: no cover - the taker failed; try again as the taker
                    break
        else:
            while st.writer or st.readers:
                st.cond.wait()
            st.writer = True
            take = True
    if take:
        try:
            fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            with st.cond:
                if shared:
                    st.readers -= 1
                else:
                    st.writer = False
                st.cond.notify_all()
            raise
        with st.cond:
            st.fd = fd
            st.ready = shared
            st.cond.notify_all()
    try:
        yield
    finally:
        with st.cond:
            if shared:
                st.readers -= 1
                last = st.readers == 0
            else:
                st.writer = False
                last = True
            if last:
                os.close(st.fd)   # closing drops the process's record lock
                st.fd = -1
                st.ready = False
            st.cond.notify_all()


# --- openat2: opening beneath a held directory without following what a container planted ---------

#: ``resolve`` flags of openat2(2)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

#: the syscall number: the same on every architecture that has openat2 (it came after the unification)
_SYS_OPENAT2 = 437
_openat2_call: Any = None


def _openat2_binding() -> Any:
    """ctypes for the syscall, made on first use (no import-time work)."""
    global _openat2_call
    if _openat2_call is None:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.syscall.restype = ctypes.c_long

        class How(ctypes.Structure):
            _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

        def call(dirfd: int, path: bytes, flags: int, mode: int, resolve: int) -> int:
            how = How(flags, mode, resolve)
            fd = libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), path, ctypes.byref(how),
                              ctypes.c_size_t(ctypes.sizeof(how)))
            return int(fd) if fd >= 0 else -ctypes.get_errno()

        _openat2_call = call
    return _openat2_call


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): ``path`` opened relative to ``dirfd`` under the ``resolve`` rules; returns the fd.

    The way host code opens a path a container can change (its socket
    folder, its writable layer): with ``RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS``
    nothing a container planted (a symlink, ``..``) leads the open anywhere
    else, and the kernel checks every component in the one call, so there is
    no window between a check and the open. ``O_CLOEXEC`` is always added.
    Raises OSError (ENOSYS before Linux 5.6).
    """
    fd = _openat2_binding()(dirfd, os.fsencode(path), flags | os.O_CLOEXEC, mode, resolve)
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd), path)
    return fd
