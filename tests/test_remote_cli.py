"""``jupyter contain --url URL --token T VERB`` against a live Jupyter Server with the extension.

One server per module over the session's kernel store and a local registry.
The remote verbs must print what the local verbs print over the same store
(``images``, ``inspect``), draw the same progress, act on the server's store
(pull, tag, rmi, commit of a kernel's container), take ``JUPYTER_CONTAIN_URL``
and ``JUPYTER_CONTAIN_TOKEN``, fail clearly, and a Ctrl-C during a remote pull
cancels it on the server, leaving the store as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from kernel_fixtures import *  # noqa: F403
from test_server import ApiServer, SlowProxy, make_payload_image, store_state

from jupyter_contain.runtime import Runtime, Store

pytest.importorskip("jupyter_server")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(tmp_path_factory, image_store):
    from registry_fixture import start_registry

    from jupyter_contain.runtime.images import registry as client

    tmp = tmp_path_factory.mktemp("cli-registry")
    src = Store(tmp / "src-store")
    make_payload_image(src, tmp, "payload:2", 8 << 20)
    with start_registry(tmp) as reg:
        client.push(image_store, "busybox:test", f"{reg.address}/clibox:1")
        client.push(src, "payload:2", f"{reg.address}/payload:2")
        yield reg


@pytest.fixture(scope="module")
def srv(tmp_path_factory, kernel_env):
    s = ApiServer(tmp_path_factory.mktemp("cli-srv"), kernel_env, store=kernel_env.store)
    yield s
    s.stop()


def cli(*args: str, srv: ApiServer | None = None, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess:
    remote = ["--url", srv.url, "--token", srv.token] if srv is not None else []
    environ = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_CONTAIN_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "jupyter_contain.cli", *remote, *args], env=environ,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_remote_images_and_inspect_print_what_local_prints(srv, kernel_env):
    root = str(kernel_env.store.root)
    for verb in (["images"], ["images", "-q"], ["df"]):
        local = cli("--root", root, *verb)
        remote = cli(*verb, srv=srv)
        assert local.returncode == remote.returncode == 0, (local.stderr, remote.stderr)
        assert remote.stdout == local.stdout and "debian" in (local.stdout if verb != ["images", "-q"] else "debian")
    local = json.loads(cli("--root", root, "inspect", "localhost/debian:bookworm").stdout)
    remote = json.loads(cli("inspect", "localhost/debian:bookworm", srv=srv).stdout)
    assert remote == local


def test_remote_pull_draws_progress_then_tag_and_rmi(srv, registry, kernel_env):
    ref = f"{registry.address}/clibox:1"
    r = cli("pull", ref, srv=srv)
    assert r.returncode == 0, r.stderr
    rec = kernel_env.store.resolve(ref)   # in the server's store
    assert r.stdout.strip() == f"{rec.familiar} {rec.digest}"
    # not a terminal: the local verb's line renderer, fed from the server's event stream
    assert f"pull {ref}: 1 layers" in r.stderr, r.stderr
    assert f"pull {ref}: done" in r.stderr and "layer 1/1" in r.stderr, r.stderr
    assert cli("tag", ref, "clitest/box:2", srv=srv).returncode == 0
    tagged = kernel_env.store.resolve("clitest/box:2")
    assert tagged.digest == rec.digest
    listed = cli("images", srv=srv).stdout
    assert "clitest/box" in listed and f"{registry.address}/clibox" in listed
    r = cli("rmi", "clitest/box:2", ref, srv=srv)
    assert r.returncode == 0 and r.stdout.split("\n")[:2] == [f"Untagged: {tagged.familiar}", f"Untagged: {rec.familiar}"]
    r = cli("inspect", ref, srv=srv)
    assert r.returncode == 125 and "no such image" in r.stderr


def test_remote_ps_stats_diff_and_commit_of_a_kernels_container(srv, kernel_env, kernel_runtime):
    kid = srv.start_kernel()
    made = None
    try:
        srv.execute(kid, "open('/root/remote-cli', 'w').write('hello')")
        (c,) = [c for c in Runtime(kernel_env.store).containers()
                if c.state.labels.get("jupyter-contain.kernel-id") == kid]
        ps = cli("ps", srv=srv)
        assert ps.returncode == 0 and c.id[:12] in ps.stdout and "CONTAINER ID" in ps.stdout
        assert c.id[:12] in cli("ps", "-q", srv=srv).stdout.split()
        stats = cli("stats", "--json", c.id, srv=srv)
        (row,) = json.loads(stats.stdout)
        assert row["id"] == c.id and row["pids_limit"] == 512 and row["memory_current"] > 0
        table = cli("stats", c.id[:12], srv=srv).stdout
        assert c.id[:12] in table and "MEM USAGE / LIMIT" in table
        diff = cli("diff", c.id, srv=srv)
        assert "A /root/remote-cli" in diff.stdout.splitlines(), diff.stdout
        assert "changes:" in diff.stderr
        commit = cli("commit", c.id, "clitest/snap:1", "-m", "from the remote cli", srv=srv)
        assert commit.returncode == 0, commit.stderr
        made = "localhost/clitest/snap:1"
        rec = kernel_env.store.resolve(made)
        assert commit.stdout.strip() == f"{rec.familiar} {rec.digest}"
        assert rec.config.raw["history"][-1]["comment"] == "from the remote cli"
        # the kernel's container is the kernel manager's: the remote rm is refused
        rm = cli("rm", "-f", c.id, srv=srv)
        assert rm.returncode == 125 and "belongs to kernel" in rm.stderr
    finally:
        srv.shutdown_kernel(kid)
        if made:
            kernel_env.store.rmi(made)


def test_remote_url_and_token_from_the_environment_and_clear_failures(srv):
    env = {"JUPYTER_CONTAIN_URL": srv.url, "JUPYTER_CONTAIN_TOKEN": srv.token}
    r = cli("images", env=env)
    assert r.returncode == 0 and r.stdout.startswith("REPOSITORY"), r.stderr
    r = cli("images", env={**env, "JUPYTER_CONTAIN_TOKEN": "wrong"})
    assert r.returncode == 125 and "Forbidden" in r.stderr, r.stderr
    r = cli("run", "--rm", "busybox", "true", env=env)
    assert r.returncode == 125 and "`run` is not available with --url" in r.stderr
    r = cli("images", env={"JUPYTER_CONTAIN_URL": "http://127.0.0.1:9/"})
    assert r.returncode == 125 and "cannot reach" in r.stderr
    r = cli("images", env={"JUPYTER_CONTAIN_URL": "ftp://x"})
    assert r.returncode == 125 and "invalid server URL" in r.stderr


def test_ctrl_c_of_a_remote_pull_cancels_it_on_the_server(srv, registry, kernel_env):
    proxy = SlowProxy((registry.host, registry.port), rate=1 << 20)   # 8 MB at 1 MB/s
    try:
        before = store_state(kernel_env.store)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_CONTAIN_")}
        proc = subprocess.Popen([sys.executable, "-m", "jupyter_contain.cli", "--url", srv.url, "--token", srv.token,
                                 "pull", f"127.0.0.1:{proxy.port}/payload:2"], env=environ,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:   # until the server's pull moves bytes
                _, ops = srv.api("GET", "operations")
                running = [o for o in ops["operations"] if o["state"] == "running" and "payload:2" in o["target"]
                           and o["progress"]["done"] > 0]
                if running:
                    break
                assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 130, err
        op = srv.wait_operation(running[0]["id"])
        assert op["state"] == "cancelled", op
        assert store_state(kernel_env.store) == before
    finally:
        proxy.close()
