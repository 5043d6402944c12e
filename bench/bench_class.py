"""Benchmark: a class of N kernels (30 by default) starting at once, beside N local ipykernels.

The teaching workflow's class side (issue #18), timed in one run:
- ``cold``: N contained kernels start concurrently from a kernelspec pinned to an image pushed
  to a registry on 127.0.0.1, into a **fresh store** (the pull and unpack are part of it: the
  starts share one pull, ``kernel/classroom.py``);
- ``warm``: N more start concurrently from the same store, the image already there;
- ``pooled``: N start concurrently from the same kernelspec with a warm pool of N
  (``kernel/pool.py``), filled before the clock starts (the design's budget: p95 < 1 s);
- ``local``: N local ipykernels (``python -m ipykernel_launcher`` from this venv) start
  concurrently through the same ``AsyncKernelManager``.

Each kernel's time is from the moment all N are asked to start to its ``kernel_info_reply``
(``wait_for_ready``): p50/p95/max per kind, the wall time until the last one, and the ratios
of contained to local. ``--rounds R`` repeats the three phases, rotating their order (``cold``
always gets a new fresh store). Run: ``.venv/bin/python bench/bench_class.py [--students 30]``.
All kernels of a phase are shut down before the next starts; everything is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from common import pct, rotations  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from registry_fixture import start_registry  # noqa: E402

from jupyter_contain.kernel import classroom, kernelspec, pool  # noqa: E402
from jupyter_contain.runtime import Runtime, Store  # noqa: E402
from jupyter_contain.runtime.images import archive, bootstrap, registry  # noqa: E402

IMAGE = "localhost/debian:bookworm"


def write_spec(kdir: Path, name: str, spec: dict) -> None:
    (kdir / name).mkdir(parents=True, exist_ok=True)
    (kdir / name / "kernel.json").write_text(json.dumps(spec))


async def start_class(ksm: KernelSpecManager, name: str, n: int, cwd: Path) -> tuple[list[float], float]:
    """Start ``n`` kernels of ``name`` at once; (seconds to each one's kernel_info_reply, wall time)."""
    kms: list[AsyncKernelManager] = []
    clients = []

    async def one(i: int, t0: float) -> float:
        folder = cwd / f"s{i:02}"
        folder.mkdir(parents=True, exist_ok=True)
        # ipc, as contained kernels use: 30 local kernels picking free TCP ports at once collide
        # ("Address already in use": a kernel dies before its first reply)
        km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm, transport="ipc",
                                ip=str(folder / "k"))
        kms.append(km)
        await km.start_kernel(cwd=str(folder))
        kc = km.client()
        clients.append(kc)
        kc.start_channels()
        await kc.wait_for_ready(timeout=600)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        times = await asyncio.gather(*(one(i, t0) for i in range(n)))
        wall = time.perf_counter() - t0
    finally:
        for kc in clients:
            kc.stop_channels()
        await asyncio.gather(*(km.shutdown_kernel(now=True) for km in kms), return_exceptions=True)
    return list(times), wall


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--students", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-pool", action="store_true", help="leave out the pooled kind")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench-class-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    try:
        teacher = Store(work / "teacher-store")
        cfg = bootstrap.DEBIAN_KERNEL.config
        image = archive.import_rootfs(teacher, bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL), IMAGE,
                                      env=cfg.get("Env", ()), cmd=cfg.get("Cmd", ()),
                                      workdir=cfg.get("WorkingDir", ""))
        with start_registry(work / "registry") as reg:
            class_image = f"{reg.address}/course/env:v1"
            teacher.tag(class_image, image.descriptor)
            res = registry.push(teacher, class_image)
            rec = teacher.resolve(class_image)
            pinned = classroom.pinned_reference(rec)
            print(f"image {IMAGE}: {sum(d.size for d in rec.manifest.layers) / 1e6:.0f} MB compressed, "
                  f"pushed as {res.reference} ({res.digest[:19]}...); kernels pinned to it")
            kdir = work / "kernels"
            ksm = KernelSpecManager(kernel_dirs=[str(kdir)])
            write_spec(kdir, "local", {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                       "display_name": "local", "language": "python"})
            kinds = ["cold", "warm", "local"] + ([] if args.no_pool else ["pooled"])
            results: dict[str, list[float]] = {k: [] for k in kinds}
            walls: dict[str, list[float]] = {k: [] for k in kinds}
            class_store: Path | None = None
            for r, order in rotations(kinds, args.rounds):
                if class_store is None:   # warm and pooled need a store a cold start filled
                    order.remove("cold")
                    order.insert(0, "cold")
                for kind in order:
                    if kind == "cold":
                        if class_store is not None:
                            shutil.rmtree(class_store)
                        class_store = work / f"class-store-{r}"
                    if kind in ("cold", "warm", "pooled"):
                        assert class_store is not None
                        extra = {"pool": {"size": args.students, "idle_ttl": 0}} if kind == "pooled" else {}
                        write_spec(kdir, f"course-{kind}", kernelspec.kernel_json(
                            image=rec, display_name="course",
                            config={"image": pinned, "store_root": str(class_store), **extra}))
                    name = "local" if kind == "local" else f"course-{kind}"
                    if kind == "pooled":
                        # the first start makes the pool (and starts cold); the pool fills, untimed
                        asyncio.run(start_class(ksm, name, 1, work / f"pool-{r}"))
                        if not pool.wait_ready(name, args.students, timeout=900):
                            print("WARNING: the pool did not fill in 900 s", file=sys.stderr)
                        time.sleep(1)
                    times, wall = asyncio.run(start_class(ksm, name, args.students, work / f"{kind}-{r}"))
                    if kind == "pooled":
                        pool.drain(name)
                    results[kind] += times
                    walls[kind].append(wall)
                    print(f"round {r + 1} {kind:5}: {args.students} kernels, last ready after {wall:.2f} s",
                          flush=True)
                    if kind != "local":
                        left = Runtime(Store(class_store)).containers() if class_store else []
                        assert not left, f"{len(left)} containers left after shutdown"
        print()
        print(f"{'kind':6} {'kernels':>7} {'p50 s':>8} {'p95 s':>8} {'max s':>8} {'wall s':>8}")
        for kind, values in results.items():
            print(f"{kind:6} {len(values):7d} {pct(values, 50):8.2f} {pct(values, 95):8.2f} {max(values):8.2f} "
                  f"{max(walls[kind]):8.2f}")
        local50, local95 = pct(results["local"], 50), pct(results["local"], 95)
        for kind in [k for k in kinds if k != "local"]:
            print(f"{kind} / local: p50 {pct(results[kind], 50) / local50:.2f}x, "
                  f"p95 {pct(results[kind], 95) / local95:.2f}x")
        print("budget (DESIGN.md): 30 students at once, p95 < 1 s pooled")
    finally:
        pool.drain_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
