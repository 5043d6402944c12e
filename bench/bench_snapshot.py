"""Benchmark: snapshot of a 100 MB writable layer, beside ``podman commit`` of the same content.

Each repetition makes a fresh container in each engine, writes 1000 files of
100 KB into it (from ``/dev/urandom``: incompressible, the worst case for
gzip; ``--content text`` writes compressible text instead), lets it exit, and
times only the commit:
- ours: ``snapshot(runtime, container, tag)`` (library call: freeze, copy into
  the unpacked layer, tar + DiffID + parallel gzip in one pass, image, tag);
- ours-zstd: the same with ``compress="zstd"``;
- podman: ``podman commit`` (through run-peer, with its own --root/--runroot and
  containers.conf in a temp folder).
Contenders alternate within one run (the disk here is slow for a while after a
big delete). Prints medians and the ratio to podman (budget: <= 0.5x).
Run: ``.venv/bin/python bench/bench_snapshot.py [--reps N] [--content random|text]``.
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

from jupyter_contain.runtime import commit as snap
from jupyter_contain.runtime.containers.container import ContainerSpec, Runtime
from jupyter_contain.runtime.images import archive, bootstrap
from jupyter_contain.runtime.images.store import Store

RUN_PEER = Path("/work/shared/tools/run-peer")
FILES, SIZE = 1000, 100 * 1024
SCRIPTS = {
    "random": f"mkdir /data; i=0; while [ $i -lt {FILES} ]; do head -c {SIZE} /dev/urandom > /data/f$i; "
              "i=$((i+1)); done",
    # compressible, like source files and wheels' text: hexdump lines of random bytes
    "text": f"mkdir /data; i=0; while [ $i -lt {FILES} ]; do head -c {SIZE // 4} /dev/urandom | od -An -tx1 | "
            f"head -c {SIZE} > /data/f$i; i=$((i+1)); done",
}
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
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {proc.stderr.strip()[-1500:]}")
    return proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--content", choices=sorted(SCRIPTS), default="random")
    ap.add_argument("--no-podman", action="store_true")
    args = ap.parse_args()
    script = SCRIPTS[args.content]

    # podman names an image pulled from oci:DIR after DIR: keep the path a valid reference
    work = Path(os.environ.get("TMPDIR", "/var/tmp")) / f"bench-snap-{os.getpid()}"
    work.mkdir()
    results: dict[str, list[float]] = {"ours": [], "ours-zstd": [], "podman": []}
    phases: dict[str, list[float]] = {"frozen (archive + copy)": [], "sync blob + image": []}
    try:
        store = Store(work / "store")
        archive.import_rootfs(store, bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX), "busybox:bench",
                              cmd=["/bin/sh"])
        rt = Runtime(store)
        env = dict(os.environ, CONTAINERS_CONF=str(work / "containers.conf"))
        (work / "containers.conf").write_text(CONTAINERS_CONF)
        podman = [str(RUN_PEER), "podman", "--root", str(work / "podman-root"), "--runroot",
                  str(work / "podman-run"), "--storage-driver", "overlay"]
        use_podman = not args.no_podman and shutil.which("podman") and RUN_PEER.exists()
        image_id = ""
        if use_podman:
            image_id = _run(podman + ["pull", "-q", f"oci:{store.root}:localhost/busybox:bench"], env=env).split()[-1]

        def ours(compress: str, rep: int) -> float:
            c = rt.create(ContainerSpec(image="busybox:bench", command=("sh", "-c", script)))
            try:
                c.start()
                info = c.wait(300)
                assert info is not None and info.code == 0, info
                subprocess.run(["sync"], check=False)
                stages: dict[str, float] = {}

                def progress(stage: str, done: int, total: int) -> None:
                    stages.setdefault(stage, time.monotonic())

                t = time.monotonic()
                rec = snap.snapshot(rt, c, f"bench-{compress}:{rep}", compress=compress, progress=progress)
                secs = time.monotonic() - t
                if compress == "gzip" and "commit" in stages:
                    phases["frozen (archive + copy)"].append(stages["commit"] - t)
                    phases["sync blob + image"].append(t + secs - stages["commit"])
                size = rec.manifest.layers[-1].size
                print(f"    layer {size / 1e6:.1f} MB {compress}", flush=True)
                store.rmi(rec.name)
                return secs
            finally:
                c.remove(force=True)
                store.gc()

        def podman_commit(rep: int) -> float:
            name = f"bench{rep}"
            try:
                _run(podman + ["run", "--name", name, image_id, "sh", "-c", script], env=env)
                subprocess.run(["sync"], check=False)
                t = time.monotonic()
                _run(podman + ["commit", "-q", name, f"bench:{rep}"], env=env)
                return time.monotonic() - t
            finally:
                subprocess.run(podman + ["rm", "-f", name], capture_output=True, env=env, check=False)
                subprocess.run(podman + ["rmi", "-f", f"bench:{rep}"], capture_output=True, env=env, check=False)

        contenders = {"ours": lambda r: ours("gzip", r), "ours-zstd": lambda r: ours("zstd", r)}
        if use_podman:
            contenders["podman"] = podman_commit
        names = list(contenders)
        print(f"content: {FILES} files x {SIZE // 1024} KB ({args.content}) per container", flush=True)
        for rep in range(args.reps):
            for name in names if rep % 2 == 0 else names[::-1]:
                secs = contenders[name](rep)
                results[name].append(secs)
                print(f"rep {rep + 1} {name:<10} {secs:6.2f} s", flush=True)
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
        print(f"  {k:<10} {v:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in results[k])})")
    for k, v in phases.items():
        if v:
            print(f"  ours (gzip) {k}: median {statistics.median(v):.2f} s")
    for ours_name in ("ours", "ours-zstd"):
        if ours_name in med and "podman" in med:
            r = med[ours_name] / med["podman"]
            print(f"  {ours_name} / podman commit: {r:.2f}x (budget <= 0.5x){'' if r <= 0.5 else '  OVER BUDGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
