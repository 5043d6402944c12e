"""Benchmark: kernel ready (launch -> kernel_info_reply) for a contained kernel and its anchors.

Compares, in the same run and alternating (the order rotates every round):
- ``contained``: our provisioner through ``jupyter_client.KernelManager`` (container create +
  start from a warm process, ipykernel on ipc sockets in the container);
- ``local``: a local ipykernel (``python -m ipykernel_launcher`` from this venv) through the
  same KernelManager;
- ``crun``: the same image's ipykernel started by ``crun run`` of an OCI bundle made by
  ``jupyter contain bundle`` (network namespace removed: the kernel listens on 127.0.0.1 tcp),
  through ``/work/shared/tools/run-peer`` (a long-lived peer shell in the private cgroup
  namespace launches crun, so run-peer's own set-up is not timed).

Prints p50/p95 per kind and the ratios to the anchors (budget: contained <= 1.15x local), and
for ``contained`` where the time goes (KernelManager.start_kernel, i.e. container create + start,
vs. the kernel's own start-up until it answers). Run:
``.venv/bin/python bench/bench_kernel.py [--reps 7] [--no-crun]``.
Note: the image's ipykernel (Debian's) is not the venv's: ``local`` runs another ipykernel
version, ``crun`` runs exactly the same kernel as ``contained``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import pct  # noqa: E402  (bench/ is the script's folder)
from jupyter_client.blocking import BlockingKernelClient  # noqa: E402
from jupyter_client.connect import write_connection_file  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

from jupyter_contain.kernel import kernelspec  # noqa: E402
from jupyter_contain.runtime import Runtime, Store  # noqa: E402
from jupyter_contain.runtime.images import archive, bootstrap  # noqa: E402

IMAGE = "localhost/debian:bookworm"
RUN_PEER = Path("/work/shared/tools/run-peer")
PEER_SCRIPT = r"""
while read -r cmd a b; do
  case "$cmd" in
    run) crun run -b "$a" "$b" </dev/null >/dev/null 2>&1 & ;;
    wait) wait; echo done ;;
  esac
done
"""


def _km_ready(ksm: KernelSpecManager, name: str) -> tuple[float, float]:
    """(total launch -> kernel_info_reply, of which start_kernel) in seconds."""
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    t0 = time.perf_counter()
    km.start_kernel()
    t1 = time.perf_counter()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(120)
        t2 = time.perf_counter()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return t2 - t0, t1 - t0


class CrunAnchor:
    """The image's kernel started by ``crun run`` of a bundle, from a peer shell."""

    def __init__(self, work: Path, store: Store) -> None:
        self.work = work
        self.bundle = work / "bundle"
        self.jc = work / "jc"
        self.jc.mkdir()
        subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(store.root), "bundle", IMAGE,
                        str(self.bundle), "--", "python3", "-m", "ipykernel_launcher", "-f", "/jc/conn.json"],
                       check=True, capture_output=True)
        cfg_path = self.bundle / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
        cfg["mounts"].append({"destination": "/jc", "type": "bind", "source": str(self.jc),
                              "options": ["rbind", "rw"]})
        cfg["process"]["env"].append("JPY_PARENT_PID=1")
        cfg_path.write_text(json.dumps(cfg, indent=1))
        self.peer = subprocess.Popen([str(RUN_PEER), "bash", "-c", PEER_SCRIPT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ready(self) -> float:
        conn = self.jc / "conn.json"
        conn.unlink(missing_ok=True)
        write_connection_file(str(conn), ip="127.0.0.1", transport="tcp", key=uuid.uuid4().hex.encode())
        os.chmod(conn, 0o644)
        cid = f"jc-bench-{uuid.uuid4().hex[:8]}"
        kc = BlockingKernelClient()
        kc.load_connection_file(str(conn))
        t0 = time.perf_counter()
        self.peer.stdin.write(f"run {self.bundle} {cid}\n")
        self.peer.stdin.flush()
        kc.start_channels()
        try:
            kc.wait_for_ready(120)
            t = time.perf_counter() - t0
            kc.shutdown()
        finally:
            kc.stop_channels()
        self.peer.stdin.write("wait\n")
        self.peer.stdin.flush()
        assert self.peer.stdout.readline().strip() == "done"
        return t

    def close(self) -> None:
        self.peer.stdin.close()
        self.peer.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-crun", action="store_true")
    ap.add_argument("--debug", action="store_true")
    ap.add_argument("--contained-config", default="{}", help="extra provisioner options (JSON), to compare")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench-kernel-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    crun: CrunAnchor | None = None
    try:
        store = Store(work / "store")
        cfg = bootstrap.DEBIAN_KERNEL.config
        image = archive.import_rootfs(store, bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL), IMAGE,
                                      env=cfg.get("Env", ()), cmd=cfg.get("Cmd", ()), workdir=cfg.get("WorkingDir", ""))
        kdir = work / "kernels"
        for name, spec in {
            "contained": kernelspec.kernel_json(image=image, display_name="bench contained",
                                                config={"store_root": str(store.root),
                                                        **json.loads(args.contained_config)}),
            "local": {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                      "display_name": "bench local", "language": "python"},
        }.items():
            (kdir / name).mkdir(parents=True)
            (kdir / name / "kernel.json").write_text(json.dumps(spec))
        ksm = KernelSpecManager(kernel_dirs=[str(kdir)])
        kinds = ["contained", "local"]
        if not args.no_crun and shutil.which("crun") and RUN_PEER.exists():
            crun = CrunAnchor(work, store)
            kinds.append("crun")
        # one warm-up each (page cache, first-import costs in this process)
        _km_ready(ksm, "contained")
        _km_ready(ksm, "local")
        if crun:
            crun.ready()
        times: dict[str, list[float]] = {k: [] for k in kinds}
        start_part: list[float] = []
        for rep in range(args.reps):
            order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
            for kind in order:
                if kind == "crun":
                    assert crun is not None
                    times[kind].append(crun.ready())
                else:
                    total, start = _km_ready(ksm, kind)
                    times[kind].append(total)
                    if kind == "contained":
                        start_part.append(start)
        print(f"kernel ready (launch -> kernel_info_reply), {args.reps} rounds alternated, ms:")
        for k in kinds:
            print(f"  {k:10s} p50 {pct(times[k], 50) * 1000:7.1f}   p95 {pct(times[k], 95) * 1000:7.1f}")
        print(f"  contained: start_kernel (container create + start) p50 {pct(start_part, 50) * 1000:.1f} ms, "
              f"kernel start-up until ready p50 "
              f"{statistics.median(t - s for t, s in zip(times['contained'], start_part)) * 1000:.1f} ms")
        for anchor in kinds[1:]:
            print(f"  ratio contained/{anchor}: p50 {pct(times['contained'], 50) / pct(times[anchor], 50):.2f}x"
                  f"   p95 {pct(times['contained'], 95) / pct(times[anchor], 95):.2f}x")
        print("  budget: contained <= 1.15x local")
        left = Runtime(store).containers()
        if left:
            print(f"  WARNING: {len(left)} container(s) left behind", file=sys.stderr)
        return 0
    finally:
        if crun is not None:
            crun.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
