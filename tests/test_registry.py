"""Registry client against a real local registry (Debian's docker-registry on 127.0.0.1).

Images are built here as OCI layouts (small tars, gzip / zstd / plain layers, a
multi-platform index with an attestation entry) and pushed with skopeo; what we
push is read back with skopeo. Fault injection (cuts, 429, corruption, redirects)
lives in test_registry_faults.py, which reuses the helpers below.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard
from registry_fixture import inspect_with_skopeo, start_registry

from jupyter_contain.cli import main as cli_main
from jupyter_contain.errors import AuthenticationError, ImageNotFound, ManifestError
from jupyter_contain.runtime.images import archive, auth, registry
from jupyter_contain.runtime.images.progress import EXISTS, ProgressEvent
from jupyter_contain.runtime.images.store import Store
from jupyter_contain.runtime.spec import Platform

pytestmark = pytest.mark.needs_tools

# --- building test images --------------------------------------------------------------


def make_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar with these regular files (parent dirs added)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1700000000
                    tar.addfile(ti)
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(files[name]), 0o644, 1700000000
            tar.addfile(ti, io.BytesIO(files[name]))
    return buf.getvalue()


_LAYER_TYPES = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
                "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
                "tar": "application/vnd.oci.image.layer.v1.tar"}


def _compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _put(layout: Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def build_layout(layout: Path, tag: str, images: list[dict], *, index: bool | None = None) -> dict:
    """Write an OCI layout with ``images`` (each {"arch": "amd64", "layers": [(tar, compression)]}).

    More than one image (or ``index=True``) makes an index with an attestation
    entry beside them. Returns {"top": digest of what ``tag`` names, "manifests": {arch: digest},
    "diff_ids": {arch: [...]}}.
    """
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    out: dict = {"manifests": {}, "diff_ids": {}}
    entries = []
    for img in images:
        arch = img.get("arch", "amd64")
        layers, diff_ids = [], []
        for tar, how in img["layers"]:
            diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
            layers.append({"mediaType": _LAYER_TYPES[how], **_put(layout, _compress(tar, how))})
        cfg = {"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
               "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        cfg_desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                    **_put(layout, json.dumps(cfg).encode())}
        man = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
               "config": cfg_desc, "layers": layers}
        m = _put(layout, json.dumps(man).encode())
        out["manifests"][arch] = m["digest"]
        out["diff_ids"][arch] = diff_ids
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", **m,
                        "platform": {"os": "linux", "architecture": arch}})
    if index or (index is None and len(images) > 1):
        # a buildx-style attestation entry: must be skipped by platform selection
        att_layer = {"mediaType": "application/vnd.in-toto+json", **_put(layout, b'{"predicate":{}}')}
        att_cfg = {"mediaType": "application/vnd.oci.image.config.v1+json", **_put(layout, b"{}")}
        att = _put(layout, json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                       "config": att_cfg, "layers": [att_layer]}).encode())
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", **att,
                        "platform": {"os": "unknown", "architecture": "unknown"},
                        "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                        "vnd.docker.reference.digest": entries[0]["digest"]}})
        idx = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
        top = {"mediaType": "application/vnd.oci.image.index.v1+json", **_put(layout, json.dumps(idx).encode())}
    else:
        top = {k: v for k, v in entries[0].items() if k != "platform"}
    top = {**top, "annotations": {"org.opencontainers.image.ref.name": tag}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    out["top"] = top["digest"]
    return out


def skopeo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """skopeo with no host policy or credentials involved."""
    with tempfile.TemporaryDirectory(prefix="skopeo-auth-") as d:
        env = dict(os.environ, REGISTRY_AUTH_FILE=os.path.join(d, "auth.json"))
        proc = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def push_layout(layout: Path, tag: str, dest: str, creds: tuple[str, str] | None = None) -> None:
    c = ["--dest-creds", f"{creds[0]}:{creds[1]}"] if creds else ["--dest-no-creds"]
    skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", *c, f"oci:{layout}:{tag}",
           f"docker://{dest}")


def simple_image(tmp: Path, *, compressions=("gzip", "gzip"), name="img", seed=b"") -> tuple[Path, dict]:
    layers = []
    for i, how in enumerate(compressions):
        files = {f"layer{i}/hello.txt": b"hello %d %s\n" % (i, seed),
                 f"layer{i}/big.bin": hashlib.sha256(seed + bytes([i])).digest() * 20000}
        layers.append((make_tar(files), how))
    layout = tmp / f"layout-{name}"
    info = build_layout(layout, "v1", [{"arch": Platform.host().architecture, "layers": layers}])
    return layout, info


@pytest.fixture
def docker_config(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "docker-config"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    return d


def fast_config(docker_config: Path | None = None, **kw) -> registry.RegistryConfig:
    kw.setdefault("backoff", 0.05)
    return registry.RegistryConfig(docker_config=docker_config, **kw)


def store_is_empty(store: Store) -> bool:
    return (not store.images() and not any(store.layers_dir.iterdir()) and not any(store.tmp_dir.iterdir())
            and not any(store.blobs_dir.iterdir()))


# --- pull ----------------------------------------------------------------------------


def test_pull_anonymous_gzip_zstd_plain(tmp_path, store, docker_config):
    layout, info = simple_image(tmp_path, compressions=("gzip", "zstd", "tar"))
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1")
        events: list[ProgressEvent] = []
        rec = registry.pull(store, f"{reg.address}/demo/app:v1", progress=events.append, config=fast_config())
        assert rec.name == f"{reg.address}/demo/app:v1"
        assert rec.digest == info["top"]
        assert store.resolve(f"{reg.address}/demo/app:v1").digest == rec.digest
        dirs = store.layer_dirs(rec)
        assert all(d.is_dir() for d in dirs)
        assert (dirs[0] / "layer2" / "hello.txt").read_bytes() == b"hello 2 \n"
        assert (dirs[1] / "layer1" / "hello.txt").read_bytes() == b"hello 1 \n"
        assert events[-1].kind == "finished" and events[-1].bytes_done == events[-1].bytes_total
        assert not any(store.tmp_dir.iterdir())
        # a second pull moves no layer: everything is in the store already
        again: list[ProgressEvent] = []
        registry.pull(store, f"{reg.address}/demo/app:v1", progress=again.append, config=fast_config())
        assert {e.layer for e in again if e.status == EXISTS} >= {d.digest for d in rec.manifest.layers}
        assert not [e for e in again if e.status == "downloading"]


def test_pull_unknown_image_and_tag(tmp_path, store):
    layout, _ = simple_image(tmp_path, compressions=("gzip",))
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1")
        with pytest.raises(ImageNotFound, match="not found"):
            registry.pull(store, f"{reg.address}/demo/nothing:v1", config=fast_config())
        with pytest.raises(ImageNotFound):
            registry.pull(store, f"{reg.address}/demo/app:v2", config=fast_config())
        assert store_is_empty(store)


def test_pull_by_digest(tmp_path, store):
    layout, info = simple_image(tmp_path, compressions=("gzip",))
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1")
        rec = registry.pull(store, f"{reg.address}/demo/app@{info['top']}", config=fast_config())
        assert rec.digest == info["top"]
        assert store.resolve(f"{reg.address}/demo/app@{info['top']}").digest == info["top"]
        bad = "sha256:" + "0" * 64
        with pytest.raises(ImageNotFound):
            registry.pull(store, f"{reg.address}/demo/app@{bad}", config=fast_config())


def test_platform_selection_from_index(tmp_path, store):
    base = make_tar({"etc/os": b"base\n"})
    images = [{"arch": "amd64", "layers": [(base, "gzip"), (make_tar({"arch": b"amd64\n"}), "gzip")]},
              {"arch": "arm64", "layers": [(base, "gzip"), (make_tar({"arch": b"arm64\n"}), "zstd")]}]
    layout = tmp_path / "multi"
    info = build_layout(layout, "v1", images)
    with start_registry(tmp_path) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/multi:v1")
        ref = f"{reg.address}/demo/multi:v1"
        raw = inspect_with_skopeo(ref, raw=True)
        assert raw["mediaType"].endswith("index.v1+json") and len(raw["manifests"]) == 3
        arm = registry.pull(store, ref, platform=Platform.parse("linux/arm64"), config=fast_config())
        assert arm.digest == info["manifests"]["arm64"]
        assert arm.config.platform.architecture == "arm64"
        assert (store.layer_dirs(arm)[0] / "arch").read_bytes() == b"arm64\n"
        host = registry.pull(store, ref, config=fast_config())
        assert host.digest == info["manifests"][Platform.host().architecture]
        with pytest.raises(ManifestError, match="offered: linux/amd64, linux/arm64"):
            registry.pull(store, ref, platform=Platform.parse("linux/s390x"), config=fast_config())


def test_basic_auth(tmp_path, store, docker_config):
    layout, _ = simple_image(tmp_path, compressions=("gzip",))
    with start_registry(tmp_path, auth="basic") as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1", reg.credentials)
        ref = f"{reg.address}/demo/app:v1"
        cfg = fast_config(docker_config)
        with pytest.raises(AuthenticationError, match="requires authentication"):
            registry.pull(store, ref, config=cfg)
        user, pw = reg.credentials
        with pytest.raises(AuthenticationError, match="refused"):
            registry.login(reg.address, user, pw + "x", config=cfg)
        assert not (docker_config / "config.json").exists()
        registry.login(reg.address, user, pw, config=cfg)
        rec = registry.pull(store, ref, config=cfg)
        assert rec.name == ref
        # wrong credentials in the file: a clear refusal
        auth.store_credentials(reg.address, auth.Credentials(user, "nope"), directory=docker_config)
        with pytest.raises(AuthenticationError, match="refused"):
            registry.pull(Store(tmp_path / "other"), ref, config=cfg)


def test_token_auth_with_credentials(tmp_path, store, docker_config):
    layout, _ = simple_image(tmp_path, compressions=("gzip", "gzip", "zstd"))
    with start_registry(tmp_path, auth="token") as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1", reg.credentials)
        ref = f"{reg.address}/demo/app:v1"
        cfg = fast_config(docker_config)
        with pytest.raises(AuthenticationError):
            registry.pull(store, ref, config=cfg)  # anonymous gets no pull access here
        registry.login(reg.address, *reg.credentials, config=cfg)
        del reg.token_requests[:]
        rec = registry.pull(store, ref, config=cfg)
        assert len(rec.manifest.layers) == 3
        pulls = [r for r in reg.token_requests if "scope=repository%3Ademo%2Fapp%3Apull" in r[1]]
        # one token for the whole pull (cached per scope), fetched with the user's credentials
        assert len(pulls) == 1 and pulls[0][2] == reg.credentials[0] and pulls[0][3] == 200


def test_token_auth_anonymous_pull(tmp_path, store, docker_config):
    layout, _ = simple_image(tmp_path, compressions=("gzip",))
    with start_registry(tmp_path, auth="token", anonymous_pull=True) as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1", reg.credentials)
        del reg.token_requests[:]  # skopeo's
        rec = registry.pull(store, f"{reg.address}/demo/app:v1", config=fast_config(docker_config))
        assert rec.manifest.layers
        assert reg.token_requests and all(r[2] is None for r in reg.token_requests)


# --- push ----------------------------------------------------------------------------


def _busybox_plus(store: Store, busybox_tar: Path, name: str, files: dict[str, bytes] | None):
    base = archive.import_rootfs(store, busybox_tar, "busybox-base:1", unpack=False)
    if not files:
        return base
    desc, diff_id = archive.store_layer_from_tar(store, io.BytesIO(make_tar(files)))
    cfg = json.loads(json.dumps(dict(base.config.raw)))
    cfg["rootfs"]["diff_ids"].append(diff_id)
    return store.add_image(name=name, config=cfg, layers=[*base.manifest.layers, desc])


def _upload_counts(reg) -> tuple[int, int, int]:
    """(upload sessions started, mounts, blob PUTs) from the registry's access log."""
    text = reg.log_path.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if '"POST /v2/' in ln or '"PUT /v2/' in ln]
    starts = sum(1 for ln in lines if '"POST /v2/' in ln and "/blobs/uploads/" in ln and "mount=" not in ln)
    mounts = sum(1 for ln in lines if '"POST /v2/' in ln and "mount=" in ln)
    puts = sum(1 for ln in lines if '"PUT /v2/' in ln and "/blobs/uploads/" in ln)
    return starts, mounts, puts


def test_push_read_by_skopeo_and_shared_base(tmp_path, store, busybox_tar, docker_config):
    with start_registry(tmp_path, auth="basic") as reg:
        cfg = fast_config(docker_config)
        registry.login(reg.address, *reg.credentials, config=cfg)
        base = _busybox_plus(store, busybox_tar, "busybox-base:1", None)
        res = registry.push(store, "busybox-base:1", f"{reg.address}/lib/base:1", config=cfg)
        assert set(res.uploaded) == {base.manifest.config.digest, *(d.digest for d in base.manifest.layers)}
        info = inspect_with_skopeo(f"{reg.address}/lib/base:1", reg.credentials)
        assert info["Digest"] == base.digest
        out = tmp_path / "copied"
        skopeo("copy", "--src-tls-verify=false", "--src-creds", "%s:%s" % reg.credentials,
               f"docker://{reg.address}/lib/base:1", f"oci:{out}:x")
        assert (out / "blobs" / "sha256" / base.manifest.layers[0].digest[7:]).is_file()

        # a second image on the same base, in another repository: the base is mounted, not sent
        app = _busybox_plus(store, busybox_tar, "app:1", {"app/main.py": b"print('hi')\n"})
        before = _upload_counts(reg)
        res = registry.push(store, "app:1", f"{reg.address}/team/app:1", config=cfg)
        after = _upload_counts(reg)
        new_layer = app.manifest.layers[-1].digest
        assert res.mounted == (base.manifest.layers[0].digest,)
        assert set(res.uploaded) == {new_layer, app.manifest.config.digest}
        assert after[0] - before[0] == 2 and after[2] - before[2] == 2 and after[1] - before[1] == 1
        # the same image again, to the same repository: nothing is sent
        res = registry.push(store, "app:1", f"{reg.address}/team/app:2", config=cfg)
        assert not res.uploaded and not res.mounted and len(res.existing) == 3
        assert _upload_counts(reg) == after
        # and we pull it back into a fresh store, byte for byte the same image
        other = Store(tmp_path / "other")
        rec = registry.pull(other, f"{reg.address}/team/app:2", config=cfg)
        assert rec.digest == app.digest
        assert (other.layer_dirs(rec)[0] / "app" / "main.py").read_bytes() == b"print('hi')\n"


def test_push_chunked_upload(tmp_path, store, busybox_tar):
    rec = archive.import_rootfs(store, busybox_tar, "busybox:1", unpack=False)
    with start_registry(tmp_path) as reg:
        cfg = fast_config(chunk_threshold=64 << 10, chunk_size=256 << 10)
        registry.push(store, "busybox:1", f"{reg.address}/chunked/bb:1", config=cfg)
        patches = reg.log_path.read_text().count('"PATCH /v2/chunked/bb/blobs/uploads/')
        assert patches == -(-rec.manifest.layers[0].size // (256 << 10))
        assert inspect_with_skopeo(f"{reg.address}/chunked/bb:1")["Digest"] == rec.digest


# --- login / logout / credential helpers ------------------------------------------------


def test_login_logout_config_file(tmp_path, docker_config):
    with start_registry(tmp_path, auth="token") as reg:
        user, pw = reg.credentials
        (docker_config / "config.json").write_text(json.dumps({"auths": {"other.example": {"auth": "eDp5"}},
                                                               "psFormat": "table"}))
        rc = cli_main(["--root", str(tmp_path / "store"), "login", reg.address, "-u", user, "-p", pw])
        assert rc == 0
        path = docker_config / "config.json"
        assert (path.stat().st_mode & 0o777) == 0o600
        doc = json.loads(path.read_text())
        assert base64.b64decode(doc["auths"][reg.address]["auth"]).decode() == f"{user}:{pw}"
        assert doc["psFormat"] == "table" and "other.example" in doc["auths"]
        assert auth.get_credentials(reg.address) == auth.Credentials(user, pw)
        assert cli_main(["logout", reg.address]) == 0
        doc = json.loads(path.read_text())
        assert reg.address not in doc["auths"] and "other.example" in doc["auths"]
        assert auth.get_credentials(reg.address) is None


def test_credential_helper(tmp_path, store, docker_config, monkeypatch):
    layout, _ = simple_image(tmp_path, compressions=("gzip",))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    with start_registry(tmp_path, auth="basic") as reg:
        push_layout(layout, "v1", f"{reg.address}/demo/app:v1", reg.credentials)
        user, pw = reg.credentials
        calls = tmp_path / "helper-calls"
        helper = bindir / "docker-credential-testhelper"
        helper.write_text(f"""#!/bin/sh
read server
echo "$1 $server" >> {calls}
if [ "$1" = get ] && [ "$server" = "{reg.address}" ]; then
  echo '{{"ServerURL":"{reg.address}","Username":"{user}","Secret":"{pw}"}}'
  exit 0
fi
echo "credentials not found in native keychain"
exit 1
""")
        helper.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
        (docker_config / "config.json").write_text(json.dumps({"credHelpers": {reg.address: "testhelper"}}))
        rec = registry.pull(store, f"{reg.address}/demo/app:v1", config=fast_config())
        assert rec.manifest.layers
        assert f"get {reg.address}" in calls.read_text()


def test_cli_pull_push_and_error_line(tmp_path, busybox_tar, capsys):
    root = tmp_path / "store"
    store = Store(root)
    archive.import_rootfs(store, busybox_tar, "busybox:1", unpack=False)
    with start_registry(tmp_path) as reg:
        assert cli_main(["--root", str(root), "push", "busybox:1", f"{reg.address}/cli/bb:1"]) == 0
        assert cli_main(["--root", str(tmp_path / "s2"), "pull", f"{reg.address}/cli/bb:1"]) == 0
        out, err = capsys.readouterr()
        assert f"{reg.address}/cli/bb:1 sha256:" in out
        assert "layer 1/1" in err  # plain progress lines (stderr is not a terminal here)
        rc = cli_main(["--root", str(tmp_path / "s2"), "pull", f"{reg.address}/cli/none:1"])
        out, err = capsys.readouterr()
        assert rc != 0 and "Traceback" not in err
        assert err.strip().count("\n") == 0 and "not found" in err


def test_loopback_is_plain_http_and_config_loading(tmp_path, monkeypatch):
    assert registry.is_loopback("127.0.0.1:5000") and registry.is_loopback("localhost")
    assert registry.is_loopback("[::1]:5000") and registry.is_loopback("127.3.4.5")
    assert not registry.is_loopback("example.com:5000") and not registry.is_loopback("10.0.0.1")
    (tmp_path / "registries.json").write_text(json.dumps({"insecure_registries": ["reg.internal:5000"],
                                                          "mirrors": {"docker.io": ["http://127.0.0.1:1"]}}))
    monkeypatch.setenv("JUPYTER_CONTAIN_INSECURE_REGISTRIES", "other.internal, third:1")
    cfg = registry.RegistryConfig.load(tmp_path)
    assert cfg.insecure_registries == ("reg.internal:5000", "other.internal", "third:1")
    assert cfg.mirrors == {"docker.io": ("http://127.0.0.1:1",)}
    with registry.Client("127.0.0.1:5000", config=cfg) as c:
        assert c.base == "http://127.0.0.1:5000"
    with registry.Client("quay.io", config=cfg) as c:
        assert c.base == "https://quay.io"
    with registry.Client("docker.io", config=cfg) as c:
        assert c.base == "https://registry-1.docker.io"
    assert registry.parse_challenge('Bearer realm="https://a/token",service="reg",scope="repository:x:pull"') == (
        "bearer", {"realm": "https://a/token", "service": "reg", "scope": "repository:x:pull"})


def test_progress_renderers():
    from jupyter_contain.runtime.images import progress as p

    events: list[p.ProgressEvent] = []
    t = p.Tracker("pull", "x/y:1", events.append)
    t.resolved([("sha256:" + "a" * 64, -1, 10), ("sha256:" + "b" * 64, 0, 1000)])
    t.status("sha256:" + "b" * 64, p.DOWNLOADING)
    t.advance("sha256:" + "b" * 64, 500)
    t.status("sha256:" + "b" * 64, p.DONE)
    t.status("sha256:" + "a" * 64, p.EXISTS)
    t.finished()
    assert events[-1].bytes_done == events[-1].bytes_total == 1010 and events[-1].fraction == 1.0
    assert any(e.layer_bytes == 500 and e.layer_total == 1000 for e in events)
    lines, bars = io.StringIO(), io.StringIO()
    for e in events:
        p.LineRenderer(lines)(e)
        p.BarRenderer(bars)(e)
    assert "layer 1/1 downloading" in lines.getvalue() and "\x1b" not in lines.getvalue()
    bar = p.BarRenderer(bars)
    for e in events:
        bar(e)
    assert "\x1b[" in bars.getvalue() and "[====" in bars.getvalue()
    assert isinstance(p.renderer_for(io.StringIO()), p.LineRenderer)
