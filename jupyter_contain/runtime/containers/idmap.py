"""User-namespace id slices for containers: which host ids a container's ids become.

:class:`IdMapping`, reading subordinate id files, :func:`rootless_mapping`
and :func:`write_maps` live in ``runtime.userns`` (below both halves of the
runtime: the image half needs them too) and are re-exported here. Owns
reading the subordinate id ranges of ``/etc/subuid`` and ``/etc/subgid``
(:func:`subordinate_ranges`), handing out one distinct 65536-id slice of them
per container (:class:`Allocator`: an ``O_EXCL`` reservation file per slice,
so concurrent processes never get the same one and no lock is held), and the
administrator's one-time setup (:func:`setup_commands`, :func:`ensure_subids`:
``useradd`` + ``usermod --add-subuids/--add-subgids``, as Debian expects).

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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from jupyter_contain import errors
from jupyter_contain.runtime.userns import (  # re-exported: moved below both halves of the runtime
    RANGE_SIZE,
    IdMapping,
    SubidRange,
    read_subid_file,
    rootless_mapping,
    write_maps,
)
from jupyter_contain.runtime.userns import subid_files as _subid_files

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

#: the system user whose subordinate ranges containers use (root's are the fallback)
SUBID_USER = "jupyter-contain"
#: what :func:`ensure_subids` asks for: 1024 containers' worth
DEFAULT_SUBID_COUNT = RANGE_SIZE * 1024


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
