"""Where container cgroups go: the hierarchies mounted here and this process's place in them.

Owns reading ``/proc/self/mountinfo`` and ``/proc/self/cgroup`` and choosing,
per hierarchy, the folder beneath which ``jupyter-contain/<name>`` is made
(:attr:`Hierarchy.base`). Must not create or write anything.

v1: the base is this process's own cgroup in each hierarchy.

v2: a cgroup that holds processes cannot hand controllers to its children (the
"no internal processes" rule; only the root cgroup is exempt), and a server
always lives in such a leaf (``/system.slice/jupyter.service``,
``.../app.slice/run-1.scope``). So the base is the deepest of the process's own
cgroup and its ancestors that this process may write and whose
``cgroup.subtree_control`` hands down memory, cpu and pids: under systemd, the
slice or the delegated ``user@.service`` subtree above the server's own leaf
(what systemd's ``Delegate=yes`` gives a user); in a container or a VM without
systemd, the root cgroup. Nothing is ever written to the base itself except
the mkdir of our own ``jupyter-contain`` folder.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_contain.errors import InvalidSpec

from .fs import REAL_FS, CgroupFS
from .limits import Limits

log = logging.getLogger(__name__)

PARENT_NAME = "jupyter-contain"
#: v1 controllers we use; every other hierarchy (name=systemd, blkio, devices,
#: net_cls, cpuset alone, ...) is never written to.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
#: v2 controllers we enable for container cgroups (freeze/kill are core files).
V2_CONTROLLERS = ("memory", "cpu", "pids")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidSpec(f"invalid container cgroup name {name!r}")


@dataclass(frozen=True)
class Hierarchy:
    """One mounted hierarchy, the cgroup this process is in there, and where ours go."""

    #: v1: the mount's controllers; v2: what ``base`` hands its children (its subtree_control)
    controllers: frozenset[str]
    mountpoint: Path
    own: Path  # directory of this process's cgroup in this hierarchy
    #: where the ``jupyter-contain`` folder is made: ``own`` (v1), own or an ancestor (v2)
    base: Path | None = None

    def __post_init__(self) -> None:
        if self.base is None:
            object.__setattr__(self, "base", self.own)

    @property
    def where(self) -> Path:
        assert self.base is not None
        return self.base


@dataclass(frozen=True)
class CgroupRoot:
    """Where container cgroups go. ``version`` None: no usable (delegated) cgroups."""

    version: int | None
    hierarchies: tuple[Hierarchy, ...] = ()
    parent_name: str = PARENT_NAME
    reason: str = ""  # why version is None, or what is missing
    fs: CgroupFS = field(default=REAL_FS, repr=False, compare=False)

    @property
    def usable(self) -> bool:
        return self.version is not None

    def unusable_reason(self) -> str | None:
        """Why containers cannot get cgroups here (None: they can), in words for a user."""
        if not self.usable:
            return f"no delegated cgroups: {self.reason}"
        for h in self.hierarchies:
            if not self.fs.writable(h.where):
                if self.version == 1:
                    return (f"{h.where} is not writable by uid {os.geteuid()} "
                            "(cgroup v1 hierarchies are the administrator's)")
                return (f"{h.where} is not writable by uid {os.geteuid()}: no part of the cgroup v2 tree "
                        f"above this process is delegated to it. {delegation_hint(h)}")
        return None

    def missing(self, limits: Limits) -> list[str]:
        """Controllers ``limits`` need that the containers' parent cannot have."""
        have: set[str] = set().union(*(h.controllers for h in self.hierarchies)) if self.hierarchies else set()
        return [c for c in limits.controllers() if c not in have]

    def parents(self) -> dict[str, Path]:
        """controller (v1) or "unified" (v2) -> the ``jupyter-contain`` folder."""
        out: dict[str, Path] = {}
        for h in self.hierarchies:
            keys = sorted(h.controllers & set(V1_CONTROLLERS)) if self.version == 1 else ["unified"]
            for key in keys:
                out[key] = h.where / self.parent_name
        return out

    def paths_for(self, name: str) -> dict[str, Path]:
        """Where :meth:`Cgroups.create` will make container ``name``'s folders (controller -> folder).

        Known before anything exists, so a start can record them first: a
        process killed between the mkdir and its own record leaves nothing
        the record does not name.
        """
        check_name(name)
        return {k: p / name for k, p in self.parents().items()}


def delegation_hint(h: Hierarchy) -> str:
    """What to configure so that this process's container cgroups get memory, cpu and pids (v2)."""
    ctrl = " ".join("+" + c for c in V2_CONTROLLERS)
    return ("Run the server in a cgroup delegated to this user, as systemd does for "
            "'systemd-run --user -p Delegate=yes --scope jupyter lab' or a unit with Delegate=yes "
            "(on older systemd: 'systemctl edit user@.service' with [Service] Delegate=cpu memory pids); "
            f"or, as root, give it a subtree: mkdir D; chown USER D D/cgroup.procs D/cgroup.subtree_control; "
            f"echo '{ctrl}' > D/cgroup.subtree_control (D's parent must list them too), "
            f"and start the server in a child of D (this process is in {h.own})")


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


def _v2_base(own: Path, mountpoint: Path, fs: CgroupFS) -> tuple[Path, frozenset[str]]:
    """The deepest of ``own`` and its ancestors we may write that hands down our controllers.

    The first (deepest) that hands down all of V2_CONTROLLERS wins; failing
    that, the deepest that hands down the most of them; failing that, ``own``
    (whose refusal then names what is missing). The walk never leaves the
    mount, nor climbs past a folder this process may not write.
    """
    want = set(V2_CONTROLLERS)
    best: tuple[int, Path, frozenset[str]] = (0, own, frozenset(fs.read_words(own / "cgroup.subtree_control")))
    d = own
    while True:
        if not fs.writable(d):
            break
        sub = frozenset(fs.read_words(d / "cgroup.subtree_control"))
        n = len(want & sub)
        if n == len(want):
            return d, sub
        if n > best[0]:
            best = (n, d, sub)
        if d == mountpoint or not d.is_relative_to(mountpoint):
            break
        d = d.parent
    return best[1], best[2]


def detect(*, proc_self_cgroup: Path = Path("/proc/self/cgroup"),
           mountinfo: Path = Path("/proc/self/mountinfo"),
           version: int | None = None,
           parent_name: str = PARENT_NAME,
           fs: CgroupFS = REAL_FS) -> CgroupRoot:
    """Find where this process may create container cgroups.

    v1 hierarchies that carry a controller we use win over the unified mount
    (a hybrid machine's unified mount tracks processes but holds no
    controllers). ``version`` forces one kind (tests, or a caller that knows).
    Never raises for a missing or unwritable tree: returns a root whose
    ``version`` is None and whose ``reason`` says why; ``Cgroups.create``
    raises that as a CgroupError.
    """
    if not NAME_RE.fullmatch(parent_name):
        raise InvalidSpec(f"invalid cgroup folder name {parent_name!r}")
    try:
        mounts = _parse_mountinfo(Path(mountinfo).read_text())
        v1_paths, v2_path = _parse_proc_cgroup(Path(proc_self_cgroup).read_text())
    except OSError as e:
        return CgroupRoot(None, parent_name=parent_name, reason=f"cannot read cgroup membership: {e}", fs=fs)

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
            if own is None or not fs.is_dir(own):
                log.debug("cgroup v1 %s at %s: our cgroup is not reachable", ",".join(sorted(ctrls)), mountpoint)
                continue
            seen.add(ctrls)
            # a comounted cpuset needs cpuset.cpus/mems copied into new cgroups
            v1.append(Hierarchy(ctrls | ({"cpuset"} & opts), mountpoint, own))
        elif fstype == "cgroup2" and unified is None and v2_path is not None:
            own = _own_dir(mount_root, mountpoint, v2_path)
            if own is None or not fs.is_dir(own):
                continue
            base, handed = _v2_base(own, mountpoint, fs)
            unified = Hierarchy(handed, mountpoint, own, base)

    want_v1 = version == 1 or (version is None and v1)
    if want_v1 and v1:
        return CgroupRoot(1, tuple(v1), parent_name=parent_name, fs=fs)
    if version in (None, 2) and unified is not None:
        return CgroupRoot(2, (unified,), parent_name=parent_name, fs=fs)
    what = {1: "no cgroup v1 hierarchy with memory, cpu, pids or freezer",
            2: "no cgroup v2 (unified) hierarchy"}.get(version or 0, "no cgroup hierarchy")
    return CgroupRoot(None, parent_name=parent_name, fs=fs,
                      reason=f"{what} is mounted where this process can reach its own cgroup")
