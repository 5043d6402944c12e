"""User namespaces below both halves of the runtime: id mappings, and running a tool as their root.

Owns :class:`IdMapping` (a container's ``uid_map``/``gid_map``, the text the
kernel takes, the OCI ``uidMappings`` form, the JSON kept in ``state.json``),
reading subordinate id files (:func:`read_subid_file`), a rootless caller's
mapping (:func:`rootless_mapping`) and writing it for a child
(:func:`write_maps`, through the setuid ``newuidmap``/``newgidmap``),
:func:`run_in_userns` (a host program as root of a mapping: what the image
half needs to restore an image's owners and to remove what only that root
may remove), and :func:`rootless`, the one place that decides whether this
process is rootless; stores and runtimes decide it once and pass it on.

Both ``runtime.images`` and ``runtime.containers`` may import this module;
it must import neither (the import-direction test says so). Handing out
subordinate id slices to containers (``Allocator``) and the administrator's
setup stay in ``containers.idmap``. No import-time side effects.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_contain import errors, native

from .process import DEFAULT_PATH, TOOL_CAPABILITIES, Arena, ProcessSpec, fill_process

__all__ = [
    "RANGE_SIZE",
    "IdMapping",
    "SubidRange",
    "read_subid_file",
    "rootless",
    "rootless_mapping",
    "run_in_userns",
    "write_maps",
]

#: ids per container: 0..65535 inside, like Podman's and Docker's default
RANGE_SIZE = 65536
Extent = tuple[int, int, int]   # (inside, outside, count)


def _extents(value: Iterable[Sequence[int]]) -> tuple[Extent, ...]:
    out = []
    for item in value:
        inside, outside, count = (int(x) for x in item)
        if inside < 0 or outside < 0 or count <= 0 or inside + count > 2**32 - 1 or outside + count > 2**32 - 1:
            raise errors.InvalidSpec(f"invalid id map extent {item!r}")
        out.append((inside, outside, count))
    if not out:
        raise errors.InvalidSpec("an id map needs at least one extent")
    if len(out) > 340:   # the kernel's limit on lines
        raise errors.InvalidSpec("an id map has at most 340 extents")
    return tuple(out)


@dataclass(frozen=True)
class IdMapping:
    """A container's user namespace: ``(inside, outside, count)`` extents for uids and gids."""

    uid_map: tuple[Extent, ...]
    gid_map: tuple[Extent, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "uid_map", _extents(self.uid_map))
        object.__setattr__(self, "gid_map", _extents(self.gid_map))
        for name, m in (("uid", self.uid_map), ("gid", self.gid_map)):
            if not any(inside == 0 for inside, _, _ in m):
                raise errors.InvalidSpec(f"the {name} map must map the container's root (id 0)")

    @classmethod
    def single(cls, host_uid: int, host_gid: int, size: int = RANGE_SIZE) -> IdMapping:
        """Container ids ``0..size-1`` -> host ``host_uid..``, ``host_gid..``."""
        return cls(((0, host_uid, size),), ((0, host_gid, size),))

    @staticmethod
    def _text(m: tuple[Extent, ...]) -> str:
        return "".join(f"{i} {o} {c}\n" for i, o, c in m)

    def uid_map_text(self) -> str:
        """What ``/proc/PID/uid_map`` takes (one write)."""
        return self._text(self.uid_map)

    def gid_map_text(self) -> str:
        return self._text(self.gid_map)

    @staticmethod
    def _to_host(m: tuple[Extent, ...], ident: int) -> int | None:
        for inside, outside, count in m:
            if inside <= ident < inside + count:
                return outside + ident - inside
        return None

    def host_uid(self, uid: int) -> int | None:
        """The host uid of container uid ``uid`` (None: unmapped)."""
        return self._to_host(self.uid_map, uid)

    def host_gid(self, gid: int) -> int | None:
        return self._to_host(self.gid_map, gid)

    @staticmethod
    def _to_inside(m: tuple[Extent, ...], ident: int) -> int | None:
        for inside, outside, count in m:
            if outside <= ident < outside + count:
                return inside + ident - outside
        return None

    def container_uid(self, host_uid: int) -> int | None:
        """The container uid that host uid ``host_uid`` is (None: it is not mapped)."""
        return self._to_inside(self.uid_map, host_uid)

    def container_gid(self, host_gid: int) -> int | None:
        return self._to_inside(self.gid_map, host_gid)

    def to_json(self) -> dict[str, Any]:
        return {"uid_map": [list(e) for e in self.uid_map], "gid_map": [list(e) for e in self.gid_map]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IdMapping:
        try:
            return cls(tuple(tuple(e) for e in data["uid_map"]), tuple(tuple(e) for e in data["gid_map"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.ContainerError(f"unreadable user namespace mapping {data!r}: {exc}") from None

    def oci(self) -> dict[str, list[dict[str, int]]]:
        """``linux.uidMappings`` / ``gidMappings`` of an OCI runtime-spec config."""
        def conv(m: tuple[Extent, ...]) -> list[dict[str, int]]:
            return [{"containerID": i, "hostID": o, "size": c} for i, o, c in m]
        return {"uidMappings": conv(self.uid_map), "gidMappings": conv(self.gid_map)}


@dataclass(frozen=True)
class SubidRange:
    """One ``name:start:count`` line of ``/etc/subuid`` or ``/etc/subgid``."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


def read_subid_file(path: Path, user: str) -> list[SubidRange]:
    """The ranges ``path`` gives ``user`` (by name or by uid, as shadow-utils matches them)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise errors.ContainerError(f"cannot read {path}: {exc}") from None
    names = {user}
    with contextlib.suppress(KeyError):
        names.add(str(pwd.getpwnam(user).pw_uid))
    out = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in names or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        if int(parts[2]) > 0:
            out.append(SubidRange(int(parts[1]), int(parts[2])))
    return sorted(out, key=lambda r: r.start)


def subid_files() -> tuple[Path, Path]:
    """``/etc/subuid`` and ``/etc/subgid`` (overridable, so that tests and unusual hosts need not edit /etc)."""
    return (Path(os.environ.get("JUPYTER_CONTAIN_SUBUID_FILE", "/etc/subuid")),
            Path(os.environ.get("JUPYTER_CONTAIN_SUBGID_FILE", "/etc/subgid")))


def rootless() -> bool:
    """True when this process is not root: what it makes gets a user namespace of its own ids.

    The one test of it; a ``Store`` and a ``Runtime`` ask once, when made,
    and pass the answer to what they call.
    """
    return os.geteuid() != 0


def _login_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def rootless_mapping(*, uid: int | None = None, gid: int | None = None) -> IdMapping:
    """A rootless container's ids: root inside is the caller (``uid``/``gid``, default ours).

    With subordinate ranges for the caller in ``/etc/subuid`` and
    ``/etc/subgid`` (read by name or uid, as ``newuidmap`` does), container
    ids ``1..65536`` map onto the first 65536 of them, so ``nobody`` and
    other image users exist inside. Without, only root (0) exists inside.
    Every container of one user shares this mapping (as rootless Podman's
    do): they all run as that user anyway.
    """
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    subuid, subgid = subid_files()
    name = _login_name(uid) or str(uid)
    uids, gids = read_subid_file(subuid, name), read_subid_file(subgid, name)
    if name != str(uid):
        uids = uids or read_subid_file(subuid, str(uid))
        gids = gids or read_subid_file(subgid, str(uid))
    if uids and gids:
        n = min(RANGE_SIZE, uids[0].count, gids[0].count)
        return IdMapping(((0, uid, 1), (1, uids[0].start, n)), ((0, gid, 1), (1, gids[0].start, n)))
    return IdMapping(((0, uid, 1),), ((0, gid, 1),))


def write_maps(pid: int, mapping: IdMapping) -> None:
    """Write ``mapping`` for ``pid``'s new user namespace, as an unprivileged caller.

    The caller's own id alone: written directly (after ``setgroups`` is
    denied, as the kernel requires of an unprivileged writer). Anything
    more: through ``newuidmap``/``newgidmap`` (setuid root, Debian's
    ``uidmap`` package), which check the ranges against ``/etc/subuid``.
    """
    one = len(mapping.uid_map) == 1 and len(mapping.gid_map) == 1 and \
        mapping.uid_map[0][2] == 1 and mapping.gid_map[0][2] == 1
    if one:
        try:
            Path(f"/proc/{pid}/setgroups").write_text("deny")
            Path(f"/proc/{pid}/uid_map").write_text(mapping.uid_map_text())
            Path(f"/proc/{pid}/gid_map").write_text(mapping.gid_map_text())
        except OSError as exc:
            raise errors.ContainerError(f"cannot write the user namespace maps of {pid}: {exc}") from None
        return
    for tool, m in (("newuidmap", mapping.uid_map), ("newgidmap", mapping.gid_map)):
        exe = shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin")
        if exe is None:
            raise errors.ContainerError(f"{tool} is not installed (Debian: apt-get install uidmap)")
        argv = [exe, str(pid)] + [str(x) for extent in m for x in extent]
        res = subprocess.run(argv, capture_output=True, text=True, check=False, close_fds=True)
        if res.returncode != 0:
            raise errors.ContainerError(
                f"{tool} refused {' '.join(argv[2:])}: {res.stderr.strip() or f'exit {res.returncode}'} "
                "(check /etc/subuid and /etc/subgid)")


def run_in_userns(mapping: IdMapping, argv: Sequence[str], *, rootless: bool,
                  timeout: float = 120) -> tuple[int, str]:
    """Run host program ``argv`` as root of a new user namespace with ``mapping``; (exit code, stderr tail).

    Nothing else is new: the host's filesystem, pids and network. What a
    rootless caller needs its containers' root for: a writable layer holds
    files of the container's other users (subordinate ids), in folders the
    caller itself may not write, and only root of that mapping can remove
    them. The process keeps Docker's default capabilities, CAP_FSETID
    included (inside the namespace: over its mapped ids only; an image's
    setgid files keep their bit), and no_new_privs. ``rootless``: the
    caller is not root (:func:`rootless`, decided by the caller once), so the
    maps go through :func:`write_maps`.
    """
    arena = Arena()
    cfg = arena.new("struct jc_config *")
    cfg.clone_flags = native.CLONE_NEWUSER
    cfg.uid_map = arena.str(mapping.uid_map_text())
    cfg.gid_map = arena.str(mapping.gid_map_text())
    cfg.caller_maps = int(rootless)
    process = ProcessSpec(argv=tuple(argv), env={"PATH": DEFAULT_PATH, "LC_ALL": "C"},
                          capabilities=TOOL_CAPABILITIES)
    with open(os.devnull, "rb") as null, tempfile.TemporaryFile() as err:
        fill_process(arena, cfg, process, (null.fileno(), null.fileno(), err.fileno()), b"")
        proc = native.spawn(cfg)
        try:
            if rootless:
                write_maps(proc.pid, mapping)
                proc.proceed()
            proc.release()
            code = proc.wait(timeout)
            if code is None:
                raise errors.ContainerError(f"{argv[0]} in a user namespace took longer than {timeout:.0f} s")
        finally:
            proc.abort()
            proc.close()
        err.seek(0)
        return code, err.read()[-2000:].decode(errors="replace")
