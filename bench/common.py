"""Shared helpers of the benchmark scripts: timing, percentiles, tables, peer engines.

Owns: percentiles and the p50/p95 table and ratio printing, timed subprocess
runs, the rotating order in which contenders alternate, Pss of a process,
the podman ``containers.conf`` these machines need, and :class:`PeerShell`
(one long-lived helper inside ``/work/shared/tools/run-peer`` that starts and
times peer engines, so run-peer's own set-up is never in a measurement).

Must not: import the package (the scripts do), touch anything outside the
folders the caller passes, or end processes it did not start. Importing it
has no side effects.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

RUN_PEER = Path("/work/shared/tools/run-peer")

#: root lacks CAP_SYS_RESOURCE here: podman's default rlimits fail unless they stay within the hard
#: limits; netns "none" and its own tmp_dir keep it off the machine's networking and /run/libpod
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "{tmp_dir}"
"""

# The helper run inside run-peer: reads one JSON request per line ({"argv": [...]}), runs it with
# stdin from /dev/null and output to a temp file (a detached payload may keep it open: a pipe
# would block), answers one JSON line {"rc", "secs", "out"}. Timed with perf_counter around the
# child's whole life, as a warm process calling a CLI sees it.
_PEER_HELPER = r"""
import json, os, subprocess, sys, tempfile, time
for line in sys.stdin:
    req = json.loads(line)
    with tempfile.TemporaryFile() as out:
        t = time.perf_counter()
        rc = subprocess.call(req["argv"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        secs = time.perf_counter() - t
        out.seek(0)
        text = out.read()[-4000:].decode(errors="replace")
    sys.stdout.write(json.dumps({"rc": rc, "secs": secs, "out": text}) + "\n")
    sys.stdout.flush()
"""


def pct(values: Sequence[float], q: float) -> float:
    """Percentile ``q`` (0..100) with linear interpolation between the nearest ranks."""
    s = sorted(values)
    if not s:
        raise ValueError("no values")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def rotations(names: Sequence[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """Yield (round, order): the order rotates by one each round, and reverses every other round.

    The machine's disk and CPU are noisy and shared: no contender may always
    run first, or always right after the same other one.
    """
    n = len(names)
    for r in range(rounds):
        order = list(names[r % n:]) + list(names[:r % n])
        yield r, order if r % 2 == 0 else order[::-1]


def run_checked(cmd: Sequence[str], **kw) -> str:
    """Run ``cmd``; its stdout, or RuntimeError with the tail of its stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return proc.stdout


def timed_run(cmd: Sequence[str], **kw) -> float:
    """Seconds ``cmd`` took from spawn to exit (output discarded); RuntimeError if it failed."""
    t = time.perf_counter()
    proc = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False, **kw)
    secs = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()[-1500:]}")
    return secs


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (shared pages divided among their users)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss line for pid {pid}")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's)."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            continue
    return out


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def print_times(results: Mapping[str, Sequence[float]], *, title: str, scale: float = 1000.0,
                unit: str = "ms") -> None:
    """One row per contender: p50, p95, mean and the count, ``values * scale`` in ``unit``."""
    print(title)
    print(f"  {'':16s} {'p50':>8s} {'p95':>8s} {'mean':>8s} {'n':>4s}  ({unit})")
    for name, vals in results.items():
        if not vals:
            continue
        v = [x * scale for x in vals]
        print(f"  {name:16s} {pct(v, 50):8.1f} {pct(v, 95):8.1f} {statistics.fmean(v):8.1f} {len(v):4d}")


def print_ratios(results: Mapping[str, Sequence[float]], ours: Sequence[str], peers: Sequence[str], *,
                 budgets: Mapping[str, float] | None = None) -> None:
    """Ratios ours/peer at p50 and p95; a peer with a budget gets OK/OVER on the p50 ratio."""
    budgets = budgets or {}
    for o in ours:
        for p in peers:
            if not results.get(o) or not results.get(p):
                continue
            r50 = pct(results[o], 50) / pct(results[p], 50)
            r95 = pct(results[o], 95) / pct(results[p], 95)
            verdict = ""
            if p in budgets:
                verdict = f"  budget <= {budgets[p]:.2f}x: {'OK' if r50 <= budgets[p] else 'OVER'}"
            print(f"  {o + ' / ' + p:30s} p50 {r50:5.2f}x   p95 {r95:5.2f}x{verdict}")


def write_containers_conf(work: Path) -> dict[str, str]:
    """Write podman's containers.conf into ``work``; the environment that makes podman use it."""
    tmp_dir = work / "podman-tmp"
    tmp_dir.mkdir(exist_ok=True)
    conf = work / "containers.conf"
    conf.write_text(CONTAINERS_CONF.format(tmp_dir=tmp_dir))
    return dict(os.environ, CONTAINERS_CONF=str(conf))


class PeerShell:
    """A warm helper process inside run-peer's cgroup + mount namespace that runs and times commands.

    Only peer engines go through it (crun, runc, podman create cgroups at
    absolute paths); our own runtime never needs it.
    """

    def __init__(self, *, env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([str(RUN_PEER), sys.executable, "-u", "-c", _PEER_HELPER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=dict(env) if env is not None else None)

    def run(self, argv: Sequence[str], *, check: bool = True) -> tuple[int, float, str]:
        """(exit code, seconds from spawn to exit, output tail) of ``argv`` run by the helper."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv]}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"run-peer helper ended (exit {self.proc.wait()})")
        rep = json.loads(line)
        if check and rep["rc"] != 0:
            raise RuntimeError(f"{' '.join(map(str, argv[:4]))} failed ({rep['rc']}): {rep['out'].strip()[-1500:]}")
        return rep["rc"], rep["secs"], rep["out"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
