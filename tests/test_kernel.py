"""Real kernels in real containers through jupyter_client: the provisioner, end to end.

Every test starts ipykernel inside a container from the Debian kernel image
(imported once per session from the cached rootfs tarball) and talks ZMQ over
ipc sockets to it. Covered: execute, interrupt, restart in place (files
kept), reset, shutdown leaving nothing, the OOM and crash reasons reaching the
notebook after the restarter's restart, ``ps -a`` showing the reason, ten
kernels at once, the image probe, bad kernelspec options, and the clean-up of
containers a dead server left.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.manager import AsyncKernelManager, KernelManager
from kernel_fixtures import *  # noqa: F403
from kernel_fixtures import KERNEL_NAME, make_spec, run_cell

from jupyter_contain import errors
from jupyter_contain.kernel import containers, kernelspec
from jupyter_contain.runtime import Runtime

pytestmark = pytest.mark.slow

READY = 120   # seconds: two cores, and other test rooms may be busy too


async def arun_cell(kc, code: str, *, timeout: float = 60) -> dict:
    out: dict = {"stdout": "", "stderr": "", "error": None, "streams": []}

    def hook(msg: dict) -> None:
        t, c = msg["msg_type"], msg["content"]
        if t == "stream":
            out[c["name"]] += c["text"]
            out["streams"].append(c["text"])
        elif t == "error":
            out["error"] = c

    out["reply"] = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return out


def _kernel_container(rt: Runtime, kernel_id: str):
    hits = [c for c in rt.containers() if c.state.labels.get("jupyter-contain.kernel-id") == kernel_id]
    assert len(hits) <= 1
    return hits[0] if hits else None


# --- blocking KernelManager ----------------------------------------------------------


def test_execute_interrupt_restart_shutdown(ksm, kernel_env, kernel_runtime):
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(READY)
        kernel_dir = containers.kernel_runtime_dir() / km.kernel_id
        assert kernel_dir.is_dir()
        c = _kernel_container(kernel_runtime, km.kernel_id)
        assert c is not None and c.refresh_status() == "running"

        r = run_cell(kc, "import os, socket; print(socket.gethostname(), os.getpid(), "
                         "open('/proc/1/cmdline','rb').read().split(b'\\0')[0].decode())")
        assert r["reply"]["content"]["status"] == "ok"
        hostname, pid, init = r["stdout"].split()
        assert hostname != socket.gethostname() and hostname == c.id[:12]
        assert int(pid) < 10 and init == "jc-init"   # its own pid namespace, our init as PID 1

        # interrupt: a long sleep ends with KeyboardInterrupt within a second
        msg_id = kc.execute("import time; time.sleep(100)", stop_on_error=False)
        _wait_busy(kc, msg_id)
        t0 = time.monotonic()
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=10)
        took = time.monotonic() - t0
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert took < 1.0, f"interrupt took {took:.2f} s"

        # restart in place: the writable layer survives
        r = run_cell(kc, "open('/root/kept.txt','w').write('still here')")
        assert r["reply"]["content"]["status"] == "ok"
        km.restart_kernel()
        kc.wait_for_ready(READY)
        c2 = _kernel_container(kernel_runtime, km.kernel_id)
        assert c2 is not None and c2.id == c.id
        r = run_cell(kc, "print(open('/root/kept.txt').read())")
        assert r["stdout"].strip() == "still here"
        # a restart the user asked for is no death to report
        assert r["stderr"] == ""
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    # nothing left: container, kernel folder (the leak check covers mounts, cgroups, processes)
    assert _kernel_container(Runtime(kernel_env.store), km.kernel_id) is None
    assert not kernel_dir.exists()


def _wait_busy(kc, msg_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=timeout)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "busy"):
            time.sleep(0.3)   # let the cell reach the sleep
            return
    raise AssertionError("the kernel never went busy")


def test_reset_option_clears_writable_layer(ksm, kernel_env, kernel_runtime):
    name = make_spec(kernel_env, "t-reset", reset=True)
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(READY)
        r = run_cell(kc, "open('/root/gone.txt','w').write('x'); import os; print(os.path.exists('/root/gone.txt'))")
        assert r["stdout"].strip() == "True"
        first = _kernel_container(kernel_runtime, km.kernel_id)
        km.restart_kernel()
        kc.wait_for_ready(READY)
        r = run_cell(kc, "import os; print(os.path.exists('/root/gone.txt'))")
        assert r["stdout"].strip() == "False"
        second = _kernel_container(kernel_runtime, km.kernel_id)
        assert second is not None and second.id != first.id   # a fresh container from the image
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_bad_memory_option_fails_clearly_at_start(ksm, kernel_env, kernel_runtime):
    name = make_spec(kernel_env, "t-badmem", memory="lots")
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    with pytest.raises(errors.InvalidSpec) as ei:
        km.start_kernel()
    msg = str(ei.value)
    assert "t-badmem" in msg and "memory" in msg and "'lots'" in msg and "512m" in msg
    km.cleanup_resources()
    assert not (containers.kernel_runtime_dir() / km.kernel_id).exists()


@pytest.mark.filterwarnings("ignore:Passing unrecognized arguments:DeprecationWarning")
def test_unknown_option_fails_clearly(ksm, kernel_env, kernel_runtime):
    name = make_spec(kernel_env, "t-typo", memroy="1g")
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    with pytest.raises(errors.InvalidSpec, match="unknown option.*memroy"):
        km.start_kernel()
    km.cleanup_resources()


def test_probe_rejects_image_without_python(image_store, tmp_path):
    with pytest.raises(errors.KernelError) as ei:
        kernelspec.install(store=image_store, image_name="localhost/busybox:test", name="t-busybox",
                           prefix=str(tmp_path / "prefix"), kernel_layer_mode="never")
    msg = str(ei.value)
    assert "busybox" in msg and "no python3" in msg and "ipykernel" in msg
    assert not (tmp_path / "prefix/share/jupyter/kernels/t-busybox").exists()
    assert Runtime(image_store).containers() == []   # the probe container is gone too


def test_kernelspec_install_writes_provisioner_and_launcher(kernel_env):
    spec = json.loads((kernel_env.spec_dir(KERNEL_NAME) / "kernel.json").read_text())
    prov = spec["metadata"]["kernel_provisioner"]
    assert prov["provisioner_name"] == "jupyter-contain"
    assert prov["config"]["image"] == "localhost/debian:bookworm"
    assert spec["argv"][1:3] == ["-m", "jupyter_contain.kernel.launcher"]
    assert "{connection_file}" in spec["argv"]


# --- the argv fallback --------------------------------------------------------------------


def test_argv_launcher_for_clients_without_provisioners(ksm, kernel_env, kernel_runtime):
    """A kernelspec without the provisioner stanza: jupyter_client runs argv (the launcher) on tcp."""
    name = make_spec(kernel_env, "t-argv", provisioner=False)
    assert "kernel_provisioner" not in json.loads((kernel_env.spec_dir(name) / "kernel.json").read_text())["metadata"]
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel()
    assert type(km.provisioner).__name__ == "LocalProvisioner" and km.transport == "tcp"
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(READY)
        r = run_cell(kc, "import os, socket; print(socket.gethostname(), "
                         "open('/proc/1/cmdline','rb').read().split(b'\\0')[0].decode())")
        assert r["reply"]["content"]["status"] == "ok", r
        hostname, init = r["stdout"].split()
        assert hostname != socket.gethostname() and init == "jc-init"
        c = next(c for c in kernel_runtime.containers() if c.id.startswith(hostname))
        assert c.refresh_status() == "running"

        msg_id = kc.execute("import time; time.sleep(100)", stop_on_error=False)
        _wait_busy(kc, msg_id)
        t0 = time.monotonic()
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=10)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - t0 < 1.0
        r = run_cell(kc, "print(6 * 7)")
        assert r["stdout"].strip() == "42"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    # the launcher ended with the kernel and took the container with it
    assert not km.has_kernel
    assert not c.dir.exists()


# --- restarter: death reasons ----------------------------------------------------------


async def _start_with_restarter(ksm, name: str):
    km = AsyncIOLoopKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    await km.start_kernel()
    restarts: list[str] = []
    km.add_restart_callback(lambda: restarts.append("restart"), "restart")
    km.start_restarter()
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(READY)
    return km, kc, restarts


async def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def _await_dead(km, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while await km.is_alive():
        if time.monotonic() > deadline:
            raise AssertionError("the kernel did not die")
        await asyncio.sleep(0.05)


def test_oom_reason_reaches_notebook_and_ps(ksm, kernel_env, kernel_runtime):
    name = make_spec(kernel_env, "t-oom", memory="128m")

    async def main() -> None:
        km = AsyncIOLoopKernelManager(kernel_name=name, kernel_spec_manager=ksm)
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(READY)
            kc.execute("x = b'x' * (1 << 30)")
            # before the restarter runs: the container shows why it ended
            await _await_dead(km)
            c = _kernel_container(kernel_runtime, km.kernel_id)
            ps = subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(kernel_env.store.root),
                                 "ps", "-a"], capture_output=True, text=True, timeout=60)
            assert ps.returncode == 0, ps.stderr
            line = next(ln for ln in ps.stdout.splitlines() if c.id[:12] in ln)
            assert "out of memory (limit 128 MiB" in line, ps.stdout

            restarts: list[str] = []
            km.add_restart_callback(lambda: restarts.append("restart"), "restart")
            km.start_restarter()
            await _wait_for(lambda: restarts, 30, "the restarter")
            await kc.wait_for_ready(READY)
            r = await arun_cell(kc, "print('after')")
            assert r["streams"], r
            first = r["streams"][0]
            assert "the previous kernel was killed: out of memory (limit 128 MiB, peak " in first, r
            assert "after" in r["stdout"]
            # said once: the next cell is quiet
            r = await arun_cell(kc, "1")
            assert r["stderr"] == ""
            # and the container is the same one (restart in place)
            assert _kernel_container(kernel_runtime, km.kernel_id).id == c.id
        finally:
            km.stop_restarter()
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    asyncio.run(main())


def test_crashed_kernel_restarts_and_says_why(ksm, kernel_env, kernel_runtime):
    async def main() -> None:
        km, kc, restarts = await _start_with_restarter(ksm, KERNEL_NAME)
        try:
            await arun_cell(kc, "open('/root/before-crash','w').write('1')")
            kc.execute("import os; os.kill(os.getpid(), 9)")
            await _wait_for(lambda: restarts, 60, "the restarter")
            await kc.wait_for_ready(READY)
            r = await arun_cell(kc, "import os; print(os.path.exists('/root/before-crash'))")
            assert "the previous kernel was killed by SIGKILL" in r["streams"][0], r
            assert r["stdout"].strip().endswith("True")
        finally:
            km.stop_restarter()
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    asyncio.run(main())


# --- many at once ------------------------------------------------------------------------


def test_ten_kernels_concurrently(ksm, kernel_env, kernel_runtime):
    async def one(i: int) -> tuple[str, str]:
        km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(300)
            r = await arun_cell(kc, f"import socket; print(socket.gethostname(), {i} * 2)", timeout=120)
            return km.kernel_id, r["stdout"]
        finally:
            kc.stop_channels()
            await km.shutdown_kernel()

    async def main() -> list[tuple[str, str]]:
        return await asyncio.gather(*(one(i) for i in range(10)))

    results = asyncio.run(main())
    hosts = {out.split()[0] for _, out in results}
    assert len(hosts) == 10                                        # ten containers
    assert sorted(int(out.split()[1]) for _, out in results) == [i * 2 for i in range(10)]
    assert Runtime(kernel_env.store).containers() == []
    for kid, _ in results:
        assert not (containers.kernel_runtime_dir() / kid).exists()


# --- what a dead server leaves -------------------------------------------------------------


def test_gc_once_removes_containers_of_dead_owner(kernel_env, kernel_runtime):
    """A container whose owner died is removed by the next process's first kernel start."""
    from jupyter_contain.runtime import ContainerSpec

    # a short-lived owner: a child that exits at once (its pid is then dead)
    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    rt = Runtime(kernel_env.store)
    c = rt.create(ContainerSpec(image="localhost/debian:bookworm", command=("sleep", "1000"),
                                owner_pid=os.getpid()))
    # rewrite the owner as the dead child (owner_start None: dead for sure)
    st = json.loads((c.dir / "state.json").read_text())
    st["owner_pid"], st["owner_start"] = child.pid, None
    (c.dir / "state.json").write_text(json.dumps(st))
    containers._gc_done.clear()
    removed = containers.gc_once(rt)
    assert c.id in removed
    assert containers.gc_once(rt) == []          # once per process and store
    assert not c.dir.exists()


def _one_cell(ksm, name: str, code: str, *, cwd: Path | None = None) -> dict:
    """Start kernel ``name``, run ``code`` (it must not fail), shut the kernel down; the cell's result."""
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel(**({"cwd": str(cwd)} if cwd else {}))
    try:
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            r = run_cell(kc, code)
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
    assert r["error"] is None, r
    return r


def test_userns_and_seccomp_options(ksm, kernel_env, kernel_runtime, tmp_path, monkeypatch, caplog):
    """userns=auto: kernel root is a subordinate uid; seccomp=unconfined: Docker's profile off (unshare
    works), the host-file guard on (no setuid file in the notebook folder), and a warning."""
    base = 3_000_000
    (tmp_path / "subuid").write_text(f"jupyter-contain:{base}:{4 * 65536}\n")
    (tmp_path / "subgid").write_text(f"jupyter-contain:{base}:{4 * 65536}\n")
    monkeypatch.setenv("JUPYTER_CONTAIN_SUBUID_FILE", str(tmp_path / "subuid"))
    monkeypatch.setenv("JUPYTER_CONTAIN_SUBGID_FILE", str(tmp_path / "subgid"))
    name = make_spec(kernel_env, "t-hardened", userns="auto", seccomp="unconfined")
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir(mode=0o700)
    with caplog.at_level("WARNING"):
        r = _one_cell(ksm, name, "import os\nprint(os.getuid(), open('/proc/self/uid_map').read().split()[:2])\n"
                                 "print([l for l in open('/proc/self/status') if l.startswith('Seccomp:')][0])\n"
                                 "open('saved.txt', 'w').write('from the kernel')\n"
                                 "try:\n    os.chmod('saved.txt', 0o4755); print('suid set')\n"
                                 "except PermissionError:\n    print('suid refused')\n", cwd=notebooks)
    first, second, third = [ln for ln in r["stdout"].splitlines() if ln.strip()][:3]
    uid, host = first.split(" ", 1)
    assert uid == "0" and host.startswith("['0', '") and int(host.split("'")[3]) >= base
    assert second.split() == ["Seccomp:", "2"] and third == "suid refused", r["stdout"]
    # the notebook folder (0700, host root's) is the kernel root's to write: an idmapped bind
    saved = notebooks / "saved.txt"
    assert saved.read_text() == "from the kernel" and saved.stat().st_uid == 0
    assert any("seccomp=unconfined" in rec.getMessage() for rec in caplog.records)
    with pytest.raises(errors.InvalidSpec, match="option userns"):
        KernelManager(kernel_name=make_spec(kernel_env, "t-badns", userns="yes"), kernel_spec_manager=ksm).start_kernel()


def test_default_user_namespace_and_shared_folders(ksm, kernel_env, kernel_runtime, tmp_path):
    """With subordinate ids set up (scripts/setup), a kernel's root is not host root by default,
    yet writes the notebook folder and the kernelspec's mounts as their host owner would."""
    from jupyter_contain.runtime.containers import idmap
    try:
        idmap.subordinate_ranges()
    except errors.ContainError:
        pytest.skip("no subordinate ids for jupyter-contain on this machine: run scripts/setup")
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    name = make_spec(kernel_env, "t-shared", mounts=[f"{data}:/data"])
    r = _one_cell(ksm, name, "import os\nprint(open('/proc/self/uid_map').read().split()[:2])\n"
                             "open('/data/out.txt', 'w').write('ok')\nprint(os.stat('/data').st_uid)")
    mapping, owner = r["stdout"].splitlines()[:2]
    assert mapping != "['0', '0']" and mapping.startswith("['0', '")     # root inside is a subordinate uid
    assert owner == "0" and (data / "out.txt").read_text() == "ok" and (data / "out.txt").stat().st_uid == 0
