"""A real Jupyter Server on loopback running contained kernels over its REST API and websocket.

The server is ``python -m jupyter_server`` on 127.0.0.1 at a free port with a
token, a temp root dir and ``JUPYTER_PATH`` pointing at the test kernelspecs;
it is ended by PID. Also: a server killed with a kernel running leaves the
container behind, and the next server's first kernel start removes it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from kernel_fixtures import *  # noqa: F403
from kernel_fixtures import KERNEL_NAME

from jupyter_contain.kernel import containers
from jupyter_contain.runtime import Runtime

websocket = pytest.importorskip("websocket", reason="websocket-client is needed to talk to the server")
pytest.importorskip("jupyter_server")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, kernel_env) -> None:
        self.port = _free_port()
        self.token = uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = base / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path = base / f"server-{self.port}.log"
        env = dict(os.environ)
        env.update({
            "JUPYTER_PATH": str(kernel_env.data_dir),
            "JUPYTER_CONFIG_DIR": str(base / "config"),
            "JUPYTER_DATA_DIR": str(base / "data"),
            "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
            "JUPYTER_PLATFORM_DIRS": "1",
        })
        env.pop("JUPYTER_CONFIG_PATH", None)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}", "--ServerApp.open_browser=False",
             f"--ServerApp.root_dir={self.root}", "--KernelSpecManager.ensure_native_kernel=False", "--allow-root"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.request("GET", "/api/status")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"jupyter server did not start:\n{self.log_text()}") from None
                time.sleep(0.2)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | None]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def channels(self, kernel_id: str):
        return websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}",
            header=[f"Authorization: token {self.token}"], timeout=120)

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def server_base(tmp_path):
    return tmp_path


def _execute(ws, code: str, timeout: float = 120) -> dict:
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    out = {"stdout": "", "stderr": "", "reply": None, "idle": False}
    deadline = time.monotonic() + timeout
    while not (out["reply"] and out["idle"]):
        assert time.monotonic() < deadline, f"no reply in {timeout} s: {out}"
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out[msg["content"]["name"]] += msg["content"]["text"]
        elif msg["msg_type"] == "execute_reply":
            out["reply"] = msg["content"]
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            out["idle"] = True
    return out


def _kernel_containers(rt: Runtime, kernel_id: str) -> list:
    return [c for c in rt.containers() if c.state.labels.get("jupyter-contain.kernel-id") == kernel_id]


def test_server_runs_contained_kernel(server_base, kernel_env, kernel_runtime):
    srv = Server(server_base, kernel_env)
    try:
        code, specs = srv.request("GET", "/api/kernelspecs")
        assert code == 200 and KERNEL_NAME in specs["kernelspecs"]
        code, kernel = srv.request("POST", "/api/kernels", {"name": KERNEL_NAME})
        assert code == 201, kernel
        kid = kernel["id"]
        ws = srv.channels(kid)
        try:
            r = _execute(ws, "import socket, os; print(socket.gethostname(), len([p for p in os.listdir('/proc') "
                             "if p.isdigit()]))")
        finally:
            ws.close()
        assert r["reply"]["status"] == "ok", r
        hostname, nprocs = r["stdout"].split()
        assert hostname != socket.gethostname()
        assert int(nprocs) < 10            # init, the kernel and a few helpers: not the host's processes
        (c,) = _kernel_containers(kernel_runtime, kid)
        assert c.id.startswith(hostname)
        assert (containers.kernel_runtime_dir() / kid).is_dir()
        code, _ = srv.request("DELETE", f"/api/kernels/{kid}")
        assert code == 204
        assert _kernel_containers(Runtime(kernel_env.store), kid) == []
        assert not (containers.kernel_runtime_dir() / kid).exists()
    finally:
        srv.stop()
    assert srv.proc.returncode is not None


def test_killed_server_leftovers_are_cleaned_by_next_server(server_base, kernel_env, kernel_runtime):
    first = Server(server_base / "a", kernel_env)
    try:
        code, kernel = first.request("POST", "/api/kernels", {"name": KERNEL_NAME})
        assert code == 201, kernel
        old_kid = kernel["id"]
        (old,) = _kernel_containers(kernel_runtime, old_kid)
        deadline = time.monotonic() + 60
        while old.pid is None:          # running (its init may still be starting the kernel)
            assert time.monotonic() < deadline
            time.sleep(0.1)
        old_pid = old.pid
    finally:
        first.stop(signal.SIGKILL)       # no chance to shut its kernels down
    # the container outlived its server
    assert old.refresh_status() == "running" and os.path.exists(f"/proc/{old_pid}")

    second = Server(server_base / "b", kernel_env)
    try:
        code, kernel = second.request("POST", "/api/kernels", {"name": KERNEL_NAME})
        assert code == 201, kernel
        assert not old.dir.exists(), "the dead server's container is still there"
        assert not (containers.kernel_runtime_dir() / old_kid).exists()
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{old_pid}") and _proc_state(old_pid) != "Z":
            assert time.monotonic() < deadline, "the dead server's kernel still runs"
            time.sleep(0.1)
        # the kernel's container, and the warm pool's kernel if the first server had made it (#19)
        assert re.search(r"removed [12] container\(s\) left by dead processes", second.log_text())
        code, _ = second.request("DELETE", f"/api/kernels/{kernel['id']}")
        assert code == 204
    finally:
        second.stop()
    assert Runtime(kernel_env.store).containers() == []


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
