"""Warm pools (kernel/pool.py): real pooled kernels over ZMQ, handed out through jupyter_client.

A pooled kernel must be indistinguishable from a cold one: the notebook folder
bound at its path and the working directory set at hand-out (into the running
container), the kernel's environment, its limits, its own container; restarts,
interrupts and death reasons as for cold kernels; never handed out twice, never
reused after a shutdown; a changed kernelspec drains its pool and
``drain_all`` (server shutdown) leaves nothing behind (the autouse leak check
looks at processes, mounts and cgroups after every test).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.manager import KernelManager
from kernel_fixtures import *  # noqa: F403
from kernel_fixtures import KERNEL_NAME, make_spec, run_cell

from jupyter_contain import errors
from jupyter_contain.kernel import pool, snapshots
from jupyter_contain.kernel.folder import kernel_runtime_dir
from jupyter_contain.kernel.pool import POOL_LABEL, PoolSettings
from jupyter_contain.runtime import Runtime

pytestmark = pytest.mark.slow

READY = 120


@pytest.fixture(autouse=True)
def no_pool_left(kernel_env, kernel_runtime):
    """Every test drains what it pooled (before kernel_runtime's own check); then nothing pooled remains."""
    yield
    pool.drain_all()
    for d in kernel_env.kernels_dir.glob("t-pool*"):   # a server started later would fill their pools
        shutil.rmtree(d)
    rt = Runtime(kernel_env.store)
    left = [c.id[:12] for c in rt.containers() if c.state.labels.get(POOL_LABEL)]
    folders = [p.name for p in kernel_runtime_dir().glob("pool-*")] if kernel_runtime_dir().is_dir() else []
    assert not left, f"pooled containers left: {left}"
    assert not [f for f in folders if not _owned_elsewhere(f)], f"pool folders left: {folders}"


def _spec(kernel_env, name: str, *, kernel_env_vars: dict | None = None, **config: object) -> str:
    """make_spec, with the provisioner option ``env`` (make_spec's first parameter has that name)."""
    make_spec(kernel_env, name, **config)
    if kernel_env_vars is not None:
        path = kernel_env.spec_dir(name) / "kernel.json"
        spec = json.loads(path.read_text())
        spec["metadata"]["kernel_provisioner"]["config"]["env"] = kernel_env_vars
        path.write_text(json.dumps(spec, indent=1))
    return name


def _owned_elsewhere(folder: str) -> bool:
    """A pool folder of another process's pool (other agents' test runs share /run/jupyter-contain)."""
    return folder not in _ours
_ours: set[str] = set()


def _start(ksm, name: str, cwd: Path) -> tuple[KernelManager, object]:
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel(cwd=str(cwd))
    folder = km.provisioner.kernel_dir
    if folder is not None and folder.name.startswith("pool-"):
        _ours.add(folder.name)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(READY)
    return km, kc


def _pooled(km) -> bool:
    return km.provisioner.kernel_dir.name.startswith("pool-")


def _seed_and_wait(ksm, name: str, tmp_path: Path, n: int = 1) -> None:
    """A first (cold) start makes the pool; its kernel is shut down; wait until ``n`` wait warm."""
    km, kc = _start(ksm, name, tmp_path)
    try:
        assert not _pooled(km)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert pool.wait_ready(name, n, timeout=90), pool.pools()


def test_settings_are_checked():
    assert PoolSettings.from_config(None).size == 0
    assert PoolSettings.from_config(3).size == 3
    s = PoolSettings.from_config({"size": 2, "idle_ttl": 60, "memory_budget": "1g"})
    assert (s.size, s.idle_ttl, s.memory_budget) == (2, 60.0, 1 << 30)
    for bad in ({"size": -1}, {"sise": 2}, {"memory_budget": "lots"}, "two", {"size": 1000}):
        with pytest.raises(errors.InvalidSpec):
            PoolSettings.from_config(bad)


def test_pooled_kernel_is_a_cold_one(ksm, kernel_env, kernel_runtime, tmp_path):
    name = _spec(kernel_env, "t-pool", memory="256m", kernel_env_vars={"POOL_TEST": "yes"}, pool=1)
    nb = tmp_path / "notebooks" / "week 1"
    nb.mkdir(parents=True)
    (nb / "data.csv").write_text("a,b\n1,2\n")
    os.chown(nb, 1000, 1000)
    _seed_and_wait(ksm, name, tmp_path)

    km, kc = _start(ksm, name, nb)
    try:
        assert _pooled(km), "the start did not take the pooled kernel"
        steps = [n for n, _ in km.provisioner._trace.breakdown()]
        assert "handed out" in steps and "container made" not in steps, steps
        r = run_cell(kc, "import os, json; print(json.dumps([os.getcwd(), sorted(os.listdir('.')), "
                         "os.environ.get('POOL_TEST'), os.environ['JUPYTER_CONTAIN_KERNEL_ID'], "
                         "open('data.csv').read()]))")
        assert r["error"] is None, r
        cwd, names, pool_env, kid, data = json.loads(r["stdout"])
        assert cwd == str(nb) and names == ["data.csv"] and data == "a,b\n1,2\n"
        assert pool_env == "yes" and kid == km.kernel_id
        # saved as the folder's owner, as a cold kernel's root does
        run_cell(kc, "open('out.txt', 'w').write('x')")
        st = (nb / "out.txt").stat()
        assert (st.st_uid, st.st_gid) == (1000, 1000)
        # the kernelspec's memory limit holds in the pooled kernel's cgroup
        r = run_cell(kc, "import glob; p = [f for f in glob.glob('/sys/fs/cgroup/memory*/memory.max') + "
                         "glob.glob('/sys/fs/cgroup/memory/memory.limit_in_bytes')]; print(open(p[0]).read())")
        assert int(r["stdout"].strip()) == 256 << 20, r
        c = km.provisioner.container
        assert c.state.labels["jupyter-contain.kernel-id"] == km.kernel_id
        assert not c.state.labels.get(POOL_LABEL)

        # interrupt, then a restart in place: same container, the folder and cwd again
        msg_id = kc.execute("import time; time.sleep(100)", stop_on_error=False)
        time.sleep(0.5)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        run_cell(kc, "open('/root/kept', 'w').write('1')")
        km.restart_kernel()
        kc.wait_for_ready(READY)
        r = run_cell(kc, "import os; print(os.getcwd(), os.path.exists('/root/kept'), os.path.exists('data.csv'))")
        assert r["stdout"].strip() == f"{nb} True True", r
        assert km.provisioner.container.id == c.id
        # a snapshot: the writable layer of the kernel, labelled with the kernel (not the pool slot)
        rec = snapshots.snapshot(kernel_runtime, c, "localhost/pool-snap:1")
        try:
            with kernel_env.store.open_blob(rec.manifest.layers[-1].digest) as blob, \
                    tarfile.open(fileobj=blob, mode="r|*") as tar:
                names = [m.name.removeprefix("./").rstrip("/") for m in tar]
            assert "root/kept" in names
            assert snapshots.kernel_id_of(c) == km.kernel_id
        finally:
            kernel_env.store.untag("localhost/pool-snap:1")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    # shut down: gone for good, never back in the pool
    with pytest.raises(errors.ContainerNotFound):
        kernel_runtime.get(c.id)
    assert not km.provisioner.kernel_dir or not Path(km.provisioner.kernel_dir).exists()


def test_never_handed_out_twice_and_per_start_mismatch_is_cold(ksm, kernel_env, kernel_runtime, tmp_path):
    name = make_spec(kernel_env, "t-pool2", pool=1)
    _seed_and_wait(ksm, name, tmp_path)
    km1, kc1 = _start(ksm, name, tmp_path)
    # the pool had one: the second start, right after, is cold (or gets a newly refilled one)
    km2, kc2 = _start(ksm, name, tmp_path)
    try:
        assert _pooled(km1)
        assert km1.provisioner.container.id != km2.provisioner.container.id
        assert km1.provisioner.kernel_dir != km2.provisioner.kernel_dir
    finally:
        for km, kc in ((km1, kc1), (km2, kc2)):
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def test_kernelspec_change_drains_pool(ksm, kernel_env, kernel_runtime, tmp_path):
    name = _spec(kernel_env, "t-pool3", pool=1, kernel_env_vars={"V": "1"})
    _seed_and_wait(ksm, name, tmp_path)
    old = [c.id for c in kernel_runtime.containers() if c.state.labels.get(POOL_LABEL)]
    assert len(old) == 1
    _spec(kernel_env, "t-pool3", pool=1, kernel_env_vars={"V": "2"})
    # drained in the background (the refill thread looks at the kernelspec every 5 s), before any start
    deadline = time.monotonic() + 30
    while any(c.state.labels.get(POOL_LABEL) for c in kernel_runtime.containers() if c.id in old):
        assert time.monotonic() < deadline, "the changed kernelspec's pool was not drained"
        time.sleep(0.2)
    km, kc = _start(ksm, name, tmp_path)
    try:
        assert not _pooled(km), "a kernel of the old kernelspec was handed out"
        assert run_cell(kc, "import os; print(os.environ['V'])")["stdout"].strip() == "2"
        for cid in old:
            with pytest.raises(errors.ContainerNotFound):
                kernel_runtime.get(cid)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_pooled_kernel_death_reason_after_restart(ksm, kernel_env, kernel_runtime, tmp_path):
    name = make_spec(kernel_env, "t-pool4", pool=1)
    _seed_and_wait(ksm, name, tmp_path)

    async def main() -> None:
        km = AsyncIOLoopKernelManager(kernel_name=name, kernel_spec_manager=ksm)
        await km.start_kernel(cwd=str(tmp_path))
        _ours.add(km.provisioner.kernel_dir.name)
        assert _pooled(km)
        restarts: list[str] = []
        km.add_restart_callback(lambda: restarts.append("restart"), "restart")
        km.start_restarter()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(READY)
            kc.execute("import os; os.kill(os.getpid(), 9)")
            deadline = time.monotonic() + 60
            while not restarts:
                assert time.monotonic() < deadline, "no restart"
                await asyncio.sleep(0.1)
            await kc.wait_for_ready(READY)
            streams: list[str] = []

            def hook(msg: dict) -> None:
                if msg["msg_type"] == "stream":
                    streams.append(msg["content"]["text"])

            await kc.execute_interactive("import os; print(os.getcwd())", timeout=60, output_hook=hook)
            assert "the previous kernel was killed by SIGKILL" in streams[0], streams
            assert streams[-1].strip() == str(tmp_path)
        finally:
            km.stop_restarter()
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    asyncio.run(main())


def test_drain_all_leaves_nothing(ksm, kernel_env, kernel_runtime, tmp_path):
    name = make_spec(kernel_env, "t-pool5", pool=2)
    _seed_and_wait(ksm, name, tmp_path, n=2)
    pooled = [c for c in kernel_runtime.containers() if c.state.labels.get(POOL_LABEL)]
    assert len(pooled) == 2
    folders = {p.name for p in kernel_runtime_dir().glob("pool-*")}
    assert pool.drain_all() == 2
    assert not [c for c in kernel_runtime.containers() if c.state.labels.get(POOL_LABEL)]
    assert not folders & {p.name for p in kernel_runtime_dir().glob("pool-*")}
    assert pool.pools() == {}


def test_failed_hand_out_starts_cold(ksm, kernel_env, kernel_runtime, tmp_path, monkeypatch):
    """A pooled kernel that cannot be handed out is removed; the start goes on cold, nothing is left."""
    from jupyter_contain.runtime import Container

    name = make_spec(kernel_env, "t-pool6", pool=1)
    _seed_and_wait(ksm, name, tmp_path)
    (waiting,) = [c.id for c in kernel_runtime.containers() if c.state.labels.get(POOL_LABEL)]

    def refuse(self, bind):
        raise errors.ContainerError("attach refused (test)")

    monkeypatch.setattr(Container, "attach_bind", refuse)
    km, kc = _start(ksm, name, tmp_path)
    try:
        assert not _pooled(km)
        assert km.provisioner.container.id != waiting
        r = run_cell(kc, "import os; print(os.getcwd())")
        assert r["stdout"].strip() == str(tmp_path)
        with pytest.raises(errors.ContainerNotFound):
            kernel_runtime.get(waiting)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _waiting_pooled(rt: Runtime) -> list[str]:
    """Pooled containers whose kernel waits for its hand-out (as pool.PooledKernel.waiting looks)."""
    out = []
    for c in rt.containers():
        if not c.state.labels.get(POOL_LABEL) or c.pid is None:
            continue
        try:
            kids = Path(f"/proc/{c.pid}/task/{c.pid}/children").read_text().split()
            if any(Path(f"/proc/{k}/wchan").read_text() in ("wait_for_partner", "fifo_open") for k in kids):
                out.append(c.id)
        except OSError:
            continue
    return out


def test_pool_through_jupyter_server(tmp_path, kernel_env, kernel_runtime):
    """A Jupyter server (its default ContainApp.kernel_pool: 1) hands a notebook's session a warm kernel
    in that notebook's folder with its session name; its stop leaves no pooled kernel behind."""
    from test_kernel_server import Server, _execute

    srv = Server(tmp_path, kernel_env)
    try:
        (srv.root / "week1").mkdir()
        code, s1 = srv.request("POST", "/api/sessions", {"path": "week1/a.ipynb", "type": "notebook",
                                                          "kernel": {"name": KERNEL_NAME}})
        assert code == 201, s1
        rt = Runtime(kernel_env.store)
        deadline = time.monotonic() + 90
        while not (waiting := _waiting_pooled(rt)):
            assert time.monotonic() < deadline, "the server's pool did not fill"
            time.sleep(0.2)
        code, s2 = srv.request("POST", "/api/sessions", {"path": "week1/b.ipynb", "type": "notebook",
                                                          "kernel": {"name": KERNEL_NAME}})
        assert code == 201, s2
        kid = s2["kernel"]["id"]
        (c,) = [c for c in rt.containers() if c.state.labels.get("jupyter-contain.kernel-id") == kid]
        assert c.id in waiting, "the second session did not get the pooled kernel"
        ws = srv.channels(kid)
        try:
            r = _execute(ws, "import os; print(os.getcwd()); print(os.environ.get('JPY_SESSION_NAME'))")
        finally:
            ws.close()
        cwd, session = r["stdout"].split()
        assert cwd == str(srv.root / "week1") and session.endswith("week1/b.ipynb"), r
    finally:
        srv.stop()
    assert Runtime(kernel_env.store).containers() == []


def test_server_fills_a_kernelspecs_own_pool_at_its_start(tmp_path, kernel_env, kernel_runtime):
    """A kernelspec that sets ``pool`` is warm before its first start: the server fills it when it starts."""
    from test_kernel_server import Server

    name = make_spec(kernel_env, "t-pool7", pool=1)
    srv = Server(tmp_path, kernel_env)
    try:
        rt = Runtime(kernel_env.store)
        deadline = time.monotonic() + 90
        while not (waiting := _waiting_pooled(rt)):
            assert time.monotonic() < deadline, "the server did not fill the kernelspec's pool"
            time.sleep(0.2)
        code, k = srv.request("POST", "/api/kernels", {"name": name})
        assert code == 201, k
        (c,) = [c for c in rt.containers() if c.state.labels.get("jupyter-contain.kernel-id") == k["id"]]
        assert c.id in waiting, "the first start did not get the pooled kernel"
    finally:
        srv.stop()
    assert Runtime(kernel_env.store).containers() == []
