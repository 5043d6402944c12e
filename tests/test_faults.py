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

from jupyter_contain import errors
from jupyter_contain.runtime.containers import network
from jupyter_contain.runtime.containers.cgroups import Limits, find_orphans
from jupyter_contain.runtime.containers.container import FAULT_ENV, FAULT_STEPS, ContainerSpec, Runtime
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
            assert removed == [] and rt.get(cid).status() == "running", step
            assert _processes_with(token)
        else:
            assert set(before) <= set(removed), (step, removed)
            for cid, st in before.items():
                # a foreground run's owner is the CLI too: before "running", its creator died
                why = (f"its creator (pid {st['creator_pid']}) died before it ran" if step not in DETACHED_KEPT
                       else f"its owner (pid {st['owner_pid']}) is gone")
                assert f"gc: removed container {st['name']} ({cid[:12]}): {why}" in caplog.text, step
        _assert_nothing_left(rt, token, keep=kept)
        for cid in kept:
            assert cli(rt.store.root, "rm", "-f", cid).returncode == 0
            _assert_nothing_left(rt, token)


def test_rm_f_of_a_start_killed_after_its_cgroups_removes_them(store_rt):
    """The state names the cgroup folders before they exist: rm -f alone removes them."""
    rt = store_rt
    token = f"fault{os.getpid()}rm"
    for step in ("start:cgroup", "start:spawned", "start:pid"):
        res = cli(rt.store.root, "run", "-d", "busybox:test", "sh", "-c", f"sleep 30; : {token}", fault=step)
        assert res.returncode == -signal.SIGKILL, res
        (c,) = rt.containers()
        st = c.state
        assert st["status"] == "creating" and c.status() == "dead"
        folders = [Path(p) for p in st["cgroup"].values()]
        assert folders and all(p.is_dir() for p in folders), st["cgroup"]
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

    for i, step in enumerate(("start:network", "start:pid", "start:released")):
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
