"""Benchmark: pull + unpack of the Debian test image from a loopback registry.

Compares, in the same run and alternating, 3 repetitions each:
- ours: ``jupyter-contain pull`` (CLI in a fresh process, as a user runs it) into a fresh store,
  and the library call ``registry.pull`` (in-process, no interpreter start-up);
- ``skopeo copy docker://REF oci:DIR`` + ``umoci unpack`` into fresh folders;
- ``podman pull`` into fresh ``--root``/``--runroot`` folders.

The image is the cached Debian rootfs tarball (bootstrap.DEBIAN_KERNEL) imported
into a temp store and pushed once with skopeo to a ``docker-registry`` on
127.0.0.1. Prints medians and ratios (budget: ours <= 0.5x podman pull, <= 0.8x
skopeo+umoci). Run: ``.venv/bin/python bench/bench_pull.py [--reps N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from jupyter_contain.runtime.images import archive, bootstrap, registry  # noqa: E402
from jupyter_contain.runtime.images.store import Store, remove_tree  # noqa: E402
from registry_fixture import start_registry  # noqa: E402


def _run(cmd: list[str], **kw) -> float:
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.strip()[-1500:]}")
    return time.monotonic() - t


def _drop(path: Path) -> None:
    remove_tree(path)
    subprocess.run(["sync"], check=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-podman", action="store_true")
    args = ap.parse_args()

    tar = bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL)
    work = Path(tempfile.mkdtemp(prefix="bench-pull-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    results: dict[str, list[float]] = {"ours-cli": [], "ours-lib": [], "skopeo+umoci": [], "podman": []}
    try:
        src = Store(work / "src")
        rec = archive.import_rootfs(src, tar, "debian-bench:1", unpack=False)
        size = rec.size
        with start_registry(work) as reg:
            ref = f"{reg.address}/bench/debian:1"
            _run(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", "--dest-no-creds",
                  f"oci:{src.root}:{rec.name}", f"docker://{ref}"])
            print(f"image: {ref}, {size / 1e6:.1f} MB compressed, 1 layer "
                  f"({tar.stat().st_size / 1e6:.0f} MB uncompressed)", flush=True)
            env = dict(os.environ, PYTHONPATH=str(HERE.parent))

            def ours_cli() -> float:
                root = work / "ours"
                try:
                    return _run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(root), "pull", "-q", ref],
                                env=env)
                finally:
                    _drop(root)

            def ours_lib() -> float:
                root = work / "ours-lib"
                try:
                    store = Store(root)
                    t = time.monotonic()
                    registry.pull(store, ref)
                    return time.monotonic() - t
                finally:
                    _drop(root)

            def skopeo_umoci() -> float:
                layout, bundle = work / "oci", work / "bundle"
                try:
                    t = _run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", "--src-no-creds",
                              f"docker://{ref}", f"oci:{layout}:x"])
                    return t + _run(["umoci", "unpack", "--image", f"{layout}:x", str(bundle)])
                finally:
                    _drop(layout)
                    _drop(bundle)

            def podman() -> float:
                root, runroot = work / "podman-root", work / "podman-run"
                try:
                    return _run(["podman", "--root", str(root), "--runroot", str(runroot),
                                 "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs", "--events-backend",
                                 "none", "pull", "-q", "--tls-verify=false", ref])
                finally:
                    # podman's overlay storage may leave mounts; unmount what sits beneath root
                    subprocess.run(["podman", "--root", str(root), "--runroot", str(runroot),
                                    "--storage-driver", "overlay", "system", "reset", "-f"],
                                   capture_output=True, check=False)
                    _drop(root)
                    _drop(runroot)

            contenders = {"ours-cli": ours_cli, "ours-lib": ours_lib, "skopeo+umoci": skopeo_umoci}
            if not args.no_podman and shutil.which("podman"):
                contenders["podman"] = podman
            names = list(contenders)
            for rep in range(args.reps):
                order = names if rep % 2 == 0 else names[::-1]
                for name in order:
                    secs = contenders[name]()
                    results[name].append(secs)
                    print(f"rep {rep + 1} {name:<13} {secs:6.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items() if v}
    print("\nmedians:")
    for k, v in med.items():
        print(f"  {k:<13} {v:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in results[k])})")
    for ours in ("ours-cli", "ours-lib"):
        for peer, budget in (("podman", 0.5), ("skopeo+umoci", 0.8)):
            if ours in med and peer in med:
                r = med[ours] / med[peer]
                print(f"  {ours} / {peer}: {r:.2f}x (budget <= {budget}x){'' if r <= budget else '  OVER BUDGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
