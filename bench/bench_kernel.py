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

- ``pooled``: the same kernelspec with a warm pool of one (``kernel/pool.py``): the start takes a
  kernel that waits, ipykernel imported, for its hand-out; the pool's refill is waited for
  between rounds (not timed).

Prints p50/p95 per kind and the ratios to the anchors (budgets: contained <= 1.0x local, pooled
<= 0.1x local), and for ``contained`` where the time goes (KernelManager.start_kernel, i.e.
container create + start, vs. the kernel's own start-up until it answers). ``--trace``: every
step of a cold and a pooled start (the provisioner's :class:`~jupyter_contain.kernel.trace.StartTrace`,
then the kernel's sockets bound and its first reply as a client sees them), and inside the
container what Python's own start and the ipykernel import cost. ``--concurrent N``: N starts at
once with a pool of N (filled beforehand) and with none, p50/p95/max. ``--pool-memory N``: host
memory of an idle pool of N (the kernels' cgroups, and this process's own growth beside them).
Run: ``.venv/bin/python bench/bench_kernel.py [--reps 7] [--no-crun] [--trace] [--concurrent 30]
[--pool-memory 10]``.
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

from jupyter_contain.kernel import kernelspec, pool  # noqa: E402
from jupyter_contain.runtime import Runtime, Store  # noqa: E402
from jupyter_contain.runtime.images import archive, bootstrap  # noqa: E402

IMAGE = "localhost/debian:bookworm"
#: the notebooks' folder the kernels start in (made in the run's work folder)
NOTEBOOKS = Path("/nonexistent")
RUN_PEER = Path("/work/shared/tools/run-peer")
PEER_SCRIPT = r"""
while read -r cmd a b; do
  case "$cmd" in
    run) crun run -b "$a" "$b" </dev/null >/dev/null 2>&1 & ;;
    kill) crun kill "$a" KILL >/dev/null 2>&1 ;;
    wait) wait; echo done ;;
  esac
done
"""


#: the last contained start's trace: (provisioner steps, sockets bound, first reply), ms
TRACES: dict[str, list[tuple[list[tuple[str, float]], float, float]]] = {}


def _first_reply(kc: object, timeout: float) -> None:
    """Until the first kernel_info_reply. Not ``wait_for_ready``: that adds a 0.2 s IOPub flush (and a
    0.2 s IOPub check) after the reply to every start, local or contained, which is not the kernel's."""
    from queue import Empty

    deadline = time.perf_counter() + timeout
    kc.kernel_info()  # type: ignore[attr-defined]
    while time.perf_counter() < deadline:
        try:
            msg = kc.get_shell_msg(timeout=0.5)  # type: ignore[attr-defined]
        except Empty:
            kc.kernel_info()  # type: ignore[attr-defined]
            continue
        if msg["msg_type"] == "kernel_info_reply":
            return
    raise RuntimeError("no kernel_info_reply")


def _km_ready(ksm: KernelSpecManager, name: str) -> tuple[float, float]:
    """(total launch -> kernel_info_reply, of which start_kernel) in seconds."""
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    t0 = time.perf_counter()
    km.start_kernel(cwd=str(NOTEBOOKS))   # a notebook's folder, as a server starts kernels: bound in
    t1 = time.perf_counter()
    prov = km.provisioner
    pins = getattr(prov, "_pins", None)
    kc = km.client()
    kc.start_channels()
    try:
        bound = None
        if pins is not None:
            while not pins.complete and time.perf_counter() - t1 < 60:
                time.sleep(0.0005)
            bound = time.perf_counter()
        _first_reply(kc, 120)
        t2 = time.perf_counter()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    trace = getattr(prov, "_trace", None)
    if trace is not None and bound is not None:
        TRACES.setdefault(name, []).append((trace.breakdown(), (bound - t1) * 1000, (t2 - bound) * 1000))
    return t2 - t0, t1 - t0


def _print_traces(name: str) -> None:
    rows = TRACES.get(name) or []
    if not rows:
        return
    steps: dict[str, list[float]] = {}
    for marks, bound, reply in rows:
        for step, ms in marks:
            steps.setdefault(step, []).append(ms)
        steps.setdefault("kernel sockets bound (Python, ipykernel import, kernel init)", []).append(bound)
        steps.setdefault("first reply (kernel_info, ZMQ connect)", []).append(reply)
    print(f"  trace {name} ({len(rows)} starts), p50 ms:")
    for step, ms in steps.items():
        print(f"    {step:62s} {statistics.median(ms):7.1f}")


def _inside_costs(store: Store) -> None:
    """Python's own start and the ipykernel import inside the image's container (exec, p50 of 5)."""
    from jupyter_contain.runtime import ContainerSpec

    rt = Runtime(store)
    c = rt.create(ContainerSpec(image=IMAGE, command=("sleep", "600")))
    try:
        c.start()
        code = ("import time, sys; t0 = time.perf_counter(); import ipykernel.kernelapp, ipykernel.ipkernel; "
                "t1 = time.perf_counter(); print((t1 - t0) * 1000)")
        pys, imps = [], []
        for _ in range(5):
            r, w = os.pipe()
            t0 = time.perf_counter()
            p = c.exec(["python3", "-c", "pass"], stdio=(0, w, w))
            p.wait()
            pys.append((time.perf_counter() - t0) * 1000)
            p.close()
            p = c.exec(["python3", "-c", code], stdio=(0, w, w))
            os.close(w)
            out = b""
            while chunk := os.read(r, 4096):
                out += chunk
            os.close(r)
            p.wait()
            p.close()
            imps.append(float(out.decode().split()[-1]))
        print(f"  inside the container: python3 -c pass (exec) p50 {statistics.median(pys):.1f} ms, "
              f"import ipykernel.kernelapp + ipkernel p50 {statistics.median(imps):.1f} ms")
    finally:
        c.remove(force=True)


def _concurrent(ksm: KernelSpecManager, name: str, n: int) -> list[float]:
    """``n`` kernels started at once (AsyncKernelManager); each one's launch -> ready, seconds."""
    import asyncio

    from jupyter_client.manager import AsyncKernelManager

    async def one() -> tuple[float, AsyncKernelManager]:
        km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
        t0 = time.perf_counter()
        await km.start_kernel(cwd=str(NOTEBOOKS))
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(300)   # the 0.2 s IOPub flush included: as a server's clients see it
        finally:
            kc.stop_channels()
        return time.perf_counter() - t0, km

    async def main() -> list[float]:
        got = await asyncio.gather(*(one() for _ in range(n)))
        await asyncio.gather(*(km.shutdown_kernel(now=True) for _, km in got))
        return [t for t, _ in got]

    return asyncio.run(main())


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


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
            _first_reply(kc, 120)
            t = time.perf_counter() - t0
        finally:
            kc.stop_channels()
            # not a shutdown request: the control channel may not be connected yet, and a lost
            # request would leave the container running (and the peer's `wait` with it)
            self.peer.stdin.write(f"kill {cid}\n")
            self.peer.stdin.flush()
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
    ap.add_argument("--trace", action="store_true", help="where a cold and a pooled start spend their time")
    ap.add_argument("--no-pool", action="store_true", help="leave out the pooled kind")
    ap.add_argument("--concurrent", type=int, default=0, help="N starts at once, pool of N vs none")
    ap.add_argument("--pool-memory", type=int, default=0, help="host memory of an idle pool of N")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    if args.trace:
        logging.getLogger("jupyter_contain.kernel.trace").setLevel(logging.DEBUG)

    work = Path(tempfile.mkdtemp(prefix="bench-kernel-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    crun: CrunAnchor | None = None
    try:
        global NOTEBOOKS
        NOTEBOOKS = work / "notebooks"
        NOTEBOOKS.mkdir()
        store = Store(work / "store")
        cfg = bootstrap.DEBIAN_KERNEL.config
        image = archive.import_rootfs(store, bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL), IMAGE,
                                      env=cfg.get("Env", ()), cmd=cfg.get("Cmd", ()), workdir=cfg.get("WorkingDir", ""))
        kdir = work / "kernels"
        for name, spec in {
            "contained": kernelspec.kernel_json(image=image, display_name="bench contained",
                                                config={"store_root": str(store.root),
                                                        **json.loads(args.contained_config)}),
            "pooled": kernelspec.kernel_json(image=image, display_name="bench pooled",
                                             config={"store_root": str(store.root), "pool": 1,
                                                     **json.loads(args.contained_config)}),
            "pool-n": kernelspec.kernel_json(image=image, display_name="bench pool of N",
                                             config={"store_root": str(store.root), "pool": max(args.concurrent, 1),
                                                     **json.loads(args.contained_config)}),
            "pool-m": kernelspec.kernel_json(image=image, display_name="bench idle pool",
                                             config={"store_root": str(store.root), "pool": max(args.pool_memory, 1),
                                                     **json.loads(args.contained_config)}),
            "local": {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                      "display_name": "bench local", "language": "python"},
        }.items():
            (kdir / name).mkdir(parents=True)
            (kdir / name / "kernel.json").write_text(json.dumps(spec))
        ksm = KernelSpecManager(kernel_dirs=[str(kdir)])
        kinds = ["contained", "local"] + ([] if args.no_pool else ["pooled"])
        if not args.no_crun and shutil.which("crun") and RUN_PEER.exists():
            crun = CrunAnchor(work, store)
            kinds.append("crun")
        # one warm-up each (page cache, first-import costs in this process); the pooled kind's first
        # start is cold and makes its pool
        _km_ready(ksm, "contained")
        _km_ready(ksm, "local")
        if "pooled" in kinds:
            _km_ready(ksm, "pooled")
        TRACES.clear()
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
                elif kind == "pooled":
                    # the refill after the previous hand-out, not timed: a pool is for starts that
                    # come later than its refill takes
                    if not pool.wait_ready("pooled", 1, timeout=120):
                        print("  WARNING: the pool did not refill in 120 s", file=sys.stderr)
                    time.sleep(0.2)
                    total, _ = _km_ready(ksm, kind)
                    times[kind].append(total)
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
        if "pooled" in kinds:
            print(f"  ratio pooled/local: p50 {pct(times['pooled'], 50) / pct(times['local'], 50):.2f}x   "
                  f"pooled/contained: p50 {pct(times['pooled'], 50) / pct(times['contained'], 50):.2f}x")
        print("  budgets: contained <= 1.0x local, pooled <= 0.1x local")
        if args.trace:
            _print_traces("contained")
            _print_traces("pooled")
            _inside_costs(store)
        pool.drain_all()
        if args.concurrent:
            n = args.concurrent
            cold = _concurrent(ksm, "contained", n)
            _km_ready(ksm, "pool-n")        # makes the pool; then wait for all n to wait
            t0 = time.perf_counter()
            filled = pool.wait_ready("pool-n", n, timeout=600)
            fill_s = time.perf_counter() - t0
            warm = _concurrent(ksm, "pool-n", n)
            pool.drain_all()
            print(f"{n} kernels started at once (launch -> kernel_info_reply), s:")
            print(f"  no pool      p50 {pct(cold, 50):6.2f}   p95 {pct(cold, 95):6.2f}   max {max(cold):6.2f}")
            print(f"  pool of {n:<3d}  p50 {pct(warm, 50):6.2f}   p95 {pct(warm, 95):6.2f}   max {max(warm):6.2f}"
                  f"   (pool {'filled' if filled else 'NOT filled'} in {fill_s:.1f} s)")
            print("  budget: p95 < 1 s pooled")
        if args.pool_memory:
            n = args.pool_memory
            rss0 = _rss()
            _km_ready(ksm, "pool-m")        # makes the pool
            pool.wait_ready("pool-m", n, timeout=600)
            time.sleep(2)
            rt = Runtime(store)
            mem = [c.stats()["memory_current"] or 0 for c in rt.containers()
                   if c.state.labels.get(pool.POOL_LABEL)]
            rss1 = _rss()
            print(f"idle pool of {len(mem)}: kernels' cgroups {sum(mem) / (1 << 20):.0f} MiB in all "
                  f"({statistics.median(mem) / (1 << 20):.1f} MiB each, p50); this process grew by "
                  f"{(rss1 - rss0) / (1 << 20):.1f} MiB ({(rss1 - rss0) / max(len(mem), 1) / 1024:.0f} KiB per "
                  "pooled kernel)")
            pool.drain_all()
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
