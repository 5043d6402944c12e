"""Benchmark: pull + unpack of the Debian test image from a loopback registry, ours beside the peers.

Compares, in the same run, rotating the order each round (``common.rotations``):
- ``ours-cli``: ``jupyter-contain pull`` (CLI in a fresh process, as a user runs it) into a fresh store;
- ``ours-lib``: the library call ``registry.pull`` (in-process, no interpreter start-up);
- ``skopeo+umoci``: ``skopeo copy docker://REF oci:DIR`` + ``umoci unpack`` into fresh folders;
- ``podman``: ``podman pull`` into fresh ``--root``/``--runroot`` folders, run through one warm
  helper inside ``/work/shared/tools/run-peer`` (podman's mounts stay in its mount namespace).
Every contender does the same work: download, verify each blob's digest, decompress, check the
DiffID and leave an unpacked tree ready to run a container.

The image is the cached Debian rootfs tarball (``bootstrap.DEBIAN_KERNEL``) imported into a
temp store and pushed once with skopeo to a ``docker-registry`` on 127.0.0.1. Each time is
shown as the call alone and as the call plus a ``sync`` right after it (the page cache may
still hold what a call wrote; the sync counts that writeback against whoever left it).

Deletes make the next creates slow on this disk: ext4 here has no journal, and then it does
not reuse an inode freed less than 60 s ago, or 360 s while the inode table block holding it
is dirty (and new inodes created in that block dirty it again), so every create scans past the
recently freed ones (perf: ``find_inode_bit`` -> ``recently_deleted``). For ~6 minutes after a
big tree is removed, a 2 s pull takes 3-7 s, and every contender slows alike. So nothing is
removed until every round has run (~0.45 GB per contender and round, removed at the end), and
the run starts with ``--settle`` seconds (default 360) of waiting, for what was deleted before
it (the previous run's clean-up included). Other work on the machine that deletes trees (a
test suite) still shows up as noise.

Prints medians and the ratios (budget: ours <= 0.5x podman pull, <= 0.8x skopeo+umoci).
Run: ``.venv/bin/python bench/bench_pull.py [--reps 3] [--no-podman] [--settle 360]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from common import PeerShell, rotations, run_checked, timed_run, write_containers_conf  # noqa: E402
from registry_fixture import start_registry  # noqa: E402

from jupyter_contain.runtime.images import archive, bootstrap, registry  # noqa: E402
from jupyter_contain.runtime.images.store import Store, remove_tree  # noqa: E402

BUDGETS = {"podman": 0.5, "skopeo+umoci": 0.8}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-podman", action="store_true")
    ap.add_argument("--settle", type=float, default=360.0,
                    help="seconds to wait before the first round, for earlier deletes (see the module doc)")
    args = ap.parse_args()

    tar = bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL)
    work = Path(tempfile.mkdtemp(prefix="bench-pull-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    call: dict[str, list[float]] = {}
    synced: dict[str, list[float]] = {}
    peer: PeerShell | None = None
    try:
        src = Store(work / "src")
        rec = archive.import_rootfs(src, tar, "debian-bench:1", unpack=False)
        with start_registry(work) as reg:
            ref = f"{reg.address}/bench/debian:1"
            run_checked(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", "--dest-no-creds",
                         f"oci:{src.root}:{rec.name}", f"docker://{ref}"])
            print(f"image: {ref}, {rec.size / 1e6:.1f} MB compressed, 1 layer "
                  f"({tar.stat().st_size / 1e6:.0f} MB uncompressed)", flush=True)
            env = dict(os.environ, PYTHONPATH=str(HERE.parent))

            def ours_cli(rep: int) -> float:
                return timed_run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(work / f"cli-{rep}"),
                                  "pull", "-q", ref], env=env)

            def ours_lib(rep: int) -> float:
                store = Store(work / f"lib-{rep}")
                t = time.perf_counter()
                registry.pull(store, ref)
                return time.perf_counter() - t

            def skopeo_umoci(rep: int) -> float:
                layout, bundle = work / f"oci-{rep}", work / f"bundle-{rep}"
                t = timed_run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", "--src-no-creds",
                               f"docker://{ref}", f"oci:{layout}:x"])
                return t + timed_run(["umoci", "unpack", "--image", f"{layout}:x", str(bundle)])

            def podman(rep: int) -> float:
                assert peer is not None
                runroot = work / f"pr-{rep}"
                assert len(str(runroot)) < 50, runroot  # podman's runroot must stay short (socket paths)
                return peer.run(["podman", "--root", work / f"podman-{rep}", "--runroot", runroot,
                                 "--storage-driver", "overlay", "pull", "-q", "--tls-verify=false", ref])[1]

            contenders: dict[str, Callable[[int], float]] = {
                "ours-cli": ours_cli, "ours-lib": ours_lib, "skopeo+umoci": skopeo_umoci}
            if not args.no_podman and shutil.which("podman"):
                peer = PeerShell(env=write_containers_conf(work))
                contenders["podman"] = podman
            call = {k: [] for k in contenders}
            synced = {k: [] for k in contenders}
            os.sync()
            time.sleep(args.settle)
            for rep, order in rotations(list(contenders), args.reps):
                for name in order:
                    secs = contenders[name](rep)
                    t = time.perf_counter()
                    os.sync()
                    flushed = secs + time.perf_counter() - t
                    call[name].append(secs)
                    synced[name].append(flushed)
                    print(f"rep {rep + 1} {name:<13} {secs:6.2f} s  (+sync {flushed:6.2f} s)", flush=True)
    finally:
        if peer is not None:
            peer.close()  # its mount namespace, and any mount podman left in it, goes with it
        remove_tree(work)

    print(f"\nmedians over {args.reps} rounds (s), removing only at the end:")
    print(f"  {'':13s} {'call':>7s} {'+sync':>7s}   runs (call)")
    for k, times in call.items():
        if times:
            print(f"  {k:<13} {statistics.median(times):7.2f} {statistics.median(synced[k]):7.2f}   "
                  f"{', '.join(f'{x:.2f}' for x in times)}")
    for ours in ("ours-cli", "ours-lib"):
        for peer_name, budget in BUDGETS.items():
            if call.get(ours) and call.get(peer_name):
                r = statistics.median(call[ours]) / statistics.median(call[peer_name])
                rs = statistics.median(synced[ours]) / statistics.median(synced[peer_name])
                print(f"  {ours} / {peer_name}: {r:.2f}x call, {rs:.2f}x with sync "
                      f"(budget <= {budget}x){'' if r <= budget else '  OVER BUDGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
