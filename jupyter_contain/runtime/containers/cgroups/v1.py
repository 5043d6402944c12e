"""cgroup v1: one folder per hierarchy (memory, cpu+cpuacct, pids, freezer), as runc's ``fs``.

Owns the v1 control files: ``memory.limit_in_bytes`` + ``memory.memsw.limit_in_bytes``
(no swap beyond the limit), ``cpu.cfs_quota_us``, ``pids.max``, ``freezer.state``,
``memory.oom_control``, and the ``tasks`` files a new process writes itself into.
Must not touch a hierarchy other than those ``placement.V1_CONTROLLERS`` names.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from jupyter_contain.errors import CgroupError

from .base import Cgroups
from .limits import CPU_PERIOD_US, Limits, Stats
from .placement import V1_CONTROLLERS, CgroupRoot

log = logging.getLogger(__name__)

#: v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 on x86-64)
_V1_UNLIMITED = 1 << 62


class CgroupsV1(Cgroups):
    version = 1

    @classmethod
    def check_controllers(cls, root: CgroupRoot, limits: Limits) -> None:
        missing = root.missing(limits)
        if missing:
            raise CgroupError(f"cannot limit {', '.join(missing)}: no cgroup v1 hierarchy carries that controller")

    def _make(self, root: CgroupRoot, limits: Limits) -> None:
        fs = self.fs
        for h in root.hierarchies:
            d = self._make_leaf(h.where / root.parent_name, v2_controllers=None)
            for c in sorted(h.controllers & set(V1_CONTROLLERS)):
                self.paths[c] = d
            if "cpuset" in h.controllers:
                # a fresh cpuset cgroup has no cpus/mems and refuses tasks:
                # copy them down from our own cgroup (as runc does)
                for target in (d.parent, d):
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        if not fs.read(target / f).strip():
                            fs.write(target / f, fs.read(target.parent / f).strip())

    def _write_limits(self, limits: Limits) -> None:
        fs, paths = self.fs, self.paths
        if limits.memory is not None:
            d = paths["memory"]
            fs.write(d / "memory.limit_in_bytes", str(limits.memory))
            # memsw (memory+swap) exists only with swap accounting; equal to
            # the memory limit means no swap beyond it.
            if fs.exists(d / "memory.memsw.limit_in_bytes"):
                fs.write(d / "memory.memsw.limit_in_bytes", str(limits.memory))
            try:
                fs.write(d / "memory.swappiness", "0")
            except OSError as e:  # refused under some hierarchies; the memsw limit is what counts
                log.debug("memory.swappiness not set for %s: %s", self.name, e)
        if limits.cpus is not None:
            d = paths["cpu"]
            fs.write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            fs.write(d / "cpu.cfs_quota_us", str(limits.cpu_quota_us))
        if limits.pids is not None:
            fs.write(paths["pids"] / "pids.max", str(limits.pids))

    def spawn_args(self) -> dict[str, Any]:
        # cgroup_tasks: each hierarchy's ``tasks`` file, where the new
        # (single-threaded) process writes "0" to move itself, without the RCU wait
        return {"cgroup_tasks": tuple(d / "tasks" for d in self._dirs())}

    def _dir(self, controller: str) -> Path | None:
        return self.paths.get(controller)

    def _limit(self, mem: Path) -> int | None:
        limit = self.fs.read_int(mem / "memory.limit_in_bytes")
        return None if limit is None or limit >= _V1_UNLIMITED else limit

    def stats(self) -> Stats:
        fs = self.fs
        mem, cpu, pids = self._dir("memory"), self._dir("cpuacct"), self._dir("pids")
        return Stats(
            memory_current=fs.read_int(mem / "memory.usage_in_bytes") if mem else None,
            memory_peak=fs.read_int(mem / "memory.max_usage_in_bytes") if mem else None,
            memory_limit=self._limit(mem) if mem else None,
            cpu_usage_ns=fs.read_int(cpu / "cpuacct.usage") if cpu else None,
            pids_current=fs.read_int(pids / "pids.current") if pids else None,
            pids_limit=fs.read_int(pids / "pids.max") if pids else None,
            oom_kills=self._oom_kills(),
        )

    def memory_outcome(self) -> tuple[bool, int | None, int | None]:
        mem = self._dir("memory")
        if mem is None:
            return False, None, None
        return self.oom_killed(), self._limit(mem), self.fs.read_int(mem / "memory.max_usage_in_bytes")

    def _oom_kills(self) -> int | None:
        d = self._dir("memory")
        # "oom_kill N" in memory.oom_control (kernel >= 4.13)
        return None if d is None else self.fs.read_keyed(d / "memory.oom_control").get("oom_kill")

    def _freeze_file(self) -> tuple[Path, str, str]:
        d = self.paths.get("freezer")
        if d is None:
            raise CgroupError(f"cannot freeze container {self.name}: no freezer cgroup")
        return d / "freezer.state", "FROZEN", "THAWED"

    def _is_state(self, frozen: bool) -> bool:
        return self.fs.read(self.paths["freezer"] / "freezer.state").strip() == ("FROZEN" if frozen else "THAWED")

    def _kill_file(self) -> Path | None:
        return None
