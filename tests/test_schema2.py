"""Every manifest and index form registries and peers serve, end to end with real tools.

Images reach a real registry on 127.0.0.1 the ways users' images do: ``skopeo
copy --format v2s2`` (Docker schema 2, what ``docker push`` writes), ``skopeo
copy --all`` of hand-written layouts (a Docker manifest list and an OCI index
listing arm64 first, an index led by an attestation entry), ``skopeo copy
--preserve-digests`` from ``dir:`` layouts for layer media types no converter
writes (Docker's uncompressed and zstd layers, foreign and non-distributable
layers), and ``podman push``. Then each is pulled and must be stored as served
(same bytes, same digest), run, committed on, saved to both archive forms and
loaded and run by podman, pushed back (same digest), inspected, listed, gc'd,
and read from the store by skopeo and umoci. One kernel runs on a schema-2 image.

Podman runs through ``/work/shared/tools/run-peer`` with its own storage,
runroot and containers.conf (rlimits within ours, no network namespace).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard
from kernel_fixtures import IMAGE, kernel_env, run_cell  # noqa: F401  (the session's Debian kernel image)
from registry_fixture import start_registry

from jupyter_contain.errors import ImageError, ManifestError
from jupyter_contain.runtime import commit as snap
from jupyter_contain.runtime.containers.container import ContainerSpec, Runtime
from jupyter_contain.runtime.images import archive, registry
from jupyter_contain.runtime.images.store import ANNOTATION_INDEX, ANNOTATION_MANIFEST, Store
from jupyter_contain.runtime.spec import (
    DOCKER_CONFIG,
    DOCKER_FOREIGN_LAYER_GZIP,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_ZSTD,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_ND_GZIP,
    OCI_MANIFEST,
    Platform,
    sha256_digest,
)

pytestmark = pytest.mark.needs_tools

REPO = Path(__file__).resolve().parent.parent
RUN_PEER = Path("/work/shared/tools/run-peer")
HOST = Platform.host()
PODMAN_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "none"
"""


# --- tools -------------------------------------------------------------------------------------


def _need(tool: str) -> None:
    if not shutil.which(tool):
        pytest.skip(f"{tool} is not installed")


def skopeo(*args: str, timeout: float = 300) -> str:
    """skopeo with no host policy or credentials involved; returns its stdout."""
    _need("skopeo")
    with tempfile.TemporaryDirectory(prefix="skopeo-auth-") as d:
        env = dict(os.environ, REGISTRY_AUTH_FILE=os.path.join(d, "auth.json"))
        proc = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    assert proc.returncode == 0, f"skopeo {args[0]}: {proc.stderr[-2000:]}"
    return proc.stdout


def registry_manifest(ref: str) -> tuple[bytes, str]:
    """The manifest bytes the registry serves for ``ref``, and their digest."""
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}").encode()
    return raw, sha256_digest(raw)


def registry_digest(ref: str) -> str:
    return json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{ref}"))["Digest"]


class Podman:
    """podman in throw-away storage, through run-peer (its cgroups stay beneath ours)."""

    def __init__(self, base: Path) -> None:
        _need("podman")
        if not RUN_PEER.exists():
            pytest.skip("run-peer is not available")
        self.base = base
        (base / "containers.conf").write_text(PODMAN_CONF)
        (base / "auth.json").write_text("{}")   # no host credentials
        self.runroot = Path(tempfile.mkdtemp(prefix="jcs2-"))   # podman wants a runroot under 50 characters
        self.env = {**os.environ, "CONTAINERS_CONF": str(base / "containers.conf"),
                    "REGISTRY_AUTH_FILE": str(base / "auth.json")}
        self.cmd = [str(RUN_PEER), "podman", "--root", str(base / "root"), "--runroot", str(self.runroot),
                    "--storage-driver", "overlay"]

    def __call__(self, *args: str, timeout: float = 180) -> str:
        res = subprocess.run([*self.cmd, *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                             check=False)
        assert res.returncode == 0, f"podman {args[0]}: {res.stderr[-2000:]}"
        return res.stdout

    def close(self) -> None:
        subprocess.run([*self.cmd, "system", "reset", "-f"], capture_output=True, env=self.env, timeout=120,
                       check=False)
        shutil.rmtree(self.runroot, ignore_errors=True)


# --- images written by hand ------------------------------------------------------------------


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(files[name]), 0o644, 1700000000
            tar.addfile(ti, io.BytesIO(files[name]))
    return buf.getvalue()


def _compress(data: bytes, how: str) -> bytes:
    return {"gzip": lambda: gzip.compress(data, mtime=0), "zstd": lambda: zstandard.ZstdCompressor().compress(data),
            "tar": lambda: data}[how]()


class Blobs:
    """Blobs of a hand-written image, written where a layout keeps them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, media_type: str, **extra) -> dict:
        digest = sha256_digest(data)
        (self.folder / digest[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def busybox_parts(source: Store) -> tuple[bytes, str, dict]:
    """The busybox layer (gzip blob), its DiffID and its image config, from the source store."""
    rec = source.resolve("busybox:1")
    return source.blob_path(rec.manifest.layers[0].digest).read_bytes(), rec.config.diff_ids[0], dict(rec.config.raw)


def manifest_doc(blobs: Blobs, *, family: str, config: dict, layers: list[tuple[bytes, str]]) -> bytes:
    """A manifest of ``family`` (oci/docker) whose config is ``config`` with these layer blobs."""
    cfg = blobs.put(json.dumps(config).encode(), OCI_CONFIG if family == "oci" else DOCKER_CONFIG)
    descs = [blobs.put(data, mt) for data, mt in layers]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST if family == "oci" else DOCKER_MANIFEST,
                       "config": cfg, "layers": descs}).encode()


def image_config(base: dict, diff_ids: list[str], *, arch: str = HOST.architecture) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    cfg["architecture"] = arch
    cfg.pop("variant", None)
    return cfg


def write_dir_layout(folder: Path, top: bytes, instances: list[bytes] = ()) -> None:
    """A ``dir:`` transport layout (``manifest.json`` + blobs named by hex; list instances beside)."""
    (folder / "version").write_text("Directory Transport Version: 1.1\n")
    (folder / "manifest.json").write_bytes(top)
    for m in instances:
        (folder / f"{sha256_digest(m)[7:]}.manifest.json").write_bytes(m)


def write_oci_layout(folder: Path, top: dict, tag: str) -> None:
    (folder / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (folder / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {**top, "annotations": {"org.opencontainers.image.ref.name": tag}}]}))


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    with start_registry(tmp_path_factory.mktemp("s2-registry")) as r:
        yield r


@pytest.fixture(scope="module")
def source(tmp_path_factory, busybox_tar) -> Store:
    """A store holding localhost/busybox:1 (OCI, one gzip layer) for skopeo to copy from."""
    s = Store(tmp_path_factory.mktemp("s2-source"))
    archive.import_rootfs(s, busybox_tar, "busybox:1", unpack=False)
    return s


@pytest.fixture(scope="module")
def dst(tmp_path_factory) -> Store:
    """The store the module pulls into (and runs from)."""
    return Store(tmp_path_factory.mktemp("s2-store"))


@pytest.fixture
def rt(dst):
    rt = Runtime(dst)
    before = {c.id for c in rt.containers()}
    yield rt
    for c in rt.containers():
        if c.id not in before:
            c.remove(force=True)


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    p = Podman(tmp_path_factory.mktemp("s2-podman"))
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def v2s2(reg, source, dst):
    """busybox pushed by ``skopeo copy --format v2s2`` and pulled: (reference, record)."""
    ref = f"{reg.address}/s2/busybox:v2s2"
    skopeo("copy", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{source.root}:localhost/busybox:1",
           f"docker://{ref}")
    return ref, registry.pull(dst, ref)


def run_out(rt: Runtime, image: str, *command: str) -> str:
    with tempfile.TemporaryFile() as out, open(os.devnull, "rb") as null:
        info = rt.run(ContainerSpec(image=image, command=command), stdio=(null.fileno(), out.fileno(), out.fileno()),
                      remove=True)
        out.seek(0)
        text = out.read().decode()
    assert info.code == 0, text
    return text


def cli(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False)


def index_entry(store: Store, name: str) -> dict:
    entries = json.loads((store.root / "index.json").read_text())["manifests"]
    hits = [e for e in entries if e.get("annotations", {}).get("org.opencontainers.image.ref.name") == name]
    assert len(hits) == 1, entries
    return hits[0]


# --- Docker schema 2 manifest ----------------------------------------------------------------------


def test_v2s2_is_stored_as_served(v2s2, dst):
    ref, rec = v2s2
    raw, digest = registry_manifest(ref)
    assert json.loads(raw)["mediaType"] == DOCKER_MANIFEST
    assert rec.digest == digest == registry_digest(ref)
    assert dst.blob_path(digest).read_bytes() == raw           # the same bytes
    assert rec.descriptor.media_type == DOCKER_MANIFEST
    assert rec.manifest.config.media_type == DOCKER_CONFIG
    assert [d.media_type for d in rec.manifest.layers] == [DOCKER_LAYER_GZIP]
    # index.json names its OCI form (peers read only those) and what was served
    entry = index_entry(dst, ref)
    assert entry["mediaType"] == OCI_MANIFEST and entry["annotations"][ANNOTATION_MANIFEST] == digest
    oci = json.loads(dst.blob_path(entry["digest"]).read_bytes())
    assert oci["config"] == {"mediaType": OCI_CONFIG, "digest": rec.manifest.config.digest,
                             "size": rec.manifest.config.size}
    assert [(d["mediaType"], d["digest"]) for d in oci["layers"]] == [(OCI_LAYER_GZIP, rec.manifest.layers[0].digest)]
    # every way of naming it gives the served manifest
    for name in (ref, f"{ref.rsplit(':', 1)[0]}@{digest}", digest[7:19]):
        assert dst.resolve(name).digest == digest, name
    assert dst.record("x", digest).descriptor.media_type == DOCKER_MANIFEST


def test_v2s2_runs_from_cli_and_library(v2s2, dst, rt):
    ref, rec = v2s2
    # the command of the report: it failed with "manifest mediaType ... differs"
    res = cli(dst.root, "run", "--rm", ref, "cat", "/etc/passwd")
    assert res.returncode == 0 and "root:" in res.stdout, res.stderr
    assert "busybox" in run_out(rt, ref, "sh", "-c", "busybox 2>&1 | head -1").lower()
    c = rt.create(ContainerSpec(image=f"{ref.rsplit(':', 1)[0]}@{rec.digest}", command=("true",)))
    try:
        assert c.image().digest == rec.digest   # what a container start reads back
    finally:
        c.remove(force=True)


def test_v2s2_inspect_images_gc(v2s2, dst, rt):
    ref, rec = v2s2
    res = cli(dst.root, "inspect", ref)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)[0]
    assert doc["digest"] == rec.digest and doc["media_type"] == DOCKER_MANIFEST
    assert doc["layers"][0]["mediaType"] == DOCKER_LAYER_GZIP
    res = cli(dst.root, "images", "--json")
    assert rec.digest in {i["digest"] for i in json.loads(res.stdout)}
    dst.gc()   # keeps the served manifest, its OCI form, config and layers
    entry = index_entry(dst, ref)
    for d in (rec.digest, entry["digest"], rec.manifest.config.digest, rec.manifest.layers[0].digest):
        assert dst.has_blob(d), d
    assert dst.resolve(ref).digest == rec.digest


def test_v2s2_store_is_read_by_skopeo_and_umoci(v2s2, dst, tmp_path):
    ref, rec = v2s2
    out = json.loads(skopeo("inspect", f"oci:{dst.root}:{ref}"))
    assert out["Layers"] == [rec.manifest.layers[0].digest]
    assert out["Digest"] == index_entry(dst, ref)["digest"]
    _need("umoci")
    res = subprocess.run(["umoci", "unpack", "--image", f"{dst.root}:{ref}", str(tmp_path / "bundle")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "bundle/rootfs/bin/busybox").is_file()


def test_v2s2_push_back_keeps_the_digest(v2s2, dst, reg):
    ref, rec = v2s2
    again = f"{reg.address}/s2/again:v1"
    result = registry.push(dst, ref, again)
    assert result.digest == rec.digest == registry_digest(again)
    assert registry_manifest(again)[0] == dst.blob_path(rec.digest).read_bytes()


def test_v2s2_commit_records_base_and_is_oci(v2s2, dst, rt, reg):
    ref, rec = v2s2
    c = rt.create(ContainerSpec(image=ref, command=("sh", "-c", "echo committed > /note")))
    try:
        c.start()
        assert c.wait(30).code == 0
        new = snap.snapshot(rt, c, "s2-commit:1")
    finally:
        c.remove(force=True)
    assert new.manifest.media_type == OCI_MANIFEST and new.manifest.config.media_type == OCI_CONFIG
    base = new.manifest.layers[0]
    assert (base.media_type, base.digest) == (OCI_LAYER_GZIP, rec.manifest.layers[0].digest)
    assert new.config.labels["org.opencontainers.image.base.digest"] == rec.digest
    assert new.manifest.annotations["org.opencontainers.image.base.digest"] == rec.digest
    assert run_out(rt, "s2-commit:1", "cat", "/note") == "committed\n"
    pushed = f"{reg.address}/s2/committed:1"
    result = registry.push(dst, "s2-commit:1", pushed)
    assert result.mounted == (rec.manifest.layers[0].digest,)   # the base layer: from the repository pulled
    raw, digest = registry_manifest(pushed)
    assert digest == new.digest and json.loads(raw)["layers"][0]["mediaType"] == OCI_LAYER_GZIP
    dst.rmi("s2-commit:1")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_v2s2_save_load_run_in_podman(v2s2, dst, podman, tmp_path, fmt):
    ref, rec = v2s2
    out = tmp_path / "img.tar"
    res = cli(dst.root, "save", ref, "-o", str(out), "--format", fmt)
    assert res.returncode == 0, res.stderr
    loaded = podman("load", "-q", "-i", str(out)).strip().split()[-1]
    assert podman("run", "--rm", loaded, "cat", "/etc/passwd").startswith("root:")
    if fmt == "oci-archive":
        # imported here again, the archive gives back the image with its registry digest
        other = Store(tmp_path / "other")
        back = archive.import_oci_archive(other, out, unpack=False)
        assert back.digest == rec.digest and back.descriptor.media_type == DOCKER_MANIFEST


# --- Docker manifest list, OCI index, attestations ---------------------------------------------------


@pytest.fixture(scope="module")
def multi(tmp_path_factory, source, reg) -> dict:
    """One layout: an OCI index listing arm64 first, then this machine's platform; an index led by an
    attestation entry; pushed as an OCI index and (``--format v2s2``) as a Docker manifest list."""
    layer, diff_id, cfg = busybox_parts(source)
    base = tmp_path_factory.mktemp("s2-multi")
    blobs = Blobs(base / "layout/blobs/sha256")
    other = "arm64" if HOST.architecture != "arm64" else "amd64"
    arch_layer = make_tar({"etc/arch": b"other\n"})
    m_other = blobs.put(manifest_doc(blobs, family="oci", config=image_config(
        cfg, [diff_id, sha256_digest(arch_layer)], arch=other), layers=[(layer, OCI_LAYER_GZIP),
                                                                        (_compress(arch_layer, "gzip"), OCI_LAYER_GZIP)]),
        OCI_MANIFEST, platform={"os": "linux", "architecture": other, **({"variant": "v8"} if other == "arm64" else {})})
    mine_layer = make_tar({"etc/arch": b"mine\n"})
    m_host = blobs.put(manifest_doc(blobs, family="oci", config=image_config(
        cfg, [diff_id, sha256_digest(mine_layer)]), layers=[(layer, OCI_LAYER_GZIP),
                                                            (_compress(mine_layer, "gzip"), OCI_LAYER_GZIP)]),
        OCI_MANIFEST, platform={"os": "linux", "architecture": HOST.architecture})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [m_other, m_host]}).encode()
    # an attestation (buildx's form: unknown/unknown, an in-toto layer) listed first
    att = blobs.put(json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                "config": blobs.put(b"{}", "application/vnd.oci.empty.v1+json"),
                                "layers": [blobs.put(b'{"predicate":{}}', "application/vnd.in-toto+json")]}).encode(),
                    OCI_MANIFEST, platform={"os": "unknown", "architecture": "unknown"},
                    annotations={"vnd.docker.reference.type": "attestation-manifest",
                                 "vnd.docker.reference.digest": m_host["digest"]})
    attested = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [att, m_other, m_host]}).encode()
    layout = base / "layout"
    write_oci_layout(layout, blobs.put(index, OCI_INDEX), "multi")
    refs = {"oci": f"{reg.address}/s2/multi:oci", "docker": f"{reg.address}/s2/multi:docker",
            "attested": f"{reg.address}/s2/multi:attested"}
    skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:multi",
           f"docker://{refs['oci']}")
    skopeo("copy", "--all", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{layout}:multi",
           f"docker://{refs['docker']}")
    att_layout = base / "attested"
    shutil.copytree(layout, att_layout)
    Blobs(att_layout / "blobs/sha256").put(attested, OCI_INDEX)
    write_oci_layout(att_layout, {"mediaType": OCI_INDEX, "digest": sha256_digest(attested), "size": len(attested)},
                     "multi")
    skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", f"oci:{att_layout}:multi",
           f"docker://{refs['attested']}")
    return {"refs": refs, "other": other, "host_oci": m_host["digest"], "other_oci": m_other["digest"]}


@pytest.mark.parametrize("form", ["oci", "docker", "attested"])
def test_index_forms_pick_this_platform(multi, dst, rt, form):
    ref = multi["refs"][form]
    raw, top = registry_manifest(ref)
    doc = json.loads(raw)
    assert doc["mediaType"] == (DOCKER_MANIFEST_LIST if form == "docker" else OCI_INDEX)
    assert doc["manifests"][0]["platform"]["architecture"] != HOST.architecture   # not first in line
    rec = registry.pull(dst, ref)
    want = [m for m in doc["manifests"] if m["platform"]["architecture"] == HOST.architecture][0]
    assert rec.digest == want["digest"] and rec.descriptor.media_type == want["mediaType"]
    assert rec.index_digest == top and dst.blob_path(top).read_bytes() == raw   # the index as served
    entry = index_entry(dst, ref)
    assert entry["mediaType"] == OCI_MANIFEST and entry["annotations"][ANNOTATION_INDEX] == top
    if form != "docker":   # an OCI manifest is entered as itself
        assert entry["digest"] == rec.digest and ANNOTATION_MANIFEST not in entry["annotations"]
    # NAME@<index digest> (what `docker pull NAME@...` users copy) and @<manifest digest> both find it
    repo = ref.rsplit(":", 1)[0]
    assert dst.resolve(f"{repo}@{top}").digest == rec.digest
    assert dst.resolve(f"{repo}@{rec.digest}").digest == rec.digest
    assert run_out(rt, ref, "cat", "/etc/arch") == "mine\n"
    # another platform on request, by digest of the same index
    arm = registry.pull(dst, f"{repo}@{top}", platform=Platform.parse(f"linux/{multi['other']}"))
    assert arm.config.platform.architecture == multi["other"]
    assert arm.digest == [m for m in doc["manifests"] if m["platform"]["architecture"] == multi["other"]][0]["digest"]


def test_index_pull_pushes_back_the_platform_manifest(multi, dst, reg):
    ref = multi["refs"]["docker"]
    rec = registry.pull(dst, ref)
    dest = f"{reg.address}/s2/multi-back:1"
    assert registry.push(dst, ref, dest).digest == rec.digest == registry_digest(dest)


def test_gc_keeps_what_tags_name_and_drops_the_rest(multi, tmp_path):
    store = Store(tmp_path / "gc")
    ref = multi["refs"]["docker"]
    rec = registry.pull(store, ref)
    entry = index_entry(store, ref)
    named = {rec.digest, rec.index_digest, entry["digest"], rec.manifest.config.digest,
             *(d.digest for d in rec.manifest.layers)}
    assert store.gc().blobs_removed == 0
    assert {f"sha256:{p.name}" for p in store.blobs_dir.iterdir()} == named
    store.rmi(ref)
    report = store.gc()
    assert report.blobs_removed == len(named) and not any(store.blobs_dir.iterdir())


# --- layer media types of both families; foreign layers; schema1 ------------------------------------


def test_layer_types_of_both_families(source, reg, dst, rt, tmp_path):
    """gzip, uncompressed and zstd layers under OCI and Docker media types, each pushed as written.

    skopeo 1.9 refuses Docker's zstd type (containerd's name; BuildKit writes it), so the Docker
    manifest goes in as a layout (as `docker save` of Docker 25+ writes them) and out by our push.
    """
    layer, diff_id, cfg = busybox_parts(source)
    tars = [make_tar({f"etc/{how}": f"{how}\n".encode()}) for how in ("gzip", "tar", "zstd")]
    for family, types in (("docker", (DOCKER_LAYER_GZIP, DOCKER_LAYER, DOCKER_LAYER_ZSTD)),
                          ("oci", (OCI_LAYER_GZIP, "application/vnd.oci.image.layer.v1.tar",
                                   "application/vnd.oci.image.layer.v1.tar+zstd"))):
        folder = tmp_path / family
        blobs = Blobs(folder / "blobs/sha256")
        layers = [(layer, types[0])] + [(_compress(t, how), mt) for t, how, mt in zip(tars, ("gzip", "tar", "zstd"),
                                                                                      types)]
        doc = manifest_doc(blobs, family=family, config=image_config(
            cfg, [diff_id, *(sha256_digest(t) for t in tars)]), layers=layers)
        ref = f"{reg.address}/s2/layers:{family}"
        if family == "oci":
            for p in (folder / "blobs/sha256").iterdir():
                p.rename(folder / p.name)
            write_dir_layout(folder, doc)
            skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", f"dir:{folder}", f"docker://{ref}")
        else:
            write_oci_layout(folder, blobs.put(doc, DOCKER_MANIFEST), "layers")
            staged = Store(tmp_path / "staged")
            imported = archive.import_oci_layout(staged, folder, unpack=False)
            assert imported.digest == sha256_digest(doc) and imported.descriptor.media_type == DOCKER_MANIFEST
            assert registry.push(staged, imported.name, ref).digest == sha256_digest(doc)
        rec = registry.pull(dst, ref)
        assert rec.digest == sha256_digest(doc) == registry_manifest(ref)[1]
        assert [d.media_type for d in rec.manifest.layers] == [types[0], *types]
        assert run_out(rt, ref, "cat", "/etc/gzip", "/etc/tar", "/etc/zstd") == "gzip\ntar\nzstd\n"
        out = json.loads(skopeo("inspect", f"oci:{dst.root}:{ref}"))   # its OCI form, for peers
        assert out["Layers"] == [d.digest for d in rec.manifest.layers]


def test_foreign_layers(source, reg, tmp_path):
    layer, diff_id, cfg = busybox_parts(source)
    extra = make_tar({"etc/licensed": b"yes\n"})
    extra_gz = _compress(extra, "gzip")
    extra_digest = sha256_digest(extra_gz)
    config = image_config(cfg, [diff_id, sha256_digest(extra)])
    store = Store(tmp_path / "store")
    # a non-distributable layer the registry holds is fetched like any other
    folder = tmp_path / "nondist"
    blobs = Blobs(folder)
    nd = manifest_doc(blobs, family="oci", config=config, layers=[(layer, OCI_LAYER_GZIP), (extra_gz, OCI_LAYER_ND_GZIP)])
    write_dir_layout(folder, nd)
    for repo in ("nondist", "withheld"):
        skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", f"dir:{folder}",
               f"docker://{reg.address}/s2/{repo}:1")
    rec = registry.pull(store, f"{reg.address}/s2/nondist:1")
    assert rec.manifest.layers[1].media_type == OCI_LAYER_ND_GZIP
    assert (store.layer_dirs(rec)[0] / "etc/licensed").read_bytes() == b"yes\n"
    # one the registry does not serve (here: deleted from the repository) is refused clearly
    import requests

    assert requests.delete(f"{reg.url}/v2/s2/withheld/blobs/{extra_digest}", timeout=30).status_code == 202
    fresh = Store(tmp_path / "fresh")
    with pytest.raises(ManifestError, match=r"non-distributable \(foreign\) layer .* does not serve"):
        registry.pull(fresh, f"{reg.address}/s2/withheld:1")
    assert fresh.images() == [] and not any(fresh.layers_dir.iterdir()) and not any(fresh.tmp_dir.iterdir())
    # Docker's foreign layer (with the URLs it names; docker-registry refuses those by default) in a
    # layout: imported when the layout holds it, refused clearly when it does not
    layout = tmp_path / "layout"
    lblobs = Blobs(layout / "blobs/sha256")
    man = json.loads(manifest_doc(lblobs, family="docker", config=config, layers=[(layer, DOCKER_LAYER_GZIP)]))
    man["layers"].append({"mediaType": DOCKER_FOREIGN_LAYER_GZIP, "digest": extra_digest, "size": len(extra_gz),
                          "urls": ["https://example.invalid/l.tar.gz"]})
    write_oci_layout(layout, lblobs.put(json.dumps(man).encode(), DOCKER_MANIFEST), "f")
    other = Store(tmp_path / "other")
    with pytest.raises(ImageError, match=r"non-distributable \(foreign\) layer .* archive does not include "
                                         r"\(the image says it is at https://example.invalid/l.tar.gz\)"):
        archive.import_oci_layout(other, layout, unpack=False)
    assert other.images() == []
    lblobs.put(extra_gz, DOCKER_FOREIGN_LAYER_GZIP)
    rec = archive.import_oci_layout(other, layout)
    assert rec.manifest.layers[1].urls == ("https://example.invalid/l.tar.gz",)
    assert (other.layer_dirs(rec)[0] / "etc/licensed").read_bytes() == b"yes\n"


# --- podman push, podman save ------------------------------------------------------------------------


@pytest.mark.slow
def test_podman_push_and_docker_archive(source, dst, rt, reg, podman, tmp_path):
    oci = tmp_path / "bb.oci.tar"
    archive.save_oci_archive(source, source.resolve("busybox:1"), oci)
    name = podman("load", "-q", "-i", str(oci)).strip().split()[-1]
    for fmt in ("v2s2", "oci"):
        ref = f"{reg.address}/s2/podman:{fmt}"
        podman("push", "--tls-verify=false", "--format", fmt, name, f"docker://{ref}")
        raw, digest = registry_manifest(ref)
        assert json.loads(raw)["mediaType"] == (DOCKER_MANIFEST if fmt == "v2s2" else OCI_MANIFEST)
        rec = registry.pull(dst, ref)
        assert rec.digest == digest
        assert run_out(rt, ref, "cat", "/etc/passwd").startswith("root:")
    # what `podman save --format docker-archive` writes imports and runs
    dar = tmp_path / "bb.docker.tar"
    podman("save", "--format", "docker-archive", "-o", str(dar), name)
    rec = archive.import_docker_archive(dst, dar, name="from-podman:1")
    assert run_out(rt, rec.name, "cat", "/etc/passwd").startswith("root:")


# --- a store written by an earlier version ------------------------------------------------------------


def test_store_of_an_earlier_version_is_upgraded(v2s2, dst, tmp_path):
    """Before, a Docker manifest was tagged in index.json directly: peers could not see it."""
    ref, rec = v2s2
    old = Store(tmp_path / "old")
    for d in (rec.digest, rec.manifest.config.digest, rec.manifest.layers[0].digest):
        shutil.copy(dst.blob_path(d), old.blob_path(d))
    entry = {"mediaType": DOCKER_MANIFEST, "digest": rec.digest, "size": rec.descriptor.size,
             "annotations": {"org.opencontainers.image.ref.name": ref}}
    (old.root / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                     "manifests": [entry]}))
    old.pin("c0ffee", old.record(ref, rec.digest))   # a container of the earlier version holds it
    again = Store(old.root)
    upgraded = index_entry(again, ref)
    assert upgraded["mediaType"] == OCI_MANIFEST and upgraded["annotations"][ANNOTATION_MANIFEST] == rec.digest
    assert again.resolve(ref).digest == rec.digest and again.pins()["c0ffee"]["manifest"] == rec.digest
    assert json.loads(skopeo("inspect", f"oci:{again.root}:{ref}"))["Layers"] == [rec.manifest.layers[0].digest]
    assert again.gc().blobs_removed == 0


# --- a kernel on a schema-2 image ---------------------------------------------------------------------


@pytest.mark.slow
def test_kernel_on_a_v2s2_image(kernel_env, reg, tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    from jupyter_contain.kernel import kernelspec

    store = kernel_env.store
    ref = f"{reg.address}/s2/debian:v2s2"
    skopeo("copy", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{store.root}:{IMAGE}", f"docker://{ref}")
    rec = registry.pull(store, ref)   # the layer is in the store already: manifest and config move
    assert rec.descriptor.media_type == DOCKER_MANIFEST and rec.digest == registry_digest(ref)
    name, _ = kernelspec.install(store=store, image_name=ref, name="contained-v2s2", prefix=str(tmp_path / "p"))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "p/share/jupyter/kernels")])
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(120)
        r = run_cell(kc, "print(open('/etc/os-release').read().split()[0])")
        assert r["reply"]["content"]["status"] == "ok" and r["stdout"].startswith("PRETTY_NAME"), r
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    store.rmi(ref)


def test_peer_gc_of_the_store_loses_no_image(v2s2, tmp_path, caplog):
    """umoci gc sees only the OCI forms in index.json: what was served may go, the image stays."""
    _need("umoci")
    ref, rec = v2s2
    store = Store(tmp_path / "store")
    registry.pull(store, ref)
    oci = index_entry(store, ref)["digest"]
    res = subprocess.run(["umoci", "gc", "--layout", str(store.root)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert not store.has_blob(rec.digest) and store.has_blob(oci)
    again = Store(store.root).resolve(ref)
    assert again.digest == oci and again.descriptor.media_type == OCI_MANIFEST
    assert again.config.diff_ids == rec.config.diff_ids
    assert "is gone from the store; using its OCI form" in caplog.text


def test_read_only_store_of_an_earlier_version_is_read_and_says_what_to_do(v2s2, dst, tmp_path):
    """A store the user cannot write (here: a read-only bind mount in a mount namespace of its own)."""
    ref, rec = v2s2
    old = Store(tmp_path / "old")
    for d in (rec.digest, rec.manifest.config.digest, rec.manifest.layers[0].digest):
        shutil.copy(dst.blob_path(d), old.blob_path(d))
    entry = {"mediaType": DOCKER_MANIFEST, "digest": rec.digest, "size": rec.descriptor.size,
             "annotations": {"org.opencontainers.image.ref.name": ref}}
    (old.root / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                     "manifests": [entry]}))
    before = (old.root / "index.json").read_bytes()
    script = ("import logging, sys; logging.basicConfig(level=logging.WARNING); "
              "from jupyter_contain.runtime.images.store import Store; s = Store(sys.argv[1]); "
              "print(s.resolve(sys.argv[2]).digest, s.record('x', sys.argv[3]).descriptor.media_type)")
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          'mount --bind -o ro "$1" "$1" && exec "$2" -c "$3" "$1" "$4" "$5"', "sh",
                          str(old.root), sys.executable, script, ref, rec.digest],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [rec.digest, DOCKER_MANIFEST]
    assert "cannot be upgraded now" in res.stderr and "run `jupyter contain images` once as a user who may " \
        "write the store" in res.stderr
    assert (old.root / "index.json").read_bytes() == before
