"""Benchmark: start-to-exit of ``/bin/true`` in the busybox image, ours beside crun, runc, bwrap and podman.

Time, in one run with the engines alternating every round (rotating order; the
disk and CPU here are noisy), ``--rounds`` rounds after ``--warmup`` rounds:
- ``ours``: the library calls from this warm process, ``Runtime.create`` +
  ``Container.start`` + ``wait`` + ``remove``, default limits (cgroups on, pids
  limit, Docker's seccomp profile), network none;
- ``ours-host``: the same with ``network="host"``;
- ``ours-start``: ``start`` + ``wait`` only, on a container created beforehand
  (create and remove outside the timing);
- ``crun`` / ``runc``: ``crun run -b B id`` / ``runc run -b B id`` of a bundle whose
  config is ``crun spec`` / ``runc spec`` (terminal off, args ``/bin/true``,
  rootfs: the busybox image applied by ``bundle.write_bundle``);
- ``crun-same``: ``crun run`` of the config our runtime writes for that bundle
  (the same namespaces, capabilities, masked paths and seccomp profile as ours,
  plus our default pids limit): the same work as ``ours``;
- ``bwrap``: ``bwrap --unshare-all --ro-bind ROOTFS / --proc /proc --dev /dev /bin/true``;
- ``podman``: ``podman run --rm --network none IMG /bin/true`` with the image
  saved by us as an oci-archive and ``podman load``-ed into podman's own temp
  ``--root``/``--runroot``;
- ``cli``: ``jupyter contain --root STORE run --rm IMG /bin/true`` from a shell,
  as a user types it (jupyter_core's ``jupyter`` finds ``jupyter-contain`` and
  execs it: two Python starts); ``cli-direct``: ``jupyter-contain ...`` itself
  (one Python start); ``python``: ``python -c pass`` with this venv's Python.
  These run with bytecode caching on (``PYTHONDONTWRITEBYTECODE`` dropped: a
  pip install compiles bytecode; the warm-up rounds write it for a checkout),
  and the seccomp program cached as the runtime keeps it.
crun, runc and podman run through one warm helper inside
``/work/shared/tools/run-peer`` (their cgroups stay beneath ours) that times
each command from spawn to exit, so run-peer's set-up is never timed.

After the alternated rounds: ``jupyter contain --version`` and ``ps`` beside
``python -c pass``, and where the time of ``cli-direct`` goes (the bare
interpreter, ``site``, each import as ``-X importtime`` reports it, the rest).

Then ``--alone`` (20) back-to-back runs each of ours, crun and crun-same, in
blocks: a peer's cgroup attach (writing the child's pid to ``cgroup.procs``)
waits for an RCU grace period, unless another attach ran within the last
one, so in the alternated rounds a peer's time depends on who ran before it.
Ours enters its cgroups from the child itself and takes no such wait. Then
``--spaced`` (20) rounds of the three alternated with 100 ms of idle before
each run: starts one at a time on a quiet machine, as kernels start.

Then memory: ``--containers`` (10) containers per engine run ``sleep 60``; the
host memory each uses beside its payload is the Pss of every host process the
container has besides its payload's tree: our ``jc-init`` (PID 1 in the
container, the payload its child), podman's ``conmon``, nothing for ``crun run
-d`` (the payload is PID 1 and crun exits). Pss splits shared pages among their
users, so N copies of one static init count once in total.

Budgets (the issues): ours <= 1.0x crun (p50), <= 1 MiB per container; cli <= 3x crun
and <= 0.25x podman.
Run: ``.venv/bin/python bench/bench_start.py [--rounds 40] [--no-podman]``.
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
import time
import uuid
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import (
    RUN_PEER,
    PeerShell,
    children,
    comm,
    pct,
    print_ratios,
    print_times,
    pss_kib,
    rotations,
    run_checked,
    timed_run,
    write_containers_conf,
)

from jupyter_contain.runtime import Container, ContainerSpec, Runtime, Store
from jupyter_contain.runtime.containers import bundle as bundle_mod
from jupyter_contain.runtime.containers.cgroups import DEFAULT_PIDS_LIMIT
from jupyter_contain.runtime.fsutil import remove_tree
from jupyter_contain.runtime.images import archive, bootstrap

log = logging.getLogger("bench_start")

IMAGE = "busybox:bench"
OURS = ("ours", "ours-host", "ours-start")
PEERS = ("crun", "crun-same", "runc", "bwrap", "podman")
CLI = ("cli", "cli-direct")
BIN = Path(sys.executable).parent


def _spec_config(tool: str, dest: Path, rootfs: Path, args: list[str]) -> None:
    """``tool spec`` in ``dest``, terminal off, ``args``, root at ``rootfs`` (read-only, as spec made it)."""
    dest.mkdir(parents=True)
    run_checked([tool, "spec", "-b", str(dest)])
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = args
    cfg["root"]["path"] = str(rootfs)
    cfg_path.write_text(json.dumps(cfg, indent=1))


def _same_config(src: Path, dest: Path, rootfs: Path, args: list[str]) -> None:
    """Our runtime's config for the bundle, with our default pids limit, args ``args``."""
    dest.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["process"]["args"] = args
    cfg["root"]["path"] = str(rootfs)
    cfg["linux"].setdefault("resources", {})["pids"] = {"limit": DEFAULT_PIDS_LIMIT}
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))


def _cgroup_procs(pid: int) -> set[int]:
    """Every process in ``pid``'s pids cgroup (the container's, for any engine here)."""
    with open(f"/proc/{pid}/cgroup") as f:
        path = next(line.split(":", 2)[2].strip() for line in f if line.split(":")[1] == "pids")
    with open(f"/sys/fs/cgroup/pids{path}/cgroup.procs") as f:
        return {int(x) for x in f.read().split()}


def _tree(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        try:
            todo.extend(children(p))
        except FileNotFoundError:
            pass
    return out


class Bench:
    def __init__(self, work: Path, *, use_podman: bool) -> None:
        self.work = work
        self.store = Store(work / "store")
        self.rec = archive.import_rootfs(self.store, bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX), IMAGE,
                                         cmd=["/bin/sh"])
        self.rt = Runtime(self.store)
        # one applied rootfs for every peer; our config.json beside it
        self.bundle = work / "bundle"
        bundle_mod.write_bundle(self.store, self.rec, self.bundle, command=("/bin/true",))
        self.rootfs = self.bundle / "rootfs"
        self.b: dict[str, Path] = {}
        for tool in ("crun", "runc"):
            for payload, args in (("true", ["/bin/true"]), ("sleep", ["sleep", "60"])):
                _spec_config(tool, work / f"{tool}-{payload}", self.rootfs, args)
                self.b[f"{tool}-{payload}"] = work / f"{tool}-{payload}"
        for payload, args in (("true", ["/bin/true"]), ("sleep", ["sleep", "60"])):
            _same_config(self.bundle, work / f"same-{payload}", self.rootfs, args)
            self.b[f"same-{payload}"] = work / f"same-{payload}"
        self.crun = ["crun", "--root", str(work / "crun-state")]
        self.runc = ["runc", "--root", str(work / "runc-state")]
        self.podman: list[str] = []
        self.podman_image = ""
        env = None
        if use_podman:
            env = write_containers_conf(work)
            runroot = work / "prun"
            assert len(str(runroot)) < 50, runroot  # podman's runroot must stay short (socket paths)
            self.podman = ["podman", "--root", str(work / "proot"), "--runroot", str(runroot),
                           "--storage-driver", "overlay"]
        self.peer = PeerShell(env=env)
        if use_podman:
            try:
                oci = work / "busybox.oci.tar"
                archive.save_oci_archive(self.store, self.rec, oci)
                self.peer.run(self.podman + ["load", "-q", "-i", oci])
                oci.unlink()
                _, _, out = self.peer.run(self.podman + ["images", "--no-trunc", "--format", "{{.ID}}"])
                self.podman_image = out.split()[0]
            except BaseException:
                self.close()
                raise
        #: where the time of ``ours`` goes, per phase
        self.phases: dict[str, list[float]] = {"create": [], "start": [], "wait": [], "remove": []}

    # --- one start-to-exit each ----------------------------------------------------------

    def ours(self, *, network: str = "none", record: bool = False) -> float:
        t0 = time.perf_counter()
        c = self.rt.create(ContainerSpec(image=IMAGE, command=("/bin/true",), network=network))
        t1 = time.perf_counter()
        c.start()
        t2 = time.perf_counter()
        info = c.wait()
        t3 = time.perf_counter()
        c.remove()
        t4 = time.perf_counter()
        assert info is not None and info.code == 0, info
        if record:
            for k, v in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                self.phases[k].append(v)
        return t4 - t0

    def ours_start(self) -> float:
        c = self.rt.create(ContainerSpec(image=IMAGE, command=("/bin/true",)))
        try:
            t = time.perf_counter()
            c.start()
            info = c.wait()
            secs = time.perf_counter() - t
            assert info is not None and info.code == 0, info
            return secs
        finally:
            c.remove(force=True)

    def peer_run(self, argv: list[str]) -> float:
        return self.peer.run(argv)[1]

    def contenders(self) -> dict[str, Callable[[bool], float]]:
        cid = lambda: f"jcb-{uuid.uuid4().hex[:10]}"
        out: dict[str, Callable[[bool], float]] = {
            "ours": lambda rec: self.ours(record=rec),
            "ours-host": lambda rec: self.ours(network="host"),
            "ours-start": lambda rec: self.ours_start(),
            "crun": lambda rec: self.peer_run(self.crun + ["run", "-b", str(self.b["crun-true"]), cid()]),
            "crun-same": lambda rec: self.peer_run(self.crun + ["run", "-b", str(self.b["same-true"]), cid()]),
            "runc": lambda rec: self.peer_run(self.runc + ["run", "-b", str(self.b["runc-true"]), cid()]),
            "bwrap": lambda rec: timed_run(["bwrap", "--unshare-all", "--ro-bind", str(self.rootfs), "/",
                                            "--proc", "/proc", "--dev", "/dev", "/bin/true"]),
        }
        if self.podman:
            out["podman"] = lambda rec: self.peer_run(self.podman + ["run", "--rm", "--network", "none",
                                                                     self.podman_image, "/bin/true"])
        run = ["--root", str(self.store.root), "run", "--rm", IMAGE, "/bin/true"]
        out["cli"] = lambda rec: timed_run(self.jupyter + ["contain", *run], env=self.cli_env)
        out["cli-direct"] = lambda rec: timed_run([str(BIN / "jupyter-contain"), *run], env=self.cli_env)
        out["python"] = lambda rec: timed_run([sys.executable, "-c", "pass"], env=self.cli_env)
        return out

    @property
    def jupyter(self) -> list[str]:
        return [str(BIN / "jupyter") if (BIN / "jupyter").exists() else shutil.which("jupyter") or "jupyter"]

    @property
    def cli_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.pop("JUPYTER_CONTAIN_URL", None)
        return env

    # --- where a CLI start goes -----------------------------------------------------------

    def cli_small(self, rounds: int) -> dict[str, list[float]]:
        """``--version`` and ``ps`` beside ``python -c pass``, alternated."""
        cmds = {
            "python": [sys.executable, "-c", "pass"],
            "cli --version": self.jupyter + ["contain", "--version"],
            "cli-direct --version": [str(BIN / "jupyter-contain"), "--version"],
            "cli-direct ps": [str(BIN / "jupyter-contain"), "--root", str(self.store.root), "ps", "-a"],
        }
        out: dict[str, list[float]] = {k: [] for k in cmds}
        for _, order in rotations(list(cmds), rounds):
            for name in order:
                out[name].append(timed_run(cmds[name], env=self.cli_env))
        return out

    def cli_breakdown(self, rounds: int) -> list[tuple[str, float]]:
        """Medians: bare interpreter, site, every top-level import of ``run`` (-X importtime), the rest."""
        run = [str(BIN / "jupyter-contain"), "--root", str(self.store.root), "run", "--rm", IMAGE, "/bin/true"]
        bare = statistics.median(timed_run([sys.executable, "-S", "-c", "pass"], env=self.cli_env)
                                 for _ in range(rounds))
        python = statistics.median(timed_run([sys.executable, "-c", "pass"], env=self.cli_env)
                                   for _ in range(rounds))
        wall = statistics.median(timed_run([sys.executable, *run], env=self.cli_env) for _ in range(rounds))
        imports: dict[str, list[float]] = {}
        for _ in range(rounds):
            res = subprocess.run([sys.executable, "-X", "importtime", *run], env=self.cli_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
            seen: dict[str, float] = {}
            for line in res.stderr.splitlines():
                # "import time: self | cumulative | name": top level only (no indent)
                parts = line.split("|")
                if (len(parts) == 3 and parts[1].strip().isdigit() and parts[2].startswith(" ")
                        and not parts[2].startswith("  ")):
                    name = parts[2].strip()
                    if name != "site":
                        key = ".".join(name.split(".")[:3]) if name.startswith("jupyter_contain") else \
                            name.split(".")[0]
                        seen[key] = seen.get(key, 0.0) + int(parts[1]) / 1e6
            for k, v in seen.items():
                imports.setdefault(k, []).append(v)
        rows = [("interpreter (python -S -c pass)", bare), ("site (python -c pass minus -S)", python - bare)]
        med = sorted(((k, statistics.median(v + [0.0] * (rounds - len(v)))) for k, v in imports.items()),
                     key=lambda kv: -kv[1])
        total_imports = sum(v for _, v in med)
        rows += [(f"import {k}", v) for k, v in med[:10]]
        rows.append((f"import (the other {max(len(med) - 10, 0)})", sum(v for _, v in med[10:])))
        rows.append(("the verb's own work (wall - the above)", wall - python - total_imports))
        rows.append(("wall (jupyter-contain run --rm)", wall))
        return rows

    # --- memory beside the payload --------------------------------------------------------

    def memory_ours(self, n: int) -> dict[str, float]:
        cs: list[Container] = []
        try:
            for _ in range(n):
                c = self.rt.create(ContainerSpec(image=IMAGE, command=("sleep", "60")))
                cs.append(c)
                c.start()
            time.sleep(0.5)
            beside, payload, extra = [], [], 0
            inits = set()
            for c in cs:
                init = c.pid
                assert init is not None and comm(init) == "jc-init", (init, init and comm(init))
                inits.add(init)
                kids = children(init)
                assert [comm(k) for k in kids] == ["sleep"], [comm(k) for k in kids]
                beside.append(pss_kib(init))
                payload.append(sum(pss_kib(p) for p in _tree(kids[0])))
                # every process of the container's cgroup: the init, the payload's tree
                extra += len(_cgroup_procs(init) - {init} - _tree(kids[0]))
            # no daemon, no shim: this process's only other child is the run-peer helper
            others = set(children(os.getpid())) - inits - {self.peer.proc.pid}
            return {"procs": 1 + (extra + len(others)) / n, "beside": statistics.fmean(beside),
                    "beside_max": max(beside), "payload": statistics.fmean(payload)}
        finally:
            for c in cs:
                c.remove(force=True)

    def memory_crun(self, n: int) -> dict[str, float]:
        ids = [f"jcb-m{i}-{uuid.uuid4().hex[:8]}" for i in range(n)]
        started: list[str] = []
        try:
            for cid in ids:
                self.peer.run(self.crun + ["run", "-d", "-b", str(self.b["same-sleep"]), cid])
                started.append(cid)
            time.sleep(0.5)
            payload, extra = [], 0
            for cid in ids:
                pid = json.loads(self.peer.run(self.crun + ["state", cid])[2])["pid"]
                assert comm(pid) == "sleep", comm(pid)
                payload.append(pss_kib(pid))
                extra += len(_cgroup_procs(pid) - _tree(pid))
            # crun run -d has exited: the helper has no child left
            extra += len(children(self.peer.proc.pid))
            return {"procs": extra / n, "beside": 0.0, "beside_max": 0, "payload": statistics.fmean(payload)}
        finally:
            for cid in started:
                self.peer.run(self.crun + ["delete", "-f", cid], check=False)

    def memory_podman(self, n: int) -> dict[str, float]:
        names = [f"jcb-m{i}" for i in range(n)]
        started: list[str] = []
        try:
            for name in names:
                self.peer.run(self.podman + ["run", "-d", "--name", name, "--network", "none",
                                             self.podman_image, "sleep", "60"])
                started.append(name)
            time.sleep(0.5)
            beside, payload, procs = [], [], []
            for name in names:
                out = self.peer.run(self.podman + ["inspect", "--format", "{{.State.Pid}} {{.State.ConmonPid}}",
                                                   name])[2]
                pid, conmon = (int(x) for x in out.split())
                assert comm(pid) == "sleep" and comm(conmon) == "conmon", (comm(pid), comm(conmon))
                beside.append(pss_kib(conmon))
                payload.append(pss_kib(pid))
                procs.append(1 + len(_cgroup_procs(pid) - _tree(pid)))
            return {"procs": statistics.fmean(procs), "beside": statistics.fmean(beside),
                    "beside_max": max(beside), "payload": statistics.fmean(payload)}
        finally:
            if started:
                self.peer.run(self.podman + ["rm", "-f", "-t", "0"] + started, check=False)

    def close(self) -> None:
        for c in self.rt.containers():
            c.remove(force=True)
        if self.podman:
            self.peer.run(self.podman + ["system", "reset", "-f"], check=False)
        self.peer.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--containers", type=int, default=10, help="containers per engine for the memory figures")
    ap.add_argument("--alone", type=int, default=20,
                    help="then runs of ours, crun and crun-same, each in a block of this many (0: none)")
    ap.add_argument("--spaced", type=int, default=20,
                    help="then rounds of ours, crun and crun-same alternated with 100 ms idle before each run (0: none)")
    ap.add_argument("--no-podman", action="store_true")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    if not RUN_PEER.exists():
        print(f"{RUN_PEER} is missing: peers cannot run here", file=sys.stderr)
        return 1
    for tool in ("crun", "runc", "bwrap"):
        if not shutil.which(tool):
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    use_podman = not args.no_podman and shutil.which("podman") is not None

    # short: podman's runroot below it must stay under 50 characters
    work = Path("/var/tmp") / f"jcbs-{os.getpid()}"
    work.mkdir()
    bench: Bench | None = None
    try:
        bench = Bench(work, use_podman=use_podman)
        contenders = bench.contenders()
        names = list(contenders)
        results: dict[str, list[float]] = {k: [] for k in names}
        for _, order in rotations(names, args.warmup):
            for name in order:
                contenders[name](False)
        for r, order in rotations(names, args.rounds):
            for name in order:
                results[name].append(contenders[name](True))
            if (r + 1) % 10 == 0:
                print(f"  {r + 1}/{args.rounds} rounds", file=sys.stderr, flush=True)

        print_times(results, title=f"start-to-exit of /bin/true (busybox rootfs), {args.rounds} rounds alternated, "
                                   f"after {args.warmup} warm-up rounds:")
        print("  ours phases p50 (ms): " + ", ".join(f"{k} {pct(v, 50) * 1000:.1f}" for k, v in bench.phases.items()))
        print("ratios:")
        print_ratios(results, OURS, [p for p in PEERS if p in results], budgets={"crun": 1.0, "runc": 0.5})
        print("the command line, from a shell:")
        print_ratios(results, CLI, [p for p in ("crun", "podman", "python") if p in results],
                     budgets={"crun": 3.0, "podman": 0.25})

        small = bench.cli_small(max(args.rounds // 2, 5))
        print_times(small, title="\nthe command line's own start, alternated:")
        print_ratios(small, [k for k in small if k != "python"], ["python"])
        print("\nwhere `jupyter-contain run --rm IMAGE /bin/true` goes (medians; -X importtime inflates imports):")
        for what, secs in bench.cli_breakdown(max(args.rounds // 4, 5)):
            print(f"  {what:44s} {secs * 1000:7.1f} ms")

        if args.alone:
            # Each engine in a block of its own: a peer's cgroup attach waits
            # for an RCU grace period (cgroup_threadgroup_rwsem) unless another
            # attach ran just before it; in the alternated rounds that depends
            # on who ran before (ours no longer attaches that way: see cgroups.py)
            alone: dict[str, list[float]] = {}
            for name in ("ours", "crun", "crun-same"):
                alone[name] = [contenders[name](False) for _ in range(args.alone)]
            print_times(alone, title=f"\nthe same, each in a block of {args.alone} back-to-back runs:")
            print_ratios(alone, ("ours",), ["crun", "crun-same"], budgets={"crun": 1.0})
        if args.spaced:
            # as kernels start in practice: one at a time, with the machine idle
            # in between (every earlier teardown done, no grace period to ride)
            spaced: dict[str, list[float]] = {"ours": [], "crun": [], "crun-same": []}
            for _ in range(args.spaced):
                for name in spaced:
                    time.sleep(0.1)
                    spaced[name].append(contenders[name](False))
            print_times(spaced, title=f"\nthe same, {args.spaced} rounds alternated, 100 ms idle before each run:")
            print_ratios(spaced, ("ours",), ["crun", "crun-same"], budgets={"crun": 1.0})

        n = args.containers
        mem = {"ours": bench.memory_ours(n), "crun": bench.memory_crun(n)}
        if use_podman:
            mem["podman"] = bench.memory_podman(n)
        print(f"\nhost memory per running container beside its payload ({n} containers each running sleep 60):")
        print(f"  {'':8s} {'host procs':>10s} {'Pss beside':>11s} {'max':>7s} {'payload Pss':>12s}  (KiB)")
        for k, m in mem.items():
            print(f"  {k:8s} {m['procs']:10.1f} {m['beside']:11.0f} {m['beside_max']:7.0f} {m['payload']:12.0f}")
        verdict = "OK" if mem["ours"]["beside_max"] <= 1024 else "OVER"
        print(f"  ours: {mem['ours']['beside']:.0f} KiB per container (max {mem['ours']['beside_max']:.0f}); "
              f"budget <= 1024 KiB: {verdict}")
        print("  (host procs: processes per container outside its payload's tree, counting jc-init / conmon; "
              "kernel objects - namespaces, mounts, cgroups - are not in Pss)")
        return 0
    finally:
        if bench is not None:
            bench.close()
        remove_tree(work)


if __name__ == "__main__":
    sys.exit(main())
