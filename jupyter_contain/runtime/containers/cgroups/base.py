"""One container's cgroups: the interface both backends give, and what they share.

Owns creating the container's folder(s) beneath ``<base>/jupyter-contain/``,
re-opening them from a record, the process list, freezing with a deadline,
kill-all and removal. The version-specific control files live in ``v1.py``
and ``v2.py``, as runc's ``fs`` and ``fs2``. Every file operation goes through
the injected :class:`~.fs.CgroupFS`.

Must not spawn processes or make syscalls beyond file I/O and kill(2). Never
writes to, moves processes out of, or removes a cgroup it did not create.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from jupyter_contain.errors import CgroupError

from .fs import REAL_FS, CgroupFS, fail
from .limits import Limits, Stats
from .placement import NAME_RE, PARENT_NAME, CgroupRoot, check_name, delegation_hint, detect

log = logging.getLogger(__name__)


@dataclass
class Cgroups(ABC):
    """One container's cgroup(s). Build with :meth:`create` or :meth:`open`."""

    version: ClassVar[int]

    name: str
    #: v1: controller -> directory (cpu and cpuacct may share one);
    #: v2: {"unified": directory}. For the container's record.
    paths: dict[str, Path]
    parent_name: str = PARENT_NAME
    poll_interval: float = field(default=0.005, repr=False)
    fs: CgroupFS = field(default=REAL_FS, repr=False, compare=False)

    # -- construction --

    @staticmethod
    def backend(version: int) -> type[Cgroups]:
        from .v1 import CgroupsV1
        from .v2 import CgroupsV2
        return {1: CgroupsV1, 2: CgroupsV2}[version]

    @classmethod
    def create(cls, name: str, limits: Limits, *, root: CgroupRoot | None = None) -> Cgroups:
        """Create the container's cgroups and write ``limits`` into them."""
        check_name(name)
        root = root if root is not None else detect()
        if not root.usable:
            raise CgroupError(f"no delegated cgroups for containers: {root.reason}")
        for h in root.hierarchies:
            if not root.fs.writable(h.where):
                raise CgroupError(
                    f"no delegated cgroups for containers: {h.where} is not writable by uid {os.geteuid()}"
                    + (" (run as root, or in a cgroup delegated to this user)" if root.version == 1
                       else f". {delegation_hint(h)}"))
        assert root.version is not None
        backend = cls.backend(root.version)
        backend.check_controllers(root, limits)
        self = backend(name, {}, root.parent_name, fs=root.fs)
        try:
            self._make(root, limits)
            self._write_limits(limits)
        except (OSError, CgroupError) as e:
            self._remove_dirs()
            if isinstance(e, CgroupError):
                raise
            raise CgroupError(f"cannot set up cgroup {name}: {e}") from e
        log.debug("created cgroups %s: %s", name, self.paths)
        return self

    @classmethod
    def open(cls, name: str, *, root: CgroupRoot | None = None,
             paths: dict[str, Path | str] | None = None, fs: CgroupFS | None = None) -> Cgroups:
        """Re-open a container's cgroups from another process.

        ``paths`` (the record's :attr:`paths`) wins; without it the paths are
        found again from ``root`` (which is only right for a process in the
        same cgroup as the creator).
        """
        check_name(name)
        if paths:
            fs = fs or (root.fs if root is not None else REAL_FS)
            found = {k: Path(v) for k, v in paths.items()}
            for p in found.values():
                # only folders we create: <base>/jupyter-contain*/<name>, so a stale or
                # edited record can never make us kill or remove someone else's cgroup
                if not p.is_absolute() or p.name != name or not p.parent.name.startswith(PARENT_NAME):
                    raise CgroupError(f"cgroup path {p} does not belong to container {name}")
            version = 2 if list(found) == ["unified"] else 1
            parent_name = next(iter(found.values())).parent.name
        else:
            root = root if root is not None else detect()
            if not root.usable:
                raise CgroupError(f"no delegated cgroups for containers: {root.reason}")
            assert root.version is not None
            fs = fs or root.fs
            version, parent_name = root.version, root.parent_name
            found = {k: p / name for k, p in root.parents().items()}
        found = {k: p for k, p in found.items() if fs.is_dir(p)}
        if not found:
            raise CgroupError(f"no cgroup for container {name}")
        return cls.backend(version)(name, found, parent_name, fs=fs)

    # -- what each backend gives --

    @classmethod
    @abstractmethod
    def check_controllers(cls, root: CgroupRoot, limits: Limits) -> None:
        """Raise CgroupError naming what to configure when ``limits`` cannot be enforced under ``root``."""

    @abstractmethod
    def _make(self, root: CgroupRoot, limits: Limits) -> None:
        """mkdir the container's folder(s), filling :attr:`paths` as each is made."""

    @abstractmethod
    def _write_limits(self, limits: Limits) -> None: ...

    @abstractmethod
    def spawn_args(self) -> dict[str, Any]:
        """How a new process enters these cgroups: keyword arguments for ``spawn.SpawnConfig``/``join``.

        Moving another process (:meth:`attach`) takes the write side of
        ``cgroup_threadgroup_rwsem``, which waits for an RCU grace period:
        5-13 ms on this 2-core machine. Each backend skips it its own way.
        """

    @abstractmethod
    def stats(self) -> Stats:
        """Live usage: a few small file reads, no process spawned."""

    @abstractmethod
    def memory_outcome(self) -> tuple[bool, int | None, int | None]:
        """(OOM-killed, memory limit, memory peak): what an exit record needs, in three reads."""

    @abstractmethod
    def _oom_kills(self) -> int | None: ...

    @abstractmethod
    def _freeze_file(self) -> tuple[Path, str, str]:
        """(file, frozen value, thawed value)."""

    @abstractmethod
    def _is_state(self, frozen: bool) -> bool: ...

    @abstractmethod
    def _kill_file(self) -> Path | None:
        """A file whose "1" kills every process at once (v2's cgroup.kill, kernel >= 5.14), or None."""

    @abstractmethod
    def _dir(self, controller: str) -> Path | None: ...

    # -- processes --

    def _dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.paths.values()))

    def attach(self, pid: int) -> None:
        """Move process ``pid`` (a child not yet released) into every hierarchy."""
        for d in self._dirs():
            try:
                self.fs.write(d / "cgroup.procs", str(pid))
            except OSError as e:
                raise fail(f"move process {pid} into", d, e) from e

    def pids(self) -> list[int]:
        """Every process in the container (union over the hierarchies)."""
        out: set[int] = set()
        for d in self._dirs():
            try:
                out.update(int(x) for x in self.fs.read(d / "cgroup.procs").split())
            except FileNotFoundError:
                continue
            except OSError as e:
                raise fail("read", d / "cgroup.procs", e) from e
        return sorted(out)

    # -- readout --

    def pids_outcome(self) -> tuple[int | None, int]:
        """(pids limit, forks refused at that limit): did the container run out of processes?"""
        d = self._dir("pids")
        if d is None:
            return None, 0
        limit = self.fs.read_int(d / "pids.max")   # "max" (no limit) reads as None
        return limit, self.fs.read_keyed(d / "pids.events").get("max", 0)

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process of this container."""
        return bool(self._oom_kills())

    # -- freezing --

    def _set_frozen(self, frozen: bool, timeout: float) -> None:
        path, on, off = self._freeze_file()
        value = on if frozen else off
        deadline = time.monotonic() + timeout
        try:
            self.fs.write(path, value)
            while not self._is_state(frozen):
                if time.monotonic() > deadline:
                    if frozen:  # do not leave it half frozen
                        try:
                            self.fs.write(path, off)
                        except OSError as e:
                            log.warning("cannot thaw %s after a failed freeze: %s", self.name, e)
                    raise CgroupError(f"container {self.name} did not become {'frozen' if frozen else 'thawed'}"
                                      f" within {timeout:g} s")
                time.sleep(self.poll_interval)
                if self.version == 1 and frozen:
                    # v1 can stay FREEZING when a task is busy; writing again retries
                    self.fs.write(path, value)
        except OSError as e:
            raise fail("freeze" if frozen else "thaw", path, e) from e

    def freeze(self, *, timeout: float = 5.0) -> None:
        """Stop every process; returns once the kernel reports FROZEN."""
        self._set_frozen(True, timeout)

    def thaw(self, *, timeout: float = 5.0) -> None:
        """Let every process run again; returns once the kernel reports THAWED."""
        self._set_frozen(False, timeout)

    def can_freeze(self) -> bool:
        try:
            self._freeze_file()
        except CgroupError:
            return False
        return True

    # -- teardown --

    def kill_all(self, sig: int = signal.SIGKILL, *, timeout: float = 5.0) -> None:
        """Signal every process; for SIGKILL, wait until the cgroup is empty."""
        if not self.pids():  # also when the folders are gone already
            return
        kill_file = self._kill_file() if sig == signal.SIGKILL else None
        if kill_file is not None:
            try:
                self.fs.write(kill_file, "1")  # the kernel kills every process, no fork race
            except OSError as e:
                raise fail("kill processes in", kill_file.parent, e) from e
        else:
            # Freeze first so nothing forks while we read the list; a frozen
            # process keeps its pid until it dies, so no pid is reused under us.
            can_freeze = self.can_freeze()
            try:
                if can_freeze:
                    try:
                        self.freeze(timeout=min(timeout, 2.0))
                    except CgroupError as e:  # still FREEZING: kill what we see anyway
                        log.debug("kill_all %s without a full freeze: %s", self.name, e)
                self._signal_all(sig)
            finally:
                if can_freeze:
                    # a signal reaches (and SIGKILL ends) a frozen task only once thawed
                    self.thaw(timeout=timeout)
        if sig != signal.SIGKILL:
            return
        deadline = time.monotonic() + timeout
        while True:
            left = self.pids()
            if not left:
                return
            if time.monotonic() > deadline:
                raise CgroupError(f"processes {left} of container {self.name} survived SIGKILL for {timeout:g} s")
            if kill_file is None:
                self._signal_all(sig)  # late forks seen when we could not freeze
            time.sleep(self.poll_interval)

    def _signal_all(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def destroy(self, *, timeout: float = 5.0) -> None:
        """Kill every process, remove our folders. Idempotent."""
        self.kill_all(timeout=timeout)
        self._remove_dirs(timeout=timeout)
        log.debug("destroyed cgroups %s", self.name)

    def _remove_dirs(self, *, timeout: float = 2.0) -> None:
        for d in self._dirs():
            self._rmdir_retry(d, timeout)
            parent = d.parent
            if parent.name == self.parent_name:
                # shared by every container: goes when the last one goes
                try:
                    self.fs.rmdir(parent)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                        log.debug("cannot remove %s: %s", parent, e)

    def _rmdir_retry(self, d: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.fs.rmdir(d)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                # EBUSY right after the last process died: the kernel is still unlinking it
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise fail("remove cgroup", d, e) from e
                time.sleep(0.01)

    def _make_leaf(self, parent: Path, *, v2_controllers: list[str] | None) -> Path:
        """mkdir parent (shared) and parent/name (ours, must be new)."""
        fs, name = self.fs, self.name
        for _ in range(5):
            try:
                fs.mkdir(parent)
            except FileExistsError:
                pass
            except OSError as e:
                raise fail("create cgroup", parent, e) from e
            if v2_controllers:
                # the parent holds no processes, so it may enable controllers for its children
                try:
                    have = set(fs.read(parent / "cgroup.subtree_control").split())
                    add = [c for c in v2_controllers if c not in have]
                    if add:
                        fs.write(parent / "cgroup.subtree_control", " ".join("+" + c for c in add))
                except FileNotFoundError:
                    continue  # removed by a concurrent destroy: start again
                except OSError as e:
                    raise fail("enable controllers in", parent, e) from e
            try:
                fs.mkdir(parent / name)
                return parent / name
            except FileExistsError:
                raise CgroupError(f"cgroup {parent / name} already exists (container {name} not cleaned up?)") from None
            except FileNotFoundError:
                continue  # parent removed by a concurrent destroy of the last container
            except OSError as e:
                raise fail("create cgroup", parent / name, e) from e
        raise CgroupError(f"cannot create cgroup {parent / name}: its parent keeps disappearing")


def find_orphans(*, root: CgroupRoot | None = None, exclude: Iterable[str] = ()) -> list[str]:
    """Names of container cgroups on disk (for gc), less ``exclude``."""
    root = root if root is not None else detect()
    skip = set(exclude)
    names: set[str] = set()
    for parent in set(root.parents().values()):
        try:
            entries = root.fs.subdirs(parent)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise fail("list", parent, e) from e
        names.update(n for n in entries if NAME_RE.fullmatch(n))
    return sorted(names - skip)
