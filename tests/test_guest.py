"""The host channel and the guest side (magics, widgets) with real kernels in real containers.

Every test starts ipykernel in a container from the Debian kernel image (the
session fixtures of ``kernel_fixtures``) through jupyter_client; the guest
extension is loaded there as in production. Covered: the channel refusing
malformed, oversized, unknown and out-of-bounds requests (straight to its
socket from the host); ``%container stats|diff|ps|images|reset``; the
snapshot widget driven from the kernel (image in the store, a container from
it sees the file, "Install as kernel"); the resources widget updating;
``%%container`` (Python, shell, failure, OOM, interrupt); the channel on the
server's event loop (an async kernel manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time

import pytest
from jupyter_client.manager import AsyncKernelManager, KernelManager
from kernel_fixtures import *
from kernel_fixtures import KERNEL_NAME, make_spec, run_cell

from jupyter_contain import errors
from jupyter_contain.kernel import channel, containers
from jupyter_contain.runtime import ContainerSpec, Runtime

pytestmark = pytest.mark.slow

READY = 120


class Kernel:
    """A blocking kernel manager + client around one contained kernel."""

    def __init__(self, ksm, name: str = KERNEL_NAME) -> None:
        self.km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(READY)
        except BaseException:
            self.close()
            raise

    def run(self, code: str, *, timeout: float = 120, ok: bool = True) -> dict:
        r = run_cell(self.kc, code, timeout=timeout)
        if ok:
            assert r["reply"]["content"]["status"] == "ok", (r["error"], r["stdout"], r["stderr"])
        return r

    @property
    def sock(self):
        return channel.socket_path(containers.kernel_runtime_dir() / self.km.kernel_id / "ch")

    def container(self, rt: Runtime):
        hits = [c for c in rt.containers()
                if c.state.labels.get("jupyter-contain.kernel-id") == self.km.kernel_id]
        assert len(hits) == 1
        return hits[0]

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def kernel(ksm, kernel_env, kernel_runtime):
    k = Kernel(ksm)
    yield k
    sock = k.sock
    k.close()
    assert not sock.exists()


def ask(path, payload: bytes, *, timeout: float = 30) -> list[dict]:
    """Send raw bytes to a channel socket; the answer lines until the host closes or answers finally."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(path))
    try:
        s.sendall(payload)
        out, buf = [], b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                out.append(json.loads(line))
                if "ok" in out[-1]:
                    return out
        return out
    finally:
        s.close()


def ask1(path, req: dict) -> dict:
    return ask(path, json.dumps(req).encode() + b"\n")[-1]


# --- the channel refuses what it must ----------------------------------------------------------


def test_channel_refuses_malformed_oversized_unknown_and_bad_tags(kernel, kernel_env):
    sock = kernel.sock
    assert sock.exists() and (sock.stat().st_mode & 0o777) == 0o600

    assert ask(sock, b"not json\n")[-1] == {"ok": False, "error": "malformed request: not a JSON line"}
    assert "not a JSON object" in ask(sock, b"[1, 2]\n")[-1]["error"]
    # an oversized line: refused, the connection closed
    r = ask(sock, b'{"op": "stats", "x": "' + b"a" * (70 * 1024) + b'"}\n')
    assert len(r) == 1 and r[0]["ok"] is False and "too long" in r[0]["error"]
    assert "unknown request 'exec'" in ask1(sock, {"op": "exec", "argv": ["sh"]})["error"]
    assert "unknown request" in ask1(sock, {"no": "op"})["error"]
    # no field may smuggle in a container, a path or a command
    assert "unknown field(s) container" in ask1(sock, {"op": "stats", "container": "other"})["error"]
    assert "unknown field(s) path" in ask1(sock, {"op": "diff", "path": "/etc"})["error"]
    assert "limit" in ask1(sock, {"op": "diff", "limit": "all"})["error"]

    for tag, why in [("../x", "invalid tag"), ("evil.io/x:1", "no registry or host part"),
                     ("localhost/x:1", "no registry or host part"), ("", "needs a tag"), ("  ", "needs a tag"),
                     ("x@sha256:" + "0" * 64, "digest"), ("UPPER:1", "invalid tag"), (5, "needs a tag")]:
        r = ask1(sock, {"op": "snapshot", "tag": tag})
        assert r["ok"] is False and why in r["error"], (tag, r)
    assert "compression" in ask1(sock, {"op": "snapshot", "tag": "x:1", "compress": "xz"})["error"]
    assert "too long" in ask1(sock, {"op": "snapshot", "tag": "x:1", "message": "m" * 5000})["error"]
    # (a snapshot tagged like the kernel's own image lands in the kernels' namespace instead of
    # replacing it: tests/test_hostile_channel.py)
    # kernelspecs only for this kernel's snapshots
    r = ask1(sock, {"op": "install_kernelspec", "image": "debian:bookworm"})
    assert r["ok"] is False and "not a snapshot this kernel made" in r["error"]
    r = ask1(sock, {"op": "install_kernelspec", "image": "/etc/passwd"})
    assert r["ok"] is False
    # %%container: only store images, no network the kernel does not have, no limits above its own
    r = ask1(sock, {"op": "run_cell", "code": "print(1)", "image": "evil.io/x:1"})
    assert r["ok"] is False and "evil.io/x" in r["error"]
    r = ask1(sock, {"op": "run_cell", "code": "print(1)", "image": "/bin/sh"})
    assert r["ok"] is False and "invalid image" in r["error"]
    r = ask1(sock, {"op": "run_cell", "code": "print(1)", "network": "host"})
    assert r["ok"] is False and "network" in r["error"]
    r = ask1(sock, {"op": "run_cell", "code": 1})
    assert r["ok"] is False and "code must be a string" in r["error"]
    # the same refusal reaches the notebook through the magic, without a traceback
    r = kernel.run("%container snapshot evil.io/x:1", ok=False)
    assert r["error"]["ename"] == "HostError" and "no registry or host part" in r["error"]["evalue"]
    assert len(r["error"]["traceback"]) == 1
    # still serving after all that, and several requests on one connection work
    lines = ask(sock, b'{"op": "ps"}\n{"op": "images"}\n')
    assert lines[0]["ok"] and lines[0]["container"]["id"] == kernel.container(Runtime(kernel_env.store)).id


def test_stats_ps_images_magics(ksm, kernel_env, kernel_runtime):
    name = make_spec(kernel_env, "t-guest-mem", memory="256m", pids=300)
    k = Kernel(ksm, name)
    try:
        out = k.run("%container stats")["stdout"]
        assert "of 256.0 MiB" in out and "of 300" in out, out
        mem = float(out.split("memory:")[1].split()[0])
        assert 1 < mem < 256, out   # a kernel uses some MiB of its 256
        # the raw answer is consistent too
        st = k.run("from jupyter_contain_guest import request; r = request('stats')['stats']; "
                   "print(r['memory_limit'], r['memory_current'] < r['memory_limit'], r['pids_current'])")
        limit, below, pids = st["stdout"].split()
        assert int(limit) == 256 << 20 and below == "True" and 1 <= int(pids) < 300
        c = k.container(kernel_runtime)
        out = k.run("%container ps")["stdout"]
        assert out.startswith(c.id[:12]) and "running" in out and "256.0 MiB" in out and len(out.splitlines()) == 1
        assert "localhost/debian:bookworm" in k.run("%container images")["stdout"].split()
        # a cell above the kernel's own memory limit is refused
        r = k.run("%%container --memory 1g\nprint(1)", ok=False)
        assert r["error"] and "above this kernel's own limit" in r["error"]["evalue"]
        assert "%%container [IMAGE]" in k.run("%container help")["stdout"]
    finally:
        k.close()


# --- diff and snapshot -----------------------------------------------------------------------------


def test_diff_and_snapshot_widget_then_install_as_kernel(kernel, kernel_env, kernel_runtime):
    store = kernel_env.store
    kernel.run("import os; os.makedirs('/opt/proj', exist_ok=True); "
               "open('/opt/proj/hello.txt','w').write('made in the kernel')")
    out = kernel.run("%container diff")["stdout"]
    assert "A /opt/proj/hello.txt" in out and "/opt" in out.splitlines()[1], out
    assert "/run" not in out and ".jupyter-contain" not in out   # runtime stubs are no changes

    r = kernel.run(
        "from jupyter_contain_guest import snapshot_widget\n"
        "w = snapshot_widget()\n"
        "print('/opt' in w.summary.value, w.button.disabled)\n"
        "w.tag.value = 'evil.io/x:1'\n"
        "print(w.button.disabled, 'no registry' in w.feedback.value)\n"
        "w.tag.value = 't-guest-snap:v1'\n"
        "w.message.value = 'hello layer'\n"
        "w.compress.value = 'zstd'\n"
        "print(w.button.disabled)\n"
        "w.button._click_handlers(w.button)\n"
        "print(w.progress.value, w.progress.bar_style, w.image)\n"
        "print(w.result.value)\n")
    lines = r["stdout"].splitlines()
    assert lines[0] == "True False" and lines[1] == "True True" and lines[2] == "False", r
    # a kernel's snapshots live in their own namespace (issue #23: no squatting of short names)
    assert lines[3] == "100 success localhost/kernel-snapshot/t-guest-snap:v1", r
    assert "sha256:" in lines[4]
    rec = store.resolve("localhost/kernel-snapshot/t-guest-snap:v1")
    spec_dir = kernel_env.kernels_dir / "snapshot-t-guest-snap-v1"
    try:
        assert rec.digest in lines[4]
        assert rec.manifest.layers[-1].media_type.endswith("zstd")
        assert rec.config.raw["history"][-1]["comment"] == "hello layer"
        # a container from the snapshot sees the file
        with tempfile.TemporaryFile() as f:
            info = kernel_runtime.run(ContainerSpec(image=rec.name, command=("cat", "/opt/proj/hello.txt")),
                                      stdio=(0, f.fileno(), f.fileno()), remove=True)
            f.seek(0)
            assert info.code == 0 and f.read() == b"made in the kernel"
        # a second snapshot under the same tag (made by this kernel) may replace it
        r = kernel.run("print(w.snapshot()['image'])")
        assert r["stdout"].strip() == "localhost/kernel-snapshot/t-guest-snap:v1"
        # "Install as kernel": beside the kernel's own kernelspec
        r = kernel.run("w.display_name.value = 'My env'\nw.install_button._click_handlers(w.install_button)\n"
                       "print(w.feedback.value)")
        # the display name always says where it came from (kernel-made tiles cannot impersonate others)
        shown = "My env (snapshot of Contained Python (debian))"
        assert f"installed kernel {shown} (snapshot-t-guest-snap-v1)" in r["stdout"], r
        spec = json.loads((spec_dir / "kernel.json").read_text())
        assert spec["display_name"] == shown
        cfg = spec["metadata"]["kernel_provisioner"]["config"]
        assert cfg["image"] == rec.name and cfg["store_root"] == str(store.root)
        # the magic form of a snapshot, with progress lines
        r = kernel.run("%container snapshot t-guest-snap:v2 -m 'by magic'")
        assert "snapshot: commit 100%" in r["stdout"], r
        assert "localhost/kernel-snapshot/t-guest-snap:v2 sha256:" in r["stdout"], r
        assert store.resolve("kernel-snapshot/t-guest-snap:v2").config.raw["history"][-1]["comment"] == "by magic"
    finally:
        shutil.rmtree(spec_dir, ignore_errors=True)
        for n in ("localhost/kernel-snapshot/t-guest-snap:v1", "localhost/kernel-snapshot/t-guest-snap:v2"):
            with contextlib.suppress(errors.ContainError):
                store.rmi(n)


def test_resources_widget_updates_by_itself(kernel):
    r = kernel.run(
        "import time\n"
        "from jupyter_contain_guest import resources_widget\n"
        "w = resources_widget(interval=0.2)\n"
        "time.sleep(0.5)\n"
        "a, n = w.memory_bar.value, w.updates\n"
        "x = b'x' * (96 << 20)\n"
        "t0 = time.time()\n"
        "while w.memory_bar.value < a + 80 and time.time() - t0 < 10: time.sleep(0.1)\n"
        "b, m = w.memory_bar.value, w.updates\n"
        "w.stop(); del x\n"
        "print(a, b, n, m, w.pids_bar.value >= 1, w.cpu_bar.max > 0, w.error)\n", timeout=60)
    a, b, n, m, pids_ok, cpu_ok, err = r["stdout"].split()
    assert float(b) - float(a) >= 80, r["stdout"]    # MiB: the 96 MiB allocated shows
    assert int(m) > int(n) >= 1 and pids_ok == "True" and cpu_ok == "True" and err == "None"
    # the magic forms show the widgets (display_data, not text)
    msg_id = kernel.kc.execute("%container snapshot\n%container resources")
    shown = []
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "display_data":
            shown.append(msg["content"]["data"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert len(shown) == 2 and all("application/vnd.jupyter.widget-view+json" in d for d in shown), shown


# --- %%container ----------------------------------------------------------------------------------


def test_container_cell_magic(kernel, kernel_env, kernel_runtime, caplog):
    # the host's view of each cell's pipes (run_code's debug line) shows in a failure's message
    caplog.set_level(logging.DEBUG, logger=channel.__name__)
    own = kernel.run("import socket; print(socket.gethostname())")["stdout"].strip()
    r = kernel.run("%%container\nimport socket, sys\nprint(socket.gethostname())\nprint('to err', file=sys.stderr)")
    other = r["stdout"].strip()
    assert other and other != own and r["stderr"] == "to err\n", (r, caplog.text)
    # a failing cell raises in the notebook, with the exit reason
    r = kernel.run("%%container\nimport sys\nprint('before')\nsys.exit(3)", ok=False)
    assert r["stdout"] == "before\n" and r["error"]["ename"] == "ContainerCellError"
    assert "exited with code 3" in r["error"]["evalue"]
    r = kernel.run("%%container\nraise ValueError('boom')", ok=False)
    assert "ValueError: boom" in r["stderr"] and "exited with code 1" in r["error"]["evalue"], (r, caplog.text)
    # shell, and an image named explicitly
    r = kernel.run("%%container debian:bookworm --shell\necho $((6 * 7)); cat /etc/debian_version | cut -c1-2")
    assert r["stdout"].split() == ["42", "12"]
    # out of memory
    r = kernel.run("%%container --memory 64m\nx = b'x' * (256 << 20)", ok=False)
    assert "out of memory" in r["error"]["evalue"] and "limit 64 MiB" in r["error"]["evalue"], r["error"]
    # output arrives while the cell runs, not at its end
    r = run_cell(kernel.kc, "%%container --shell\nfor i in 1 2 3; do echo $i; sleep 0.3; done")
    assert r["stdout"].split() == ["1", "2", "3"], (r, caplog.text)
    # straight to the socket: output events, the final answer, and the connection still serves
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(str(kernel.sock))
    with s, s.makefile("rb") as f:
        s.sendall(b'{"op": "run_cell", "code": "print(6 * 7)"}\n{"op": "ps"}\n')
        events = []
        while "ok" not in (msg := json.loads(f.readline())):
            events.append(msg)
        ps = json.loads(f.readline())
    assert {(e["event"], e["stream"]) for e in events} == {("output", "stdout")}
    assert "".join(e["text"] for e in events) == "42\n"
    assert msg["ok"] and msg["exit"]["code"] == 0 and ps["ok"] and ps["container"]["id"]
    left = [c for c in kernel_runtime.containers() if c.state.labels.get(channel.CELL_LABEL)]
    assert left == []


def test_container_cell_gets_the_kernels_sandbox(kernel, kernel_runtime):
    """A %%container cell runs with no more than its kernel: the same kind of user namespace."""
    from jupyter_contain.runtime.containers import idmap
    try:
        idmap.subordinate_ranges()
    except errors.ContainError:
        pytest.skip("no subordinate ids for jupyter-contain on this machine: run scripts/setup")
    probe = "print(open('/proc/self/uid_map').read().split()[:2])"
    own = kernel.run(probe)["stdout"].strip()
    cell = kernel.run("%%container\n" + probe)["stdout"].strip()
    # both: root inside is a subordinate uid (each container has its own slice), never host root
    for text in (own, cell):
        assert text.startswith("['0', '") and text != "['0', '0']", (own, cell)


def test_container_cell_streams_live_and_interrupt_kills_it(kernel, kernel_runtime):
    kc = kernel.kc
    msg_id = kc.execute("%%container --shell\necho started; sleep 100", stop_on_error=False)
    t0 = time.monotonic()
    seen = ""
    while "started" not in seen:   # the first line shows before the cell ends
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
    cells = [c for c in kernel_runtime.containers() if c.state.labels.get(channel.CELL_LABEL)]
    assert len(cells) == 1 and cells[0].refresh_status() == "running"
    kernel.km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 15
    while [c for c in Runtime(kernel_runtime.store).containers() if c.state.labels.get(channel.CELL_LABEL)]:
        assert time.monotonic() < deadline, "the cell's container outlived the interrupt"
        time.sleep(0.1)
    assert kernel.run("print('alive')")["stdout"] == "alive\n"


# --- reset -------------------------------------------------------------------------------------------


def test_reset_magic_takes_effect_at_restart(kernel, kernel_runtime):
    kernel.run("open('/root/reset-me','w').write('x')")
    c = kernel.container(kernel_runtime)
    out = kernel.run("%container reset")["stdout"]
    assert "next restart" in out
    # not before the restart
    assert kernel.run("import os; print(os.path.exists('/root/reset-me'))")["stdout"].strip() == "True"
    kernel.km.restart_kernel()
    kernel.kc.wait_for_ready(READY)
    assert kernel.run("import os; print(os.path.exists('/root/reset-me'))")["stdout"].strip() == "False"
    assert kernel.container(kernel_runtime).id == c.id
    # once: a second restart keeps what was written since
    kernel.run("open('/root/kept','w').write('x')")
    kernel.km.restart_kernel()
    kernel.kc.wait_for_ready(READY)
    assert kernel.run("import os; print(os.path.exists('/root/kept'))")["stdout"].strip() == "True"


# --- the channel on the server's event loop ----------------------------------------------------------


def test_channel_on_the_event_loop_of_an_async_manager(ksm, kernel_env, kernel_runtime):
    async def main() -> tuple[str, str, bool]:
        km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(READY)
            assert km.provisioner._channel._thread is None   # on this loop, no thread of its own
            out: dict = {"stdout": ""}

            def hook(msg: dict) -> None:
                if msg["msg_type"] == "stream":
                    out["stdout"] += msg["content"]["text"]
            await kc.execute_interactive("%container stats\n%container ps", timeout=60, output_hook=hook)
            sock = channel.socket_path(containers.kernel_runtime_dir() / km.kernel_id / "ch")
            return out["stdout"], str(sock), sock.exists()
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    out, sock, existed = asyncio.run(main())
    assert "memory:" in out and "processes:" in out and "running" in out, out
    assert existed and not os.path.exists(sock)   # stopped with the kernel


def test_guest_without_ipywidgets_keeps_magics(kernel):
    r = kernel.run("import sys; sys.modules['ipywidgets'] = None\n"
                   "import jupyter_contain_guest.widgets as gw; gw._classes.clear()\n"
                   "from jupyter_contain_guest import snapshot_widget\n"
                   "try:\n    snapshot_widget()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    assert r["stdout"].startswith("HostError widgets need ipywidgets"), r
    assert "memory:" in kernel.run("%container stats")["stdout"]



# --- the widgets on a newer ipywidgets (8, in this venv) against a stand-in host ----------------


class _FakeHost:
    """A stand-in for the host channel speaking the same protocol, with canned answers."""

    def __init__(self, folder) -> None:
        import socketserver
        import threading

        self.requests: list[dict] = []
        self.memory = 10 << 20
        host = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    req = json.loads(line)
                    host.requests.append(req)
                    for msg in host.answer(req):
                        self.wfile.write(json.dumps(msg).encode() + b"\n")

        self.server = socketserver.ThreadingUnixStreamServer(str(folder / channel.SOCKET_NAME), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def answer(self, req: dict) -> list[dict]:
        op = req["op"]
        if op == "diff":
            return [{"ok": True, "total": 1, "bytes": 5, "summary": [{"folder": "/opt", "count": 1, "bytes": 5}],
                     "changes": [], "truncated": False}]
        if op == "snapshot":
            return [{"event": "progress", "stage": "archive", "done": 50, "total": 100},
                    {"event": "progress", "stage": "commit", "done": 100, "total": 100},
                    {"ok": True, "image": "localhost/" + req["tag"], "digest": "sha256:" + "a" * 64, "size": 1234}]
        if op == "install_kernelspec":
            return [{"ok": True, "kernel_name": "contained-x", "display_name": req.get("display_name", "X")}]
        if op == "stats":
            self.memory += 5 << 20
            return [{"ok": True, "stats": {"memory_current": self.memory, "memory_peak": self.memory,
                                           "memory_limit": 256 << 20, "cpu_usage_ns": 10 ** 9, "pids_current": 3,
                                           "pids_limit": 100, "oom_kills": 0, "cpus_limit": None, "cpu_count": 2,
                                           "time": time.time()}}]
        return [{"ok": False, "error": "unknown"}]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def guest_module(tmp_path, monkeypatch):
    """The guest package imported in this process (the venv's newer ipywidgets), talking to a stand-in."""
    import sys

    pytest.importorskip("ipywidgets")
    from jupyter_contain.kernel import guest_files

    monkeypatch.syspath_prepend(str(guest_files.guest_path()))
    monkeypatch.setenv("JUPYTER_CONTAIN_KERNEL_DIR", str(tmp_path))
    host = _FakeHost(tmp_path)
    try:
        import jupyter_contain_guest.widgets as gw
        yield gw, host
    finally:
        host.close()
        for name in [m for m in sys.modules if m.startswith("jupyter_contain_guest")]:
            del sys.modules[name]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_widgets_on_newer_ipywidgets(guest_module):
    import ipywidgets

    gw, host = guest_module
    assert int(ipywidgets.__version__.split(".")[0]) >= 7
    w = gw.snapshot_widget()
    assert "/opt" in w.summary.value
    w.tag.value = "evil.io/x:1"
    assert w.button.disabled and "no registry" in w.feedback.value
    w.tag.value = "myenv:v1"
    w.message.value = "m"
    w.compress.value = "zstd"
    assert not w.button.disabled
    w.button._click_handlers(w.button)
    assert w.progress.value == 100 and w.progress.bar_style == "success" and w.image == "localhost/myenv:v1"
    assert "sha256:aaaa" in w.result.value and not w.install_button.disabled
    snap = next(r for r in host.requests if r["op"] == "snapshot")
    assert snap == {"op": "snapshot", "tag": "myenv:v1", "message": "m", "compress": "zstd"}
    w.display_name.value = "Mine"
    w.install_button._click_handlers(w.install_button)
    assert "installed kernel Mine" in w.feedback.value
    w.close()

    r = gw.resources_widget(interval=0.05)
    try:
        first = r.memory_bar.value
        deadline = time.monotonic() + 10
        while r.memory_bar.value <= first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.memory_bar.value > first and r.memory_bar.max == 256.0
        assert r.pids_bar.value == 3 and r.pids_bar.max == 100 and r.error is None
    finally:
        r.close()
    assert r._thread is None
