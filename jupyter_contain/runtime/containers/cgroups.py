"""Container cgroups, v1 and v2 behind one interface.

Owns every cgroup file the runtime reads or writes: finding the hierarchies
(``/proc/self/mountinfo``) and the cgroup this process is in
(``/proc/self/cgroup``), creating one cgroup per container beneath it in a
parent folder named ``jupyter-contain``, writing the limits (memory with no
swap beyond it, CPU quota, pids), attaching processes (and telling a new
process how to enter them without the costly move: :meth:`Cgroups.spawn_args`),
reading usage, OOM kills, freezing, killing every process and removing the
folders again.

Must not spawn processes, make syscalls beyond file I/O and kill(2), or import
anything Jupyter. Never writes to, moves processes out of, or removes a cgroup
it did not create: every directory it touches lies beneath
``<our cgroup>/jupyter-contain/``.

Layout (``<own>`` is this process's cgroup in that hierarchy)::

    v1:  <mount of memory>/<own>/jupyter-contain/<name>   (likewise cpu, cpuacct, pids, freezer)
    v2:  <unified mount>/<own>/jupyter-contain/<name>

On a hybrid machine (v1 controllers plus a controller-less unified mount) the
v1 hierarchies are used and the unified one is left alone.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from jupyter_contain.errors import CgroupError, InvalidSpec
from jupyter_contain.runtime.fsutil import read_small

log = logging.getLogger(__name__)

DEFAULT_PIDS_LIMIT = 512
PARENT_NAME = "jupyter-contain"
CPU_PERIOD_US = 100_000
#: the kernel refuses a CFS quota below 1 ms
MIN_CPUS = 0.01

#: v1 controllers we use; every other hierarchy (name=systemd, blkio, devices,
#: net_cls, cpuset alone, ...) is never written to.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
#: v2 controllers we enable for container cgroups (freeze/kill are core files).
V2_CONTROLLERS = ("memory", "cpu", "pids")

#: v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 on x86-64)
_V1_UNLIMITED = 1 << 62

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MEMORY_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")
_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}


# --- limits -----------------------------------------------------------------

def parse_memory(text: str) -> int:
    """Parse a memory size ("512m", "1g", "1.5GiB", "1048576") into bytes.

    Units are binary, as Docker's ``--memory`` takes them (k = 1024).
    """
    m = _MEMORY_RE.fullmatch(text or "")
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise InvalidSpec(f"invalid memory size {text!r} (examples: 512m, 1g, 1.5GiB, 1048576)")
    value = int(Decimal(m.group(1)) * _UNITS[unit])  # exact, unlike float
    if value <= 0:
        raise InvalidSpec(f"invalid memory size {text!r}: must be more than 0 bytes")
    return value


def parse_cpus(text: str) -> float:
    """Parse a CPU count ("1.5") as Docker's ``--cpus`` takes it."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InvalidSpec(f"invalid CPU count {text!r} (examples: 0.5, 2)") from None
    _check_cpus(value, text)
    return value


def _check_cpus(value: float, shown: object) -> None:
    if not math.isfinite(value) or value < MIN_CPUS:
        raise InvalidSpec(f"invalid CPU count {shown!r}: must be a number of at least {MIN_CPUS}")


@dataclass(frozen=True)
class Limits:
    """What a container may use. ``None`` means no limit."""

    memory: int | None = None  # bytes; no swap beyond it
    cpus: float | None = None  # 1.5 -> quota 150000 us per 100000 us period
    pids: int | None = DEFAULT_PIDS_LIMIT

    def __post_init__(self) -> None:
        if self.memory is not None and (isinstance(self.memory, bool) or int(self.memory) != self.memory
                                        or self.memory <= 0):
            raise InvalidSpec(f"invalid memory limit {self.memory!r}: must be a positive number of bytes")
        if self.cpus is not None:
            _check_cpus(float(self.cpus), self.cpus)
        if self.pids is not None and (isinstance(self.pids, bool) or int(self.pids) != self.pids
                                      or self.pids <= 0):
            raise InvalidSpec(f"invalid pids limit {self.pids!r}: must be a positive integer")

    @property
    def cpu_quota_us(self) -> int | None:
        return None if self.cpus is None else round(self.cpus * CPU_PERIOD_US)


@dataclass(frozen=True)
class Stats:
    """A container's live usage; ``None`` where the kernel does not tell."""

    memory_current: int | None
    memory_peak: int | None
    memory_limit: int | None  # None: unlimited
    cpu_usage_ns: int | None
    pids_current: int | None
    pids_limit: int | None  # None: unlimited
    oom_kills: int | None


# --- detection --------------------------------------------------------------

@dataclass(frozen=True)
class Hierarchy:
    """One mounted hierarchy and the cgroup this process is in there."""

    controllers: frozenset[str]  # v1: the mount's controllers; v2: own cgroup.controllers
    mountpoint: Path
    own: Path  # directory of this process's cgroup in this hierarchy


@dataclass(frozen=True)
class CgroupRoot:
    """Where container cgroups go. ``version`` None: no usable (delegated) cgroups."""

    version: int | None
    hierarchies: tuple[Hierarchy, ...] = ()
    parent_name: str = PARENT_NAME
    reason: str = ""  # why version is None, or what is missing

    @property
    def usable(self) -> bool:
        return self.version is not None

    def unusable_reason(self) -> str | None:
        """Why containers cannot get cgroups here (None: they can), in words for a user."""
        if not self.usable:
            return f"no delegated cgroups: {self.reason}"
        for h in self.hierarchies:
            if not os.access(h.own, os.W_OK):
                kind = "cgroup v1 hierarchies are the administrator's" if self.version == 1 else \
                    "the cgroup v2 tree is not delegated (a systemd unit with Delegate=yes would)"
                return f"{h.own} is not writable by uid {os.geteuid()} ({kind})"
        return None

    def parents(self) -> dict[str, Path]:
        """controller (v1) or "unified" (v2) -> the ``jupyter-contain`` folder."""
        out: dict[str, Path] = {}
        for h in self.hierarchies:
            keys = sorted(h.controllers & set(V1_CONTROLLERS)) if self.version == 1 else ["unified"]
            for key in keys:
                out[key] = h.own / self.parent_name
        return out

    def paths_for(self, name: str) -> dict[str, Path]:
        """Where :meth:`Cgroups.create` will make container ``name``'s folders (controller -> folder).

        Known before anything exists, so a start can record them first: a
        process killed between the mkdir and its own record leaves nothing
        the record does not name.
        """
        _check_name(name)
        return {k: p / name for k, p in self.parents().items()}


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def _parse_mountinfo(text: str) -> list[tuple[str, Path, str, set[str]]]:
    """-> (mount root, mountpoint, fstype, superoptions) of every cgroup mount."""
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if "-" not in parts:
            continue
        sep = parts.index("-")
        if sep < 6 or len(parts) < sep + 4:
            continue
        fstype = parts[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        mounts.append((_unescape(parts[3]), Path(_unescape(parts[4])), fstype, set(parts[sep + 3].split(","))))
    return mounts


def _parse_proc_cgroup(text: str) -> tuple[dict[frozenset[str], str], str | None]:
    """-> ({v1 controller set: path}, v2 path or None)."""
    v1: dict[frozenset[str], str] = {}
    v2 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "" and parts[0] == "0":
            v2 = path
        elif ctrls:
            v1[frozenset(ctrls.split(","))] = path
    return v1, v2


def _own_dir(mount_root: str, mountpoint: Path, path: str) -> Path | None:
    """The directory of cgroup ``path`` in a mount whose root is ``mount_root``."""
    if path.endswith(" (deleted)"):
        return None
    root = mount_root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        # The mount shows another part of the hierarchy (a bind of a sibling):
        # our cgroup is not reachable through it.
        return None
    rel = path[len(root):].lstrip("/")
    return mountpoint / rel if rel else mountpoint


def detect(*, proc_self_cgroup: Path = Path("/proc/self/cgroup"),
           mountinfo: Path = Path("/proc/self/mountinfo"),
           version: int | None = None,
           parent_name: str = PARENT_NAME) -> CgroupRoot:
    """Find where this process may create container cgroups.

    v1 hierarchies that carry a controller we use win over the unified mount
    (a hybrid machine's unified mount tracks processes but holds no
    controllers). ``version`` forces one kind (tests, or a caller that knows).
    Never raises for a missing or unwritable tree: returns a root whose
    ``version`` is None and whose ``reason`` says why; ``Cgroups.create``
    raises that as a CgroupError.
    """
    if not _NAME_RE.fullmatch(parent_name):
        raise InvalidSpec(f"invalid cgroup folder name {parent_name!r}")
    try:
        mounts = _parse_mountinfo(Path(mountinfo).read_text())
        v1_paths, v2_path = _parse_proc_cgroup(Path(proc_self_cgroup).read_text())
    except OSError as e:
        return CgroupRoot(None, parent_name=parent_name, reason=f"cannot read cgroup membership: {e}")

    v1: list[Hierarchy] = []
    seen: set[frozenset[str]] = set()
    unified: Hierarchy | None = None
    for mount_root, mountpoint, fstype, opts in mounts:
        if fstype == "cgroup":
            ctrls = frozenset(o for o in opts if o in V1_CONTROLLERS)
            if not ctrls or ctrls in seen:
                continue
            # /proc/self/cgroup names the full controller set of the hierarchy
            # (e.g. "cpu,cpuacct" or "cpuset,cpu"): find the line that has ours.
            key = next((k for k in v1_paths if ctrls <= k), None)
            own = _own_dir(mount_root, mountpoint, v1_paths[key]) if key else None
            if own is None or not own.is_dir():
                log.debug("cgroup v1 %s at %s: our cgroup is not reachable", ",".join(sorted(ctrls)), mountpoint)
                continue
            seen.add(ctrls)
            # a comounted cpuset needs cpuset.cpus/mems copied into new cgroups
            v1.append(Hierarchy(ctrls | ({"cpuset"} & opts), mountpoint, own))
        elif fstype == "cgroup2" and unified is None and v2_path is not None:
            own = _own_dir(mount_root, mountpoint, v2_path)
            if own is None or not own.is_dir():
                continue
            try:
                ctrls = frozenset((own / "cgroup.controllers").read_text().split())
            except OSError:
                ctrls = frozenset()
            unified = Hierarchy(ctrls, mountpoint, own)

    want_v1 = version == 1 or (version is None and v1)
    if want_v1 and v1:
        return CgroupRoot(1, tuple(v1), parent_name=parent_name)
    if version in (None, 2) and unified is not None:
        return CgroupRoot(2, (unified,), parent_name=parent_name)
    what = {1: "no cgroup v1 hierarchy with memory, cpu, pids or freezer",
            2: "no cgroup v2 (unified) hierarchy"}.get(version or 0, "no cgroup hierarchy")
    return CgroupRoot(None, parent_name=parent_name,
                      reason=f"{what} is mounted where this process can reach its own cgroup")


# --- file I/O (the only places that touch cgroupfs; tests swap them for a fake kernel) ---

def _write(path: Path, value: str) -> None:
    # No O_CREAT: a control file that does not exist means a missing controller.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _mkdir(path: Path) -> None:
    os.mkdir(path, 0o755)


def _rmdir(path: Path) -> None:
    os.rmdir(path)


def _read(path: Path) -> str:
    return read_small(path).decode("ascii")


def _read_int(path: Path) -> int | None:
    """An integer control file; None if missing, "max" or unreadable."""
    try:
        text = _read(path).strip()
    except OSError:
        return None
    if text == "max" or not text:
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed file ("key value" lines): memory.events, cpu.stat, oom_control."""
    out: dict[str, int] = {}
    try:
        text = _read(path)
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def _fail(action: str, path: Path, e: OSError) -> CgroupError:
    return CgroupError(f"cannot {action} {path}: {e.strerror or e}")


# --- one container's cgroups ------------------------------------------------

@dataclass
class Cgroups:
    """One container's cgroup(s). Build with :meth:`create` or :meth:`open`."""

    name: str
    version: int
    #: v1: controller -> directory (cpu and cpuacct may share one);
    #: v2: {"unified": directory}. For the container's record.
    paths: dict[str, Path]
    parent_name: str = PARENT_NAME
    poll_interval: float = field(default=0.005, repr=False)

    # -- construction --

    @classmethod
    def create(cls, name: str, limits: Limits, *, root: CgroupRoot | None = None) -> Cgroups:
        """Create the container's cgroups and write ``limits`` into them."""
        _check_name(name)
        root = root if root is not None else detect()
        if not root.usable:
            raise CgroupError(f"no delegated cgroups for containers: {root.reason}")
        for h in root.hierarchies:
            if not os.access(h.own, os.W_OK):
                raise CgroupError(
                    f"no delegated cgroups for containers: {h.own} is not writable by uid {os.geteuid()}"
                    " (run as root, or in a cgroup delegated to this user, e.g. a systemd unit with Delegate=yes)")
        if root.version == 1:
            self = cls._create_v1(name, limits, root)
        else:
            self = cls._create_v2(name, limits, root)
        log.debug("created cgroups %s: %s", name, self.paths)
        return self

    @classmethod
    def _create_v1(cls, name: str, limits: Limits, root: CgroupRoot) -> Cgroups:
        have = set().union(*(h.controllers for h in root.hierarchies))
        need = {"memory": limits.memory, "cpu": limits.cpus, "pids": limits.pids}
        missing = [c for c, v in need.items() if v is not None and c not in have]
        if missing:
            raise CgroupError(f"cannot limit {', '.join(missing)}: no cgroup v1 hierarchy carries that controller")
        paths: dict[str, Path] = {}
        self = cls(name, 1, paths, root.parent_name)
        try:
            for h in root.hierarchies:
                d = _make_leaf(h.own / root.parent_name, name, v2_controllers=None)
                for c in sorted(h.controllers & set(V1_CONTROLLERS)):
                    paths[c] = d
                if "cpuset" in h.controllers:
                    # a fresh cpuset cgroup has no cpus/mems and refuses tasks:
                    # copy them down from our own cgroup (as runc does)
                    for target in (d.parent, d):
                        for f in ("cpuset.cpus", "cpuset.mems"):
                            if not _read(target / f).strip():
                                _write(target / f, _read(target.parent / f).strip())
            if limits.memory is not None:
                d = paths["memory"]
                _write(d / "memory.limit_in_bytes", str(limits.memory))
                # memsw (memory+swap) exists only with swap accounting; equal to
                # the memory limit means no swap beyond it.
                if (d / "memory.memsw.limit_in_bytes").exists():
                    _write(d / "memory.memsw.limit_in_bytes", str(limits.memory))
                try:
                    _write(d / "memory.swappiness", "0")
                except OSError as e:  # refused under some hierarchies; the memsw limit is what counts
                    log.debug("memory.swappiness not set for %s: %s", name, e)
            if limits.cpus is not None:
                d = paths["cpu"]
                _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(limits.cpu_quota_us))
            if limits.pids is not None:
                _write(paths["pids"] / "pids.max", str(limits.pids))
        except (OSError, CgroupError) as e:
            self._remove_dirs()
            if isinstance(e, CgroupError):
                raise
            raise CgroupError(f"cannot set up cgroup {name}: {e}") from e
        return self

    @classmethod
    def _create_v2(cls, name: str, limits: Limits, root: CgroupRoot) -> Cgroups:
        h = root.hierarchies[0]
        # Controllers reach our children only if our own cgroup enables them in
        # its cgroup.subtree_control. We never write there: our cgroup holds
        # processes (us), and the "no internal processes" rule forbids it anyway.
        try:
            delegated = set(_read(h.own / "cgroup.subtree_control").split())
        except OSError as e:
            raise _fail("read", h.own / "cgroup.subtree_control", e) from e
        need = {"memory": limits.memory, "cpu": limits.cpus, "pids": limits.pids}
        missing = [c for c, v in need.items() if v is not None and c not in delegated]
        if missing:
            ctrl = " ".join("+" + c for c in missing)
            raise CgroupError(
                f"cgroup v2 controllers {', '.join(missing)} are not delegated to the children of {h.own}: "
                f"its cgroup.subtree_control must list them (echo '{ctrl}' > {h.own}/cgroup.subtree_control, "
                "which the kernel allows only while that cgroup holds no processes; e.g. run under "
                "systemd with Delegate=yes, or move this process into a leaf cgroup first)")
        enable = [c for c in V2_CONTROLLERS if c in delegated]
        self = cls(name, 2, {}, root.parent_name)
        try:
            d = _make_leaf(h.own / root.parent_name, name, v2_controllers=enable)
            self.paths["unified"] = d
            if limits.memory is not None:
                _write(d / "memory.max", str(limits.memory))
                if (d / "memory.swap.max").exists():  # absent without swap accounting
                    _write(d / "memory.swap.max", "0")
            if limits.cpus is not None:
                _write(d / "cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}")
            if limits.pids is not None:
                _write(d / "pids.max", str(limits.pids))
        except (OSError, CgroupError) as e:
            self._remove_dirs()
            if isinstance(e, CgroupError):
                raise
            raise CgroupError(f"cannot set up cgroup {name}: {e}") from e
        return self

    @classmethod
    def open(cls, name: str, *, root: CgroupRoot | None = None,
             paths: dict[str, Path | str] | None = None) -> Cgroups:
        """Re-open a container's cgroups from another process.

        ``paths`` (the record's :attr:`paths`) wins; without it the paths are
        found again from ``root`` (which is only right for a process in the
        same cgroup as the creator).
        """
        _check_name(name)
        if paths:
            found = {k: Path(v) for k, v in paths.items()}
            for p in found.values():
                # only folders we create: <own>/jupyter-contain*/<name>, so a stale or
                # edited record can never make us kill or remove someone else's cgroup
                if not p.is_absolute() or p.name != name or not p.parent.name.startswith(PARENT_NAME):
                    raise CgroupError(f"cgroup path {p} does not belong to container {name}")
            version = 2 if list(found) == ["unified"] else 1
            parent_name = next(iter(found.values())).parent.name
        else:
            root = root if root is not None else detect()
            if not root.usable:
                raise CgroupError(f"no delegated cgroups for containers: {root.reason}")
            version, parent_name = root.version, root.parent_name
            found = {k: p / name for k, p in root.parents().items()}
        found = {k: p for k, p in found.items() if p.is_dir()}
        if not found:
            raise CgroupError(f"no cgroup for container {name}")
        return cls(name, version, found, parent_name)

    # -- processes --

    def _dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.paths.values()))

    def attach(self, pid: int) -> None:
        """Move process ``pid`` (a child not yet released) into every hierarchy."""
        for d in self._dirs():
            try:
                _write(d / "cgroup.procs", str(pid))
            except OSError as e:
                raise _fail(f"move process {pid} into", d, e) from e

    def spawn_args(self) -> dict[str, Any]:
        """How a new process enters these cgroups: keyword arguments for ``spawn.SpawnConfig``/``join``.

        Moving another process (:meth:`attach`) takes the write side of
        ``cgroup_threadgroup_rwsem``, which waits for an RCU grace period:
        5-13 ms on this 2-core machine. Two ways skip it:
        v1: ``cgroup_tasks``, each hierarchy's ``tasks`` file, where the new
        (single-threaded) process writes "0" to move itself;
        v2: ``cgroup_dir``, the cgroup the process is cloned into
        (``CLONE_INTO_CGROUP``; v2 has no ``tasks`` file).
        """
        if self.version == 2:
            return {"cgroup_dir": self.paths["unified"]}
        return {"cgroup_tasks": tuple(d / "tasks" for d in self._dirs())}

    def pids(self) -> list[int]:
        """Every process in the container (union over the hierarchies)."""
        out: set[int] = set()
        for d in self._dirs():
            try:
                out.update(int(x) for x in _read(d / "cgroup.procs").split())
            except FileNotFoundError:
                continue
            except OSError as e:
                raise _fail("read", d / "cgroup.procs", e) from e
        return sorted(out)

    # -- readout --

    def _dir(self, controller: str) -> Path | None:
        return self.paths.get("unified" if self.version == 2 else controller)

    def stats(self) -> Stats:
        """Live usage: a few small file reads, no process spawned."""
        mem, cpu, pids = self._dir("memory"), self._dir("cpuacct"), self._dir("pids")
        if self.version == 2:
            d = self.paths["unified"]  # one directory holds every controller's files
            cpu_usec = _read_keyed(d / "cpu.stat").get("usage_usec")  # core file, no cpu controller needed
            return Stats(
                memory_current=_read_int(d / "memory.current"),
                memory_peak=_read_int(d / "memory.peak"),  # kernel >= 5.19
                memory_limit=_read_int(d / "memory.max"),
                cpu_usage_ns=None if cpu_usec is None else cpu_usec * 1000,
                pids_current=_read_int(d / "pids.current"),
                pids_limit=_read_int(d / "pids.max"),
                oom_kills=self._oom_kills(),
            )
        limit = _read_int(mem / "memory.limit_in_bytes") if mem else None
        return Stats(
            memory_current=_read_int(mem / "memory.usage_in_bytes") if mem else None,
            memory_peak=_read_int(mem / "memory.max_usage_in_bytes") if mem else None,
            memory_limit=None if limit is None or limit >= _V1_UNLIMITED else limit,
            cpu_usage_ns=_read_int(cpu / "cpuacct.usage") if cpu else None,
            pids_current=_read_int(pids / "pids.current") if pids else None,
            pids_limit=_read_int(pids / "pids.max") if pids else None,
            oom_kills=self._oom_kills(),
        )

    def memory_outcome(self) -> tuple[bool, int | None, int | None]:
        """(OOM-killed, memory limit, memory peak): what an exit record needs, in three reads."""
        mem = self._dir("memory")
        if mem is None:
            return False, None, None
        if self.version == 2:
            return self.oom_killed(), _read_int(mem / "memory.max"), _read_int(mem / "memory.peak")
        limit = _read_int(mem / "memory.limit_in_bytes")
        return (self.oom_killed(), None if limit is None or limit >= _V1_UNLIMITED else limit,
                _read_int(mem / "memory.max_usage_in_bytes"))

    def pids_outcome(self) -> tuple[int | None, int]:
        """(pids limit, forks refused at that limit): did the container run out of processes?"""
        d = self._dir("pids")
        if d is None:
            return None, 0
        limit = _read_int(d / "pids.max")   # "max" (no limit) reads as None
        return limit, _read_keyed(d / "pids.events").get("max", 0)

    def _oom_kills(self) -> int | None:
        d = self._dir("memory")
        if d is None:
            return None
        # v1: "oom_kill N" in memory.oom_control (kernel >= 4.13)
        f = d / ("memory.events" if self.version == 2 else "memory.oom_control")
        return _read_keyed(f).get("oom_kill")

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process of this container."""
        return bool(self._oom_kills())

    # -- freezing --

    def _freeze_file(self) -> tuple[Path, str, str]:
        if self.version == 2:
            return self.paths["unified"] / "cgroup.freeze", "1", "0"
        d = self.paths.get("freezer")
        if d is None:
            raise CgroupError(f"cannot freeze container {self.name}: no freezer cgroup")
        return d / "freezer.state", "FROZEN", "THAWED"

    def _is_state(self, frozen: bool) -> bool:
        if self.version == 2:
            return _read_keyed(self.paths["unified"] / "cgroup.events").get("frozen") == int(frozen)
        return _read(self.paths["freezer"] / "freezer.state").strip() == ("FROZEN" if frozen else "THAWED")

    def _set_frozen(self, frozen: bool, timeout: float) -> None:
        path, on, off = self._freeze_file()
        value = on if frozen else off
        deadline = time.monotonic() + timeout
        try:
            _write(path, value)
            while not self._is_state(frozen):
                if time.monotonic() > deadline:
                    if frozen:  # do not leave it half frozen
                        try:
                            _write(path, off)
                        except OSError as e:
                            log.warning("cannot thaw %s after a failed freeze: %s", self.name, e)
                    raise CgroupError(f"container {self.name} did not become {'frozen' if frozen else 'thawed'}"
                                      f" within {timeout:g} s")
                time.sleep(self.poll_interval)
                if self.version == 1 and frozen:
                    # v1 can stay FREEZING when a task is busy; writing again retries
                    _write(path, value)
        except OSError as e:
            raise _fail("freeze" if frozen else "thaw", path, e) from e

    def freeze(self, *, timeout: float = 5.0) -> None:
        """Stop every process; returns once the kernel reports FROZEN."""
        self._set_frozen(True, timeout)

    def thaw(self, *, timeout: float = 5.0) -> None:
        """Let every process run again; returns once the kernel reports THAWED."""
        self._set_frozen(False, timeout)

    # -- teardown --

    def kill_all(self, sig: int = signal.SIGKILL, *, timeout: float = 5.0) -> None:
        """Signal every process; for SIGKILL, wait until the cgroup is empty."""
        if not self.pids():  # also when the folders are gone already
            return
        kill_file = self.paths.get("unified", Path("/nonexistent")) / "cgroup.kill"
        if self.version == 2 and sig == signal.SIGKILL and kill_file.exists():
            try:
                _write(kill_file, "1")  # kernel kills every process, no fork race
            except OSError as e:
                raise _fail("kill processes in", kill_file.parent, e) from e
        else:
            # Freeze first so nothing forks while we read the list; a frozen
            # process keeps its pid until it dies, so no pid is reused under us.
            can_freeze = self.version == 2 or "freezer" in self.paths
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
            if self.version == 1 or not kill_file.exists():
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
            _rmdir_retry(d, timeout)
            parent = d.parent
            if parent.name == self.parent_name:
                # shared by every container: goes when the last one goes
                try:
                    _rmdir(parent)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                        log.debug("cannot remove %s: %s", parent, e)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidSpec(f"invalid container cgroup name {name!r}")


def _make_leaf(parent: Path, name: str, *, v2_controllers: list[str] | None) -> Path:
    """mkdir parent (shared) and parent/name (ours, must be new)."""
    for _ in range(5):
        try:
            _mkdir(parent)
        except FileExistsError:
            pass
        except OSError as e:
            raise _fail("create cgroup", parent, e) from e
        if v2_controllers:
            # the parent holds no processes, so it may enable controllers for its children
            try:
                have = set(_read(parent / "cgroup.subtree_control").split())
                add = [c for c in v2_controllers if c not in have]
                if add:
                    _write(parent / "cgroup.subtree_control", " ".join("+" + c for c in add))
            except FileNotFoundError:
                continue  # removed by a concurrent destroy: start again
            except OSError as e:
                raise _fail("enable controllers in", parent, e) from e
        try:
            _mkdir(parent / name)
            return parent / name
        except FileExistsError:
            raise CgroupError(f"cgroup {parent / name} already exists (container {name} not cleaned up?)") from None
        except FileNotFoundError:
            continue  # parent removed by a concurrent destroy of the last container
        except OSError as e:
            raise _fail("create cgroup", parent / name, e) from e
    raise CgroupError(f"cannot create cgroup {parent / name}: its parent keeps disappearing")


def _rmdir_retry(d: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            # EBUSY right after the last process died: the kernel is still unlinking it
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise _fail("remove cgroup", d, e) from e
            time.sleep(0.01)


def find_orphans(*, root: CgroupRoot | None = None, exclude: Iterable[str] = ()) -> list[str]:
    """Names of container cgroups on disk (for gc), less ``exclude``."""
    root = root if root is not None else detect()
    skip = set(exclude)
    names: set[str] = set()
    for parent in set(root.parents().values()):
        try:
            entries = list(os.scandir(parent))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise _fail("list", parent, e) from e
        names.update(e.name for e in entries if e.is_dir(follow_symlinks=False) and _NAME_RE.fullmatch(e.name))
    return sorted(names - skip)
