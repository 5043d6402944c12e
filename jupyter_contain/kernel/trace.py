"""Where a kernel start's time goes: named marks, logged at debug level as a breakdown.

Owns :class:`StartTrace`, the provisioner's record of one start (cold or
pooled): each mark is the time since the previous one, so the breakdown adds
up to the whole. Must not measure anything itself beyond the clock, or log
above debug level (a start is not worth a line at info). The benchmark
(``bench/bench_kernel.py --trace``) reads :meth:`StartTrace.breakdown` from
the provisioner and adds what only a client sees (the kernel's sockets bound,
the first reply).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

__all__ = ["StartTrace"]


class StartTrace:
    """Marks of one kernel start (``time.perf_counter``)."""

    def __init__(self, kernel_id: str) -> None:
        self.kernel_id = kernel_id
        self.t0 = time.perf_counter()
        self.marks: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter()))

    def breakdown(self) -> list[tuple[str, float]]:
        """(step, milliseconds since the previous mark), in order."""
        out, prev = [], self.t0
        for name, t in self.marks:
            out.append((name, (t - prev) * 1000))
            prev = t
        return out

    def total_ms(self) -> float:
        return ((self.marks[-1][1] if self.marks else self.t0) - self.t0) * 1000

    def log(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("kernel %s start: %s (%.1f ms)", self.kernel_id,
                      ", ".join(f"{n} {ms:.1f}" for n, ms in self.breakdown()), self.total_ms())
