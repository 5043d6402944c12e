"""Base rootfs tarballs (busybox, Debian) and the local registry fixture, for real.

The busybox tests build from the host's busybox-static in a temp dir. The
Debian test uses the machine-wide cache and builds it (~1 min, Debian mirror
traffic) only when it is cold. Registry tests run Debian's docker-registry on
127.0.0.1 and push with skopeo an image made by umoci.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from registry_fixture import (
    inspect_with_skopeo,
    make_oci_image,
    push_with_skopeo,
    start_registry,
)

from jupyter_contain.errors import ImageError
from jupyter_contain.runtime.images import bootstrap
from jupyter_contain.runtime.images.bootstrap import (
    BUSYBOX,
    DEBIAN_KERNEL,
    WIDGET_WHEELS,
    Wheel,
    build_rootfs_tar,
    cached_rootfs_tar,
    cached_wheels,
    host_apt_sources,
)

needs_busybox = pytest.mark.skipif(not Path("/bin/busybox").is_file(),
                                   reason="busybox-static not installed")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name.removeprefix("./").rstrip("/"): m for m in tar.getmembers()}


# ------------------------------------------------------------------ busybox

@needs_busybox
def test_busybox_tarball_layout(tmp_path):
    out = build_rootfs_tar(BUSYBOX, tmp_path / "bb.tar")
    assert out == tmp_path / "bb.tar"
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names == sorted(names), "entries must be sorted for a stable DiffID"
    m = _members(out)

    assert m["bin/busybox"].isreg() and m["bin/busybox"].mode == 0o755
    assert m["bin/busybox"].size == Path("/bin/busybox").stat().st_size
    assert m["bin/sh"].issym() and m["bin/sh"].linkname == "/bin/busybox"
    applets = subprocess.run(["/bin/busybox", "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in (a for a in applets if "/" in a and a != "bin/busybox"):
        assert m[applet].issym(), applet
    assert m["tmp"].isdir() and m["tmp"].mode == 0o1777
    for d in ("dev", "proc", "sys", "root", "home", "etc"):
        assert m[d].isdir(), d
    for d in ("dev", "proc", "sys"):
        assert not [n for n in m if n.startswith(d + "/")], f"{d} must be empty"
    assert all(x.uid == 0 and x.gid == 0 and x.mtime == bootstrap.SOURCE_DATE_EPOCH
               for x in m.values())
    assert not any(x.ischr() or x.isblk() for x in m.values())

    with tarfile.open(out) as tar:
        passwd = tar.extractfile("etc/passwd").read().decode()
        group = tar.extractfile("etc/group").read().decode()
    assert passwd.startswith("root:x:0:0:")
    assert re.search(r"^nobody:x:65534:65534:", passwd, re.MULTILINE)
    assert re.search(r"^root:x:0:", group, re.MULTILINE) and re.search(r":x:65534:", group, re.MULTILINE)


@needs_busybox
def test_busybox_tarball_is_deterministic(tmp_path):
    a = build_rootfs_tar(BUSYBOX, tmp_path / "a.tar")
    b = build_rootfs_tar(BUSYBOX, tmp_path / "b" / "b.tar")
    assert _sha256(a) == _sha256(b)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.tar", "b.tar"]


@needs_busybox
def test_busybox_rootfs_runs_in_a_chroot(tmp_path):
    tar = build_rootfs_tar(BUSYBOX, tmp_path / "bb.tar")
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "-xf", str(tar)], check=True)
    out = subprocess.run(["chroot", str(root), "/bin/sh", "-c",
                          "echo hi from $(id -un); ls /usr/bin/awk; wc -l < /etc/passwd"],
                         check=False, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hi", "from", "root", "/usr/bin/awk", "2"]


@needs_busybox
def test_cached_rootfs_builds_once_under_a_lock(tmp_path):
    cache = tmp_path / "cache"
    messages: list[str] = []
    first_started = threading.Event()

    def progress(msg: str) -> None:
        messages.append(msg)
        if msg.startswith("busybox:"):
            first_started.set()
            # hold the build open so the other caller must wait on the lock
            threading.Event().wait(0.5)

    results: list[Path] = []
    t = threading.Thread(target=lambda: results.append(
        cached_rootfs_tar(BUSYBOX, cache_dir=cache, progress=progress)))
    t.start()
    assert first_started.wait(10)
    second = cached_rootfs_tar(BUSYBOX, cache_dir=cache, progress=progress)
    t.join(10)
    assert results == [second]
    assert sum(m.startswith("built busybox rootfs") for m in messages) == 1
    assert any(m.startswith("waiting for another process") for m in messages)

    meta = json.loads(second.with_suffix(".json").read_text())
    assert meta["diff_id"] == "sha256:" + _sha256(second)
    assert meta["key"] == BUSYBOX.cache_key()
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*.tmp"))
    # a second call is a cache hit: same file, not rebuilt
    before = second.stat().st_mtime_ns
    assert cached_rootfs_tar(BUSYBOX, cache_dir=cache) == second
    assert second.stat().st_mtime_ns == before


def test_recipe_key_tracks_content():
    import dataclasses

    assert BUSYBOX.cache_key() == dataclasses.replace(BUSYBOX).cache_key()
    assert BUSYBOX.cache_key() != dataclasses.replace(BUSYBOX, suite="trixie").cache_key()
    more = dataclasses.replace(DEBIAN_KERNEL, packages=DEBIAN_KERNEL.packages + ("curl",))
    assert more.cache_key() != DEBIAN_KERNEL.cache_key()
    # another wheel file (a new release or a re-upload with another hash) is another rootfs
    other = Wheel("ipywidgets", "8.1.9", "ipywidgets-8.1.9-py3-none-any.whl", "0" * 64)
    swapped = dataclasses.replace(DEBIAN_KERNEL, wheels=(other,) + DEBIAN_KERNEL.wheels[1:])
    assert swapped.cache_key() != DEBIAN_KERNEL.cache_key()
    # the order the pins are written in is not content
    reordered = dataclasses.replace(DEBIAN_KERNEL, wheels=tuple(reversed(DEBIAN_KERNEL.wheels)))
    assert reordered.cache_key() == DEBIAN_KERNEL.cache_key()


def test_widget_wheels_pin_ipywidgets_8_with_what_it_requires():
    pins = {w.project: w.version for w in WIDGET_WHEELS}
    assert int(pins["ipywidgets"].split(".")[0]) == 8
    assert set(pins) == {"ipywidgets", "comm", "widgetsnbextension", "jupyterlab_widgets"}
    assert DEBIAN_KERNEL.wheels == WIDGET_WHEELS
    # bookworm's ipywidgets 6 stays out: one ipywidgets in the image
    assert "python3-ipywidgets" not in DEBIAN_KERNEL.packages


@pytest.mark.parametrize("filename, sha", [
    ("../evil-1.0-py3-none-any.whl", "0" * 64),
    ("native-1.0-cp311-cp311-linux_x86_64.whl", "0" * 64),
    ("ok-1.0-py3-none-any.whl", "abc"),
    ("ok-1.0-py3-none-any.whl", "A" * 64),
])
def test_wheel_pins_are_checked_when_made(filename, sha):
    with pytest.raises(ImageError, match="wheel"):
        Wheel("ok", "1.0", filename, sha)


def _local_wheel(d: Path, name: str = "jc_test_pkg", content: bytes = b"not really a zip") -> Wheel:
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}-1.0-py3-none-any.whl"
    path.write_bytes(content)
    return Wheel(name, "1.0", path.name, _sha256(path))


def test_cached_wheels_are_used_without_pip(tmp_path):
    w = _local_wheel(tmp_path / "wheels")
    # a python that does not exist: any attempt to run pip would fail
    assert cached_wheels([w], wheel_dir=tmp_path / "wheels", python=str(tmp_path / "no-python")) == \
        [tmp_path / "wheels" / w.filename]


def test_a_cached_wheel_with_another_hash_is_fetched_again_and_a_failed_fetch_says_what_to_do(
        tmp_path, monkeypatch):
    w = _local_wheel(tmp_path / "wheels", name="jc_no_such_project")
    (tmp_path / "wheels" / w.filename).write_bytes(b"tampered")
    # pip talks only to a closed port on loopback: no traffic leaves the machine
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(ImageError, match=r"pip could not fetch jc_no_such_project-1\.0-py3-none-any\.whl(.|\n)*"
                                         + re.escape(str(tmp_path / "wheels"))):
        cached_wheels([w], wheel_dir=tmp_path / "wheels")
    # the tampered file is not passed off as the pinned one, and no temp folder is left
    assert (tmp_path / "wheels" / w.filename).read_bytes() == b"tampered"
    assert sorted(p.name for p in (tmp_path / "wheels").iterdir()) == [".wheels.lock", w.filename]


def test_missing_busybox_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bootstrap, "BUSYBOX_BINARY", tmp_path / "no-busybox")
    with pytest.raises(ImageError, match="busybox-static"):
        cached_rootfs_tar(BUSYBOX, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_missing_mmdebstrap_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageError, match="apt-get install mmdebstrap"):
        build_rootfs_tar(DEBIAN_KERNEL, tmp_path / "d.tar")
    assert not (tmp_path / "d.tar").exists()


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("mmdebstrap"), reason="mmdebstrap not installed")
def test_failed_debian_build_reports_log_and_leaves_nothing(tmp_path):
    cache = tmp_path / "cache"
    # a mirror on loopback that refuses connections: apt update fails fast,
    # and no traffic leaves the machine
    # without the wheels, which would be fetched from the package index first
    no_wheels = dataclasses.replace(DEBIAN_KERNEL, wheels=())
    with pytest.raises(ImageError, match=r"mmdebstrap failed.*\n(.*\n)*.*127\.0\.0\.1:9"):
        cached_rootfs_tar(no_wheels, cache_dir=cache, mirror="http://127.0.0.1:9/debian")
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    assert not any(ln.split()[1].startswith(str(tmp_path))
                   for ln in Path("/proc/self/mounts").read_text().splitlines())


def test_host_apt_sources_keeps_debian_suites_only(tmp_path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(
        "# comment\ndeb [signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n")
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# http://snapshot\nURIs: http://deb.debian.org/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
        "Components: main\n")
    (etc / "sources.list.d" / "node.sources").write_text(
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"
        "Components: main\n")
    (etc / "sources.list.d" / "gcloud.list.disabled").write_text(
        "deb http://gcloud.example bookworm main\n")
    assert host_apt_sources("bookworm", etc_apt=etc) == [
        "deb http://mirror.example/debian bookworm main contrib",
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]


# ------------------------------------------------------------------- debian

@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("mmdebstrap"), reason="mmdebstrap not installed")
def test_debian_kernel_rootfs_is_cached_and_complete():
    # Builds (about a minute, from the host's Debian mirror) only if the
    # machine-wide cache is cold; otherwise a cache hit.
    tar_path = cached_rootfs_tar(DEBIAN_KERNEL)
    assert tar_path.parent == bootstrap.default_cache_dir()
    m = _members(tar_path)
    assert "usr/bin/python3" in m
    for pkg in ("ipykernel", "IPython", "pip"):
        assert f"usr/lib/python3/dist-packages/{pkg}/__init__.py" in m, pkg
    # ipywidgets 8 and comm from the pinned wheels, installed by the image's pip (so pip
    # manages them later), not Debian's ipywidgets 6
    assert "usr/lib/python3/dist-packages/ipywidgets/__init__.py" not in m
    site = "usr/local/lib/python3.11/dist-packages"
    for w in WIDGET_WHEELS:
        info = f"{site}/{w.project}-{w.version}.dist-info"
        assert f"{info}/RECORD" in m and f"{site}/{w.project}/__init__.py" in m, w
        # by name from local files: no direct_url.json (pip freeze would show a file:// URL)
        assert f"{info}/direct_url.json" not in m, w
    with tarfile.open(tar_path) as tar:
        assert tar.extractfile(f"./{site}/ipywidgets-8.1.9.dist-info/INSTALLER").read() == b"pip\n"
        # bytecode is there and hash-checked (flags 3 in the header): reproducible, and a
        # first import writes nothing into a container's writable layer
        pyc = tar.extractfile(f"./{site}/ipywidgets/__pycache__/__init__.cpython-311.pyc").read(16)
        assert int.from_bytes(pyc[4:8], "little") == 3
    assert "usr/lib/python3.11/venv/__init__.py" in m
    assert "etc/ssl/certs/ca-certificates.crt" in m
    assert not any(x.ischr() or x.isblk() or x.isfifo() for x in m.values())
    assert m["dev"].isdir() and not [n for n in m if n.startswith("dev/")]
    assert not [n for n in m if n.startswith("var/lib/apt/lists/") and m[n].isreg()
                and not n.endswith("/lock")]
    assert not [n for n in m if n.startswith("var/cache/apt/") and m[n].isreg()]
    # merged /usr via usr-is-merged: usrmerge (and the full perl it needs) stays out
    assert not [n for n in m if n.startswith("usr/share/perl/")]
    assert all(x.mtime <= bootstrap.SOURCE_DATE_EPOCH for x in m.values())
    with tarfile.open(tar_path) as tar:
        pip_conf = tar.extractfile("./etc/pip.conf").read().decode()
    assert "break-system-packages = true" in pip_conf
    meta = json.loads(tar_path.with_suffix(".json").read_text())
    assert meta["size"] == tar_path.stat().st_size
    assert meta["key"] == DEBIAN_KERNEL.cache_key()
    assert [w["sha256"] for w in meta["recipe"]["wheels"]] == [w.sha256 for w in WIDGET_WHEELS]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("mmdebstrap"), reason="mmdebstrap not installed")
def test_debian_kernel_rootfs_is_reproducible(tmp_path):
    # The same recipe (packages from the mirror's current snapshot, the same wheels) built
    # again gives the same bytes: the same DiffID, so the same image digest. ~40 s.
    cached = cached_rootfs_tar(DEBIAN_KERNEL)
    again = build_rootfs_tar(DEBIAN_KERNEL, tmp_path / "again.tar")
    assert _sha256(again) == json.loads(cached.with_suffix(".json").read_text())["diff_id"].split(":")[1]


# ----------------------------------------------------------------- registry

def _get(url: str, auth: str | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_registry_without_auth(tmp_path):
    with start_registry(tmp_path) as reg:
        status, headers, _ = _get(reg.url + "/v2/")
        assert status == 200
        assert headers.get("Docker-Distribution-Api-Version") == "registry/2.0"
        assert reg.storage.is_dir() and reg.address == f"127.0.0.1:{reg.port}"
        pid, root = reg.pid, reg.config_path.parent
    assert not _pid_alive(pid)
    assert not root.exists() and list(tmp_path.iterdir()) == []


def test_registry_basic_auth(tmp_path):
    with start_registry(tmp_path, auth="basic", users={"alice": "s3cret"}) as reg:
        status, headers, _ = _get(reg.url + "/v2/")
        assert status == 401 and headers["Www-Authenticate"].startswith("Basic realm=")
        assert _get(reg.url + "/v2/", _basic("alice", "wrong"))[0] == 401
        assert _get(reg.url + "/v2/", _basic("alice", "s3cret"))[0] == 200
        assert reg.credentials == ("alice", "s3cret")
        pid = reg.pid
    assert not _pid_alive(pid) and list(tmp_path.iterdir()) == []


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme, dict(re.findall(r'(\w+)="([^"]*)"', rest))


def test_registry_token_auth(tmp_path):
    with start_registry(tmp_path, auth="token", users={"bob": "pw"}) as reg:
        status, headers, _ = _get(reg.url + "/v2/")
        assert status == 401
        scheme, params = _parse_challenge(headers["Www-Authenticate"])
        assert scheme == "Bearer"
        assert params["realm"] == reg.token_realm and params["service"] == reg.service

        token_url = f"{params['realm']}?service={params['service']}"
        assert _get(token_url, _basic("bob", "nope"))[0] == 401
        status, _, body = _get(token_url, _basic("bob", "pw"))
        assert status == 200
        doc = json.loads(body)
        assert doc["token"] == doc["access_token"] and doc["expires_in"] > 0
        assert _get(reg.url + "/v2/", "Bearer " + doc["token"])[0] == 200
        assert _get(reg.url + "/v2/", "Bearer " + doc["token"][:-4] + "AAAA")[0] == 401

        # a repository request names its scope in the challenge
        status, headers, _ = _get(reg.url + "/v2/some/repo/tags/list")
        assert status == 401
        _, params = _parse_challenge(headers["Www-Authenticate"])
        assert params["scope"] == "repository:some/repo:pull"
        # an anonymous token carries no access: the registry refuses it
        anon = json.loads(_get(f"{token_url}&scope={params['scope']}")[2])["token"]
        assert _get(reg.url + "/v2/some/repo/tags/list", "Bearer " + anon)[0] == 401
        scoped = json.loads(_get(f"{token_url}&scope={params['scope']}",
                                 _basic("bob", "pw"))[2])["token"]
        # authorised now; the repository simply does not exist yet
        assert _get(reg.url + "/v2/some/repo/tags/list", "Bearer " + scoped)[0] == 404
        assert [(r[2], r[3]) for r in reg.token_requests] == [
            ("bob", 401), ("bob", 200), (None, 200), ("bob", 200)]
        pid = reg.pid
    assert not _pid_alive(pid) and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def busybox_oci_layout(tmp_path_factory):
    if not (shutil.which("umoci") and Path("/bin/busybox").is_file()):
        pytest.skip("umoci or busybox-static not installed")
    d = tmp_path_factory.mktemp("oci")
    layer = build_rootfs_tar(BUSYBOX, d / "busybox.tar")
    layout = make_oci_image(d / "layout", "latest", [layer], config=BUSYBOX.config)
    yield layout, layer
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.needs_tools
@pytest.mark.skipif(not shutil.which("skopeo"), reason="skopeo not installed")
@pytest.mark.parametrize("auth", ["none", "basic", "token"])
def test_skopeo_push_and_inspect(tmp_path, busybox_oci_layout, auth):
    layout, layer = busybox_oci_layout
    with start_registry(tmp_path, auth=auth) as reg:
        ref = f"{reg.address}/test/busybox:1.0"
        creds = reg.credentials
        if creds:
            with pytest.raises(RuntimeError, match="skopeo copy failed"):
                push_with_skopeo(layout, ref, None, tag="latest")
        push_with_skopeo(layout, ref, creds, tag="latest")
        info = inspect_with_skopeo(ref, creds)
        assert info["Name"] == f"{reg.address}/test/busybox"
        assert len(info["Layers"]) == 1
        assert info["Env"] == list(BUSYBOX.config["Env"])
        assert info["Architecture"] == "amd64"
        manifest = inspect_with_skopeo(ref, creds, raw=True)
        assert manifest["layers"][0]["digest"] == info["Layers"][0]
        # the registry holds the blob in its storage directory
        blob = info["Layers"][0].split(":")[1]
        assert list(reg.storage.rglob(f"blobs/sha256/{blob[:2]}/{blob}/data"))
        if auth == "token":
            assert any("scope=repository%3Atest%2Fbusybox" in r[1]
                       or "scope=repository:test/busybox" in r[1] for r in reg.token_requests)
        pid = reg.pid
    assert not _pid_alive(pid) and list(tmp_path.iterdir()) == []
    # umoci's layer is the gzip of our tarball: its DiffID is our tar's sha256
    oci_config = _oci_config(layout, "latest")
    assert oci_config["rootfs"]["diff_ids"] == ["sha256:" + _sha256(layer)]


def _oci_config(layout: Path, tag: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    blob = lambda d: json.loads((layout / "blobs" / "sha256" / d.split(":")[1]).read_text())
    return blob(blob(desc["digest"])["config"]["digest"])


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("mmdebstrap"), reason="mmdebstrap not installed")
def test_bootstrap_gives_the_same_image_digest_in_two_stores(tmp_path):
    # the config's creation time is SOURCE_DATE_EPOCH, not the import's: two machines (two
    # stores here) get the same digest for the same rootfs
    import sys

    exe = Path(sys.executable).with_name("jupyter-contain")
    digests = []
    for store in ("a", "b"):
        out = subprocess.run([str(exe), "--root", str(tmp_path / store), "bootstrap", "--no-kernelspec"],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        m = re.search(r"^bootstrap: image \S+ (sha256:[0-9a-f]{64})$", out.stdout, re.M)
        assert m, out.stdout
        digests.append(m.group(1))
    assert digests[0] == digests[1]
    meta = json.loads((tmp_path / "a" / "index.json").read_text())
    assert meta["manifests"], meta
