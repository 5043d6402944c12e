"""Benchmark: start-to-exit of ``/bin/true`` with network none vs bridge vs host.

Times ``Container.start()`` + ``Container.wait()`` (the library calls, warm
process) of a created busybox container, the modes interleaved run by run,
``--runs`` each (default 50) after 3 warm-up runs. The bridge lives in a
private network namespace this script makes (``unshare --net sleep``), never
in the machine's own; it is gone when the script ends. Creation and removal
are outside the timing; the bridge's teardown (veth and nftables deletions,
each waiting for a kernel RCU grace period) runs in a background thread after
the exit is recorded, and is measured separately as "teardown".

Budget: bridge adds <= 20 ms (p50) over none.
Run: ``.venv/bin/python bench/bench_network.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import pct  # noqa: E402  (bench/ is the script's folder)

from jupyter_contain.runtime.containers import network  # noqa: E402
from jupyter_contain.runtime.containers.container import ContainerSpec, Runtime  # noqa: E402
from jupyter_contain.runtime.images import archive, bootstrap  # noqa: E402
from jupyter_contain.runtime.images.store import Store, remove_tree  # noqa: E402

MODES = ("none", "bridge", "host")
BUDGET_MS = 20.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()

    holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
    tmp = Path(tempfile.mkdtemp(prefix="jc-bench-net-"))
    try:
        while os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            time.sleep(0.005)
        store = Store(tmp / "store")
        archive.import_rootfs(store, bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX), "busybox:bench", cmd=["/bin/sh"])
        settings = network.Settings(state_dir=tmp / "net", bridge="jcbench0", host_netns=f"/proc/{holder.pid}/ns/net")
        rt = Runtime(store, network=settings)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        teardown: list[float] = []
        for i in range(args.runs + 3):
            for mode in MODES:
                c = rt.create(ContainerSpec(image="busybox:bench", command=("/bin/true",), network=mode))
                t = time.perf_counter()
                c.start()
                info = c.wait()
                elapsed = time.perf_counter() - t
                assert info is not None and info.code == 0, info
                if mode == "bridge":
                    t = time.perf_counter()
                    network.wait_pending()
                    if i >= 3:
                        teardown.append(time.perf_counter() - t)
                c.remove()
                if i >= 3:
                    times[mode].append(elapsed)
        print(f"start-to-exit of /bin/true, {args.runs} runs each (ms)")
        print(f"{'mode':8s} {'p50':>7s} {'p95':>7s} {'mean':>7s}")
        for mode in MODES:
            v = [x * 1000 for x in times[mode]]
            print(f"{mode:8s} {statistics.median(v):7.1f} {pct(v, 95):7.1f} {statistics.fmean(v):7.1f}")
        none50, bridge50 = statistics.median(times["none"]) * 1000, statistics.median(times["bridge"]) * 1000
        none95, bridge95 = pct(times["none"], 95) * 1000, pct(times["bridge"], 95) * 1000
        td = [x * 1000 for x in teardown]
        print(f"bridge teardown after the exit (background): p50 {statistics.median(td):.1f} ms, "
              f"p95 {pct(td, 95):.1f} ms")
        added = bridge50 - none50
        print(f"bridge adds {added:.1f} ms at p50 ({bridge95 - none95:.1f} ms at p95); budget {BUDGET_MS:.0f} ms: "
              f"{'OK' if added <= BUDGET_MS else 'OVER'}")
        return 0
    finally:
        holder.kill()
        holder.wait()
        remove_tree(tmp)


if __name__ == "__main__":
    sys.exit(main())
