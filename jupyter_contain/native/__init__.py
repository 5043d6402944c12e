"""Typed Python API over the C shim (``jupyter_contain.native._native``).

Owns: loading the compiled cffi module (lazily: importing this package never
fails, using it without the extension raises a clear ``ContainerError``),
finding the ``jc-init`` executable (the container's PID 1, built beside the
extension), the two-phase process handle (:class:`NativeProcess`: spawn with the child
blocked, caller's setup, :meth:`NativeProcess.release`), ``join`` for exec
into a running container, and the kernel constants the runtime needs
(capability numbers, clone flags, mount kinds).

Must not: plan mounts, know about images or Jupyter, or build configs from
specs (``runtime.containers.spawn`` does that with :func:`ffi`). No
import-time side effects.
"""

from __future__ import annotations

import errno as _errno
import importlib
import logging
import os
import select
import signal
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from jupyter_contain import errors

log = logging.getLogger(__name__)

__all__ = [
    "CAPABILITIES",
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "MAX_CGROUP_TASKS",
    "NativeProcess",
    "available",
    "ffi",
    "init_executable",
    "join",
    "lib",
    "spawn",
]

# linux/sched.h
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

#: shim.h JC_MAX_CGROUP_TASKS: cgroup v1 hierarchies a child can enter itself
MAX_CGROUP_TASKS = 16

#: linux/capability.h: name -> bit number
CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        [
            "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
            "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
            "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD",
            "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        ]
    )
}

_module: ModuleType | None = None
_module_lock = threading.Lock()
_INIT_NAME = "jc-init"
_init_warned = False


def _load() -> ModuleType:
    global _module
    if _module is None:
        with _module_lock:
            if _module is None:
                try:
                    # importlib, not `from . import _native`: that name is
                    # an attribute of this package once the module is loaded
                    mod = importlib.import_module("jupyter_contain.native._native")
                except ImportError as exc:
                    raise errors.ContainerError(
                        "the native extension jupyter_contain.native._native is not built "
                        f"({exc}); build it with `pip install -e .` in the source tree"
                    ) from exc
                _module = mod
    return _module


def available() -> bool:
    """True when the compiled extension can be loaded."""
    try:
        _load()
    except errors.ContainerError:
        return False
    return True


def ffi() -> Any:
    """The cffi ``FFI`` of the extension (to build ``struct jc_config``)."""
    return _load().ffi


def lib() -> Any:
    """The compiled functions and ``JC_*`` constants."""
    return _load().lib


def init_executable() -> Path | None:
    """The ``jc-init`` executable built beside the extension, or None (fallback).

    Without it (a build host without a static libc), the container's PID 1
    is the cloned copy of this process, which keeps a copy-on-write image of
    our memory for the container's life: logged once as a warning.
    """
    global _init_warned
    path = Path(__file__).resolve().parent / _INIT_NAME
    if os.access(path, os.X_OK):
        return path
    if not _init_warned:
        _init_warned = True
        log.warning("%s is missing (not built with a static libc?): containers use the in-process "
                    "init, which keeps a copy of this process's memory; rebuild with `pip install .`", path)
    return None


def cap_last() -> int:
    """The highest capability number this kernel knows."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def host_bounding_set() -> int:
    """Our own capability bounding set as a bit mask."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    raise errors.ContainerError("no CapBnd line in /proc/self/status")


class NativeProcess:
    """A process started by the shim: the container's init (or an exec relay).

    Two phases: after :func:`spawn` the child exists (``pid``, ``pidfd``) but
    waits; the caller records it, attaches its network etc., then :meth:`release` lets it run
    and returns once the payload's execve succeeded, or raises
    :class:`~jupyter_contain.errors.SpawnError` for the step that failed
    (the failed child is reaped). Use :meth:`abort` to give up before release.
    """

    def __init__(self, handle: Any, *, description: str = "container") -> None:
        self.pid: int = int(handle.pid)
        self.pidfd: int = int(handle.pidfd)
        #: after release, with a terminal: the master of the container's pty
        #: (owned by this object, closed by :meth:`close`)
        self.pty_master: int | None = None
        self._handle = handle
        self._description = description
        self._lock = threading.Lock()
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"<NativeProcess pid={self.pid} returncode={self.returncode}>"

    @property
    def released(self) -> bool:
        return self._handle.sync_fd < 0

    def proceed(self) -> None:
        """Rootless (``caller_maps``): the id maps are written; the child may set up its mounts."""
        rc = lib().jc_proceed(self._handle)
        if rc < 0:   # the child is gone: release() reports why
            log.debug("%s %d: proceed: %s", self._description, self.pid, os.strerror(-rc))

    def release(self) -> None:
        """Let the child continue; wait until execve succeeded or a step failed."""
        if self.released:
            raise errors.ContainerError(f"{self._description} {self.pid} was already released")
        failure = ffi().new("struct jc_failure *")
        rc = lib().jc_release(self._handle, failure)  # GIL released while blocking
        if rc == 0 and self._handle.pty_master >= 0:
            self.pty_master = int(self._handle.pty_master)
            self._handle.pty_master = -1
        if rc == 0:
            log.debug("%s %d released and exec'd", self._description, self.pid)
            return
        self.wait()
        if rc < 0:
            raise errors.SpawnError("sync", -rc, "")
        step = ffi().string(failure.step).decode("ascii", "replace")
        path = os.fsdecode(ffi().string(failure.path))
        raise errors.SpawnError(step, int(failure.err), path)

    def abort(self) -> None:
        """Give up before (or after) release: kill, reap, close everything."""
        if not self.released:
            # the detached mounts made for a user namespace go unused
            lib().jc_discard(self._handle)
            # closing our end without the release byte makes the child exit
            os.close(self._handle.sync_fd)
            self._handle.sync_fd = -1
        if self.returncode is None:
            self.send_signal(signal.SIGKILL)
            self.wait()

    def poll(self) -> int | None:
        """The exit code (128+signal for a signal) if the process ended, else None."""
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the end; returns the exit code, None if ``timeout`` expired."""
        if self.returncode is not None:
            return self.returncode
        if timeout is not None:
            with select.epoll() as ep:
                ep.register(self.pidfd, select.EPOLLIN)
                if not ep.poll(timeout):
                    return None
        return self._reap(0)

    def _reap(self, flags: int) -> int | None:
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:
                # somebody else reaped it (a SIGCHLD-ignoring parent): unknown code
                self.returncode = 255
                self._close_pidfd()
                return self.returncode
            if pid == 0:
                return None
            self.returncode = _exit_code(status)
            self._close_pidfd()
            return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the process through its pidfd (no pid-reuse race)."""
        with self._lock:
            if self.returncode is not None or self.pidfd < 0:
                return
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def _close_pidfd(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def close(self) -> None:
        """Release the fds (the pty master too); aborts a child that was never released."""
        if not self.released:
            self.abort()
        with self._lock:
            self._close_pidfd()
            if self.pty_master is not None:
                os.close(self.pty_master)
                self.pty_master = None

    def __enter__(self) -> NativeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def spawn(config: Any) -> NativeProcess:
    """Clone the container's init with ``config`` (a ``struct jc_config *``).

    The child is blocked until :meth:`NativeProcess.release`. Everything
    ``config`` points to must stay alive until this returns (the child has
    its own copy afterwards).
    """
    handle = ffi().new("struct jc_handle *")
    failure = ffi().new("struct jc_failure *")
    rc = lib().jc_spawn(config, handle, failure)  # GIL released: clone3 runs in C
    _check_spawn(rc, failure)
    return NativeProcess(handle)


def _check_spawn(rc: int, failure: Any) -> None:
    """Raise for a failed ``jc_spawn`` (``rc`` 1: a parent-side step, child already reaped)."""
    if rc < 0:
        raise errors.SpawnError("clone", -rc, "")
    if rc == 1:
        step = ffi().string(failure.step).decode("ascii", "replace")
        path = os.fsdecode(ffi().string(failure.path))
        raise errors.SpawnError(step, int(failure.err), path)


def raise_failure(failure: Any) -> None:
    """Raise the :class:`~jupyter_contain.errors.SpawnError` a filled ``struct jc_failure`` names."""
    _check_spawn(1, failure)


#: the namespaces ``join`` enters by default
JOIN_NAMESPACES = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWCGROUP


def join(pid: int, config: Any, *, namespaces: int = JOIN_NAMESPACES) -> NativeProcess:
    """Start ``config``'s process inside the namespaces of ``pid`` (exec).

    The returned process is a relay in the caller's pid namespace that
    forwards signals to the payload (forked inside the container's pid
    namespace) and exits with its status. ``config``'s mount, rootfs and
    hostname fields are ignored. Two-phase like :func:`spawn`.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise errors.SpawnError("pidfd-open", _errno.ESRCH, f"pid {pid}") from None
    try:
        config.join_pidfd = pidfd
        config.join_flags = namespaces
        config.clone_flags = 0
        config.new_cgroupns = 0
        config.n_mounts = 0
        config.rootfs = ffi().NULL
        config.hostname = ffi().NULL
        config.loopback_up = 0
        handle = ffi().new("struct jc_handle *")
        failure = ffi().new("struct jc_failure *")
        rc = lib().jc_spawn(config, handle, failure)
        _check_spawn(rc, failure)
    finally:
        os.close(pidfd)
    return NativeProcess(handle, description="exec")
