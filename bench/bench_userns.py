"""Benchmark: container start with a user namespace (``userns="auto"``) vs without (``"host"``).

Times, for a created busybox container running ``/bin/true``, ``Container.start()``
(clone to a successful execve: the library call a kernel start waits for) and
start + ``wait()`` (to the exit), the two modes interleaved run by run,
``--runs`` each (default 50) after 3 warm-up runs. Creation and removal are
outside the timing. With a user namespace the start also writes the id maps,
makes the idmapped layer and bind mounts and the overlay in the parent and
hands them to the child.

The subordinate ids come from temporary subuid/subgid files (as in the
tests) unless ``--system-subids`` is given, so /etc is never touched.

Budget: a user namespace adds <= 5 ms (p50) to the start.
Run: ``.venv/bin/python bench/bench_userns.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import pct  # noqa: E402  (bench/ is the script's folder)
from jupyter_contain.runtime.containers.container import ContainerSpec, Runtime  # noqa: E402
from jupyter_contain.runtime.images import archive, bootstrap  # noqa: E402
from jupyter_contain.runtime.images.store import Store, remove_tree  # noqa: E402

MODES = ("host", "auto")
BUDGET_MS = 5.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--system-subids", action="store_true", help="use /etc/subuid and /etc/subgid")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="jc-bench-userns-"))
    try:
        if not args.system_subids:
            (tmp / "subuid").write_text("jupyter-contain:1000000:6553600\n")
            (tmp / "subgid").write_text("jupyter-contain:1000000:6553600\n")
            os.environ["JUPYTER_CONTAIN_SUBUID_FILE"] = str(tmp / "subuid")
            os.environ["JUPYTER_CONTAIN_SUBGID_FILE"] = str(tmp / "subgid")
        store = Store(tmp / "store")
        archive.import_rootfs(store, bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX), "busybox:bench", cmd=["/bin/sh"])
        rt = Runtime(store)
        start: dict[str, list[float]] = {m: [] for m in MODES}
        total: dict[str, list[float]] = {m: [] for m in MODES}
        for i in range(args.runs + 3):
            for mode in (MODES if i % 2 else MODES[::-1]):
                c = rt.create(ContainerSpec(image="busybox:bench", command=("/bin/true",), userns=mode))
                t = time.perf_counter()
                c.start()
                t_start = time.perf_counter() - t
                info = c.wait()
                t_total = time.perf_counter() - t
                assert info is not None and info.code == 0, info
                c.remove()
                if i >= 3:
                    start[mode].append(t_start * 1000)
                    total[mode].append(t_total * 1000)
        print(f"user namespace on (auto) vs off (host), /bin/true in busybox, {args.runs} runs each (ms)")
        print(f"{'measure':18s} {'p50':>7s} {'p95':>7s} {'mean':>7s}")
        for label, series in (("start", start), ("start-to-exit", total)):
            for mode in MODES:
                v = series[mode]
                print(f"{label + ' ' + mode:18s} {statistics.median(v):7.2f} {pct(v, 95):7.2f} "
                      f"{statistics.fmean(v):7.2f}")
        added = statistics.median(start["auto"]) - statistics.median(start["host"])
        added95 = pct(start["auto"], 95) - pct(start["host"], 95)
        added_total = statistics.median(total["auto"]) - statistics.median(total["host"])
        print(f"user namespace adds {added:.2f} ms to the start at p50 ({added95:.2f} ms at p95; "
              f"{added_total:.2f} ms start-to-exit at p50); budget {BUDGET_MS:.0f} ms: "
              f"{'OK' if added <= BUDGET_MS else 'OVER'}")
        return 0
    finally:
        remove_tree(tmp)


if __name__ == "__main__":
    sys.exit(main())
