"""Benchmark: ``jupyter contain build`` beside ``podman build``, cold and fully cached.

The Containerfile (issue #17): a base image (busybox from Debian's
busybox-static, imported into both engines), an apt-free RUN that writes
50 MB in 2000 files, a COPY of a 20 MB context (200 files of 100 KB, random),
and three metadata instructions. Each repetition times, per engine:
- cold: a build into an empty cache (ours: a fresh store with the base
  imported; podman: ``--no-cache`` into its own storage with the base pulled);
- cached: the same build again, nothing changed (every step a cache hit).
Contenders alternate within one run (see bench_snapshot.py on this disk).
Ours runs as the CLI does, in a fresh process (``jupyter-contain build``), so
both columns include a process start. Prints medians and ratios
(budgets: cold <= 0.7x podman, cached <= 0.2x podman).
Run: ``.venv/bin/python bench/bench_build.py [--reps N] [--no-podman]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from jupyter_contain.runtime.images import archive, bootstrap
from jupyter_contain.runtime.images.store import Store

RUN_PEER = Path("/work/shared/tools/run-peer")
CLI = Path(sys.executable).parent / "jupyter-contain"
CONTAINERFILE = """\
FROM {base}
RUN mkdir /data && i=0; while [ $i -lt 2000 ]; do head -c 25000 /dev/urandom > /data/f$i; i=$((i+1)); done
COPY ctx/ /ctx/
ENV BENCH=1
LABEL bench=build
CMD ["sh"]
"""
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "none"
"""


def _run(cmd: list[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} failed: {proc.stderr.strip()[-1500:]}")
    return proc.stdout


def _timed(cmd: list[str], **kw) -> float:
    t = time.monotonic()
    _run(cmd, **kw)
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-podman", action="store_true")
    args = ap.parse_args()
    work = Path(os.environ.get("TMPDIR", "/var/tmp")) / f"bench-build-{os.getpid()}"
    work.mkdir()
    results: dict[str, list[float]] = {"ours cold": [], "ours cached": [], "podman cold": [], "podman cached": []}
    try:
        ctx = work / "context"
        (ctx / "ctx").mkdir(parents=True)
        for i in range(200):
            (ctx / "ctx" / f"c{i}").write_bytes(os.urandom(100 * 1024))
        tar = bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX)
        env = dict(os.environ, CONTAINERS_CONF=str(work / "containers.conf"))
        (work / "containers.conf").write_text(CONTAINERS_CONF)
        podman = [str(RUN_PEER), "podman", "--root", str(work / "podman-root"), "--runroot",
                  str(work / "podman-run"), "--storage-driver", "overlay"]
        use_podman = not args.no_podman and shutil.which("podman") and RUN_PEER.exists()
        podman_base = ""
        if use_podman:
            seed = Store(work / "seed")
            archive.import_rootfs(seed, tar, "busybox:bench", cmd=["/bin/sh"])
            podman_base = _run(podman + ["pull", "-q", f"oci:{seed.root}:localhost/busybox:bench"], env=env).split()[-1]
            (ctx / "Containerfile.podman").write_text(CONTAINERFILE.format(base=podman_base))
        (ctx / "Containerfile").write_text(CONTAINERFILE.format(base="busybox:bench"))

        def ours(rep: int) -> tuple[float, float]:
            root = work / f"ours-{rep}"
            archive.import_rootfs(Store(root), tar, "busybox:bench", cmd=["/bin/sh"])
            cmd = [str(CLI), "--root", str(root), "build", "-q", "-t", f"bench:{rep}", str(ctx)]
            subprocess.run(["sync"], check=False)
            cold = _timed(cmd)
            cached = _timed(cmd)
            return cold, cached

        def podman_build(rep: int) -> tuple[float, float]:
            cmd = podman + ["build", "-q", "--network", "none", "-f", str(ctx / "Containerfile.podman"),
                            "-t", f"bench:{rep}", str(ctx)]
            subprocess.run(["sync"], check=False)
            cold = _timed(cmd[:len(podman) + 1] + ["--no-cache"] + cmd[len(podman) + 1:], env=env)
            cached = _timed(cmd, env=env)
            return cold, cached

        contenders = {"ours": ours}
        if use_podman:
            contenders["podman"] = podman_build
        names = list(contenders)
        print("Containerfile: RUN writing 2000 files (50 MB), COPY of a 20 MB context (200 files), "
              "ENV, LABEL, CMD", flush=True)
        for rep in range(args.reps):
            for name in names if rep % 2 == 0 else names[::-1]:
                cold, cached = contenders[name](rep)
                results[f"{name} cold"].append(cold)
                results[f"{name} cached"].append(cached)
                print(f"rep {rep + 1} {name:<7} cold {cold:6.2f} s   cached {cached:6.3f} s", flush=True)
    finally:
        if (work / "podman-root").exists():
            subprocess.run([str(RUN_PEER), "podman", "--root", str(work / "podman-root"), "--runroot",
                            str(work / "podman-run"), "--storage-driver", "overlay", "system", "reset", "-f"],
                           capture_output=True, check=False,
                           env=dict(os.environ, CONTAINERS_CONF=str(work / "containers.conf")))
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items() if v}
    print("\nmedians:")
    for k, v in med.items():
        print(f"  {k:<14} {v:7.3f} s  (runs: {', '.join(f'{x:.3f}' for x in results[k])})")
    for kind, budget in (("cold", 0.7), ("cached", 0.2)):
        if f"ours {kind}" in med and f"podman {kind}" in med:
            r = med[f"ours {kind}"] / med[f"podman {kind}"]
            print(f"  ours / podman build, {kind}: {r:.2f}x (budget <= {budget}x)"
                  f"{'' if r <= budget else '  OVER BUDGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
