"""A contained kernel's folder: what the host shares with the kernel, and how it reaches its sockets.

Owns the per-kernel layout and every host-side touch of it. The rule it keeps:
nothing the container can write is ever resolved, opened, written, removed or
connected to by host code through a path. The container can write only its
own small tmpfs, which the host reaches through a folder fd pinned before the
container ran anything; what the host writes for the kernel is either put
there before that moment or kept in a folder the container sees read-only.

On the host (``kernel_runtime_dir()/<kernel id>``, mode 0700, the server's;
the container never sees it whole)::

    ch/            bound read-only (idmapped) at the same path inside: the host
                   channel's socket (host.sock, bound by the host), previous-death,
                   and s/ (a mount point, empty on the host)
    h/             host only: k-<port> symlinks to /proc/<server pid>/fd/<n>, fds
                   pinned to the kernel's own socket inodes (see SocketPins)

In the container::

    <same path>/   = ch/, read-only
    <same path>/s/ a tmpfs of the container's own (64 KiB, 128 inodes, new at every
                   start, charged to the container's memory cgroup): connection.json
                   (written by the host through the pinned fd before the container
                   runs: ipykernel rewrites and removes it, so it must be writable
                   there) and the kernel's ipc sockets k-<port>

Why the sockets are reached through pinned fds: a unix socket's ``connect`` follows
symlinks, so a kernel that could replace ``k-5`` with a symlink to a host socket
would make the server connect there. Here the server connects to ``h/k-5`` (a
symlink the host made, in a folder only the host sees) -> ``/proc/<pid>/fd/<n>``, a
fd opened on the kernel's socket inode with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`` and checked to be a socket. Until the kernel
has bound a socket, that fd is a directory, and a connect is refused (ZMQ retries);
at a restart the same fd numbers are pointed at the new kernel's sockets, so
connected clients reconnect by themselves.

Must not: start, wait for or signal kernels (the provisioner and the launcher do),
follow anything found in the tmpfs, or read more of it than the socket entries.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import errors
from ..runtime import Bind, Tmpfs
from ..runtime.fsutil import (
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    RESOLVE_NO_XDEV,
    atomic_write,
    openat2,
)

log = logging.getLogger(__name__)

__all__ = ["CONNECTION_FILE", "PREVIOUS_DEATH_FILE", "SOCKET_TMPFS", "KernelFolder", "SocketPins",
           "kernel_runtime_dir"]

#: the file in the kernel's folder that says why the previous kernel died (read by the guest)
PREVIOUS_DEATH_FILE = "previous-death"
#: the kernel's connection file, in its socket tmpfs
CONNECTION_FILE = "connection.json"
#: the socket tmpfs: room for ipykernel's five sockets and its connection file, little else
SOCKET_TMPFS = {"size": 64 * 1024, "nr_inodes": 128}
#: the one way host code looks into the socket tmpfs
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV


_OLD_KERNEL_RUN_DIR = Path("/var/lib/jupyter-contain/run")


def _kernel_release() -> tuple[int, int]:
    try:
        major, minor = os.uname().release.split("-")[0].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (99, 0)


def kernel_runtime_dir() -> Path:
    """Per-kernel folders live here (short paths: unix socket paths are limited to 107 bytes)."""
    base = os.environ.get("JUPYTER_CONTAIN_RUN_DIR")
    if base:
        return Path(base)
    if os.geteuid() == 0:
        # The kernel's channel folder is bound in idmapped (one id), and tmpfs (/run) takes
        # idmapped mounts only since Linux 6.3: before that (Debian 12's 6.1, seen in the VM
        # lane: idmap-bind EINVAL) the folders go to the store's disk (ext4, xfs, btrfs take them)
        if _kernel_release() < (6, 3):
            return _OLD_KERNEL_RUN_DIR
        return Path("/run/jupyter-contain")
    xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/jupyter-contain-{os.geteuid()}"
    return Path(xdg) / "jupyter-contain"


@dataclass(frozen=True)
class KernelFolder:
    """One kernel's folder (see the module docstring for the layout)."""

    base: Path

    @classmethod
    def make(cls, kernel_id: str) -> KernelFolder:
        if not kernel_id or "/" in kernel_id or kernel_id in (".", "..") or "\0" in kernel_id:
            raise errors.KernelError(f"invalid kernel id {kernel_id!r}")
        top = kernel_runtime_dir()
        top.mkdir(parents=True, exist_ok=True, mode=0o755)
        f = cls(top / kernel_id)
        # an existing folder is this kernel's own (a restart, or a server reconnecting): its
        # parts are remade, never trusted as found (none of them was ever container-writable)
        f.base.mkdir(exist_ok=True, mode=0o700)
        st = os.lstat(f.base)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise errors.KernelError(f"kernel folder {f.base} is not a folder of this user")
        os.chmod(f.base, 0o700)
        # 0755: every user of the kernel's container may reach the host channel, as any of its
        # processes may reach the kernel's sockets (one sandbox)
        for d, mode in ((f.channel_dir, 0o755), (f.channel_dir / "s", 0o755), (f.links_dir, 0o700)):
            d.mkdir(exist_ok=True, mode=mode)
            os.chmod(d, mode)
        return f

    # --- paths -------------------------------------------------------------------------

    @property
    def kernel_id(self) -> str:
        return self.base.name

    @property
    def inside(self) -> str:
        """The folder's path inside the container (the same as on the host: short, and known to the guest).

        Root's folders on kernels before 6.3 live on the store's disk (see
        :func:`kernel_runtime_dir`): inside they keep the usual ``/run/jupyter-contain/<id>``.
        """
        if self.base.parent == _OLD_KERNEL_RUN_DIR:
            return f"/run/jupyter-contain/{self.base.name}"
        return str(self.base)

    @property
    def channel_dir(self) -> Path:
        return self.base / "ch"

    @property
    def links_dir(self) -> Path:
        return self.base / "h"

    @property
    def sockets_inside(self) -> str:
        """The socket tmpfs, as a container path."""
        return f"{self.inside}/s"

    @property
    def connection_file_inside(self) -> str:
        return f"{self.sockets_inside}/{CONNECTION_FILE}"

    @property
    def host_ip(self) -> str:
        """The ``ip`` of the host's own connection info (ipc: ``<ip>-<port>`` are its pinned links)."""
        return str(self.links_dir / "k")

    @property
    def kernel_ip(self) -> str:
        """The ``ip`` of the kernel's connection info (its sockets in the tmpfs)."""
        return f"{self.sockets_inside}/k"

    # --- what the container gets -----------------------------------------------------------

    def binds(self) -> list[Bind]:
        # idmapped: container root reads as the folder's owner there (and may connect to host.sock)
        return [Bind(self.channel_dir, self.inside, readonly=True, idmap=True)]

    def tmpfs(self) -> list[Tmpfs]:
        return [Tmpfs(self.sockets_inside, **SOCKET_TMPFS, mode=0o1777)]

    # --- files the host writes -----------------------------------------------------------

    def write_previous_death(self, reason: str | None) -> None:
        """Leave ``reason`` for the next kernel (or clear an old one); ``ch/`` is host-only."""
        path = self.channel_dir / PREVIOUS_DEATH_FILE
        if reason:
            atomic_write(path, (reason + "\n").encode(), mode=0o644, durable=False)
        else:
            path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def write_connection_file(sockets_fd: int, info: Mapping[str, Any], *, owner: tuple[int, int]) -> None:
    """Write the kernel's connection file into its socket tmpfs, through the pinned folder fd.

    Called before the container runs anything, on a tmpfs made for this
    start: the name is new (``O_EXCL``), and nothing is followed. ``owner``:
    the host ids of the kernel's user, who must read it (the HMAC key: 0600).
    The tmpfs belongs to the container's user namespace, where the server's
    own ids may not exist (EOVERFLOW): the file is created with this
    thread's file-system ids set to ``owner`` (per thread in Linux).
    """
    data = json.dumps(dict(info), indent=1).encode()
    with _fs_ids(*owner):
        fd = openat2(sockets_fd, CONNECTION_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _RESOLVE,
                     mode=0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@contextlib.contextmanager
def _fs_ids(uid: int, gid: int) -> Any:
    """This thread's fsuid/fsgid as ``uid``/``gid`` for the block (root only; a no-op when they are ours).

    setfsuid(2) changes the calling thread alone (glibc does not broadcast
    it to the other threads, as it does setuid), so the server's other
    threads never see it.
    """
    if (uid, gid) == (os.geteuid(), os.getegid()):
        yield
        return
    if os.geteuid() != 0:
        raise errors.KernelError(f"cannot create files as {uid}:{gid} (not root)")
    libc = _libc()
    old_gid = libc.setfsgid(gid)
    old_uid = libc.setfsuid(uid)
    try:
        yield
    finally:
        libc.setfsuid(old_uid)
        libc.setfsgid(old_gid)


class SocketPins:
    """The host's links to a kernel's ipc sockets, pinned by fd (see the module docstring).

    ``links_dir`` is host-only. For each port, ``links_dir/k-<port>`` is a
    symlink to ``/proc/<this pid>/fd/<n>``; fd ``n`` stays this object's for
    its life and is pointed (``dup2``) at the kernel's socket once found,
    or at ``links_dir`` itself while there is none (connects are refused).
    A path through ``/proc/<pid>``, not ``/proc/self``: another process of
    the server's user that reads the connection file (``jupyter console
    --existing``) reaches the same sockets.
    """

    def __init__(self, links_dir: Path, ports: Iterable[int]) -> None:
        self.links_dir = Path(links_dir)
        self._fds: dict[int, int] = {}
        self._pinned: set[int] = set()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        try:
            for port in sorted(set(int(p) for p in ports)):
                if not 0 < port < 1 << 16:
                    raise errors.KernelError(f"invalid ipc port {port}")
                self._fds[port] = os.open(self.links_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self._link()
        except BaseException:
            self.close()
            raise

    def _link(self) -> None:
        """(Re)make the links: jupyter_client removes ``<ip>-<port>`` files at every restart and shutdown."""
        for port, fd in self._fds.items():
            link = self.links_dir / f"k-{port}"
            target = f"/proc/{os.getpid()}/fd/{fd}"
            with contextlib.suppress(OSError):
                if os.readlink(link) == target:
                    continue
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            os.symlink(target, link)

    @property
    def ports(self) -> list[int]:
        return sorted(self._fds)

    @property
    def complete(self) -> bool:
        return len(self._pinned) == len(self._fds)

    def pin(self, sockets_fd: int) -> bool:
        """Pin the kernel sockets that have appeared in the tmpfs ``sockets_fd``; True once all are.

        A name that is not a socket (a file, a symlink, a folder, a FIFO) is
        left unpinned and said once in the log: the kernel then cannot be
        reached on that channel, which harms only the kernel that did it.
        """
        with self._lock:
            return self._pin(sockets_fd)

    def _pin(self, sockets_fd: int) -> bool:
        for port, fd in self._fds.items():
            if port in self._pinned:
                continue
            try:
                new = openat2(sockets_fd, f"k-{port}", os.O_PATH | os.O_NOFOLLOW, _RESOLVE)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("kernel socket k-%d not pinned: %s", port, exc.strerror)
                continue
            try:
                if not stat.S_ISSOCK(os.fstat(new).st_mode):
                    continue
                os.dup2(new, fd, inheritable=False)
                self._pinned.add(port)
            finally:
                os.close(new)
        return self.complete

    def watch(self, sockets_fd: int, *, alive: Callable[[], bool]) -> None:
        """Pin the sockets as the kernel binds them, in a thread of its own (until all are, or not ``alive()``).

        A thread, not a task: a blocking kernel manager's event loop runs only
        during its calls, and clients wait for the kernel in between. A few
        syscalls a tick; ipykernel binds about half a second after the start.
        ``sockets_fd`` is borrowed: call :meth:`stop` before it is closed.
        """
        self.stop()
        self._stop.clear()

        def run() -> None:
            t0 = time.monotonic()
            while not self._stop.is_set():
                if self.pin(sockets_fd) or not alive():
                    return
                self._stop.wait(0.005 if time.monotonic() - t0 < 5 else 0.1)

        self._watcher = threading.Thread(target=run, name=f"jc-pins-{self.links_dir.parent.name[:8]}", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Stop watching (the kernel ended, or its socket folder is about to be let go)."""
        t, self._watcher = self._watcher, None
        if t is not None:
            self._stop.set()
            t.join()

    def unpin(self) -> None:
        """Back to refusing connects (the kernel ended; the next one binds new sockets)."""
        self.stop()
        for fd in self._fds.values():
            placeholder = os.open(self.links_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.dup2(placeholder, fd, inheritable=False)
            finally:
                os.close(placeholder)
        self._pinned.clear()
        self._link()

    def close(self) -> None:
        self.stop()
        for port, fd in self._fds.items():
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                (self.links_dir / f"k-{port}").unlink()
        self._fds.clear()
        self._pinned.clear()
