"""User-namespace id mappings: which host ids a container's ids become.

Owns :class:`IdMapping` (a container's ``uid_map``/``gid_map``, the text the
kernel takes, the OCI ``uidMappings`` form, the JSON kept in ``state.json``),
reading the subordinate id ranges of ``/etc/subuid`` and ``/etc/subgid``
(:func:`subordinate_ranges`), handing out one distinct 65536-id slice of them
per container (:class:`Allocator`: an ``O_EXCL`` reservation file per slice,
so concurrent processes never get the same one and no lock is held), and the
administrator's one-time setup (:func:`setup_commands`, :func:`ensure_subids`:
``useradd`` + ``usermod --add-subuids/--add-subgids``, as Debian expects).

Rootless (a caller that is not root): :func:`rootless_mapping` (container
root is the caller itself; ids 1..65536 come from the caller's own
subordinate ranges when it has some) and :func:`write_maps`, which writes
such a mapping for a child between clone and release, through the setuid
``newuidmap``/``newgidmap`` (or directly, for the caller's one id).

Must not: mount anything, write a map for root (the native spawn does,
between clone and release, and makes the one-id mappings of idmapped host
folders there too: container root <-> the folder's owner, nothing else), or
edit ``/etc/subuid`` other than through ``usermod``. No import-time side effects.

Why distinct slices (Podman's ``--userns=auto``), not one range shared by all
containers: a process of container A runs as host ids nobody else has, so it
cannot signal, trace or write files of container B (a shared bind mount, a
leaked fd) the way two containers with the same host root could.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_contain import errors

log = logging.getLogger(__name__)

__all__ = [
    "RANGE_SIZE",
    "SUBID_USER",
    "Allocator",
    "IdMapping",
    "SubidRange",
    "ensure_subids",
    "rootless_mapping",
    "setup_commands",
    "subordinate_ranges",
    "write_maps",
]

#: ids per container: 0..65535 inside, like Podman's and Docker's default
RANGE_SIZE = 65536
#: the system user whose subordinate ranges containers use (root's are the fallback)
SUBID_USER = "jupyter-contain"
#: what :func:`ensure_subids` asks for: 1024 containers' worth
DEFAULT_SUBID_COUNT = RANGE_SIZE * 1024

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


def _subid_files() -> tuple[Path, Path]:
    # overridable so that tests (and unusual hosts) need not edit /etc
    return (Path(os.environ.get("JUPYTER_CONTAIN_SUBUID_FILE", "/etc/subuid")),
            Path(os.environ.get("JUPYTER_CONTAIN_SUBGID_FILE", "/etc/subgid")))


def subordinate_ranges(user: str | None = None) -> tuple[str, list[SubidRange], list[SubidRange]]:
    """``(owner, uid ranges, gid ranges)`` for containers' user namespaces.

    ``user`` (default ``$JUPYTER_CONTAIN_SUBID_USER`` or ``jupyter-contain``)
    first, then ``root``'s own entries. Raises
    :class:`~jupyter_contain.errors.ContainerError` with the setup commands
    when neither has both a uid and a gid range.
    """
    user = user or os.environ.get("JUPYTER_CONTAIN_SUBID_USER", SUBID_USER)
    subuid, subgid = _subid_files()
    for owner in dict.fromkeys((user, "root")):
        uids, gids = read_subid_file(subuid, owner), read_subid_file(subgid, owner)
        if uids and gids:
            return owner, uids, gids
    cmds = "; ".join(" ".join(c) for c in setup_commands(user, existing=()))
    raise errors.ContainerError(
        f"no subordinate ids for user namespaces: neither {user!r} nor root has an entry in both {subuid} and "
        f"{subgid}. As root, run: {cmds}   (or use --userns host)")


def _slices(ranges: Sequence[SubidRange], size: int) -> list[int]:
    out = []
    for r in ranges:
        start = r.start
        while start + size <= r.end:
            out.append(start)
            start += size
    return out


class Allocator:
    """Hands out distinct ``size``-id slices of the subordinate ranges, one per owner.

    A reservation is a file ``<dir>/<host uid>`` created with ``O_EXCL``
    holding the owner's id: atomic across processes without a lock, and it
    survives restarts, so a container keeps its slice until it is removed.
    A reservation whose owner is gone (``alive(owner)`` false, file older
    than a minute so a container still being created is never robbed) is
    taken over.
    """

    def __init__(self, directory: Path, *, size: int = RANGE_SIZE, user: str | None = None) -> None:
        self.dir = Path(directory)
        self.size = size
        self.user = user

    def allocate(self, owner: str, *, alive: Callable[[str], bool] = lambda _: True) -> IdMapping:
        if not owner or "/" in owner or "\n" in owner:
            raise errors.InvalidSpec(f"invalid id range owner {owner!r}")
        _, uids, gids = subordinate_ranges(self.user)
        uid_slices, gid_slices = _slices(uids, self.size), _slices(gids, self.size)
        self.dir.mkdir(parents=True, exist_ok=True)
        for uid0, gid0 in zip(uid_slices, gid_slices):
            path = self.dir / str(uid0)
            for _attempt in range(2):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                except FileExistsError:
                    if self._stale(path, alive):
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                        continue
                    break
                try:
                    os.write(fd, f"{owner}\n{gid0}\n".encode())
                finally:
                    os.close(fd)
                log.debug("user namespace ids %d+%d / %d+%d for %s", uid0, self.size, gid0, self.size, owner)
                return IdMapping.single(uid0, gid0, self.size)
        raise errors.ContainerError(
            f"every subordinate id range of {self.size} ids is taken ({len(uid_slices)} in all): remove "
            "containers, or give the subordinate-id user more ids (usermod --add-subuids/--add-subgids)")

    def _stale(self, path: Path, alive: Callable[[str], bool]) -> bool:
        try:
            owner = path.read_text().split("\n", 1)[0]
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > 60 and not alive(owner)

    def release(self, owner: str, mapping: IdMapping) -> None:
        """Give ``owner``'s slice back (only if the reservation is still its own)."""
        path = self.dir / str(mapping.uid_map[0][1])
        try:
            if path.read_text().split("\n", 1)[0] == owner:
                path.unlink()
        except FileNotFoundError:
            pass

    def owners(self) -> dict[str, int]:
        """owner -> first host uid, for every reservation."""
        out = {}
        with contextlib.suppress(FileNotFoundError):
            for p in self.dir.iterdir():
                with contextlib.suppress(OSError):
                    out[p.read_text().split("\n", 1)[0]] = int(p.name)
        return out


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
    subuid, subgid = _subid_files()
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


def _free_start(existing: Iterable[SubidRange], count: int, *, floor: int = 100000) -> int:
    """The lowest start >= ``floor``, a multiple of 65536, where ``count`` ids overlap no existing range."""
    taken = sorted((r.start, r.end) for r in existing)
    start = max(floor, RANGE_SIZE)
    start = -(-start // RANGE_SIZE) * RANGE_SIZE
    for s, e in taken:
        if start < e and s < start + count:
            start = -(-e // RANGE_SIZE) * RANGE_SIZE
    return start


def _all_ranges(path: Path) -> list[SubidRange]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out.append(SubidRange(int(parts[1]), int(parts[2])))
    return out


def setup_commands(user: str = SUBID_USER, *, count: int = DEFAULT_SUBID_COUNT,
                   existing: Iterable[SubidRange] | None = None) -> list[list[str]]:
    """The commands that give ``user`` ``count`` subordinate uids and gids (a Debian admin's way).

    The range starts above every existing entry of both files (``existing``
    overrides what is read from them).
    """
    if existing is None:
        subuid, subgid = _subid_files()
        existing = _all_ranges(subuid) + _all_ranges(subgid)
    start = _free_start(existing, count)
    span = f"{start}-{start + count - 1}"
    cmds = []
    try:
        pwd.getpwnam(user)
    except KeyError:
        cmds.append(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                     "--shell", "/usr/sbin/nologin", user])
    cmds.append(["usermod", "--add-subuids", span, "--add-subgids", span, user])
    return cmds


def ensure_subids(user: str = SUBID_USER, *, count: int = DEFAULT_SUBID_COUNT) -> bool:
    """Give ``user`` subordinate ids unless it has some; True if anything was changed.

    Runs :func:`setup_commands` (``useradd``, ``usermod``): an explicit admin
    action (needs root), never done implicitly by a container start.
    """
    subuid, subgid = _subid_files()
    if read_subid_file(subuid, user) and read_subid_file(subgid, user):
        return False
    for cmd in setup_commands(user, count=count):
        if shutil.which(cmd[0]) is None:
            raise errors.ContainerError(f"{cmd[0]} is not installed (Debian: the passwd package)")
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise errors.ContainerError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.returncode}")
        log.info("ran %s", " ".join(cmd))
    return True
