"""What a container may use (:class:`Limits`) and what it used (:class:`Stats`): values only.

Owns parsing Docker's ``--memory``/``--cpus`` forms, checking limits when
they are built, and the machine-derived default memory limit for kernels
(:func:`default_memory_limit`, which reads ``/proc/meminfo`` once). Must not
read or write any other file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

from jupyter_contain.errors import InvalidSpec

DEFAULT_PIDS_LIMIT = 512
#: kernels' default memory limit: this share of the machine's memory...
DEFAULT_MEMORY_SHARE = 0.5
#: ...and never more than this
DEFAULT_MEMORY_CAP = 8 << 30
CPU_PERIOD_US = 100_000
#: the kernel refuses a CFS quota below 1 ms
MIN_CPUS = 0.01

_MEMORY_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")
_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}


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


def default_memory_limit(meminfo: str | None = None) -> int:
    """The memory limit a kernel gets unless its kernelspec or the server says otherwise.

    Half of the machine's memory (``MemTotal``), at most 8 GiB, in whole MiB:
    a runaway cell (``bytearray(30 << 30)``) then meets its own limit, and the
    OOM reason reaches the notebook, instead of pushing the whole machine into
    its OOM killer, which may pick the Jupyter server. Half leaves the other
    half to the server, the other kernels' working sets and the system (a
    4 GiB laptop: 2 GiB per kernel); the cap keeps one kernel on a large shared
    server (30 students on 256 GiB) from taking what others need, while 8 GiB
    still fits the data sets a notebook usually holds. Not a quota on the sum
    of kernels: each kernel has its own. ``memory none`` opts out.
    """
    if meminfo is None:
        with open("/proc/meminfo") as f:
            meminfo = f.read()
    total = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines()
                  if line.startswith("MemTotal:")), None)
    if total is None:
        return DEFAULT_MEMORY_CAP
    return min(DEFAULT_MEMORY_CAP, int(total * DEFAULT_MEMORY_SHARE)) // (1 << 20) << 20


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

    def controllers(self) -> list[str]:
        """The controllers these limits need ("memory", "cpu", "pids"), in that order."""
        need = {"memory": self.memory, "cpu": self.cpus, "pids": self.pids}
        return [c for c, v in need.items() if v is not None]


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
