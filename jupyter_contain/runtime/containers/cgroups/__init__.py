"""Container cgroups, v1 and v2 behind one interface.

Owns every cgroup file the runtime reads or writes: finding the hierarchies
and where container cgroups go (``placement``), creating one cgroup per
container beneath a parent folder named ``jupyter-contain``, writing the
limits (memory with no swap beyond it, CPU quota, pids), attaching processes
(and telling a new process how to enter them without the costly move:
:meth:`Cgroups.spawn_args`), reading usage, OOM kills, freezing, killing every
process and removing the folders again.

- ``limits``: :class:`Limits`, :class:`Stats`, parsing (values only);
- ``fs``: :class:`CgroupFS`, the only file I/O (tests inject a fake kernel);
- ``placement``: :func:`detect`, :class:`CgroupRoot`;
- ``base``: :class:`Cgroups`, the interface and what both versions share;
- ``v1``, ``v2``: the version-specific control files (runc's ``fs`` and ``fs2``).

Must not spawn processes, make syscalls beyond file I/O and kill(2), or import
anything Jupyter. Never writes to, moves processes out of, or removes a cgroup
it did not create: every directory it writes lies beneath
``<base>/jupyter-contain/``.

Layout (``<own>`` is this process's cgroup in that hierarchy)::

    v1:  <mount of memory>/<own>/jupyter-contain/<name>   (likewise cpu, cpuacct, pids, freezer)
    v2:  <unified mount>/<base>/jupyter-contain/<name>    (base: <own> or the nearest ancestor
                                                           that delegates memory, cpu and pids)

On a hybrid machine (v1 controllers plus a controller-less unified mount) the
v1 hierarchies are used and the unified one is left alone.
"""

from __future__ import annotations

from .base import Cgroups, find_orphans
from .fs import REAL_FS, CgroupFS
from .limits import (
    CPU_PERIOD_US,
    DEFAULT_MEMORY_CAP,
    DEFAULT_PIDS_LIMIT,
    MIN_CPUS,
    Limits,
    Stats,
    default_memory_limit,
    parse_cpus,
    parse_memory,
)
from .placement import PARENT_NAME, V1_CONTROLLERS, V2_CONTROLLERS, CgroupRoot, Hierarchy, detect
from .v1 import CgroupsV1
from .v2 import CgroupsV2

__all__ = [
    "CPU_PERIOD_US", "DEFAULT_MEMORY_CAP", "DEFAULT_PIDS_LIMIT", "MIN_CPUS", "PARENT_NAME", "REAL_FS", "V1_CONTROLLERS",
    "V2_CONTROLLERS", "CgroupFS", "CgroupRoot", "Cgroups", "CgroupsV1", "CgroupsV2", "Hierarchy", "Limits",
    "Stats", "default_memory_limit", "detect", "find_orphans", "parse_cpus", "parse_memory",
]
