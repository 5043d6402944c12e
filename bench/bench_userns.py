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

With ``--rootless USER`` (default ``jc-rootless``, which ``scripts/setup``
makes; ``--rootless ''`` skips it) the same loop also runs as that user, in
a process of its own (``setpriv``) with a store in a temporary home: a
rootless start (the maps through ``newuidmap``, no cgroups on v1, a
``userxattr`` overlay the child makes itself), beside the two modes above
measured in this run.

Budget: a user namespace adds <= 5 ms (p50) to the start.
Run: ``.venv/bin/python bench/bench_userns.py [--runs N] [--rootless USER]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import pct  # noqa: E402  (bench/ is the script's folder)

from jupyter_contain.runtime.containers.container import ContainerSpec, Runtime  # noqa: E402
from jupyter_contain.runtime.images import archive, bootstrap  # noqa: E402
from jupyter_contain.runtime.images.store import Store, remove_tree  # noqa: E402

MODES = ("host", "auto")
BUDGET_MS = 5.0


def _loop(rt: Runtime, modes: tuple[str, ...], runs: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    start: dict[str, list[float]] = {m: [] for m in modes}
    total: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(runs + 3):
        for mode in (modes if i % 2 else modes[::-1]):
            c = rt.create(ContainerSpec(image="busybox:bench", command=("/bin/true",),
                                        userns="host" if mode == "rootless" else mode))  # type: ignore[arg-type]
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
    return start, total


def _rootless(user: str, runs: int) -> tuple[list[float], list[float]]:
    """The loop as ``user`` (its own store in a temporary home): start and start-to-exit times."""
    import pwd
    pw = pwd.getpwnam(user)
    home = Path(tempfile.mkdtemp(prefix="jc-bench-rootless-"))   # beside, not in, our 0700 folder
    os.chown(home, pw.pw_uid, pw.pw_gid)
    try:
        return _rootless_in(pw, runs, home)
    finally:
        remove_tree(home)


def _rootless_in(pw: Any, runs: int, home: Path) -> tuple[list[float], list[float]]:
    import json
    import site
    import subprocess
    python = sys.executable
    if any(not (p.stat().st_mode & 0o001) for p in [Path(python).resolve(), *Path(python).resolve().parents]):
        python = "/usr/bin/python3"   # ours lives under a private folder (root's pyenv)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), *site.getsitepackages()])}
    res = subprocess.run(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", python,
                          str(Path(__file__).resolve()), "--worker", str(runs),
                          str(bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX))],
                         env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"rootless run as {pw.pw_name} failed: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["start"], out["total"]


def _worker(runs: int, tar: str) -> int:
    """(as the rootless user) the loop, printed as JSON."""
    import json
    import logging
    logging.disable(logging.WARNING)   # "no quotas" is said once; not bench output
    store = Store()
    archive.import_rootfs(store, tar, "busybox:bench", cmd=["/bin/sh"])
    start, total = _loop(Runtime(store), ("rootless",), runs)
    print(json.dumps({"start": start["rootless"], "total": total["rootless"]}))
    return 0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        return _worker(int(sys.argv[2]), sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--system-subids", action="store_true", help="use /etc/subuid and /etc/subgid")
    ap.add_argument("--rootless", default="jc-rootless", metavar="USER",
                    help="also time rootless starts as USER ('' to skip)")
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
        start, total = _loop(rt, MODES, args.runs)
        modes = MODES
        if args.rootless:
            start["rootless"], total["rootless"] = _rootless(args.rootless, args.runs)
            modes = (*MODES, "rootless")
        print(f"user namespace on (auto) vs off (host), /bin/true in busybox, {args.runs} runs each (ms)")
        print(f"{'measure':22s} {'p50':>7s} {'p95':>7s} {'mean':>7s}")
        for label, series in (("start", start), ("start-to-exit", total)):
            for mode in modes:
                v = series[mode]
                print(f"{label + ' ' + mode:22s} {statistics.median(v):7.2f} {pct(v, 95):7.2f} "
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
