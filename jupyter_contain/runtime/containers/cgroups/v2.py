"""cgroup v2: one folder in the unified hierarchy, as runc's ``fs2``.

Owns the v2 control files: ``memory.max`` + ``memory.swap.max`` 0 (no swap beyond
the limit), ``cpu.max``, ``pids.max``, ``memory.events`` (OOM kills),
``cgroup.freeze``/``cgroup.events``, ``cgroup.kill``, and the folder a new process
is cloned into (``CLONE_INTO_CGROUP``). Must not write to the base folder it
creates ``jupyter-contain`` in (that one is the administrator's or systemd's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jupyter_contain.errors import CgroupError

from .base import Cgroups
from .fs import fail
from .limits import CPU_PERIOD_US, Limits, Stats
from .placement import V2_CONTROLLERS, CgroupRoot, delegation_hint


class CgroupsV2(Cgroups):
    version = 2

    @classmethod
    def check_controllers(cls, root: CgroupRoot, limits: Limits) -> None:
        # Controllers reach our folder only if the base hands them down in its
        # cgroup.subtree_control (placement chose the deepest base that does).
        # We never write there: the base is not ours.
        h = root.hierarchies[0]
        try:
            delegated = set(root.fs.read(h.where / "cgroup.subtree_control").split())
        except OSError as e:
            raise fail("read", h.where / "cgroup.subtree_control", e) from e
        missing = [c for c in limits.controllers() if c not in delegated]
        if missing:
            raise CgroupError(
                f"cgroup v2 controllers {', '.join(missing)} are not delegated to the children of {h.where} "
                f"(its cgroup.subtree_control lists {' '.join(sorted(delegated)) or 'none'}), nor to any "
                f"cgroup above it this process may write. {delegation_hint(h)}")

    def _make(self, root: CgroupRoot, limits: Limits) -> None:
        h = root.hierarchies[0]
        delegated = set(self.fs.read(h.where / "cgroup.subtree_control").split())
        enable = [c for c in V2_CONTROLLERS if c in delegated]
        self.paths["unified"] = self._make_leaf(h.where / root.parent_name, v2_controllers=enable)

    def _write_limits(self, limits: Limits) -> None:
        fs, d = self.fs, self.paths["unified"]
        if limits.memory is not None:
            fs.write(d / "memory.max", str(limits.memory))
            if fs.exists(d / "memory.swap.max"):  # absent without swap accounting
                fs.write(d / "memory.swap.max", "0")
        if limits.cpus is not None:
            fs.write(d / "cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}")
        if limits.pids is not None:
            fs.write(d / "pids.max", str(limits.pids))

    def spawn_args(self) -> dict[str, Any]:
        # cgroup_dir: the cgroup the process is cloned into (CLONE_INTO_CGROUP,
        # kernel >= 5.7; v2 has no ``tasks`` file)
        return {"cgroup_dir": self.paths["unified"]}

    def _dir(self, controller: str) -> Path | None:
        return self.paths.get("unified")

    def stats(self) -> Stats:
        fs, d = self.fs, self.paths["unified"]  # one directory holds every controller's files
        cpu_usec = fs.read_keyed(d / "cpu.stat").get("usage_usec")  # core file, no cpu controller needed
        return Stats(
            memory_current=fs.read_int(d / "memory.current"),
            memory_peak=fs.read_int(d / "memory.peak"),  # kernel >= 5.19
            memory_limit=fs.read_int(d / "memory.max"),
            cpu_usage_ns=None if cpu_usec is None else cpu_usec * 1000,
            pids_current=fs.read_int(d / "pids.current"),
            pids_limit=fs.read_int(d / "pids.max"),
            oom_kills=self._oom_kills(),
        )

    def memory_outcome(self) -> tuple[bool, int | None, int | None]:
        d = self.paths["unified"]
        return self.oom_killed(), self.fs.read_int(d / "memory.max"), self.fs.read_int(d / "memory.peak")

    def _oom_kills(self) -> int | None:
        return self.fs.read_keyed(self.paths["unified"] / "memory.events").get("oom_kill")

    def _freeze_file(self) -> tuple[Path, str, str]:
        return self.paths["unified"] / "cgroup.freeze", "1", "0"

    def _is_state(self, frozen: bool) -> bool:
        return self.fs.read_keyed(self.paths["unified"] / "cgroup.events").get("frozen") == int(frozen)

    def _kill_file(self) -> Path | None:
        f = self.paths["unified"] / "cgroup.kill"   # kernel >= 5.14
        return f if self.fs.exists(f) else None
