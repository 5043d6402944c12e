"""Every contained kernel gets its host channel: through the argv launcher, and after a server reconnects.

The launcher test starts a kernel from a kernelspec without provisioner
metadata (so jupyter_client runs its argv, the launcher, on tcp) and checks
that ``%container stats`` answers with numbers from the kernel's own cgroup,
then that shutdown leaves no socket, kernel folder or container. The
reconnect test stops a provisioner's channel (as a dead server's would be
gone), makes a second provisioner from the saved provisioner info (what a
restarted server does) and checks that it serves the channel again.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket

import pytest
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from kernel_fixtures import *
from kernel_fixtures import KERNEL_NAME, make_spec, run_cell

from jupyter_contain.kernel import channel, containers
from jupyter_contain.runtime import Runtime

pytestmark = pytest.mark.slow

READY = 120


def _containers_of(rt: Runtime, kernel_id: str) -> list:
    return [c for c in rt.containers() if c.state.labels.get("jupyter-contain.kernel-id") == kernel_id]


def _ask(path, req: dict) -> dict:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    try:
        s.connect(str(path))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, "the channel closed without an answer"
            buf += chunk
        return json.loads(buf.split(b"\n", 1)[0])
    finally:
        s.close()


def test_argv_launcher_serves_the_host_channel(ksm, kernel_env, kernel_runtime):
    name = make_spec(kernel_env, "t-argv-channel", provisioner=False, memory="256m", pids=300)
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel()
    assert type(km.provisioner).__name__ == "LocalProvisioner"   # so argv, i.e. the launcher, runs it
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(READY)
        r = run_cell(kc, "import os; print(os.environ['JUPYTER_CONTAIN_KERNEL_ID'], "
                         "os.environ['JUPYTER_CONTAIN_KERNEL_DIR'])")
        assert r["reply"]["content"]["status"] == "ok", r
        kernel_id, kernel_dir = r["stdout"].split()
        sock = channel.socket_path(containers.kernel_runtime_dir() / kernel_id / "ch")
        assert str(sock.parent.parent) == kernel_dir and sock.is_socket()   # ch/ is bound at the folder path inside
        assert (sock.stat().st_mode & 0o777) == 0o600
        [c] = _containers_of(kernel_runtime, kernel_id)
        assert c.refresh_status() == "running"

        r = run_cell(kc, "%container stats")
        assert r["reply"]["content"]["status"] == "ok", r
        out = r["stdout"]
        assert "of 256.0 MiB" in out and "of 300" in out, out
        mem = float(re.search(r"memory:\s*([\d.]+)", out).group(1))
        pids = int(re.search(r"(\d+) of 300", out).group(1))
        assert 1 < mem < 256 and 1 <= pids < 300, out
        # the channel answers about this kernel's container only, and has no reset (a restart here is
        # a new launcher, so a new container anyway)
        r = run_cell(kc, "from jupyter_contain_guest import request; print(request('ps')['container']['id'])")
        assert r["stdout"].strip() == c.id, r
        assert "not available" in _ask(sock, {"op": "reset"})["error"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert not km.has_kernel
    # the launcher stopped the channel and took the socket, the folder and the container with it
    assert not sock.exists() and not sock.parent.exists()
    assert _containers_of(Runtime(kernel_env.store), kernel_id) == []
    assert not c.dir.exists()


def test_reconnecting_provisioner_serves_the_channel_again(ksm, kernel_env, kernel_runtime):
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    p2 = p3 = None
    try:
        kc.wait_for_ready(READY)
        sock = channel.socket_path(containers.kernel_runtime_dir() / km.kernel_id / "ch")
        assert _ask(sock, {"op": "stats"})["ok"]
        info = asyncio.run(km.provisioner.get_provisioner_info())
        # the old server's channel is gone (it died): leave a stale socket file as a dead server does
        asyncio.run(km.provisioner._stop_channel())
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(sock))
        stale.close()
        r = run_cell(kc, "%container stats")
        assert "memory:" not in r["stdout"]   # nobody serves it now

        # a new server: a fresh provisioner from the saved info
        p2 = KernelProvisionerFactory.instance().create_provisioner_instance(km.kernel_id, km.kernel_spec, km)
        asyncio.run(p2.load_provisioner_info(info))
        assert p2._channel is not None
        r = run_cell(kc, "%container stats")
        assert r["reply"]["content"]["status"] == "ok" and "memory:" in r["stdout"], r
        # served already: a second reconnect leaves the running channel alone
        p3 = KernelProvisionerFactory.instance().create_provisioner_instance(km.kernel_id, km.kernel_spec, km)
        asyncio.run(p3.load_provisioner_info(info))
        assert p3._channel is None
        assert _ask(sock, {"op": "stats"})["ok"]
        # the new server pinned the running kernel's sockets again: its client reaches the kernel
        kc2 = km.client()
        kc2.start_channels()
        try:
            kc2.wait_for_ready(READY)
        finally:
            kc2.stop_channels()
    finally:
        # the same process plays three servers here: let go of what the two "new" ones hold
        for p in (p2, p3):
            if p is not None:
                asyncio.run(p._stop_channel())
                if p._pins is not None:
                    p._pins.close()
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert not sock.exists()
