"""Registry client under faults: corruption, cut connections, 429, redirects, schema1,
a registry that is down, a full disk, two processes pulling at once.

Faults are injected by a small HTTP proxy on loopback in front of the real
registry (it forwards each request and can answer, cut, strip a header or
redirect instead), or by a tiny fake registry for documents a real one would not
serve (schema1, malformed JSON).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from registry_fixture import start_registry
from test_registry import (  # noqa: F401 - docker_config is a fixture
    build_layout,
    docker_config,
    fast_config,
    make_tar,
    push_layout,
    simple_image,
    store_is_empty,
)

from jupyter_contain.errors import DigestMismatch, ManifestError, RegistryError, StoreError
from jupyter_contain.runtime.images import registry
from jupyter_contain.runtime.images.store import Store

pytestmark = pytest.mark.needs_tools

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    """HTTP/1.1 forwarder to ``upstream`` on 127.0.0.1; ``plan(req)`` may change what happens.

    ``plan`` gets a dict (method, path, headers, n = how many requests of this
    method+path came before) and returns None (forward) or a dict with any of:
    ``status``/``headers``/``body`` (answer instead), ``cut_after`` (forward, but
    close the connection after that many body bytes), ``drop_headers`` (names not
    to forward), ``path`` and ``add_headers`` (forward elsewhere / with these).
    """

    def __init__(self, upstream: str, plan: Callable[[dict], dict | None] | None = None) -> None:
        self.upstream = upstream
        self.plan = plan or (lambda req: None)
        self.log: list[dict] = []
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                key = (self.command, self.path.split("?")[0])
                with outer._lock:
                    n = outer._counts.get(key, 0)
                    outer._counts[key] = n + 1
                req = {"method": self.command, "path": self.path, "headers": dict(self.headers), "n": n,
                       "time": time.monotonic()}
                outer.log.append(req)
                action = outer.plan(req) or {}
                if "status" in action:
                    data = action.get("body", b"")
                    self.send_response(action["status"])
                    for k, v in action.get("headers", {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in _HOP and k.lower() != "host"
                           and k.lower() not in {h.lower() for h in action.get("drop_headers", ())}}
                headers.update(action.get("add_headers", {}))
                conn = http.client.HTTPConnection(outer.upstream, timeout=30)
                try:
                    conn.request(self.command, action.get("path", self.path), body=body or None, headers=headers)
                    resp = conn.getresponse()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP:
                            self.send_header(k, v)
                    self.end_headers()
                    cut = action.get("cut_after")
                    sent = 0
                    while self.command != "HEAD":
                        chunk = resp.read(65536)
                        if not chunk:
                            break
                        if cut is not None and sent + len(chunk) >= cut:
                            self.wfile.write(chunk[: cut - sent])
                            self.wfile.flush()
                            self.close_connection = True
                            with contextlib.suppress(OSError):
                                self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)
                finally:
                    conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


def _blob_get(req: dict, digest: str) -> bool:
    return req["method"] == "GET" and req["path"].endswith(f"/blobs/{digest}")


def _big_image(tmp_path: Path) -> tuple[Path, dict]:
    """One gzip layer of ~2 MB that does not compress (so cuts land mid-layer)."""
    data = os.urandom(2 << 20)
    layout = tmp_path / "big"
    info = build_layout(layout, "v1", [{"arch": "amd64", "layers": [(make_tar({"data.bin": data}), "gzip")]}])
    return layout, info


def _layer_digest(tmp_path: Path, layout: Path, info: dict) -> str:
    man = json.loads((layout / "blobs" / "sha256" / info["top"][7:]).read_bytes())
    return man["layers"][0]["digest"]


# --- corruption ------------------------------------------------------------------------


def test_flipped_byte_in_layer_rejected_store_unchanged(tmp_path, store):
    layout, info = simple_image(tmp_path, compressions=("gzip", "gzip"))
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1")
        digest = json.loads((layout / "blobs/sha256" / info["top"][7:]).read_bytes())["layers"][1]["digest"]
        data = reg.storage / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
        with pytest.raises(DigestMismatch, match=digest):
            registry.pull(store, f"{reg.address}/demo/app:v1", config=fast_config())
        assert store_is_empty(store)


def test_flipped_byte_in_manifest_rejected(tmp_path, store):
    layout, info = simple_image(tmp_path, compressions=("gzip",))
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1")
        top = info["top"][7:]
        data = reg.storage / "docker/registry/v2/blobs/sha256" / top[:2] / top / "data"
        data.write_bytes(data.read_bytes().replace(b'"size":', b'"size" :', 1))
        with pytest.raises(DigestMismatch):
            registry.pull(store, f"{reg.address}/demo/app:v1", config=fast_config())
        with pytest.raises(DigestMismatch):
            registry.pull(store, f"{reg.address}/demo/app@{info['top']}", config=fast_config())
        assert store_is_empty(store)


# --- cut connections, Range resume, 429 ------------------------------------------------------


def test_resume_with_range_after_cut(tmp_path, store):
    layout, info = _big_image(tmp_path)
    digest = _layer_digest(tmp_path, layout, info)
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/big:v1")

        def plan(req):
            if _blob_get(req, digest) and req["n"] == 0:
                return {"cut_after": 700_000}
            return None

        with FaultProxy(reg.address, plan) as proxy:
            rec = registry.pull(store, f"{proxy.address}/demo/big:v1", config=fast_config())
        gets = [r for r in proxy.log if _blob_get(r, digest)]
        assert len(gets) == 2
        assert "Range" not in gets[0]["headers"]
        assert gets[1]["headers"]["Range"].startswith("bytes=") and gets[1]["headers"]["Range"] != "bytes=0-"
        assert int(gets[1]["headers"]["Range"][6:-1]) >= 600_000
        assert (store.layer_dirs(rec)[0] / "data.bin").stat().st_size == 2 << 20
        assert not any(store.tmp_dir.iterdir())


def test_starts_over_when_range_ignored(tmp_path, store):
    layout, info = _big_image(tmp_path)
    digest = _layer_digest(tmp_path, layout, info)
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/big:v1")

        def plan(req):
            if _blob_get(req, digest):
                return {"cut_after": 500_000} if req["n"] == 0 else {"drop_headers": ["Range"]}
            return None

        with FaultProxy(reg.address, plan) as proxy:
            rec = registry.pull(store, f"{proxy.address}/demo/big:v1", config=fast_config())
        assert len([r for r in proxy.log if _blob_get(r, digest)]) == 2
        assert rec.digest == info["top"]
        assert (store.layer_dirs(rec)[0] / "data.bin").stat().st_size == 2 << 20


def test_connection_cut_every_time_fails_cleanly(tmp_path, store):
    layout, info = _big_image(tmp_path)
    digest = _layer_digest(tmp_path, layout, info)
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/big:v1")
        with FaultProxy(reg.address, lambda req: {"cut_after": 100_000} if _blob_get(req, digest) else None) as p:
            with pytest.raises(RegistryError, match="connection"):
                registry.pull(store, f"{p.address}/demo/big:v1", config=fast_config(retries=3))
        assert store_is_empty(store)


def test_429_retry_after_honoured(tmp_path, store):
    layout, _ = simple_image(tmp_path, compressions=("gzip",))
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1")

        def plan(req):
            if "/manifests/" in req["path"] and req["n"] == 0:
                return {"status": 429, "headers": {"Retry-After": "1"}, "body": b'{"errors":[{"code":"TOOMANYREQUESTS"}]}'}
            return None

        with FaultProxy(reg.address, plan) as proxy:
            registry.pull(store, f"{proxy.address}/demo/app:v1", config=fast_config())
        manifests = [r for r in proxy.log if "/manifests/" in r["path"]]
        assert len(manifests) == 2
        assert manifests[1]["time"] - manifests[0]["time"] >= 0.95


def test_redirect_to_blob_storage_without_authorization(tmp_path, store, docker_config):
    layout, info = simple_image(tmp_path, compressions=("gzip",))
    digest = _layer_digest(tmp_path, layout, info)
    with start_registry(tmp_path, auth="basic") as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1", reg.credentials)
        import base64

        basic = "Basic " + base64.b64encode(("%s:%s" % reg.credentials).encode()).decode()
        # "blob storage": a presigned-URL-like endpoint that needs no registry credentials
        with FaultProxy(reg.address, lambda req: {"path": f"/v2/demo/app/blobs/{digest}",
                                                  "add_headers": {"Authorization": basic}}) as storage:
            def plan(req):
                if _blob_get(req, digest):
                    return {"status": 307, "headers": {"Location": f"http://{storage.address}/presigned/{digest[7:]}?sig=x"}}
                return None

            with FaultProxy(reg.address, plan) as proxy:
                registry.login(proxy.address, *reg.credentials, config=fast_config(docker_config))
                registry.pull(store, f"{proxy.address}/demo/app:v1", config=fast_config(docker_config))
        assert any(r["headers"].get("Authorization", "").startswith("Basic ") for r in proxy.log)
        assert storage.log and all("Authorization" not in r["headers"] for r in storage.log)


# --- fake registries: schema1, malformed ------------------------------------------------


@contextlib.contextmanager
def fake_registry(manifest: bytes, content_type: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = b"{}" if self.path == "/v2/" else manifest
            self.send_response(200 if self.path == "/v2/" or "/manifests/" in self.path else 404)
            self.send_header("Content-Type", "application/json" if self.path == "/v2/" else content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        t.join(10)


SCHEMA1 = json.dumps({"schemaVersion": 1, "name": "old/app", "tag": "latest", "architecture": "amd64",
                      "fsLayers": [{"blobSum": "sha256:" + "a" * 64}], "history": [{"v1Compatibility": "{}"}],
                      "signatures": []}).encode()


@pytest.mark.parametrize("ctype", ["application/vnd.docker.distribution.manifest.v1+prettyjws",
                                   "application/json"])
def test_schema1_rejected(store, ctype):
    with fake_registry(SCHEMA1, ctype) as addr:
        with pytest.raises(ManifestError, match="schema1"):
            registry.pull(store, f"{addr}/old/app:latest", config=fast_config())
    assert store_is_empty(store)


@pytest.mark.parametrize("body", [b"{not json", b'{"schemaVersion":2,"mediaType":'
                                  b'"application/vnd.oci.image.manifest.v1+json","layers":"x"}'])
def test_malformed_manifest_rejected(store, body):
    with fake_registry(body, "application/vnd.oci.image.manifest.v1+json") as addr:
        with pytest.raises(ManifestError):
            registry.pull(store, f"{addr}/bad/app:latest", config=fast_config())
    assert store_is_empty(store)


# --- registry down, disk full, two processes --------------------------------------------------


def test_registry_down(store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        start = time.monotonic()
        with pytest.raises(RegistryError, match="cannot reach registry .*connection refused"):
            registry.pull(store, f"127.0.0.1:{port}/x/y:1", config=fast_config(retries=3))
    assert time.monotonic() - start < 10
    assert store_is_empty(store)


def test_disk_full_is_a_clear_error(tmp_path):
    layout, _ = _big_image(tmp_path)
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    try:
        with start_registry(tmp_path) as reg:
            push_layout(layout, "v1", f"{reg.address}/demo/big:v1")
            store = Store(root)
            with pytest.raises(StoreError, match="no space left on device"):
                registry.pull(store, f"{reg.address}/demo/big:v1", config=fast_config())
            assert not store.images() and not any(store.tmp_dir.iterdir())
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_two_processes_pull_at_once(tmp_path):
    layout, info = simple_image(tmp_path, compressions=("gzip", "gzip", "zstd"))
    root = tmp_path / "shared-store"
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1")
        code = ("import sys; from jupyter_contain.runtime.images import registry; "
                "from jupyter_contain.runtime.images.store import Store; "
                "r = registry.pull(Store(sys.argv[1]), sys.argv[2]); print(r.digest)")
        procs = [subprocess.Popen([sys.executable, "-c", code, str(root), f"{reg.address}/demo/app:v1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert [o[0].strip() for o in outs] == [info["top"]] * 2
        store = Store(root)
        assert [r.digest for r in store.images()] == [info["top"]]
        assert len(list(store.layers_dir.iterdir())) == 3
        assert len(list(store.blobs_dir.iterdir())) == 5  # 3 layers, config, manifest
        assert not any(store.tmp_dir.iterdir())


# --- mirrors ------------------------------------------------------------------------------


def test_mirror_used_first_and_dead_mirror_skipped(tmp_path, store):
    layout, info = simple_image(tmp_path, compressions=("gzip",))
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1")
        with socket.socket() as dead, FaultProxy(reg.address) as mirror:
            dead.bind(("127.0.0.1", 0))
            cfg = fast_config(retries=2, mirrors={
                reg.address: (f"127.0.0.1:{dead.getsockname()[1]}", f"http://{mirror.address}")})
            rec = registry.pull(store, f"{reg.address}/demo/app:v1", config=cfg)
        assert rec.digest == info["top"] and rec.name == f"{reg.address}/demo/app:v1"
        assert any("/manifests/v1" in r["path"] for r in mirror.log)
        assert any("/blobs/" in r["path"] for r in mirror.log)
