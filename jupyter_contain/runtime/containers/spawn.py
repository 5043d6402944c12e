"""Run a planned container: spec -> the shim's C config -> native spawn.

Owns: :class:`ProcessSpec` (what runs, as whom, with which limits and
capabilities), :class:`SpawnConfig` (mount plan + namespaces + process +
stdio), turning them into ``struct jc_config`` (:func:`build_config`), the
two-phase :func:`spawn` (child blocked until :meth:`ContainerProcess.release`,
so the caller can record it and attach its network in between; the child
enters its cgroup v1 hierarchies itself, or is cloned into its v2 cgroup), :func:`start` (both phases)
and :func:`join` (exec into a running container). Maps an execve failure to
``CommandNotFound`` / ``CommandNotExecutable``. Points the shim at the
``jc-init`` executable (PID 1), and hands out the container's pty master
(:attr:`ContainerProcess.pty_master`) when the process asked for a terminal.
:class:`ProcessSpec` and the capability sets live in ``runtime.process``
(below both halves of the runtime) and are re-exported here.
With ``SpawnConfig.userns`` the container gets a user namespace that owns
all its other namespaces; the shim writes the id maps and makes the
idmapped rootfs inside :func:`spawn`, before the caller's cgroup step.
Rootless (``SpawnConfig.rootless``), :func:`spawn` writes the maps itself
(``userns.write_maps``) and the child mounts everything. A host program
as root of a given mapping is ``userns.run_in_userns``.

Must not: plan mounts (``rootfs``), create or write cgroups (the caller
makes them; only their ``tasks`` files pass through here), or fork Python: every child runs in C.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from jupyter_contain import errors, native
from jupyter_contain.runtime.containers.rootfs import (
    BindMount,
    FileMount,
    FsMount,
    MaskPath,
    MountOp,
    OverlayMount,
    ReadonlyPath,
    RemountReadonly,
    Symlink,
    attrs_of,
)
from jupyter_contain.runtime.process import (  # re-exported: a container's process is spawn's word
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH,
    ProcessSpec,
    capability_set,
    fill_process,
)
from jupyter_contain.runtime.process import Arena as _Arena
from jupyter_contain.runtime.userns import IdMapping, write_maps

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_PATH",
    "NAMESPACES",
    "ContainerProcess",
    "ProcessSpec",
    "SpawnConfig",
    "build_config",
    "capability_set",
    "join",
    "spawn",
    "start",
]

#: namespace names -> clone flags (a container gets all of them; "network"
#: is left out for network="host")
_NS_FLAGS: Mapping[str, int] = MappingProxyType({
    "mount": native.CLONE_NEWNS,
    "pid": native.CLONE_NEWPID,
    "uts": native.CLONE_NEWUTS,
    "ipc": native.CLONE_NEWIPC,
    "network": native.CLONE_NEWNET,
    "cgroup": native.CLONE_NEWCGROUP,
})
NAMESPACES: frozenset[str] = frozenset(_NS_FLAGS)
#: what ``join`` may enter: the above and the container's user namespace
_JOIN_FLAGS: Mapping[str, int] = MappingProxyType({**_NS_FLAGS, "user": native.CLONE_NEWUSER})

_ATTR_BITS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 16, "strictatime": 32}
@dataclass(frozen=True)
class SpawnConfig:
    """Everything the native start needs: the mount plan and the process."""

    mounts: tuple[MountOp, ...]
    process: ProcessSpec
    #: fds for the payload's stdin, stdout, stderr (the caller keeps ownership)
    stdio: tuple[int, int, int]
    network: Literal["none", "host"] = "none"
    namespaces: frozenset[str] = NAMESPACES
    #: a BPF program (struct sock_filter[], 8 bytes each) loaded right before execve
    seccomp_filter: bytes = b""
    #: an fd open for writing: init writes the payload's status there at the
    #: end ("code N\n" or "signal N\n"), for whoever outlives the caller
    #: (the caller keeps ownership)
    exit_fd: int | None = None
    #: a user namespace with these id maps (None: the host's ids). The rootfs
    #: layers and the writable layer are idmapped mounts made in the initial
    #: namespace: on disk, files keep the container's ids (uid 0, not the
    #: mapped host id). ``BindMount.idmap`` binds are idmapped with one id
    #: only (container root <-> the folder's owner, see the shim); other
    #: binds are not idmapped (host files stay out of container root's reach).
    userns: IdMapping | None = None
    #: the caller is not root (``userns`` required): the maps are written with
    #: ``newuidmap``/``newgidmap`` and the child, root of its user namespace,
    #: makes every mount itself (no idmapped mounts: an unprivileged caller
    #: cannot make them); the overlay should carry ``userxattr``
    rootless: bool = False
    #: an fd the container's init keeps open for its whole life (the caller
    #: keeps ownership of its own copy): the write end of a pipe whose read
    #: end tells a helper process (slirp4netns) that the container is gone
    hold_fd: int | None = None
    #: cgroup v1: the container's ``tasks`` file in each hierarchy; the child
    #: moves itself into them before anything else (cheap: see the shim)
    cgroup_tasks: tuple[Path, ...] = ()
    #: cgroup v2: the container's cgroup directory; the child is cloned
    #: straight into it (``CLONE_INTO_CGROUP``)
    cgroup_dir: Path | None = None
    #: the caller moves the child into its cgroup between :func:`spawn` and
    #: release; the cgroup namespace and the mounts under ``/sys/fs/cgroup``
    #: wait for the release (for callers that attach processes themselves)
    cgroup_by_caller: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mounts", tuple(self.mounts))
        object.__setattr__(self, "cgroup_tasks", tuple(Path(p) for p in self.cgroup_tasks))
        if len(self.cgroup_tasks) > native.MAX_CGROUP_TASKS:
            raise errors.InvalidSpec(f"at most {native.MAX_CGROUP_TASKS} cgroup hierarchies")
        if sum((bool(self.cgroup_tasks), self.cgroup_dir is not None, self.cgroup_by_caller)) > 1:
            raise errors.InvalidSpec("a container's cgroup is entered by the child (v1 tasks files), cloned into "
                                     "(a v2 cgroup dir) or attached by the caller: one of them")
        if self.rootless and self.userns is None:
            raise errors.InvalidSpec("a rootless container needs a user namespace")
        if not self.mounts or not isinstance(self.mounts[0], OverlayMount):
            raise errors.InvalidSpec("the mount plan must start with the rootfs overlay")
        if sum(isinstance(m, OverlayMount) for m in self.mounts) != 1:
            raise errors.InvalidSpec("the mount plan must hold exactly one rootfs overlay")
        if self.network not in ("none", "host"):
            raise errors.InvalidSpec(f"network must be 'none' or 'host', not {self.network!r}")
        ns = frozenset(self.namespaces)
        if ns - NAMESPACES:
            raise errors.InvalidSpec(f"unknown namespaces {sorted(ns - NAMESPACES)}")
        if not {"mount", "pid"} <= ns:
            raise errors.InvalidSpec("a container needs at least its own mount and pid namespaces")
        if self.network == "host":
            ns -= {"network"}
        object.__setattr__(self, "namespaces", ns)
        if len(self.stdio) != 3:
            raise errors.InvalidSpec("stdio must be three fds")
        object.__setattr__(self, "stdio", tuple(int(fd) for fd in self.stdio))
        if self.exit_fd is not None and (not isinstance(self.exit_fd, int) or self.exit_fd < 0):
            raise errors.InvalidSpec(f"exit_fd must be an open fd, not {self.exit_fd!r}")
        if len(self.seccomp_filter) % 8 or len(self.seccomp_filter) // 8 > 4096:
            raise errors.InvalidSpec("seccomp filter must be at most 4096 8-byte BPF instructions")
        if self.userns is not None:
            if not isinstance(self.userns, IdMapping):
                raise errors.InvalidSpec(f"userns must be an IdMapping, not {self.userns!r}")
            proc = self.process
            for ident, host in ((proc.uid, self.userns.host_uid), (proc.gid, self.userns.host_gid),
                                *((g, self.userns.host_gid) for g in proc.additional_gids)):
                if host(ident) is None:
                    raise errors.InvalidSpec(f"id {ident} is not mapped in the container's user namespace")
            over = self.mounts[0]
            assert isinstance(over, OverlayMount)
            if not self.rootless and over.upperdir.parent != over.workdir.parent:
                raise errors.InvalidSpec("with a user namespace the upper and work dirs must share a parent")

    @property
    def rootfs(self) -> Path:
        """The host directory the container's root is assembled at."""
        first = self.mounts[0]
        assert isinstance(first, OverlayMount)
        return first.target


def _attr_mask(op: MountOp) -> int:
    mask = 0
    for a in attrs_of(op):
        mask |= _ATTR_BITS[a]
    return mask


def _fill_mount(arena: _Arena, m: Any, op: MountOp) -> None:
    lib = native.lib()
    m.attrs = _attr_mask(op)
    if isinstance(op, OverlayMount):
        m.kind = lib.JC_MOUNT_OVERLAY
        m.target = arena.str(op.target)
        m.lowerdirs = arena.strv(op.lowerdirs, terminate=False)
        m.n_lowerdirs = len(op.lowerdirs)
        m.upperdir = arena.str(op.upperdir)
        m.workdir = arena.str(op.workdir)
        m.options, m.n_options = arena.options(op.options)
    elif isinstance(op, BindMount):
        m.kind = lib.JC_MOUNT_BIND
        m.source = arena.str(op.source)
        m.target = arena.str(op.target)
        m.flags = (lib.JC_MF_RECURSIVE if op.recursive else 0) | (lib.JC_MF_IDMAP if op.idmap else 0)
    elif isinstance(op, FileMount):
        m.kind = lib.JC_MOUNT_FILE
        m.source = arena.str(op.content)
        m.target = arena.str(op.target)
    elif isinstance(op, FsMount):
        m.kind = lib.JC_MOUNT_FS
        m.fstype = arena.str(op.fstype)
        m.source = arena.str(op.source)
        m.target = arena.str(op.target)
        m.options, m.n_options = arena.options(op.options)
    elif isinstance(op, Symlink):
        m.kind = lib.JC_MOUNT_SYMLINK
        m.source = arena.str(op.content)
        m.target = arena.str(op.path)
    elif isinstance(op, MaskPath):
        m.kind = lib.JC_MOUNT_MASK
        m.source = arena.str("/dev/null")
        m.target = arena.str(op.path)
        m.flags = lib.JC_MF_OPTIONAL
    elif isinstance(op, ReadonlyPath):
        m.kind = lib.JC_MOUNT_READONLY
        m.target = arena.str(op.path)
        m.flags = lib.JC_MF_OPTIONAL
    elif isinstance(op, RemountReadonly):
        m.kind = lib.JC_MOUNT_REMOUNT_RO
        m.target = arena.str(op.path)
    else:  # pragma: no cover - the Union is closed
        raise errors.InvalidSpec(f"unknown mount operation {op!r}")


def _needs_cgroupns(op: MountOp) -> bool:
    if isinstance(op, OverlayMount):
        return False        # its target is a host path
    target = str(getattr(op, "target", None) or getattr(op, "path", ""))
    return target == "/sys/fs/cgroup" or target.startswith("/sys/fs/cgroup/")


def _fill_cgroup(arena: _Arena, cfg: Any, tasks: tuple[Path, ...], cgroup_dir: Path | None, *,
                 by_caller: bool) -> None:
    if tasks:
        cfg.cgroup_tasks = arena.strv(tasks, terminate=False)
        cfg.n_cgroup_tasks = len(tasks)
    if cgroup_dir is not None:
        cfg.cgroup_dir = arena.str(cgroup_dir)
    cfg.cgroup_by_caller = int(by_caller)


def build_config(config: SpawnConfig) -> tuple[Any, _Arena]:
    """``struct jc_config *`` for ``config`` and the arena that keeps it alive."""
    arena = _Arena()
    cfg = arena.new("struct jc_config *")
    flags = 0
    for name in config.namespaces:
        flags |= _NS_FLAGS[name]
    cfg.clone_flags = flags & ~native.CLONE_NEWCGROUP
    if config.userns is not None:
        # every other namespace is created inside (owned by) this one
        cfg.clone_flags |= native.CLONE_NEWUSER
        cfg.uid_map = arena.str(config.userns.uid_map_text())
        cfg.gid_map = arena.str(config.userns.gid_map_text())
        cfg.caller_maps = int(config.rootless)
    # the cgroup namespace is made once the child is in its cgroup, so that
    # the container sees that cgroup as /
    cfg.new_cgroupns = int("cgroup" in config.namespaces)
    _fill_cgroup(arena, cfg, config.cgroup_tasks, config.cgroup_dir, by_caller=config.cgroup_by_caller)
    mounts = arena.new("struct jc_mount[]", len(config.mounts))
    for i, op in enumerate(config.mounts):
        _fill_mount(arena, mounts[i], op)
    cfg.mounts = mounts
    cfg.n_mounts = len(config.mounts)
    # cgroup_by_caller: the child makes these while we attach its cgroup; from
    # the first mount under /sys/fs/cgroup on, the plan needs the cgroup
    # namespace (made after). Otherwise the child makes them all at once.
    cfg.n_early_mounts = next((i for i, op in enumerate(config.mounts) if _needs_cgroupns(op)),
                              len(config.mounts)) if cfg.new_cgroupns and config.cgroup_by_caller \
        else len(config.mounts)
    cfg.rootfs = arena.str(config.rootfs)
    cfg.hostname = arena.str(config.process.hostname)
    cfg.loopback_up = int("network" in config.namespaces)
    fill_process(arena, cfg, config.process, config.stdio, config.seccomp_filter)
    if config.exit_fd is not None:
        cfg.exit_fd = config.exit_fd
    if config.hold_fd is not None:
        cfg.hold_fd = config.hold_fd
    return cfg, arena


class ContainerProcess:
    """A started container init (or exec relay); see :class:`native.NativeProcess`.

    ``pid`` is as seen from the host. :meth:`release` raises
    ``CommandNotFound``/``CommandNotExecutable`` when the command cannot be
    run, ``SpawnError`` for any other failed step.
    """

    def __init__(self, proc: native.NativeProcess, argv0: str) -> None:
        self._proc = proc
        self._argv0 = argv0
        #: rootless with a ``hold_fd``: the child's user and network namespaces
        #: ("user", "net" -> fd), opened before it made itself non-dumpable
        #: (after that, /proc/PID/ns is out of an unprivileged caller's reach)
        self.ns_fds: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<ContainerProcess pid={self.pid} argv0={self._argv0!r} returncode={self.returncode}>"

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def pidfd(self) -> int:
        return self._proc.pidfd

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def pty_master(self) -> int | None:
        """With ``ProcessSpec.tty``, after release: the master of the container's
        pty (owned by this object: closed by :meth:`close`)."""
        return self._proc.pty_master

    def release(self) -> None:
        try:
            self._proc.release()
        except errors.SpawnError as exc:
            if exc.step == "execve":
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise errors.CommandNotFound(
                        f"command not found in the container: {exc.path or self._argv0!r}"
                    ) from exc
                if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EPERM, errno.EISDIR):
                    raise errors.CommandNotExecutable(
                        f"command cannot be executed in the container: {exc.path or self._argv0!r}"
                        f" ({os.strerror(exc.errno)})"
                    ) from exc
            raise

    def abort(self) -> None:
        self._proc.abort()

    def early_failure(self) -> errors.ContainError | None:
        """Before release: why the child ended, if a step it runs before the release failed.

        The child mounts its filesystem while the caller records the
        container (and attaches its network, or on cgroup v2 its cgroup); a
        failure there ends it, and the caller's own step may then fail for
        want of the process. This failure explains that one. None while
        the child lives (or if it ended without a word).
        """
        if self._proc.released:
            return None
        # asked because a step of the caller's failed for want of the process: a child that is
        # ending right now has lost its namespaces (/proc/PID/ns) before it is a zombie, so it
        # gets a moment to end and say why (on a slow machine that window is milliseconds)
        if self._proc.poll() is None and self._proc.wait(0.5) is None:
            return None
        try:
            self.release()
        except errors.ContainError as exc:
            return exc
        return None

    def poll(self) -> int | None:
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        return self._proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self._proc.send_signal(sig)

    def terminate(self) -> None:
        self._proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self._proc.send_signal(signal.SIGKILL)

    def close(self) -> None:
        for fd in self.ns_fds.values():
            os.close(fd)
        self.ns_fds.clear()
        self._proc.close()

    def __enter__(self) -> ContainerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spawn(config: SpawnConfig) -> ContainerProcess:
    """Clone the container; it waits until :meth:`ContainerProcess.release`.

    In between, the caller records the returned ``pid``, attaches its network
    and, with ``cgroup_by_caller``, moves it into the container's cgroup.
    Call ``abort()`` if that fails.
    """
    cfg, arena = build_config(config)
    proc = native.spawn(cfg)
    del arena  # the child has its own copy of everything now
    cp = ContainerProcess(proc, config.process.argv[0])
    if config.rootless:
        assert config.userns is not None
        try:
            write_maps(proc.pid, config.userns)
            if config.hold_fd is not None:
                for ns in ("user", "net"):
                    cp.ns_fds[ns] = os.open(f"/proc/{proc.pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            cp.abort()
            cp.close()
            raise
        proc.proceed()
    log.debug("spawned container init pid %d (%s)", proc.pid, config.process.argv[0])
    return cp


def start(config: SpawnConfig) -> ContainerProcess:
    """:func:`spawn` and :meth:`~ContainerProcess.release` in one (no cgroup hook)."""
    proc = spawn(config)
    proc.release()
    return proc


def join(pid: int, *, process: ProcessSpec, stdio: tuple[int, int, int],
         namespaces: frozenset[str] = NAMESPACES, seccomp_filter: bytes = b"",
         cgroup_tasks: Sequence[Path] = (), cgroup_dir: Path | None = None) -> ContainerProcess:
    """Run ``process`` inside the running container whose init is ``pid`` (two-phase).

    Joins ``namespaces`` of ``pid`` (root and cwd come with the mount
    namespace; add ``"user"`` for a container with a user namespace, whose
    ids ``process`` then names); the returned pid is a relay in the host's
    pid namespace that forwards signals and exits with the process's status.
    ``cgroup_tasks`` / ``cgroup_dir``: as in :class:`SpawnConfig` (the
    container's cgroup v1 hierarchies, or its v2 cgroup).
    """
    if len(cgroup_tasks) > native.MAX_CGROUP_TASKS:
        raise errors.InvalidSpec(f"at most {native.MAX_CGROUP_TASKS} cgroup hierarchies")
    if cgroup_tasks and cgroup_dir is not None:
        raise errors.InvalidSpec("v1 tasks files or a v2 cgroup dir, not both")
    unknown = frozenset(namespaces) - frozenset(_JOIN_FLAGS)
    if unknown:
        raise errors.InvalidSpec(f"unknown namespaces {sorted(unknown)}")
    arena = _Arena()
    cfg = arena.new("struct jc_config *")
    fill_process(arena, cfg, process, tuple(int(fd) for fd in stdio), seccomp_filter)  # type: ignore[arg-type]
    _fill_cgroup(arena, cfg, tuple(Path(p) for p in cgroup_tasks), cgroup_dir, by_caller=False)
    flags = 0
    for name in namespaces:
        flags |= _JOIN_FLAGS[name]
    proc = native.join(pid, cfg, namespaces=flags)
    del arena
    return ContainerProcess(proc, process.argv[0])


def attach_bind(pid: int, op: BindMount, *, userns: IdMapping | None) -> None:
    """Attach the bind ``op`` inside the running container whose init is ``pid``.

    The bind is made here, with the caller's credentials (idmapped with one
    id for ``op.idmap``: container root <-> the folder's owner, as at a
    start); a short helper joins the container's mount (and user) namespace,
    makes the mount point inside the container's root as container root (a
    symlink the container planted on the way stays inside it) and moves the
    bind there. For a pooled kernel's notebook folder, handed out after the
    container started (``kernel/pool.py``).
    """
    lib = native.lib()
    arena = _Arena()
    m = arena.new("struct jc_mount *")
    _fill_mount(arena, m, op)
    ruid = userns.host_uid(0) if userns is not None else None
    rgid = userns.host_gid(0) if userns is not None else None
    failure = native.ffi().new("struct jc_failure *")
    rc = lib.jc_attach_bind(pid, m, -1 if ruid is None else ruid, -1 if rgid is None else rgid, failure)
    del arena
    if rc != 0:
        native.raise_failure(failure)


