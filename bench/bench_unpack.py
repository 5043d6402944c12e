"""Benchmark: unpack of the Debian image's one gzip layer, ours beside ``umoci unpack``, in one run.

The image is the cached Debian rootfs tarball (``bootstrap.DEBIAN_KERNEL``)
imported once into a source store (a gzip layer, level 1 as our imports write
it) and exported, outside the timing, as an OCI layout with ``skopeo copy
oci:STORE:NAME oci:LAYOUT:tag``. Each round times, in alternating order:
- ``ours-unpack``: ``layers.unpack_layer`` of the source store's blob into a
  fresh directory (decompress, DiffID, every safety check, overlay form);
- ``umoci``: ``umoci unpack --image LAYOUT:tag BUNDLE`` (decompress, DiffID, rootfs,
  config.json and its mtree manifest of the tree);
- ``ours-import``: ``archive.import_rootfs`` of the plain tarball into a fresh
  store, unpack included (gzip-compress into a blob, fsync, then unpack it).
Each time is shown as the call alone and as the call plus a ``sync`` right
after it (the page cache may still hold what a call wrote; the sync counts
that writeback against whoever left it).

Deletes make the next creates slow on this disk: for a few minutes after a
big tree is removed, every new inode costs ~0.7 ms of kernel time (perf:
ext4's ``find_inode_bit`` -> ``recently_deleted`` scanning past the freed,
not yet reusable inodes), which turns a 3 s unpack into 10-15 s. So by
default nothing is removed until every round has run (the trees, ~0.35 GB a
contender and round, are removed with ``fsutil.remove_tree`` at the end);
``--remove-each`` removes what each contender wrote right after it (then
``--pause`` seconds), as a user deleting and re-pulling would see it.

Prints medians and the ratios ours/umoci. Run:
``.venv/bin/python bench/bench_unpack.py [--reps 3]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import rotations, run_checked

from jupyter_contain.runtime import Store
from jupyter_contain.runtime.fsutil import remove_tree
from jupyter_contain.runtime.images import archive, bootstrap, layers

log = logging.getLogger("bench_unpack")


def _drop(path: Path, *, pause: float) -> None:
    """Remove what a contender wrote, sync, and wait ``pause`` seconds."""
    remove_tree(path)
    os.sync()
    time.sleep(pause)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-import", action="store_true", help="skip ours-import (the slowest, compresses too)")
    ap.add_argument("--remove-each", action="store_true",
                    help="remove what each contender wrote right after it (default: all at the end)")
    ap.add_argument("--pause", type=float, default=0.0, help="with --remove-each: seconds to wait after a removal")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    for tool in ("umoci", "skopeo"):
        if not shutil.which(tool):
            print(f"{tool} is not installed", file=sys.stderr)
            return 1

    tar = bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL)
    work = Path("/var/tmp") / f"jcbu-{os.getpid()}"
    work.mkdir()
    try:
        src = Store(work / "src")
        rec = archive.import_rootfs(src, tar, "debian-bench:1", unpack=False)
        desc, diff_id = rec.manifest.layers[0], rec.config.diff_ids[0]
        layout = work / "layout"
        run_checked(["skopeo", "--insecure-policy", "copy", f"oci:{src.root}:{rec.name}", f"oci:{layout}:bench"])
        print(f"image: {rec.name}, 1 gzip layer of {desc.size / 1e6:.1f} MB "
              f"({tar.stat().st_size / 1e6:.0f} MB uncompressed tar)", flush=True)
        os.sync()

        def ours_unpack(rep: int) -> Path:
            dest = work / f"ours-unpack-{rep}"
            with src.open_blob(desc.digest) as f:
                res = layers.unpack_layer(f, dest, media_type=desc.media_type, layer=desc.digest,
                                          expected_diff_id=diff_id)
            assert res.diff_id == diff_id
            return dest

        def umoci(rep: int) -> Path:
            dest = work / f"umoci-{rep}"
            run_checked(["umoci", "unpack", "--image", f"{layout}:bench", str(dest)])
            return dest

        def ours_import(rep: int) -> Path:
            dest = work / f"ours-import-{rep}"
            archive.import_rootfs(Store(dest), tar, "debian-bench:1")
            return dest

        contenders: dict[str, Callable[[int], Path]] = {"ours-unpack": ours_unpack, "umoci": umoci}
        if not args.no_import:
            contenders["ours-import"] = ours_import
        call: dict[str, list[float]] = {k: [] for k in contenders}
        synced: dict[str, list[float]] = {k: [] for k in contenders}
        for rep, order in rotations(list(contenders), args.reps):
            for name in order:
                t = time.perf_counter()
                wrote = contenders[name](rep)
                t1 = time.perf_counter()
                os.sync()
                t2 = time.perf_counter()
                call[name].append(t1 - t)
                synced[name].append(t2 - t)
                print(f"rep {rep + 1} {name:12s} {t1 - t:6.2f} s  (+sync {t2 - t:6.2f} s)", flush=True)
                if args.remove_each:
                    _drop(wrote, pause=args.pause)
    finally:
        remove_tree(work)

    print(f"\nmedians over {args.reps} rounds (s), "
          f"{'removing after each' if args.remove_each else 'removing only at the end'}:")
    print(f"  {'':12s} {'call':>7s} {'+sync':>7s}   runs (call)")
    for k, times in call.items():
        print(f"  {k:12s} {statistics.median(times):7.2f} {statistics.median(synced[k]):7.2f}   "
              f"{', '.join(f'{x:.2f}' for x in times)}")
    for k, times in call.items():
        if k == "umoci":
            continue
        print(f"  {k} / umoci: {statistics.median(times) / statistics.median(call['umoci']):.2f}x call, "
              f"{statistics.median(synced[k]) / statistics.median(synced['umoci']):.2f}x with sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
