"""The jupyter-contain server extension: a real ``jupyter server`` on 127.0.0.1 serving /jupyter-contain/api/v1/.

One server per module (started by PID, ended by PID), over the session's kernel
store and test kernelspecs, with a real local registry (``docker-registry``) for
pulls; kernels are real contained kernels started through ``/api/kernels`` and
every test shuts down the kernels it starts. The auth matrix runs every route of
the OpenAPI file against the live server without a token, with a wrong one,
with the right one (the route exists and checks its body before dispatch) and
against a second server whose authorizer denies resource ``contain``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kernel_fixtures import *  # noqa: F403
from kernel_fixtures import KERNEL_NAME, make_spec

from jupyter_contain.runtime import Runtime, Store

requests = pytest.importorskip("requests")
websocket = pytest.importorskip("websocket", reason="websocket-client is needed to talk to the server")
yaml = pytest.importorskip("yaml")
pytest.importorskip("jupyter_server")

pytestmark = pytest.mark.slow

API = "/jupyter-contain/api/v1"
OPENAPI = Path(__file__).parent.parent / "jupyter_contain" / "server" / "openapi.yaml"

DENY_AUTHORIZER = '''
from jupyter_server.auth.authorizer import Authorizer


class DenyContain(Authorizer):
    """Allows everything but jupyter-contain's resource."""

    def is_authorized(self, handler, user, action, resource):
        return resource != "contain"
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_session(token: str | None = None) -> Iterator[Any]:
    """A requests session whose sockets are closed at the end (urllib3 2.8's clear() leaves them to the GC)."""
    s = requests.Session()
    if token:
        s.headers["Authorization"] = f"token {token}"
    try:
        yield s
    finally:
        for adapter in s.adapters.values():
            manager = getattr(adapter, "poolmanager", None)
            for key in list(manager.pools.keys()) if manager is not None else ():
                with contextlib.suppress(KeyError):
                    manager.pools[key].close()
        s.close()


def request(method: str, url: str, **kw: Any) -> Any:
    with http_session() as s:
        resp = s.request(method, url, timeout=120, **kw)
        resp.content   # noqa: B018 - read it all before the connection closes
        return resp


class ApiServer:
    """``python -m jupyter_server`` with the extension, on 127.0.0.1, a token and temp dirs; ended by PID."""

    def __init__(self, base: Path, kernel_env: Any, *, store: Store, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, netns: str | None = None) -> None:
        #: a network namespace to run the server in (its 127.0.0.1 is that namespace's loopback)
        self.netns = netns
        self.port = free_port()
        self.token = uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = base
        self.root = base / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = base / "data"
        self.log_path = base / f"server-{self.port}.log"
        environ = dict(os.environ)
        environ.update({
            "JUPYTER_PATH": str(kernel_env.data_dir),
            "JUPYTER_CONFIG_DIR": str(base / "config"),
            "JUPYTER_DATA_DIR": str(self.data),
            "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
            "JUPYTER_PLATFORM_DIRS": "1",
            **(env or {}),
        })
        environ.pop("JUPYTER_CONFIG_PATH", None)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*(["nsenter", f"--net={netns}"] if netns else []), sys.executable, "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}", "--ServerApp.open_browser=False",
             f"--ServerApp.root_dir={self.root}", "--KernelSpecManager.ensure_native_kernel=False", "--allow-root",
             # enabled by the installed config file too (test_extension_enabled_by_installed_config)
             "--ServerApp.jpserver_extensions=jupyter_contain.server=True",
             f"--ContainApp.store_root={store.root}",
             # no warm pool (its default is one kernel per used kernelspec): a test's containers are its
             # own; tests/test_pool.py covers the pool through a server
             "--ContainApp.kernel_pool=0", *extra],
            env=environ, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while True:
            try:
                if self.http("GET", self.url + "/api/status", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"jupyter server did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.2)

    def _in_netns(self, fn: Any) -> Any:
        if self.netns is None:
            return fn()
        from jupyter_contain.runtime.containers import network

        return network.run_in_netns(self.netns, fn)

    def http(self, method: str, url: str, *, token: bool = True, **kw: Any) -> Any:
        """One request on a connection of its own (closed after it: no socket outlives a test)."""
        def go() -> Any:
            with http_session(self.token if token else None) as s:
                resp = s.request(method, url, **{"timeout": 120, **kw})
                resp.content   # noqa: B018 - read it all before the connection closes
                return resp

        return self._in_netns(go)

    def api(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (), **kw: Any) -> Any:
        resp = self.http(method, self.url + API + "/" + path, json=body, **kw)
        if ok:
            assert resp.status_code in ok, (method, path, resp.status_code, resp.text[:500])
        return resp.status_code, (resp.json() if resp.content else None)

    def jupyter(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        resp = self.http(method, self.url + path, json=body)
        return resp.status_code, (resp.json() if resp.content else None)

    def events(self, op_id: str, **params: str) -> Iterator[dict[str, Any]]:
        with http_session(self.token) as s:
            with s.get(f"{self.url}{API}/operations/{op_id}/events", params=params, stream=True,
                       timeout=120) as resp:
                assert resp.status_code == 200, resp.text
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                for line in resp.iter_lines(decode_unicode=True):
                    if line and line.startswith("data: "):
                        yield json.loads(line[6:])

    def wait_operation(self, op_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            _, body = self.api("GET", f"operations/{op_id}", ok=(200,))
            if body["operation"]["state"] != "running":
                return body["operation"]
            assert time.monotonic() < deadline, body
            time.sleep(0.1)

    def start_kernel(self, name: str = KERNEL_NAME) -> str:
        code, kernel = self.jupyter("POST", "/api/kernels", {"name": name})
        assert code == 201, (kernel, self.log_text()[-2000:])
        return kernel["id"]

    def shutdown_kernel(self, kid: str) -> None:
        code, _ = self.jupyter("DELETE", f"/api/kernels/{kid}")
        assert code in (204, 404), code

    def channels(self, kid: str) -> Any:
        return self._in_netns(lambda: websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/api/kernels/{kid}/channels?session_id={uuid.uuid4().hex}",
            header=[f"Authorization: token {self.token}"], timeout=120))

    def execute(self, kid: str, code: str, timeout: float = 120) -> dict[str, Any]:
        ws = self.channels(kid)
        try:
            return execute(ws, code, timeout)
        finally:
            ws.close()

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def execute(ws: Any, code: str, timeout: float = 120) -> dict[str, Any]:
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": False},
    }))
    out: dict[str, Any] = {"stdout": "", "stderr": "", "reply": None, "idle": False}
    deadline = time.monotonic() + timeout
    # short reads: the server's websocket pings would otherwise keep one recv() waiting forever
    ws.settimeout(1)
    while not (out["reply"] and out["idle"]):
        assert time.monotonic() < deadline, f"no reply in {timeout} s: {out}"
        try:
            msg = json.loads(ws.recv())
        except websocket.WebSocketTimeoutException:
            continue
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out[msg["content"]["name"]] += msg["content"]["text"]
        elif msg["msg_type"] == "execute_reply":
            out["reply"] = msg["content"]
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            out["idle"] = True
    return out


class EventListener:
    """Jupyter Server's event stream (``/api/events/subscribe``), collected by a thread."""

    def __init__(self, srv: ApiServer) -> None:
        self.events: list[dict[str, Any]] = []
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{srv.port}/api/events/subscribe",
                                              header=[f"Authorization: token {srv.token}"], timeout=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                return

    def ours(self, kid: str) -> list[dict[str, Any]]:
        return [e for e in self.events if (e.get("schema_id") or e.get("__schema__")) == "https://jupyter-contain.org/events/kernel-container/v1"
                and e.get("kernel_id") == kid]

    def wait_for(self, kid: str, event: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            got = [e for e in self.ours(kid) if e["event"] == event]
            if got:
                return got[0]
            assert time.monotonic() < deadline, f"no {event} event for {kid}: {self.events[-10:]}"
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.ws.close()


# --- images in the registry ---------------------------------------------------------------


def make_payload_image(store: Store, tmp: Path, name: str, size: int) -> None:
    """A one-layer image holding ``size`` random bytes (incompressible: the pull moves all of it)."""
    import tarfile

    from jupyter_contain.runtime.images import archive

    tar_path = tmp / f"{name.replace(':', '-').replace('/', '-')}.tar"
    data = tmp / "payload.bin"
    with open(data, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
    with tarfile.open(tar_path, "w") as tf:
        tf.add(data, arcname="payload.bin")
    data.unlink()
    archive.import_rootfs(store, tar_path, name)
    tar_path.unlink()


@pytest.fixture(scope="module")
def registry(tmp_path_factory, image_store):
    """A local registry holding busybox:1 and payload:1 (8 MB of random bytes)."""
    from registry_fixture import start_registry

    from jupyter_contain.runtime.images import registry as client

    tmp = tmp_path_factory.mktemp("srv-registry")
    src = Store(tmp / "src-store")
    make_payload_image(src, tmp, "payload:1", 8 << 20)
    with start_registry(tmp) as reg:
        client.push(image_store, "busybox:test", f"{reg.address}/busybox:1")
        client.push(src, "payload:1", f"{reg.address}/payload:1")
        yield reg


@pytest.fixture(scope="module")
def srv(tmp_path_factory, kernel_env):
    make_spec(kernel_env, "srv-limited", memory="256m", cpus="1", pids=64)
    make_spec(kernel_env, "srv-oom", memory="96m")
    s = ApiServer(tmp_path_factory.mktemp("srv"), kernel_env, store=kernel_env.store,
                  extra=("--ContainApp.max_memory=1g", "--ContainApp.max_pids=1000"))
    yield s
    s.stop()
    assert s.proc.returncode is not None


@pytest.fixture
def kernels(srv, kernel_runtime):
    """Kernels a test starts through the server; all shut down after it (kernel_runtime: no container left)."""
    started: list[str] = []

    def start(name: str = KERNEL_NAME) -> str:
        kid = srv.start_kernel(name)
        started.append(kid)
        return kid

    yield start
    for kid in started:
        srv.shutdown_kernel(kid)


def store_state(store: Store) -> dict[str, Any]:
    root = store.root
    return {
        "index": (root / "index.json").read_bytes(),
        "blobs": sorted(p.name for p in (root / "blobs" / "sha256").iterdir()),
        "layers": sorted(p.name for p in (root / "layers").iterdir()),
        "tmp": sorted(p.name for p in (root / "tmp").iterdir()),
    }


# --- packaging and the route table ---------------------------------------------------------------


def test_extension_enabled_by_installed_config(tmp_path):
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    env.pop("JUPYTER_CONFIG_PATH", None)
    jupyter = Path(sys.executable).parent / "jupyter"
    out = subprocess.run([str(jupyter), "server", "extension", "list"], env=env, capture_output=True, text=True,
                         timeout=120)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    assert re.search(r"jupyter_contain\.server\s+enabled", text), text
    assert re.search(r"jupyter_contain\.server\s+0\.1\.0 OK", text) or "jupyter_contain.server  OK" in text, text
    # from the file pip installs under sys.prefix (setup.py's data_files)
    assert (Path(sys.prefix) / "etc/jupyter/jupyter_server_config.d/jupyter_contain.json").is_file()


def _openapi_routes() -> dict[str, set[str]]:
    spec = yaml.safe_load(OPENAPI.read_text())
    return {path: {m for m in ops if m in ("get", "post", "delete", "put", "patch")}
            for path, ops in spec["paths"].items()}


def _code_routes() -> dict[str, set[str]]:
    from jupyter_contain.server import handlers

    out = {}
    for path, cls in handlers.ROUTES:
        names = iter(re.findall(r"\{(\w+)\}", _spec_path_for(path)))
        out["/" + re.sub(r"\(\[\^/\]\+\)", lambda _m, names=names: "{" + next(names) + "}", path)] = {
            m for m in ("get", "post", "delete") if m in cls.__dict__}
    return out


def _spec_path_for(code_path: str) -> str:
    """The OpenAPI path whose shape matches a route pattern (parameter names differ only in the spec)."""
    pattern = "^/" + code_path.replace("([^/]+)", r"\{\w+\}") + "$"
    hits = [p for p in _openapi_routes() if re.match(pattern, p)]
    assert len(hits) == 1, (code_path, hits)
    return hits[0]


def test_openapi_describes_exactly_the_routes():
    assert _code_routes() == _openapi_routes()


DUMMY = {"name": "no-such-image:0", "op_id": "0" * 32, "container": "no-such-container",
         "kernel_id": "00000000-0000-0000-0000-000000000000", "kernelspec": "no-such-kernelspec"}


def _live_routes() -> list[tuple[str, str, bool]]:
    """(method, path with dummy arguments, whether the path has arguments) for every route of the spec."""
    out = []
    for path, methods in sorted(_openapi_routes().items()):
        concrete = re.sub(r"\{(\w+)\}", lambda m: requests.utils.quote(DUMMY[m.group(1)], safe=""), path)
        out += [(m.upper(), concrete.lstrip("/"), "{" in path) for m in sorted(methods)]
    return out


def test_auth_matrix_every_route(srv, kernel_env, tmp_path):
    routes = _live_routes()
    assert len(routes) >= 30
    store_before = store_state(kernel_env.store)
    for method, path, has_args in routes:
        url = srv.url + API + "/" + path
        none = request(method, url, json={})
        assert none.status_code == 403, (method, path, none.status_code)
        assert none.json()["error"]["code"] == "forbidden"
        wrong = request(method, url, json={}, headers={"Authorization": "token nope"})
        assert wrong.status_code == 403, (method, path, wrong.status_code)
        # the right token: the route exists (no 404 no_route, no 405) and a body field nobody allows is
        # refused before any dispatch; GET and DELETE of dummy names answer 200, 404 or 409
        right = srv.http(method, url, json={"__bogus": 1} if method == "POST" else None)
        err = (right.json() if right.content else {}).get("error") if right.status_code >= 400 else None
        assert right.status_code not in (403, 405, 500), (method, path, right.status_code, right.text)
        assert not err or err["code"] != "no_route", (method, path)
        if method == "POST":
            assert right.status_code == 400 and err["code"] == "unknown_field", (method, path, right.text)
        elif has_args:
            assert right.status_code in (200, 404, 409), (method, path, right.status_code, right.text)
        else:
            assert right.status_code == 200, (method, path, right.status_code, right.text)
    assert store_state(kernel_env.store) == store_before   # nothing of that touched the store

    # XSRF as the server does it: a cookie-authenticated write without the _xsrf token is refused
    with http_session() as s:
        s.get(srv.url + f"/login?token={srv.token}", timeout=30)   # sets the login cookie and _xsrf
        assert s.get(srv.url + API + "/images", timeout=30).status_code == 200
        r = s.post(srv.url + API + "/images/gc", timeout=30)
        assert r.status_code == 403 and "xsrf" in r.json()["error"]["message"].lower(), r.text

    # an authorizer that denies resource "contain": every route 403, the rest of the server still works
    (tmp_path / "authz").mkdir()
    (tmp_path / "authz" / "deny_contain.py").write_text(DENY_AUTHORIZER)
    deny = ApiServer(tmp_path / "deny", kernel_env, store=kernel_env.store,
                     extra=("--ServerApp.authorizer_class=deny_contain.DenyContain",),
                     env={"PYTHONPATH": str(tmp_path / "authz")})
    try:
        for method, path, _ in routes:
            r = deny.http(method, deny.url + API + "/" + path, json={})
            assert r.status_code == 403, (method, path, r.status_code)
            assert r.json()["error"]["code"] == "forbidden"
            assert "resource: contain" in r.json()["error"]["message"]
        code, specs = deny.jupyter("GET", "/api/kernelspecs")
        assert code == 200 and KERNEL_NAME in specs["kernelspecs"]
    finally:
        deny.stop()


def test_bad_input_is_refused_and_changes_nothing(srv, kernel_env, tmp_path):
    before = store_state(kernel_env.store)
    outside = tmp_path / "outside.tar"
    outside.write_bytes(b"x")
    (srv.root / "escape").unlink(missing_ok=True)
    (srv.root / "escape").symlink_to(tmp_path)
    cases = [
        ("POST", "images/pull", {"reference": "Not A Reference!"}, 400, "invalid_reference"),
        ("POST", "images/pull", {}, 400, "missing_field"),
        ("POST", "images/pull", {"reference": 5}, 400, "invalid_field"),
        ("POST", "images/pull", ["not", "an", "object"], 400, "invalid_body"),
        ("POST", "images/import", {"path": str(outside)}, 400, "path_outside_root"),
        ("POST", "images/import", {"path": "escape/outside.tar"}, 400, "path_outside_root"),
        ("POST", "images/import", {"path": "../outside.tar"}, 400, "path_outside_root"),
        ("POST", f"images/{requests.utils.quote('localhost/debian:bookworm', safe='')}/save",
         {"path": "escape/x.tar"}, 400, "path_outside_root"),
        ("POST", f"images/{requests.utils.quote('localhost/debian:bookworm', safe='')}/tag",
         {"target": "x@sha256:" + "0" * 64}, 400, "invalid_reference"),
        ("POST", "kernelspecs", {"image": "localhost/debian:bookworm", "memory": "2g"}, 400, "limit_exceeded"),
        ("POST", "kernelspecs", {"image": "localhost/debian:bookworm", "memory": "lots"}, 400, "invalid_field"),
        ("POST", "kernelspecs", {"image": "localhost/debian:bookworm", "network": "host"}, 400, "limit_exceeded"),
        ("POST", "kernelspecs", {"image": "localhost/debian:bookworm", "pids": 0}, 400, "limit_exceeded"),
        ("POST", "kernelspecs", {"image": "localhost/debian:bookworm", "name": "Bad Name"}, 400,
         "invalid_kernel_name"),
        ("POST", "containers/..%2F..%2Fetc/stop", {}, 400, "invalid_container"),
        ("GET", "operations/not-an-id", None, 400, "invalid_operation_id"),
        ("DELETE", f"images/{requests.utils.quote('localhost/debian:bookworm', safe='')}", None, None, None),
    ]
    for method, path, body, status, code in cases[:-1]:
        got, reply = srv.api(method, path, body)
        assert (got, reply["error"]["code"]) == (status, code), (method, path, reply)
    # too large a body
    got = srv.http("POST", srv.url + API + "/images/pull", data=b"{" + b" " * (70 << 10) + b"}")
    assert got.status_code == 400 and got.json()["error"]["code"] == "body_too_large"
    assert store_state(kernel_env.store) == before
    (srv.root / "escape").unlink()


# --- images --------------------------------------------------------------------------------


def test_pull_streams_progress_then_lists_inspects_and_removes(srv, registry, kernel_env):
    ref = f"{registry.address}/busybox:1"
    code, body = srv.api("POST", "images/pull", {"reference": ref})
    assert code == 202, body
    op = body["operation"]
    assert op["kind"] == "pull" and op["state"] == "running" and op["target"] == ref
    events = list(srv.events(op["id"]))
    assert events[-1]["state"] == "succeeded", events[-1]
    assert all(e["state"] == "running" for e in events[:-1])
    versions = [e["version"] for e in events]
    assert versions == sorted(set(versions))
    final = events[-1]
    (layer,) = [i for i in final["progress"]["items"] if i["index"] >= 0]
    assert layer["state"] == "done" and layer["done"] == layer["total"] > 0
    assert final["progress"]["done"] == final["progress"]["total"] > 0
    image = final["result"]["image"]
    assert image["name"] == ref

    code, listing = srv.api("GET", "images")
    assert code == 200
    (listed,) = [i for i in listing["images"] if i["name"] == ref]
    assert listed == image
    rec = kernel_env.store.resolve(ref)
    assert (listed["digest"], listed["id"], listed["size"]) == (rec.digest, rec.id, rec.size)
    quoted = requests.utils.quote(ref, safe="")
    code, detail = srv.api("GET", f"images/{quoted}")
    assert code == 200 and detail["image"]["layers"][0]["digest"] == rec.manifest.layers[0].digest
    assert detail["image"]["diff_ids"] == list(rec.config.diff_ids)
    code, tagged = srv.api("POST", f"images/{quoted}/tag", {"target": "srvtest/busy:2"})
    assert code == 201 and tagged["image"]["digest"] == rec.digest
    code, _ = srv.api("DELETE", f"images/{requests.utils.quote('srvtest/busy:2', safe='')}")
    assert code == 204
    # push it back under another name (an operation too), then read it from the registry with skopeo
    from registry_fixture import inspect_with_skopeo

    code, body = srv.api("POST", f"images/{quoted}/push", {"target": f"{registry.address}/pushed:7"})
    assert code == 202, body
    pushed = srv.wait_operation(body["operation"]["id"])
    assert pushed["state"] == "succeeded" and pushed["kind"] == "push", pushed
    assert pushed["result"]["digest"] == rec.digest
    assert inspect_with_skopeo(f"{registry.address}/pushed:7", raw=True)["layers"][0]["digest"] == \
        rec.manifest.layers[0].digest
    code, _ = srv.api("DELETE", f"images/{quoted}")
    assert code == 204
    code, err = srv.api("GET", f"images/{quoted}")
    assert code == 404 and err["error"]["code"] == "image_not_found"
    # nothing refers to its blobs now: gc frees them (and leaves every other image alone)
    names = sorted(i["name"] for i in srv.api("GET", "images")[1]["images"])
    code, gc = srv.api("POST", "images/gc")
    assert code == 200 and gc["removed"]["blobs"] >= 3 and gc["removed"]["bytes"] > 0, gc
    assert not kernel_env.store.has_blob(rec.manifest.layers[0].digest)
    assert sorted(i["name"] for i in srv.api("GET", "images")[1]["images"]) == names
    code, ops = srv.api("GET", "operations")
    assert op["id"] in [o["id"] for o in ops["operations"]]


class SlowProxy:
    """A TCP relay to the registry that sends its answers at ``rate`` bytes/s (so a pull can be caught midway)."""

    def __init__(self, target: tuple[str, int], rate: int) -> None:
        self.target = target
        self.rate = rate
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(self.target)
            self._conns += [client, upstream]
            for src, dst, slow in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, slow), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        chunk = 16 << 10
        try:
            while not self._stop.is_set():
                data = src.recv(chunk)
                if not data:
                    break
                dst.sendall(data)
                if slow:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self.sock.close()
        for t in self._threads:
            t.join(5)


def test_cancelled_pull_leaves_the_store_unchanged(srv, registry, kernel_env):
    proxy = SlowProxy((registry.host, registry.port), rate=2 << 20)   # 8 MB at 2 MB/s: 4 s
    try:
        before = store_state(kernel_env.store)
        code, body = srv.api("POST", "images/pull", {"reference": f"127.0.0.1:{proxy.port}/payload:1"})
        assert code == 202, body
        op_id = body["operation"]["id"]
        seen = []
        for ev in srv.events(op_id):
            seen.append(ev)
            moving = [i for i in ev["progress"]["items"] if i["index"] >= 0 and 0 < i["done"] < (i["total"] or 0)]
            if moving and len(seen) == len([e for e in seen if e["state"] == "running"]) and not any(
                    e.get("cancel_requested") for e in seen):
                code, cancelled = srv.api("DELETE", f"operations/{op_id}")
                assert code == 202 and cancelled["operation"]["cancel_requested"] is True
        final = seen[-1]
        assert final["state"] == "cancelled", final
        assert final["error"]["code"] == "cancelled"
        assert any(0 < i["done"] < (i["total"] or 0) for e in seen for i in e["progress"]["items"])
        assert store_state(kernel_env.store) == before   # no blob, no layer, no tag, no debris in tmp/
    finally:
        proxy.close()


def test_import_and_save_stay_inside_the_root(srv):
    name = requests.utils.quote("localhost/debian:bookworm", safe="")
    code, saved = srv.api("POST", f"images/{name}/save", {"path": "debian.tar", "format": "oci-archive"})
    assert code == 200, saved
    assert saved["path"] == "debian.tar" and (srv.root / "debian.tar").stat().st_size == saved["size"] > 0
    code, imported = srv.api("POST", "images/import", {"path": "debian.tar", "name": "srvtest/reimported:1"})
    assert code == 201, imported
    assert imported["image"]["id"] == saved["image"]["id"]
    assert srv.api("DELETE", f"images/{requests.utils.quote('srvtest/reimported:1', safe='')}")[0] == 204
    (srv.root / "debian.tar").unlink()


# --- kernels' containers ---------------------------------------------------------------------


def _cgroup_file(paths: dict[str, str], controller: str, name: str) -> Path:
    for key, p in paths.items():
        if controller in key.split(",") or key == "unified":
            f = Path(p) / name
            if f.exists():
                return f
    raise AssertionError(f"no {name} in {paths}")


def test_kernel_container_stats_match_its_cgroup(srv, kernels, kernel_env):
    kid = kernels("srv-limited")
    code, info = srv.api("GET", f"kernels/{kid}/container")
    assert code == 200 and info["contained"] is True, info
    c = Runtime(kernel_env.store).get(info["container"]["id"])
    assert c.state.labels["jupyter-contain.kernel-id"] == kid
    assert info["container"]["kernel_id"] == kid and info["container"]["kernel_of_this_server"] is True
    assert info["container"]["limits"] == {"memory": 256 << 20, "cpus": 1.0, "pids": 64}
    assert info["image"]["name"] == "localhost/debian:bookworm" and info["death"] is None
    srv.execute(kid, "x = 1")   # the kernel is up
    paths = c.state.cgroup
    v2 = "unified" in paths and len(paths) == 1
    cpu_file = _cgroup_file(paths, "cpu" if v2 else "cpuacct", "cpu.stat" if v2 else "cpuacct.usage")

    def cpu_ns() -> int:
        text = cpu_file.read_text()
        return int(text.split("usage_usec")[1].split()[0]) * 1000 if v2 else int(text)

    cpu_before = cpu_ns()
    code, body = srv.api("GET", f"kernels/{kid}/container/stats")
    cpu_after = cpu_ns()
    assert code == 200
    st = body["stats"]
    mem_limit = int(_cgroup_file(paths, "memory", "memory.max" if v2 else "memory.limit_in_bytes").read_text())
    pids_limit = int(_cgroup_file(paths, "pids", "pids.max").read_text())
    pids_now = int(_cgroup_file(paths, "pids", "pids.current").read_text())
    mem_now = int(_cgroup_file(paths, "memory", "memory.current" if v2 else "memory.usage_in_bytes").read_text())
    assert st["memory"]["limit"] == mem_limit == 256 << 20
    assert st["pids"]["limit"] == pids_limit == 64
    assert abs(st["pids"]["current"] - pids_now) <= 2 and st["pids"]["current"] >= 2
    assert cpu_before <= st["cpu"]["usage_ns"] <= cpu_after
    assert 0.5 * mem_now <= st["memory"]["current"] <= 2 * mem_now
    assert st["cpu"]["limit"] == 1.0
    code, again = srv.api("GET", f"containers/{c.id}/stats")
    assert code == 200 and again["stats"]["cpu"]["percent"] is not None   # a second sample: a percentage
    code, listing = srv.api("GET", "containers")
    (row,) = [r for r in listing["containers"] if r["id"] == c.id]
    assert row["kernel_id"] == kid and row["status"] == "running"
    # a kernel's container is the kernel manager's: not stopped or removed behind its back
    code, err = srv.api("DELETE", f"containers/{c.id}", params={"force": "1"})
    assert code == 409 and err["error"]["code"] == "kernel_container"
    code, err = srv.api("POST", f"containers/{c.id}/stop", {})
    assert code == 409
    assert c.refresh_status() == "running"
    code, err = srv.api("GET", "kernels/00000000-0000-0000-0000-000000000000/container")
    assert code == 404 and err["error"]["code"] == "kernel_not_found"


def test_commit_kernel_container_then_start_a_kernel_from_it(srv, kernels, kernel_env):
    listener = EventListener(srv)
    made: list[str] = []
    try:
        kid = kernels()
        started = listener.wait_for(kid, "started")
        r = srv.execute(kid, "import os; os.makedirs('/opt/srvtest', exist_ok=True); "
                             "open('/opt/srvtest/marker', 'w').write('from kernel ' + os.environ['JUPYTER_CONTAIN_KERNEL_ID'])")
        assert r["reply"]["status"] == "ok", r
        code, d = srv.api("GET", f"kernels/{kid}/container/diff")
        assert code == 200
        assert {"kind": "A", "path": "/opt/srvtest/marker", "size": len("from kernel " + kid)} in d["changes"]
        assert any(s["path"] == "/opt" and s["added"] >= 2 for s in d["summary"])
        # the kernel's runtime state is no change a snapshot takes: listed as left out (issue #18)
        assert "/root/.ipython/profile_default/history.sqlite" in {ch["path"] for ch in d["left_out"]}
        assert not any("history.sqlite" in ch["path"] for ch in d["changes"])
        code, err = srv.api("POST", f"kernels/{kid}/container/commit", {"tag": "srvtest/bad:1", "exclude": ["/a/../b"]})
        assert code == 400 and err["error"]["code"] == "invalid_field", err
        code, body = srv.api("POST", f"kernels/{kid}/container/commit",
                             {"tag": "srvtest/snap:1", "message": "marker", "install_kernelspec": True,
                              "display_name": "Snapshot of a test kernel"})
        assert code == 202, body
        op = srv.wait_operation(body["operation"]["id"])
        assert op["state"] == "succeeded", op
        assert op["kind"] == "commit" and op["target"] == started["container_id"]
        image = op["result"]["image"]
        made.append(image["name"])
        assert image["name"] == "localhost/srvtest/snap:1"
        assert image["labels"]["io.jupyter-contain.kernel-id"] == kid
        assert "/root/.ipython/profile_default/history.sqlite" in {ch["path"] for ch in op["result"]["left_out"]}
        spec = op["result"]["kernelspec"]
        snap_event = listener.wait_for(kid, "snapshot")
        assert snap_event["image"] == image["name"] and snap_event["container_id"] == started["container_id"]
        code, specs = srv.api("GET", "kernelspecs")
        (listed,) = [s for s in specs["kernelspecs"] if s["name"] == spec]
        assert listed["image"] == image["name"] and listed["display_name"] == "Snapshot of a test kernel"

        kid2 = kernels(spec)
        r2 = srv.execute(kid2, "print(open('/opt/srvtest/marker').read())")
        assert r2["stdout"].strip() == f"from kernel {kid}", r2
        code, info2 = srv.api("GET", f"kernels/{kid2}/container")
        assert info2["image"]["name"] == image["name"]
        srv.shutdown_kernel(kid2)
        assert srv.api("DELETE", f"kernelspecs/{spec}")[0] == 204
        assert srv.api("DELETE", f"kernelspecs/{spec}")[0] == 404
    finally:
        listener.close()
        for name in made:
            srv.api("DELETE", f"images/{requests.utils.quote(name, safe='')}")


def test_death_reason_after_an_oom_kill(srv, kernels):
    listener = EventListener(srv)
    try:
        kid = kernels("srv-oom")
        srv.execute(kid, "x = 1")
        ws = srv.channels(kid)
        try:
            msg_id = uuid.uuid4().hex
            ws.send(json.dumps({
                "header": {"msg_id": msg_id, "username": "t", "session": uuid.uuid4().hex,
                           "msg_type": "execute_request", "version": "5.3", "date": ""},
                "parent_header": {}, "metadata": {}, "channel": "shell",
                "content": {"code": "b = bytearray(400 << 20)", "silent": False, "store_history": False,
                            "user_expressions": {}, "allow_stdin": False, "stop_on_error": False}}))
            event = listener.wait_for(kid, "oom_killed", timeout=90)
        finally:
            ws.close()
        assert event["memory_limit"] == 96 << 20
        assert event["reason"].startswith("killed: out of memory (limit 96 MiB")
        deadline = time.monotonic() + 60
        while True:
            code, info = srv.api("GET", f"kernels/{kid}/container")
            if code == 200 and info.get("death"):
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.2)
        death = info["death"]
        assert death["oom_killed"] is True and death["memory_limit"] == 96 << 20
        assert death["memory_peak"] and death["memory_peak"] >= 80 << 20
        assert death["reason"] == event["reason"]
        listener.wait_for(kid, "restarted", timeout=60)   # restarted in place, same container
        assert _execute_when_ready(srv, kid, "print('back')")["stdout"].strip() == "back"
        assert srv.api("GET", f"kernels/{kid}/container")[1]["container"]["id"] == event["container_id"]
    finally:
        listener.close()


def test_start_options_reach_the_container_and_outlive_a_restart(srv, kernels, kernel_env):
    """The start dialog's request: limits, network and an image tag chosen for one kernel, checked on the host."""
    store = kernel_env.store
    store.tag("localhost/debian:start-opts", store.resolve("localhost/debian:bookworm").descriptor)
    # reset: every restart makes a new container from the options, so the restart below proves they were kept
    make_spec(kernel_env, "srv-fresh", memory="256m", cpus="1", pids=64, reset=True)
    try:
        code, body = srv.api("POST", "kernels", {"name": "srv-fresh", "path": "",
                                                 "options": {"memory": "128m", "cpus": "0.5", "tag": "start-opts"}})
        assert code == 400 and body["error"]["code"] == "invalid_field", body   # path: a non-empty folder or none
        code, body = srv.api("POST", "kernels", {"name": "srv-fresh",
                                                 "options": {"memory": "128m", "cpus": "0.5", "tag": "start-opts"}})
        assert code == 201, (body, srv.log_text()[-2000:])
        kid = body["kernel"]["id"]
        assert body["options"] == {"memory": "128m", "cpus": "0.5", "tag": "start-opts"}
        code, info = srv.api("GET", f"kernels/{kid}/container")
        assert code == 200 and info["contained"], info
        assert info["container"]["limits"] == {"memory": 128 << 20, "cpus": 0.5, "pids": 64}
        assert info["image"]["name"] == "localhost/debian:start-opts"
        assert info["start_options"] == {"memory": "128m", "cpus": "0.5", "tag": "start-opts"}
        c = Runtime(store).get(info["container"]["id"])
        mem = _cgroup_file(c.state.cgroup, "memory", "memory.limit_in_bytes"
                           if "unified" not in c.state.cgroup else "memory.max")
        assert int(mem.read_text()) == 128 << 20     # the cgroup itself, not our record of it
        assert srv.execute(kid, "print(6 * 7)")["stdout"].strip() == "42"
        code, _ = srv.jupyter("POST", f"/api/kernels/{kid}/restart")
        assert code == 200
        code, again = srv.api("GET", f"kernels/{kid}/container")
        assert again["container"]["id"] != info["container"]["id"]          # a new container (reset) ...
        assert again["container"]["limits"]["memory"] == 128 << 20          # ... with the chosen options
        assert again["start_options"] == info["start_options"]
        assert _execute_when_ready(srv, kid, "print('up')")["stdout"].strip() == "up"
    finally:
        if "kid" in locals():
            srv.shutdown_kernel(kid)
        store.untag("localhost/debian:start-opts")


def test_start_options_bad_requests_start_nothing(srv, kernel_env):
    make_spec(kernel_env, "srv-plain")
    before = srv.jupyter("GET", "/api/kernels")[1]
    containers_before = {c.id for c in Runtime(kernel_env.store).containers()}
    cases = [
        ({"name": "srv-plain", "options": {"memory": "2g"}}, 400, "invalid_field", "maximum"),   # server max 1g
        ({"name": "srv-plain", "options": {"memory": "none"}}, 400, "invalid_field", "unlimited"),
        ({"name": "srv-plain", "options": {"network": "host"}}, 400, "invalid_field", "not allowed"),
        ({"name": "srv-plain", "options": {"network": "wifi"}}, 400, "invalid_field", "unknown network"),
        ({"name": "srv-plain", "options": {"cpus": "-1"}}, 400, "invalid_field", "CPU count"),
        ({"name": "srv-plain", "options": {"pids": 5}}, 400, "invalid_field", "unknown start option"),
        ({"name": "srv-plain", "options": {"tag": "../etc"}}, 400, "invalid_field", "invalid image tag"),
        ({"name": "srv-plain", "options": {"tag": "never-made"}}, 400, "image_not_found", "not in this server"),
        ({"name": "srv-plain", "options": ["128m"]}, 400, "invalid_field", "JSON object"),
        ({"name": "srv-plain", "options": {"memory": True}}, 400, "invalid_field", "string or a number"),
        ({"name": "no-such-spec"}, 404, "kernelspec_not_found", "no contained kernelspec"),
        ({"name": "srv-plain", "image": "evil"}, 400, None, "image"),
        ({"options": {}}, 400, "missing_field", "name"),
    ]
    for body, status, code, words in cases:
        got, err = srv.api("POST", "kernels", body)
        assert got == status, (body, got, err)
        assert code is None or err["error"]["code"] == code, (body, err)
        assert words in err["error"]["message"], (body, err)
    assert srv.jupyter("GET", "/api/kernels")[1] == before     # nothing started, nothing half-made
    assert {c.id for c in Runtime(kernel_env.store).containers()} == containers_before


def _execute_when_ready(srv: ApiServer, kid: str, code: str, attempts: int = 4) -> dict[str, Any]:
    """Execute right after a restart: a request sent while the new kernel binds its sockets may be lost."""
    for i in range(attempts):
        try:
            return srv.execute(kid, code, timeout=30)
        except AssertionError:
            if i == attempts - 1:
                raise
    raise AssertionError("unreachable")


def test_kernel_reset_request_and_its_event(srv, kernels):
    listener = EventListener(srv)
    try:
        kid = kernels()
        srv.execute(kid, "open('/root/scratch', 'w').write('x')")
        code, body = srv.api("POST", f"kernels/{kid}/container/reset", {})
        assert code == 202, body
        listener.wait_for(kid, "reset")
        code, _ = srv.jupyter("POST", f"/api/kernels/{kid}/restart")
        assert code == 200
        r = _execute_when_ready(srv, kid, "import os; print(os.path.exists('/root/scratch'))")
        assert r["stdout"].strip() == "False", r
    finally:
        listener.close()


def test_kernel_cannot_reach_the_servers_api(srv, kernels):
    kid = kernels()
    r = srv.execute(kid, f"""
import os, socket
try:
    socket.create_connection(("127.0.0.1", {srv.port}), timeout=3)
    print("REACHED")
except OSError as e:
    print("refused", type(e).__name__)
seen = repr(dict(os.environ)) + open('/proc/self/environ', 'rb').read().decode('latin-1')
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            seen += open(f'/proc/{{pid}}/environ', 'rb').read().decode('latin-1') + open(f'/proc/{{pid}}/cmdline', 'rb').read().decode('latin-1')
        except OSError:
            pass
print("token" if {srv.token!r} in seen else "no-token")
print("url" if any("{srv.port}" in v for v in os.environ.values()) else "no-url")
""")
    assert r["stdout"].split() == ["refused", "ConnectionRefusedError", "no-token", "no-url"], r


def test_symlinks_a_kernel_plants_in_the_notebook_folder_lead_the_server_nowhere(srv, kernel_runtime, tmp_path):
    host = tmp_path / "host-only"
    host.mkdir()
    (host / "secret.txt").write_text("host secret\n")
    # started for a notebook in the server's root, as JupyterLab does: that folder is the kernel's
    code, kernel = srv.jupyter("POST", "/api/kernels", {"name": KERNEL_NAME, "path": ""})
    assert code == 201, kernel
    kid = kernel["id"]
    r = srv.execute(kid, f"""
import os
os.symlink({str(host / 'secret.txt')!r}, 'notes.txt')
os.symlink({str(host)!r}, 'data')
open('mine.txt', 'w').write('from the kernel')
print(os.getcwd(), sorted(os.listdir('.')))
""")
    assert "'notes.txt'" in r["stdout"] and r["stdout"].split()[0] == str(srv.root), (r, srv.root)

    def status(method: str, path: str, body: Any = None) -> int:
        resp = srv.http(method, srv.url + "/api/contents/" + path, json=body)
        return resp.status_code

    try:
        for path in ("notes.txt", "data/secret.txt"):
            assert status("GET", path) == 403, path
        assert status("PUT", "notes.txt", {"type": "file", "format": "text", "content": "pwned"}) == 403
        assert status("PUT", "data/new.txt", {"type": "file", "format": "text", "content": "pwned"}) in (403, 404)
        assert (host / "secret.txt").read_text() == "host secret\n" and sorted(os.listdir(host)) == ["secret.txt"]
        # the folder still lists, without the planted entries; the kernel's own file reads as usual
        code, body = srv.jupyter("GET", "/api/contents/")
        names = {e["name"] for e in body["content"]}
        assert code == 200 and "mine.txt" in names and not names & {"notes.txt", "data"}, body
        code, body = srv.jupyter("GET", "/api/contents/mine.txt")
        assert code == 200 and body["content"] == "from the kernel"
    finally:
        srv.shutdown_kernel(kid)
        for name in ("notes.txt", "data", "mine.txt"):
            (srv.root / name).unlink(missing_ok=True)


def _netns_holder() -> subprocess.Popen:
    """A process in a network namespace of its own (loopback up), ended by PID."""
    proc = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up && exec sleep infinity"])
    deadline = time.monotonic() + 10
    me = os.readlink("/proc/self/ns/net")
    while True:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{proc.pid}/ns/net") != me and "sleep" in Path(
                    f"/proc/{proc.pid}/cmdline").read_text():
                return proc
        assert time.monotonic() < deadline and proc.poll() is None, "unshare did not make a namespace"
        time.sleep(0.01)


@pytest.mark.skipif(not any(Path(d, "libnftables.so.1").exists() for d in
                            ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")),
                    reason="libnftables is not installed (the bridge network needs it)")
def test_bridge_kernel_cannot_reach_the_server_on_its_loopback(tmp_path, kernel_env, kernel_runtime):
    """The server in a namespace the test made, as on a host: its bridge, and the API on its 127.0.0.1."""
    make_spec(kernel_env, "srv-bridge", network="bridge")
    holder = _netns_holder()
    ns = f"/proc/{holder.pid}/ns/net"
    listener = None
    s = None
    try:
        from jupyter_contain.runtime.containers import network

        s = ApiServer(tmp_path / "srv", kernel_env, store=kernel_env.store, netns=ns,
                      env={"JUPYTER_CONTAIN_NET_DIR": str(tmp_path / "net")})
        # a control: something listening on every address of the server's namespace is reachable
        listener = network.run_in_netns(ns, lambda: socket.create_server(("0.0.0.0", 0)))
        ctl_port = listener.getsockname()[1]
        accepted: list[str] = []

        def accept() -> None:
            listener.settimeout(60)
            with contextlib.suppress(OSError):
                conn, addr = listener.accept()
                accepted.append(addr[0])
                conn.close()

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        kid = s.start_kernel("srv-bridge")
        try:
            r = s.execute(kid, f"""
import socket
gw = None
for line in open('/proc/net/route').read().splitlines()[1:]:
    f = line.split()
    if f[1] == '00000000':
        gw = socket.inet_ntoa(bytes.fromhex(f[2])[::-1])
print("gateway", gw)
for host, port in (("127.0.0.1", {s.port}), (gw, {s.port}), (gw, {ctl_port})):
    try:
        socket.create_connection((host, port), timeout=5).close()
        print("reached", host, port)
    except OSError as e:
        print("refused", host, port, type(e).__name__)
""")
        finally:
            s.shutdown_kernel(kid)
        t.join(10)
        lines = r["stdout"].splitlines()
        assert lines[0].startswith("gateway 10."), r
        gw = lines[0].split()[1]
        assert lines[1:] == [f"refused 127.0.0.1 {s.port} ConnectionRefusedError",
                             f"refused {gw} {s.port} ConnectionRefusedError",
                             f"reached {gw} {ctl_port}"], r
        assert len(accepted) == 1
    finally:
        if listener is not None:
            listener.close()
        if s is not None:
            s.stop()
        holder.kill()
        holder.wait()


# --- the server's own life -------------------------------------------------------------------


def test_stopping_the_server_leaves_no_containers(tmp_path, kernel_env, kernel_runtime):
    s = ApiServer(tmp_path, kernel_env, store=kernel_env.store)
    try:
        kid = s.start_kernel()
        assert s.execute(kid, "print(1)")["stdout"].strip() == "1"
        (c,) = [c for c in kernel_runtime.containers()
                if c.state.labels.get("jupyter-contain.kernel-id") == kid]
    finally:
        s.stop()
    assert s.proc.returncode == 0, s.log_text()[-2000:]
    assert not c.dir.exists()
    assert "jupyter-contain: shutting down 1 contained kernel(s)" in s.log_text()
    # its cgroups too (in every hierarchy)
    name = f"{kernel_runtime.store_tag}-{c.id}"
    assert not [p for p in Path("/sys/fs/cgroup").glob(f"*/**/{name}")], name


# --- the pieces without a server (plain functions and threads) ---------------------------------------


def test_path_inside_the_allowed_root(tmp_path):
    from jupyter_contain.server.validate import BadRequest, path_inside

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.tar").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"s")
    (root / "link").symlink_to(tmp_path / "secret")
    (root / "dirlink").symlink_to(tmp_path)
    assert path_inside(root, "sub/a.tar", must_exist=True) == (root / "sub" / "a.tar").resolve()
    assert path_inside(root, str(root / "sub" / "new.tar"), must_exist=False) == (root / "sub" / "new.tar").resolve()
    for value, must_exist, code in [
        ("../secret", True, "path_outside_root"),
        (str(tmp_path / "secret"), True, "path_outside_root"),
        ("link", True, "path_outside_root"),            # a symlink inside that points out
        ("dirlink/secret", True, "path_outside_root"),
        ("dirlink/new.tar", False, "path_outside_root"),
        ("link", False, "invalid_path"),                # never write through a symlink
        ("sub/missing.tar", True, "path_not_found"),
        ("nodir/new.tar", False, "path_not_found"),
        ("sub/..", False, "invalid_path"),
        ("a\x00b", True, "invalid_path"),
    ]:
        with pytest.raises(BadRequest) as exc:
            path_inside(root, value, must_exist=must_exist)
        assert exc.value.code == code, (value, exc.value)


def test_a_cancelled_operation_stops_at_its_next_checkpoint_and_a_late_cancel_lets_it_finish():
    import asyncio

    from jupyter_contain.runtime.images import progress as p
    from jupyter_contain.server.operations import Operations
    from jupyter_contain.server.service import error_json, registry_progress

    def ev(kind: str, status: str, done: int) -> p.ProgressEvent:
        return p.ProgressEvent(operation="pull", reference="r", kind=kind, layer="sha256:" + "a" * 64,
                               layer_index=0, layer_count=1, status=status, layer_bytes=done, layer_total=10,
                               bytes_done=done, bytes_total=10, rate=1.0, eta=None, elapsed=1.0)

    async def main() -> list[dict]:
        ops = Operations(max_workers=2, error_json=error_json)
        import threading
        go = threading.Event()

        def early(op):   # cancelled while downloading: Cancelled at the next running event
            cb = registry_progress(op)
            cb(ev(p.LAYER, p.DOWNLOADING, 5))
            go.wait(10)
            cb(ev(p.LAYER, p.DOWNLOADING, 6))
            raise AssertionError("not reached")

        def late(op):    # cancelled while committing: done events are no cancellation points
            cb = registry_progress(op)
            go.wait(10)
            cb(ev(p.LAYER, p.DONE, 10))
            cb(ev(p.FINISHED, p.DONE, 10))
            return {"image": "ok"}

        a, b = ops.start("pull", "a", early), ops.start("pull", "b", late)
        await asyncio.sleep(0.2)
        a.cancel()
        b.cancel()
        go.set()
        seen = a.version
        while a.state == "running" or b.state == "running":
            await a.changed(seen, 1)
            seen = a.version
            await asyncio.sleep(0.01)
        await ops.shutdown()
        return [a.to_json(), b.to_json()]

    a, b = asyncio.run(main())
    assert a["state"] == "cancelled" and a["error"]["code"] == "cancelled"
    # the event that found the cancel is still shown, then nothing more
    assert a["progress"]["items"][0]["done"] == 6 and a["progress"]["items"][0]["status"] == "downloading"
    assert b["state"] == "succeeded" and b["result"] == {"image": "ok"} and b["progress"]["stage"] == "done"


def test_errors_map_to_status_and_code():
    from jupyter_contain import errors
    from jupyter_contain.server.service import error_status

    assert error_status(errors.ImageInUse("x"))[0] == 409
    assert error_status(errors.ImageInUse("x"))[1]["code"] == "image_in_use"
    assert error_status(errors.ImageNotFound("x")) == (404, {"code": "image_not_found", "message": "x"})
    assert error_status(errors.SpawnError("pivot-root", 13, "/x"))[1]["step"] == "pivot-root"
    assert error_status(ValueError("boom"))[0] == 500
