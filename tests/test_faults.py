"""Faults during a container's start, and how a container's end is told (issue #22).

A process that creates or starts a container can die at any step (an OOM
kill, a Ctrl-C of ``run -d``, a server SIGKILLed mid-start). The test hook
``JUPYTER_CONTAIN_FAULT=<step>`` (``container.FAULT_STEPS``, and the CLI's own
``run:created``/``run:started``) makes the process SIGKILL itself exactly at
that step, so every step is hit deterministically: the process must end by
SIGKILL (proof the step was reached), and afterwards ``gc`` (or ``rm -f``)
must leave no container, cgroup, mount, process, veth, lease, pin or folder.
With ``JUPYTER_CONTAIN_FAULT_ACTION=raise`` the library fails at the step
instead: the start's one undo must leave the container startable and close
every fd it held (the pins of ``start(pin=...)`` too).

Then the reasons ``ps -a`` gives, asserted exactly: SIGKILL of the init from
outside (not our child: no wait status), SIGKILL of the init we started, an
OOM kill, a pids-limit failure, a failed exec, ``kill -9`` of a kernel and of
a kernel's init.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from kernel_fixtures import *
from kernel_fixtures import KERNEL_NAME
from test_rootless import lone_user  # noqa: F401  (a fixture)

from jupyter_contain import errors
from jupyter_contain.runtime.containers import network
from jupyter_contain.runtime.containers.cgroups import find_orphans
from jupyter_contain.runtime.containers.container import (
    FAULT_ENV,
    FAULT_STEPS,
    ContainerSpec,
    Runtime,
)
from jupyter_contain.runtime.containers.rootfs import Tmpfs

REPO = Path(__file__).resolve().parents[1]
#: the steps a CLI `run` goes through (it pins nothing)
CLI_STEPS = ("create:state", "create:done", "run:created",
             *(s for s in FAULT_STEPS if s.startswith("start:") and s != "start:pinned"), "run:started")
#: from here on a detached container has reached "running": it is the user's, not garbage
DETACHED_KEPT = ("start:running", "run:started")


# --- helpers ---------------------------------------------------------------------------------


def cli(root: Path, *args: str, fault: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    e.pop(FAULT_ENV, None)
    if fault:
        e[FAULT_ENV] = fault
    # files, not pipes: a container the killed CLI started holds its stdout as long as it runs
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        res = subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(root), *args],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=timeout, env=e, check=False)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(res.args, res.returncode, out.read().decode(), err.read().decode())


def _ps(root: Path) -> list[dict]:
    res = cli(root, "ps", "-a", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _processes_with(token: str) -> list[int]:
    """Host pids whose command line carries ``token`` (each test's containers carry a unique one)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


def _assert_nothing_left(rt: Runtime, token: str, keep: set[str] = frozenset()) -> None:
    """No container (but ``keep``), folder, pin, cgroup, process, mount or lease of this store."""
    left = {c.id for c in rt.containers()} - keep
    assert not left, f"containers left: {left}"
    assert {d.name for d in rt.store.containers_dir.iterdir()} <= keep
    assert set(rt.store.pins()) <= keep
    mine = {f"{rt.store_tag}-{cid}" for cid in keep}
    stray = [n for n in find_orphans(root=rt.cgroups_here(), exclude=mine) if n.startswith(rt.store_tag)]
    assert not stray, f"cgroups left: {stray}"
    deadline = time.monotonic() + 5
    while _processes_with(token) and not keep and time.monotonic() < deadline:
        time.sleep(0.02)   # SIGKILLed processes take a moment to go
    if not keep:
        assert not _processes_with(token)
    with open("/proc/self/mountinfo") as f:
        assert str(rt.store.root) not in f.read()


@pytest.fixture
def store_rt(image_store, tmp_path):
    """A runtime over a fresh store of its own (the busybox image imported into it): a fault test
    must see every container, folder and pin of its store."""
    from jupyter_contain.runtime.images import archive, bootstrap
    from jupyter_contain.runtime.images.store import Store

    s = Store(tmp_path / "store")
    archive.import_rootfs(s, bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX), "busybox:test", cmd=["/bin/sh"])
    rt = Runtime(s)
    yield rt
    for c in Runtime(s).containers():
        c.remove(force=True)


# --- the CLI killed at each step -------------------------------------------------------------


@pytest.mark.parametrize("detach", [True, False], ids=["run-d", "run"])
def test_cli_killed_at_each_step_leaves_nothing_after_gc(store_rt, detach, caplog):
    rt = store_rt
    # "run:started" is a step of -d only (a foreground run waits then)
    for i, step in enumerate(s for s in CLI_STEPS if detach or s != "run:started"):
        token = f"fault{os.getpid()}x{i}"
        res = cli(rt.store.root, "run", *(["-d"] if detach else []), "busybox:test",
                  "sh", "-c", f"sleep 30; : {token}", fault=step)
        assert res.returncode == -signal.SIGKILL, (step, res)   # the step was reached
        before = {c.id: c.state for c in rt.containers()}
        assert len(before) <= 1, step
        with caplog.at_level(logging.INFO, logger="jupyter_contain.runtime.containers.container"):
            caplog.clear()
            removed = rt.gc()
        kept = set(before) if detach and step in DETACHED_KEPT else set()
        if kept:
            # it reached "running": a detached container the user may still want
            (cid,) = kept
            assert removed == [] and rt.get(cid).refresh_status() == "running", step
            assert _processes_with(token)
        else:
            assert set(before) <= set(removed), (step, removed)
            for cid, st in before.items():
                # a foreground run's owner is the CLI too: before "running", its creator died
                why = (f"its creator (pid {st.creator_pid}) died before it ran" if step not in DETACHED_KEPT
                       else f"its owner (pid {st.owner_pid}) is gone")
                assert f"gc: removed container {st.name} ({cid[:12]}): {why}" in caplog.text, step
        _assert_nothing_left(rt, token, keep=kept)
        for cid in kept:
            assert cli(rt.store.root, "rm", "-f", cid).returncode == 0
            _assert_nothing_left(rt, token)


def test_rm_f_of_a_start_killed_after_its_cgroups_removes_them(store_rt):
    """The state names the cgroup folders before they exist: rm -f alone removes them."""
    rt = store_rt
    token = f"fault{os.getpid()}rm"
    for step in ("start:cgroup", "start:spawned", "start:network"):
        res = cli(rt.store.root, "run", "-d", "busybox:test", "sh", "-c", f"sleep 30; : {token}", fault=step)
        assert res.returncode == -signal.SIGKILL, res
        (c,) = rt.containers()
        st = c.state
        assert st.status == "creating" and c.refresh_status() == "dead"
        folders = [Path(p) for p in st.cgroup.values()]
        assert folders and all(p.is_dir() for p in folders), st.cgroup
        assert cli(rt.store.root, "rm", "-f", c.id).returncode == 0
        assert not any(p.exists() for p in folders)
        _assert_nothing_left(rt, token)


@pytest.fixture
def bridge_env(tmp_path):
    """A network namespace of the test's own for the bridge (``JUPYTER_CONTAIN_HOST_NETNS``)."""
    if not any(Path(d, "libnftables.so.1").exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib")):
        pytest.skip("libnftables is not installed")
    holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        env = {"JUPYTER_CONTAIN_HOST_NETNS": f"/proc/{holder.pid}/ns/net", "JUPYTER_CONTAIN_BRIDGE": "jcfault0",
               "JUPYTER_CONTAIN_SUBNET": "10.89.7.0/24", "JUPYTER_CONTAIN_NET_DIR": str(tmp_path / "net")}
        yield env
    finally:
        holder.kill()
        holder.wait()


def test_bridged_run_d_killed_at_each_network_step_leaves_no_veth_or_lease(store_rt, bridge_env, monkeypatch):
    for k, v in bridge_env.items():
        monkeypatch.setenv(k, v)
    rt = Runtime(store_rt.store)   # its network settings from the environment above
    settings = rt.network_settings
    assert settings.host_netns == bridge_env["JUPYTER_CONTAIN_HOST_NETNS"]

    def veths() -> set[str]:
        def body():
            with network._ipr() as ipr:
                return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return {n for n in network.run_in_netns(settings.host_netns, body) if n.startswith("jc") and n != "jcfault0"}

    for i, step in enumerate(("start:network", "start:released")):
        token = f"fault{os.getpid()}br{i}"
        res = cli(rt.store.root, "run", "-d", "--network", "bridge", "busybox:test", "sh", "-c",
                  f"sleep 30; : {token}", fault=step)
        assert res.returncode == -signal.SIGKILL, (step, res.stderr)
        (c,) = rt.containers()
        # the veth went with the init's namespace (its peer); the lease and the rules stay for gc
        assert set(network.leases(settings)) == {c.id}, step
        removed = rt.gc()
        assert c.id in removed, step
        assert veths() == set() and network.leases(settings) == {}, step
        _assert_nothing_left(rt, token)


# --- the library failing at each step (one undo, fds closed) ---------------------------------


def test_library_failing_at_each_step_undoes_it_and_can_start_again(store_rt, monkeypatch, tmp_path):
    """A start that fails at any step leaves its container startable, its pins closed, nothing made."""
    rt = store_rt
    monkeypatch.setenv(FAULT_ENV + "_ACTION", "raise")
    prepared: list[str] = []

    def prepare(pinned):
        # a file put into the fresh tmpfs through the pinned folder, before the container runs
        fd = os.open("ready", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=pinned["/pinme"])
        os.close(fd)
        prepared.append("ready")

    spec = ContainerSpec(image="busybox:test", command=("sh", "-c", "test -e /pinme/ready"),
                         tmpfs=(Tmpfs("/pinme"),))
    for step in FAULT_STEPS:
        monkeypatch.setenv(FAULT_ENV, step)
        if step.startswith("create:"):
            with pytest.raises(errors.ContainerError, match=f"fault injected at {step}"):
                rt.create(spec)
            assert list(rt.store.containers_dir.iterdir()) == [] and rt.store.pins() == {}, step
            continue
        monkeypatch.delenv(FAULT_ENV)
        c = rt.create(spec)
        monkeypatch.setenv(FAULT_ENV, step)
        with pytest.raises(errors.ContainerError, match=f"fault injected at {step}"):
            c.start(pin=["/pinme"], prepare=prepare)
        st = c.state
        assert st.status == "creating" and c.refresh_status() == "created", step
        assert st.pid is None and st.cgroup is None and st.starter_pid is None, step
        with pytest.raises(errors.ContainerError):
            c.pinned("/pinme")                     # nothing pinned is left open
        assert not [n for n in find_orphans(root=rt.cgroups_here()) if n.startswith(rt.store_tag)], step
        monkeypatch.delenv(FAULT_ENV)
        prepared.clear()
        c.start(pin=["/pinme"], prepare=prepare)   # the same container starts after all
        assert prepared == ["ready"]
        info = c.wait(30)
        assert info is not None and info.code == 0, (step, info)
        c.remove()
    _assert_nothing_left(rt, "no-token")


def test_restart_whose_process_died_midway_is_undone_not_removed(store_rt):
    """A restart in place killed after its cgroups: gc removes what the start made, the container stays."""
    rt = store_rt
    c = rt.create(ContainerSpec(image="busybox:test", command=("sh", "-c", "echo kept > /kept")))
    c.start()
    assert c.wait(30).code == 0
    driver = ("import sys\nfrom jupyter_contain.runtime import Runtime, Store\n"
              "Runtime(Store(sys.argv[1])).get(sys.argv[2]).start()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), FAULT_ENV: "start:spawned"}
    res = subprocess.run([sys.executable, "-c", driver, str(rt.store.root), c.id], env=env, timeout=60, check=False)
    assert res.returncode == -signal.SIGKILL
    st = c.state
    assert st.status == "created" and st.cgroup and all(Path(p).is_dir() for p in st.cgroup.values())
    removed = rt.gc()
    assert removed == [f"start:{c.id}"]
    st = c.state
    assert st.status == "created" and st.cgroup is None
    assert not [n for n in find_orphans(root=rt.cgroups_here()) if n.startswith(rt.store_tag)]
    assert (c.upper / "kept").read_text() == "kept\n"     # the writable layer is the user's
    c.start()
    assert c.wait(30).code == 0
    c.remove()


# --- how a container ended, as `ps -a` says it ------------------------------------------------


def _row(root: Path, cid: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        row = next(r for r in _ps(root) if r["id"] == cid)
        if row["status"] == "exited" or time.monotonic() > deadline:
            return row
        time.sleep(0.05)


def test_sigkill_of_a_detached_init_is_killed_by_sigkill(store_rt):
    """Not our child: no wait status, no word from the init; only SIGKILL ends it so."""
    root = store_rt.store.root
    cid = cli(root, "run", "-d", "busybox:test", "sleep", "60").stdout.strip()
    init = store_rt.get(cid).pid
    assert init is not None
    os.kill(init, signal.SIGKILL)
    row = _row(root, cid)
    assert row["status"] == "exited"
    assert row["reason"] == "killed by SIGKILL"                  # was "killed by signal 127"
    assert (row["exit"]["code"], row["exit"]["signal"], row["exit"]["oom_killed"]) == (137, 9, False)
    assert cli(root, "rm", cid).returncode == 0


def test_sigkill_of_an_init_we_started_is_killed_by_sigkill(store_rt):
    c = store_rt.create(ContainerSpec(image="busybox:test", command=("sleep", "60")))
    c.start()
    os.kill(c.pid, signal.SIGKILL)
    info = c.wait(20)
    assert info is not None and info.describe() == "killed by SIGKILL" and info.code == 137
    assert _row(store_rt.store.root, c.id)["reason"] == "killed by SIGKILL"
    c.remove()


def test_payload_exit_code_137_is_not_a_signal(store_rt):
    """The init's word tells ``exit 137`` from a SIGKILL (both are 137 to its parent)."""
    root = store_rt.store.root
    cid = cli(root, "run", "-d", "busybox:test", "sh", "-c", "exit 137").stdout.strip()
    row = _row(root, cid)
    assert row["reason"] == "exited with code 137" and row["exit"]["signal"] is None
    assert cli(root, "rm", cid).returncode == 0


def test_oom_kill_reason_names_limit_and_peak(store_rt):
    root = store_rt.store.root
    cid = cli(root, "run", "-d", "-m", "32m", "busybox:test", "sh", "-c",
              "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo $x | wc -c").stdout.strip()
    row = _row(root, cid, timeout=60)
    e = row["exit"]
    assert e["oom_killed"] and e["memory_limit"] == 32 << 20 and 24 << 20 <= e["memory_peak"] <= 33 << 20, e
    assert row["reason"] == f"killed: out of memory (limit 32 MiB, peak {e['memory_peak'] / (1 << 20):.0f} MiB)"
    assert cli(root, "rm", cid).returncode == 0


def test_pids_limit_failure_says_so(store_rt):
    """init and sh are 2 of 4 processes: two sleeps start, the third fork is refused and sh exits 2."""
    root = store_rt.store.root
    cid = cli(root, "run", "-d", "--pids-limit", "4", "busybox:test", "sh", "-c",
              "sleep 30 & sleep 30 & sleep 30 & wait").stdout.strip()
    row = _row(root, cid)
    assert row["reason"] == "exited with code 2: process limit 4 reached (1 fork refused)", row
    assert cli(root, "rm", cid).returncode == 0


def test_failed_exec_is_126_or_127_and_leaves_nothing(store_rt):
    root = store_rt.store.root
    res = cli(root, "run", "busybox:test", "/no/such/command")
    assert res.returncode == 127 and "command not found" in res.stderr
    res = cli(root, "run", "-d", "busybox:test", "/etc")
    assert res.returncode == 126 and "cannot be executed" in res.stderr
    assert _ps(root) == []
    _assert_nothing_left(store_rt, "no-token")


# --- kernels: a provisioner's process killed at each step; kill -9 of a kernel ----------------

_KERNEL_DRIVER = """
import sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name=sys.argv[2], kernel_spec_manager=KernelSpecManager(kernel_dirs=[sys.argv[1]]))
km.start_kernel()
sys.exit(3)   # a fault ends this process before
"""


@pytest.fixture
def run_dir(monkeypatch):
    """The kernels' folders (``JUPYTER_CONTAIN_RUN_DIR``), short for the socket paths."""
    d = Path(tempfile.mkdtemp(prefix="jcf", dir="/tmp"))
    monkeypatch.setenv("JUPYTER_CONTAIN_RUN_DIR", str(d))
    yield d
    d.rmdir()    # empty: a folder left in it fails the test


@pytest.mark.slow
def test_kernel_provisioner_killed_at_each_step_leaves_nothing_after_gc(kernel_env, kernel_runtime, run_dir):
    from jupyter_contain.kernel import containers

    rt = kernel_runtime
    before = {c.id for c in rt.containers()}
    for step in FAULT_STEPS:
        env = {**os.environ, "PYTHONPATH": str(REPO), FAULT_ENV: step}
        res = subprocess.run([sys.executable, "-c", _KERNEL_DRIVER, str(kernel_env.kernels_dir), KERNEL_NAME],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, timeout=120, check=False)
        assert res.returncode == -signal.SIGKILL, step
        new = [c for c in rt.containers() if c.id not in before]
        assert len(new) == 1 and len(list(run_dir.iterdir())) == 1, step
        containers._gc_done.clear()
        removed = containers.gc_once(rt)
        assert new[0].id in removed, step
        assert {c.id for c in rt.containers()} == before, step
        assert list(run_dir.iterdir()) == [], step          # the kernel's folder went with it
        assert not [n for n in find_orphans(root=rt.cgroups_here()) if n == f"{rt.store_tag}-{new[0].id}"]
        deadline = time.monotonic() + 5
        while _processes_with(str(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _processes_with(str(run_dir)), step


@pytest.mark.slow
def test_kill_9_of_a_kernel_and_of_its_init_reads_killed_by_sigkill(ksm, kernel_env, kernel_runtime, run_dir):
    from jupyter_client.manager import KernelManager

    def kernel_container():
        (c,) = [c for c in kernel_runtime.containers()
                if c.state.labels.get("jupyter-contain.kernel-id") == km.kernel_id]
        return c

    def ps_reason(cid: str) -> str:
        row = _row(kernel_env.store.root, cid, timeout=30)
        assert row["status"] == "exited", row
        return row["reason"]

    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    km.start_kernel()
    try:
        c = kernel_container()
        init = c.pid
        (kernel,) = (int(p) for p in Path(f"/proc/{init}/task/{init}/children").read_text().split())
        os.kill(kernel, signal.SIGKILL)           # the kernel itself: the init says how it ended
        assert ps_reason(c.id) == "killed by SIGKILL"
        km.restart_kernel(now=True)               # in place: the same container, a new init
        c = kernel_container()
        assert c.refresh_status() == "running" and c.pid != init
        os.kill(c.pid, signal.SIGKILL)            # its init: no word, and `ps` is not its parent
        assert ps_reason(c.id) == "killed by SIGKILL"
    finally:
        km.shutdown_kernel(now=True)


def test_cli_gc_says_what_it_removed(store_rt):
    root = store_rt.store.root
    res = cli(root, "run", "-d", "busybox:test", "sleep", "30", fault="start:cgroup")
    assert res.returncode == -signal.SIGKILL
    (c,) = store_rt.containers()
    assert _ps(root)[0]["status"] == "dead"
    res = cli(root, "gc")
    assert res.returncode == 0, res.stderr
    assert f"cleaned 1 dead containers and stray cgroups:\n  {c.id}\n" in res.stdout
    assert _ps(root) == []
    _assert_nothing_left(store_rt, "no-token")


# --- rootless, without cgroups: the init's pid is what finds a released payload ---------------

_GC_AS_USER = "import json; from jupyter_contain.runtime import Runtime, Store; print(json.dumps(Runtime(Store()).gc()))"


def test_rootless_start_killed_after_the_release_is_removed_by_gc(lone_user):  # noqa: F811
    """No cgroup holds the payload: the pid recorded before the release is how gc finds and kills it."""
    from test_rootless import HERE

    from jupyter_contain.runtime.images import bootstrap

    token = f"fault{os.getpid()}rootless"
    req = {"image_tar": str(bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX)), "cmd": f"sleep 30; : {token}"}
    res = subprocess.run(lone_user.argv(lone_user.path(HERE / "rootless_driver.py"), json.dumps(req)),
                         env={**lone_user.env(), FAULT_ENV: "start:released"}, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180, check=False)
    assert res.returncode == -signal.SIGKILL
    assert _processes_with(token)                     # the payload runs, in no cgroup
    res = subprocess.run(lone_user.argv("-c", _GC_AS_USER), env=lone_user.env(), capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(json.loads(res.stdout.strip().splitlines()[-1])) == 1
    deadline = time.monotonic() + 5
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _processes_with(token)
    assert list((lone_user.home / ".local/share/jupyter-contain/containers").iterdir()) == []
