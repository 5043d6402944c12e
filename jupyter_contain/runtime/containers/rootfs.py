"""Pure planning of a container's filesystem: which mounts, in which order.

Owns: the :class:`Bind` a user asks for, the mount operations
(:data:`MountOp`, frozen dataclasses) and :func:`plan`, which turns the
image layers, the writable layer and the binds into the ordered list the
native spawn executes (bubblewrap's setup-op list, runc's spec -> config).
Also the security defaults that are mounts: minimal ``/dev``, masked and
read-only paths (Docker's/runc's defaults), and the container's own cgroup
at ``/sys/fs/cgroup`` (read-only, as Docker shows it; :class:`CgroupFs`).

Must not: make syscalls, touch the disk (not even ``stat``), or know how the
list is executed. Container paths are absolute POSIX strings resolved by the
executor inside the rootfs; host paths are :class:`~pathlib.Path`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jupyter_contain import errors
from jupyter_contain.runtime.process import container_path  # the rule for a container path

__all__ = [
    "Bind",
    "BindMount",
    "CgroupFs",
    "DEVICES",
    "FileMount",
    "FsMount",
    "HOST_FOLDER_ATTRS",
    "MASKED_PATHS",
    "MaskPath",
    "MountOp",
    "OverlayMount",
    "READONLY_PATHS",
    "ReadonlyPath",
    "Tmpfs",
    "RemountReadonly",
    "Symlink",
    "plan",
]

#: Docker's default masked paths (moby oci/defaults.go)
MASKED_PATHS: tuple[str, ...] = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

#: Docker's default read-only paths
READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

#: host device nodes bind-mounted into the container's /dev (no mknod needed,
#: which keeps working once containers get a user namespace)
DEVICES: tuple[str, ...] = ("null", "zero", "full", "random", "urandom", "tty")

#: the mount attributes of every bind of a host path a user asks for (-v, a
#: kernel's folders, kernelspec mounts): no setuid/setgid or file-capability
#: exec, no device nodes, inside the container
HOST_FOLDER_ATTRS: frozenset[str] = frozenset({"nosuid", "nodev"})

#: where a user bind may not go: the runtime owns these mounts
_RESERVED = ("/proc", "/sys")

#: characters the overlay option syntax reserves (legacy mount data)
_OVERLAY_UNSAFE = (",", ":", "\\", "\n")

Options = tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class Bind:
    """A host path to show inside the container."""

    source: Path
    target: str
    readonly: bool = False
    recursive: bool = True
    #: a root server: an idmapped bind, so that container root acts as the
    #: folder's host owner on it (a kernel's own folder, the notebook folder a
    #: user shares with it), and no other container id is mapped there.
    #: Ignored rootless.
    idmap: bool = False


@dataclass(frozen=True)
class Tmpfs:
    """A small tmpfs of the container's own at ``target`` (Docker's ``--tmpfs``).

    Bounded in bytes and inodes; its pages are charged to the container's
    memory cgroup. A kernel's socket folder is one: what the kernel writes
    there never reaches the host's disk, and it is new at every start.
    """

    target: str
    size: int = 1024 * 1024
    nr_inodes: int = 1024
    mode: int = 0o1777

    def __post_init__(self) -> None:
        if not 4096 <= self.size <= 1 << 40:
            raise errors.InvalidSpec(f"tmpfs {self.target}: size {self.size} out of range (4 KiB .. 1 TiB)")
        if not 1 <= self.nr_inodes <= 1 << 24:
            raise errors.InvalidSpec(f"tmpfs {self.target}: nr_inodes {self.nr_inodes} out of range")
        if not 0 <= self.mode <= 0o7777:
            raise errors.InvalidSpec(f"tmpfs {self.target}: mode {self.mode:o} out of range")


@dataclass(frozen=True)
class OverlayMount:
    """The rootfs: overlay of ``lowerdirs`` (topmost first) + writable upper at ``target``."""

    lowerdirs: tuple[Path, ...]
    upperdir: Path
    workdir: Path
    target: Path
    options: Options = ()


@dataclass(frozen=True)
class BindMount:
    """Bind host ``source`` onto container ``target`` (file or dir, made if missing)."""

    source: Path
    target: str
    readonly: bool = False
    recursive: bool = True
    attrs: frozenset[str] = frozenset()
    #: a root server only (with a user namespace or the host's ids; rootless
    #: cannot idmap): an idmapped bind whose mapping covers ONE id, container
    #: root <-> the owner of ``source`` (uid and gid of the folder itself): what
    #: it writes there is the owner's, a chown to any other id fails, files of
    #: other owners show as the overflow id, read-only (the folders a kernel
    #: is given: its own, the notebook's, kernelspec mounts)
    idmap: bool = False


@dataclass(frozen=True)
class FsMount:
    """A new filesystem instance (proc, sysfs, tmpfs, devpts, mqueue) at ``target``."""

    fstype: str
    target: str
    source: str | None = None
    options: Options = ()
    #: mount attributes: "ro", "nosuid", "nodev", "noexec", "noatime", "strictatime"
    attrs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Symlink:
    """A symlink at container path ``path`` pointing to ``content``."""

    path: str
    content: str


@dataclass(frozen=True)
class MaskPath:
    """Hide ``path`` (``/dev/null`` over a file, empty read-only tmpfs over a dir); skipped if missing."""

    path: str


@dataclass(frozen=True)
class ReadonlyPath:
    """Make ``path`` (and everything below) read-only; skipped if missing."""

    path: str


@dataclass(frozen=True)
class FileMount:
    """A new file holding ``content`` at container path ``target`` (``/etc/hosts`` and the like).

    The file lives on a small tmpfs of the container's own, made by the child:
    nothing on the host to write, bind or remove, and the container's root
    owns it (as Docker's are, root-owned 0644).
    """

    target: str
    content: str

    def __post_init__(self) -> None:
        if "\0" in self.content:
            raise errors.InvalidSpec(f"the content of {self.target} holds a NUL byte")
        if len(self.content.encode()) > 256 * 1024:
            raise errors.InvalidSpec(f"the content of {self.target} is larger than 256 KiB")


@dataclass(frozen=True)
class RemountReadonly:
    """Make the mount at ``path`` read-only (not recursive), once what lies on it is in place.

    The rootfs (last of all), or the cgroup tmpfs once its mount points exist.
    """

    path: str = "/"


@dataclass(frozen=True)
class CgroupFs:
    """Which cgroup filesystems to show at ``/sys/fs/cgroup``.

    Mounted inside the container's cgroup namespace, each shows the
    container's own cgroup as its root (so a program can read its limits).
    ``version`` 2: one cgroup2 mount. ``version`` 1: a tmpfs holding one
    mount per hierarchy in ``hierarchies``, each the exact controller set of
    a mounted v1 hierarchy as ``/proc/self/cgroup`` names it (e.g.
    ``("cpu", "cpuacct")``), with a symlink per controller when there are
    several (Docker's layout). Everything read-only.
    """

    version: Literal[1, 2]
    hierarchies: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise errors.InvalidSpec(f"cgroup version must be 1 or 2, not {self.version!r}")
        hs = tuple(tuple(h) for h in self.hierarchies)
        if self.version == 2 and hs:
            raise errors.InvalidSpec("cgroup v2 has no separate hierarchies")
        names: set[str] = set()
        for h in hs:
            if not h:
                raise errors.InvalidSpec("an empty cgroup v1 hierarchy")
            for c in h:
                if not c or not all(ch.isalnum() or ch == "_" for ch in c):
                    raise errors.InvalidSpec(f"invalid cgroup controller name {c!r}")
                if c in names:
                    raise errors.InvalidSpec(f"cgroup controller {c!r} in two hierarchies")
                names.add(c)
        object.__setattr__(self, "hierarchies", hs)


MountOp = OverlayMount | BindMount | FileMount | FsMount | Symlink | MaskPath | ReadonlyPath | RemountReadonly

_ATTRS = frozenset({"ro", "nosuid", "nodev", "noexec", "noatime", "strictatime"})


def _host_path(path: Path, *, what: str) -> Path:
    p = Path(path)
    if not p.is_absolute():
        raise errors.InvalidSpec(f"{what} {str(path)!r} must be an absolute host path")
    if "\0" in str(p):
        raise errors.InvalidSpec(f"{what} {str(path)!r} contains a NUL byte")
    return p


def _overlay_path(path: Path, *, what: str) -> Path:
    p = _host_path(path, what=what)
    if any(ch in str(p) for ch in _OVERLAY_UNSAFE):
        raise errors.InvalidSpec(f"{what} {str(p)!r} contains a character overlayfs reserves")
    return p


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def _dev_ops(*, tty_gid: int | None = 5) -> list[MountOp]:
    """A minimal /dev like Docker's: tmpfs, a few host devices, devpts, shm, mqueue.

    ``tty_gid``: the group of new ptys (None: the opener's; a rootless user
    namespace of one id has no group 5).
    """
    ops: list[MountOp] = [
        FsMount("tmpfs", "/dev", source="tmpfs",
                options=(("mode", "755"), ("size", "65536k")),
                attrs=frozenset({"nosuid", "strictatime"})),
    ]
    ops += [BindMount(Path("/dev") / name, f"/dev/{name}", recursive=False) for name in DEVICES]
    ops += [
        FsMount("devpts", "/dev/pts", source="devpts",
                options=(("newinstance", None), ("ptmxmode", "0666"), ("mode", "0620"))
                + ((("gid", str(tty_gid)),) if tty_gid is not None else ()),
                attrs=frozenset({"nosuid", "noexec"})),
        Symlink("/dev/ptmx", "pts/ptmx"),
        FsMount("tmpfs", "/dev/shm", source="shm",
                options=(("mode", "1777"), ("size", "65536k")),
                attrs=frozenset({"nosuid", "nodev", "noexec"})),
        FsMount("mqueue", "/dev/mqueue", source="mqueue",
                attrs=frozenset({"nosuid", "nodev", "noexec"})),
        Symlink("/dev/fd", "/proc/self/fd"),
        Symlink("/dev/stdin", "/proc/self/fd/0"),
        Symlink("/dev/stdout", "/proc/self/fd/1"),
        Symlink("/dev/stderr", "/proc/self/fd/2"),
    ]
    return ops


_CGROUP_ATTRS = frozenset({"ro", "nosuid", "nodev", "noexec"})


def _cgroup_ops(cg: CgroupFs) -> list[MountOp]:
    if cg.version == 2:
        return [FsMount("cgroup2", "/sys/fs/cgroup", source="cgroup", attrs=_CGROUP_ATTRS)]
    # the tmpfs stays writable until its mount points and symlinks exist
    ops: list[MountOp] = [FsMount("tmpfs", "/sys/fs/cgroup", source="tmpfs", options=(("mode", "755"),),
                                  attrs=frozenset({"nosuid", "nodev", "noexec"}))]
    for h in cg.hierarchies:
        name = ",".join(h)
        ops.append(FsMount("cgroup", f"/sys/fs/cgroup/{name}", source="cgroup",
                           options=tuple((c, None) for c in h), attrs=_CGROUP_ATTRS))
        if len(h) > 1:
            ops += [Symlink(f"/sys/fs/cgroup/{c}", name) for c in h]
    ops.append(RemountReadonly("/sys/fs/cgroup"))
    return ops


def plan(
    *,
    rootfs_layers: Sequence[Path],
    upper: Path,
    work: Path,
    target: Path,
    binds: Sequence[Bind] = (),
    tmpfs: Sequence[Tmpfs] = (),
    etc_files: Mapping[str, str] | None = None,
    readonly_rootfs: bool = False,
    cgroupfs: CgroupFs | None = None,
    bind_sysfs: bool = False,
    overlay_options: Options = (),
    tty_gid: int | None = 5,
) -> list[MountOp]:
    """The ordered mount operations that build a container's filesystem.

    ``rootfs_layers`` are the unpacked image layers, topmost first; ``upper``
    and ``work`` the container's writable layer; ``target`` the host directory
    the rootfs is assembled at (the executor pivots into it). ``etc_files``
    maps names under ``/etc`` (``hosts``, ``hostname``, ``resolv.conf``) to
    their content (:class:`FileMount`). ``binds`` and ``tmpfs`` go last among the
    mounts, parents before children (a tmpfs may sit on a folder of a bind). ``cgroupfs``: the cgroup filesystems
    mounted over ``/sys/fs/cgroup`` (None: sysfs's empty directory stays;
    only meaningful with a cgroup namespace). ``bind_sysfs``: a read-only
    recursive bind of the host's ``/sys`` instead of a new sysfs (a user
    namespace without its own network namespace may not mount sysfs).
    ``overlay_options``: extra overlayfs options (``userxattr`` rootless).
    ``tty_gid``: the group of the container's ptys (None where it is unmapped). Raises
    :class:`~jupyter_contain.errors.InvalidSpec` for a malformed request.
    """
    if not rootfs_layers:
        raise errors.InvalidSpec("a container needs at least one image layer")
    lowers = tuple(_overlay_path(p, what="layer") for p in rootfs_layers)
    ops: list[MountOp] = [
        OverlayMount(
            lowerdirs=lowers,
            upperdir=_overlay_path(upper, what="upper dir"),
            workdir=_overlay_path(work, what="work dir"),
            target=_host_path(target, what="rootfs target"),
            options=tuple(overlay_options),
        ),
        FsMount("proc", "/proc", source="proc", attrs=frozenset({"nosuid", "nodev", "noexec"})),
    ]
    ops += _dev_ops(tty_gid=tty_gid)
    if bind_sysfs:
        ops.append(BindMount(Path("/sys"), "/sys", readonly=True, recursive=True,
                             attrs=frozenset({"nosuid", "nodev", "noexec"})))
    else:
        ops.append(FsMount("sysfs", "/sys", source="sysfs", attrs=frozenset({"ro", "nosuid", "nodev", "noexec"})))

    taken: set[str] = set()
    for name, content in sorted((etc_files or {}).items()):
        if not name or "/" in name or name in (".", ".."):
            raise errors.InvalidSpec(f"etc file name {name!r} must be a plain file name under /etc")
        dest = f"/etc/{name}"
        taken.add(dest)
        ops.append(FileMount(dest, content))

    def claim(target: str, what: str) -> str:
        """A user mount's target, normalised, checked and taken (one mount per target)."""
        dest = container_path(target, what=f"{what} target")
        if dest == "/" or any(_under(dest, top) for top in _RESERVED):
            raise errors.InvalidSpec(f"{what} target {dest!r} is reserved by the runtime")
        if dest in taken:
            raise errors.InvalidSpec(f"two mounts target {dest!r}")
        taken.add(dest)
        return dest

    user: list[BindMount | FsMount] = []
    for b in binds:
        dest = claim(b.target, "bind")
        # host folders never carry setuid or device semantics into the
        # container (the seccomp filter keeps setuid/setgid files from being
        # made there: nosuid does not protect the host's own path to them)
        user.append(BindMount(_host_path(b.source, what="bind source"), dest,
                              readonly=b.readonly, recursive=b.recursive, idmap=b.idmap,
                              attrs=HOST_FOLDER_ATTRS))
    for t in tmpfs:
        user.append(FsMount("tmpfs", claim(t.target, "tmpfs"), source="tmpfs",
                            options=(("mode", f"{t.mode:o}"), ("size", f"{t.size // 1024}k"),
                                     ("nr_inodes", str(t.nr_inodes))),
                            attrs=frozenset({"nosuid", "nodev", "noexec"})))
    # parents before children, otherwise a later parent would hide a child
    user.sort(key=lambda m: m.target.rstrip("/").count("/"))
    ops += user

    ops += [MaskPath(p) for p in MASKED_PATHS]
    ops += [ReadonlyPath(p) for p in READONLY_PATHS]
    if readonly_rootfs:
        ops.append(RemountReadonly("/"))
    if cgroupfs is not None:
        # last: these need the container's cgroup namespace, which the child
        # makes only once it is in its cgroup; when a caller moves it there
        # (cgroup_by_caller), it mounts everything before them meanwhile
        # (see spawn.build_config)
        ops += _cgroup_ops(cgroupfs)
    return ops


def attrs_of(op: MountOp) -> frozenset[str]:
    """The mount attributes an op asks for (``ro`` included for read-only binds)."""
    attrs: frozenset[str] = getattr(op, "attrs", frozenset())
    if isinstance(op, BindMount) and op.readonly:
        attrs = attrs | {"ro"}
    unknown = attrs - _ATTRS
    if unknown:
        raise errors.InvalidSpec(f"unknown mount attributes {sorted(unknown)}")
    return attrs
