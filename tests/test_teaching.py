"""Reproducible teaching (issue #18): pinned kernelspecs and class bundles.

Specification:
- ``kernelspec install --pin`` names the image by digest; a pinned kernel starts from exactly that
  content, and when the store lacks it (another image under the same name, no registry) it refuses
  with an error that names the digest and says how to pull it.
- ``kernelspec export NAME -o class.tar [--notebooks DIR]`` / ``kernelspec import class.tar`` move a
  kernelspec, its image and notebooks to a fresh store with no network; the imported kernel runs.
- An imported bundle is hostile input: traversal, absolute names, links, devices, wrong digests,
  tampered blobs, unknown members and options are refused with a clear error, and a refused import
  leaves the store, the kernelspecs and the file system as they were.
(``notebooks/teaching.ipynb`` end to end: tests/test_teaching_notebook.py.)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from kernel_fixtures import *  # noqa: F403
from kernel_fixtures import IMAGE, run_cell

from jupyter_contain import errors
from jupyter_contain.kernel import classroom, kernelspec
from jupyter_contain.runtime import ContainerSpec, Runtime, Store
from jupyter_contain.runtime.images import archive

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "jupyter_contain.cli"]


@pytest.fixture
def jupyter_path(kernel_env, tmp_path, monkeypatch):
    """Kernelspecs are looked up in the test prefix and a prefix of this test's own (for imports)."""
    mine = tmp_path / "prefix"
    (mine / "share/jupyter/kernels").mkdir(parents=True)
    monkeypatch.setenv("JUPYTER_PATH", f"{mine / 'share/jupyter'}{os.pathsep}{kernel_env.data_dir}")
    return mine


def _ksm(*prefixes: Path):
    from jupyter_client.kernelspec import KernelSpecManager

    return KernelSpecManager(kernel_dirs=[str(p / "share/jupyter/kernels") for p in prefixes])


def _start(ksm, name: str, cwd: Path):
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel(cwd=str(cwd))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=90)
    return km, kc


def _stop(km, kc) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=True)


# --- pinning -------------------------------------------------------------------------------------------


def test_pinned_kernelspec_starts_that_content_or_refuses(jupyter_path, kernel_env, kernel_runtime, tmp_path):
    store = kernel_env.store
    base = store.resolve(IMAGE)
    name, path = kernelspec.install(store=store, image_name=IMAGE, name="t-pinned", prefix=str(jupyter_path),
                                    probe=False, pin=True)
    cfg = json.loads((Path(path) / "kernel.json").read_text())["metadata"]["kernel_provisioner"]["config"]
    assert cfg["image"] == f"localhost/debian@{base.digest}"
    ksm = _ksm(jupyter_path)
    km, kc = _start(ksm, name, tmp_path)
    try:
        out = run_cell(kc, "print('pinned ok')")
        assert "pinned ok" in out["stdout"], out
    finally:
        _stop(km, kc)

    # the same name now means other content, and the pinned digest is gone from this store:
    # the kernel refuses, naming the digest and how to pull it (no registry answers for localhost/)
    other = Store(tmp_path / "other-store")
    archive.import_rootfs(other, io.BytesIO(_tiny_rootfs()), IMAGE)
    spec = json.loads((Path(path) / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"].update(store_root=str(other.root), pull_policy="never")
    (Path(path) / "kernel.json").write_text(json.dumps(spec))
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    with pytest.raises(Exception) as got:
        km.start_kernel(cwd=str(tmp_path))
    text = str(got.value)
    assert f"pinned to localhost/debian@{base.digest}" in text, text
    assert f"jupyter contain pull localhost/debian@{base.digest}" in text and "other content" in text, text
    assert Runtime(other).containers() == []
    with pytest.raises(errors.KernelError, match="pulling it failed"):
        classroom.resolve_pinned(Runtime(other), f"localhost/debian@{base.digest}")


def _tiny_rootfs() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        data = b"not the pinned image\n"
        ti = tarfile.TarInfo("etc/marker")
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


# --- class bundles: a round trip into a fresh store ------------------------------------------------------


def test_bundle_export_import_into_a_fresh_store(jupyter_path, kernel_env, kernel_runtime, tmp_path):
    store = kernel_env.store
    # the course's environment: the base image plus a file, as a snapshot would make it
    c = kernel_runtime.create(ContainerSpec(image=IMAGE, command=("sh", "-c", "echo course > /opt/course.txt")))
    try:
        c.start()
        assert c.wait(30).code == 0
        from jupyter_contain.kernel import snapshots

        env = snapshots.snapshot(kernel_runtime, c, "course/env:v1")
    finally:
        c.remove(force=True)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    name, _ = kernelspec.install(store=store, image_name=env.name, name="t-course", prefix=str(teacher),
                                 display_name="Course 101", memory="512m", network="none", probe=False)
    notebooks = tmp_path / "nb"
    (notebooks / "week1").mkdir(parents=True)
    (notebooks / "week1/intro.ipynb").write_text('{"cells": []}')
    (notebooks / "README.md").write_text("read me\n")
    (notebooks / "link").symlink_to("/etc/passwd")                      # never exported
    (notebooks / ".ipynb_checkpoints").mkdir()
    bundle = tmp_path / "class.tar"
    env_vars = {**os.environ, "JUPYTER_PATH": str(teacher / "share/jupyter"), "JUPYTER_CONTAIN_ROOT": str(store.root)}
    r = subprocess.run([*CLI, "kernelspec", "export", name, "-o", str(bundle), "--notebooks", str(notebooks)],
                       capture_output=True, text=True, env=env_vars, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    with tarfile.open(bundle) as t:
        names = sorted(t.getnames())
    assert names == ["image.oci.tar", "jupyter-contain-bundle.json", "notebooks/README.md",
                     "notebooks/week1/intro.ipynb"], names

    fresh = Store(tmp_path / "student-store")
    student = tmp_path / "student"
    where = tmp_path / "class-notebooks"
    r = subprocess.run([*CLI, "--root", str(fresh.root), "kernelspec", "import", str(bundle), "--prefix", str(student),
                        "--notebooks-dir", str(where)],
                       capture_output=True, text=True, env={**os.environ, "JUPYTER_PATH": str(student / "share/jupyter")},
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    spec = json.loads((student / "share/jupyter/kernels/t-course/kernel.json").read_text())
    cfg = spec["metadata"]["kernel_provisioner"]["config"]
    assert cfg["image"] == f"localhost/course/env@{env.digest}" and cfg["memory"] == "512m"
    assert cfg["store_root"] == str(fresh.root) and spec["display_name"] == "Course 101"
    assert set(cfg) <= {"image", "memory", "network", "store_root", "pids"}, cfg
    assert (where / "week1/intro.ipynb").read_text() == '{"cells": []}' and not (where / "link").exists()
    assert fresh.resolve(f"localhost/course/env@{env.digest}").digest == env.digest

    km, kc = _start(_ksm(student), "t-course", where)
    try:
        out = run_cell(kc, "print(open('/opt/course.txt').read().strip())")
        assert out["stdout"].strip() == "course", out
    finally:
        _stop(km, kc)
    store.rmi(env.name)


# --- hostile bundles ---------------------------------------------------------------------------------------


def _member(t: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in kw.items():
        setattr(ti, k, v)
    t.addfile(ti, io.BytesIO(data) if data else None)


@pytest.fixture(scope="module")
def good_parts(image_store, tmp_path_factory):
    """A small valid bundle's parts (busybox image), to make hostile variants of."""
    d = tmp_path_factory.mktemp("bundle-parts")
    rec = image_store.resolve("busybox:test")
    archive.save_oci_archive(image_store, rec, d / "image.oci.tar")
    manifest = {"format": classroom.BUNDLE_FORMAT, "version": 1,
                "kernelspec": {"name": "t-hostile", "display_name": "Hostile", "options": {"memory": "256m"}},
                "image": {"reference": classroom.pinned_reference(rec), "digest": rec.digest},
                "notebooks": ["a.ipynb"]}
    return manifest, (d / "image.oci.tar").read_bytes(), rec


def _bundle(path: Path, manifest: dict, image: bytes, extra=()) -> Path:
    with tarfile.open(path, "w") as t:
        _member(t, "jupyter-contain-bundle.json", json.dumps(manifest).encode())
        _member(t, "image.oci.tar", image)
        for args, kw in extra:
            _member(t, *args, **kw)
    return path


def _tamper_blob(image: bytes) -> bytes:
    """The same archive with one layer blob's bytes changed (its name keeps the old digest)."""
    src = tarfile.open(fileobj=io.BytesIO(image))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        biggest = max((m for m in src.getmembers() if m.name.startswith("blobs/")), key=lambda m: m.size)
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == biggest.name:
                data = data[:-1] + bytes([data[-1] ^ 1])
            _member(t, m.name, data)
    return out.getvalue()


def _other_image(image_store, tmp_path) -> bytes:
    rt = Runtime(image_store)
    c = rt.create(ContainerSpec(image="busybox:test", command=("sh", "-c", "echo other > /other")))
    try:
        c.start()
        assert c.wait(10).code == 0
        from jupyter_contain.runtime import snapshot

        rec = snapshot(rt, c, "hostile-other:1")
    finally:
        c.remove(force=True)
    archive.save_oci_archive(image_store, rec, tmp_path / "other.tar")
    image_store.rmi(rec.name)
    return (tmp_path / "other.tar").read_bytes()


NB = (("notebooks/a.ipynb", b"{}"), {})

CASES = {
    "traversal": (lambda m: m, [(("notebooks/../../escaped", b"x"), {}), NB], "not a plain relative path"),
    "absolute": (lambda m: m, [(("/etc/evil", b"x"), {}), NB], "unexpected member"),
    "symlink": (lambda m: m, [NB, (("notebooks/b.ipynb",), {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"})],
                "is a symlink"),
    "hardlink": (lambda m: m, [NB, (("notebooks/b.ipynb",), {"type": tarfile.LNKTYPE, "linkname": "image.oci.tar"})],
                 "is a hard link"),
    "device": (lambda m: m, [NB, (("notebooks/dev",), {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})],
               "device"),
    "duplicate": (lambda m: m, [NB, NB], "appears twice"),
    "unlisted notebook": (lambda m: m, [NB, (("notebooks/extra.ipynb", b"{}"), {})], "not the ones its manifest"),
    "mounts option": (lambda m: {**m, "kernelspec": {**m["kernelspec"], "options": {"mounts": ["/:/host"]}}}, [NB],
                      "may not carry: mounts"),
    "host network": (lambda m: {**m, "kernelspec": {**m["kernelspec"], "options": {"network": "host"}}}, [NB],
                     "none or bridge only"),
    "bad kernel name": (lambda m: {**m, "kernelspec": {**m["kernelspec"], "name": "../evil"}}, [NB], "kernel name"),
    "digest disagrees": (lambda m: {**m, "image": {**m["image"], "digest": "sha256:" + "0" * 64}}, [NB],
                         "agree with the digest"),
    "newer format": (lambda m: {**m, "version": 2}, [NB], "bundle version"),
}


@pytest.mark.parametrize("case", sorted(CASES) + ["wrong image", "tampered blob"])
def test_hostile_bundle_is_refused_and_changes_nothing(case, good_parts, image_store, jupyter_path, tmp_path,
                                                       monkeypatch):
    manifest, image, rec = good_parts
    if case == "wrong image":
        manifest, extra, why = manifest, [NB], "not localhost/busybox@"
        image = _other_image(image_store, tmp_path)
    elif case == "tampered blob":
        manifest, extra, why = manifest, [NB], "digest"
        image = _tamper_blob(image)
    else:
        change, extra, why = CASES[case]
        manifest = change(json.loads(json.dumps(manifest)))
    bundle = _bundle(tmp_path / "hostile.tar", manifest, image, extra)
    fresh = Store(tmp_path / "fresh")
    index = (fresh.root / "index.json").read_bytes()
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "fresh" not in p.parts)
    with pytest.raises(errors.ContainError, match=why.replace(".", r"\.").replace("(", r"\(")):
        classroom.import_bundle(bundle, store=fresh, prefix=str(jupyter_path))
    assert (fresh.root / "index.json").read_bytes() == index
    assert not list((jupyter_path / "share/jupyter/kernels").iterdir())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "fresh" not in p.parts) == before
    assert not list(fresh.tmp_dir.iterdir())
    assert not (tmp_path.parent / "escaped").exists() and not Path("/etc/evil").exists()


def test_valid_small_bundle_imports(good_parts, jupyter_path, tmp_path):
    """The control for the hostile cases: the unchanged parts import."""
    manifest, image, rec = good_parts
    bundle = _bundle(tmp_path / "ok.tar", manifest, image, [NB])
    fresh = Store(tmp_path / "fresh")
    info, path, nb = classroom.import_bundle(bundle, store=fresh, prefix=str(jupyter_path),
                                             notebooks_dir=tmp_path / "nb")
    assert info.digest == rec.digest and (nb / "a.ipynb").read_bytes() == b"{}"
    assert fresh.resolve(info.image).digest == rec.digest
    # a second import refuses (the kernelspec exists) and changes nothing
    with pytest.raises(errors.KernelError, match="exists already"):
        classroom.import_bundle(bundle, store=fresh, prefix=str(jupyter_path), notebooks_dir=tmp_path / "nb2")
    assert not (tmp_path / "nb2").exists()


# --- class bundles of kernel-layer kernelspecs: the layer travels, and is hostile input ----------------------


def test_bundle_carries_the_kernel_layer_and_its_kernel_runs_offline(kernel_env, image_store, tmp_path, monkeypatch):
    """A busybox kernelspec (kernel layer) exported and imported where no layer is cached: the kernel runs."""
    from jupyter_contain.kernel import kernel_layer

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    monkeypatch.setenv("JUPYTER_PATH", str(teacher / "share/jupyter"))
    name, path = kernelspec.install(store=image_store, image_name="busybox:test", name="t-bb-class",
                                    prefix=str(teacher))
    assert json.loads((Path(path) / "kernel.json").read_text())["metadata"]["kernel_provisioner"]["config"][
        "kernel_layer"] == "layer"
    bundle = tmp_path / "class.tar"
    info = classroom.export_bundle(name, bundle, store=image_store)
    here = kernel_layer.tree_digest(kernel_layer.cached_kernel_layer())
    assert info.layer is not None and info.layer[:2] == ("layer", here)
    with tarfile.open(bundle) as t:
        layer_members = [m for m in t.getmembers() if m.name.startswith("kernel-layer/")]
    assert any(m.name == "kernel-layer/usr/bin/python3.11" and m.isreg() for m in layer_members)
    assert all((m.isdir() or m.isreg() or m.issym()) and not m.mode & ~0o777 for m in layer_members)

    # the student's machine: no kernel layer cached (and no bootstrap tarball would be needed), a fresh store
    layers = tmp_path / "student-layers"
    monkeypatch.setenv(kernel_layer.CACHE_ENV, str(layers))
    monkeypatch.setenv("JUPYTER_PATH", str(student / "share/jupyter"))
    fresh = Store(tmp_path / "student-store")
    got, spec_path, _ = classroom.import_bundle(bundle, store=fresh, prefix=str(student))
    cfg = json.loads((Path(spec_path) / "kernel.json").read_text())["metadata"]["kernel_provisioner"]["config"]
    assert cfg["kernel_layer"] == f"layer@{here}", cfg
    installed = layers / f"bundle-layer-{here.split(':')[1]}"
    assert _names(layers) == [installed.name]   # no temp folder left
    assert kernel_layer.tree_digest(installed) == here
    assert not any(p.lstat().st_mode & 0o7022 for p in installed.rglob("*") if not p.is_symlink())

    km, kc = _start(_ksm(student), name, tmp_path)
    try:
        out = run_cell(kc, "import sys, os; print(sys.executable, 6 * 7, os.path.exists('/bin/busybox'))")
        assert out["stdout"].split() == [kernel_layer.LAYER_PYTHON, "42", "True"], out
        # its %%container cells get the same (imported) layer
        out = run_cell(kc, "%%container\nimport sys; print(sys.executable, sys.version_info[:2])", timeout=60)
        assert out["stdout"].strip() == f"{kernel_layer.LAYER_PYTHON} (3, 11)", out
    finally:
        _stop(km, kc)

    # imported again under another name: the same folder serves it, never replaced
    inode = installed.stat().st_ino
    classroom.import_bundle(bundle, store=fresh, prefix=str(student), name="t-bb-class-2")
    assert installed.stat().st_ino == inode and _names(layers) == [installed.name]
    # the kernelspec names content this machine does not have: a clear error at start, nothing built
    shutil.rmtree(installed)
    with pytest.raises(errors.KernelError, match="came with a class bundle"):
        kernel_layer.binds(kernel_layer.KernelChoice.parse(cfg["kernel_layer"]))


def _names(layers: Path) -> list[str]:
    """What a layer cache holds, but its lock files."""
    return sorted(p.name for p in layers.iterdir() if not p.name.endswith(".lock"))


def _tiny_layer(root: Path) -> str:
    """A small stand-in layer tree; returns its content digest."""
    from jupyter_contain.kernel import kernel_layer

    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir()
    (root / "usr/bin/python3").write_bytes(b"#!not really\n")
    (root / "usr/bin/python3").chmod(0o755)
    (root / "usr/lib/site.py").write_bytes(b"x = 1\n")
    (root / "usr/bin/python").symlink_to("python3")
    return kernel_layer.tree_digest(root)


L = "kernel-layer/"
_TINY = [((L + "usr",), {"type": tarfile.DIRTYPE, "mode": 0o755}), ((L + "usr/bin",), {"type": tarfile.DIRTYPE}),
         ((L + "usr/lib",), {"type": tarfile.DIRTYPE}),
         ((L + "usr/bin/python3", b"#!not really\n"), {"mode": 0o755}), ((L + "usr/lib/site.py", b"x = 1\n"), {}),
         ((L + "usr/bin/python",), {"type": tarfile.SYMTYPE, "linkname": "python3"})]
LAYER_CASES = {
    "link out of the tree": ([(("kernel-layer/usr/etc",), {"type": tarfile.SYMTYPE, "linkname": "../../etc"})],
                             "leaves the layer"),
    "link out through a link": ([((L + "usr/here",), {"type": tarfile.SYMTYPE, "linkname": "."}),
                                 ((L + "usr/up",), {"type": tarfile.SYMTYPE, "linkname": "here/../.."})],
                                "leaves the layer"),
    "absolute link": ([((L + "usr/passwd",), {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"})],
                      "stay inside it"),
    "written through a link": ([((L + "usr/to-lib",), {"type": tarfile.SYMTYPE, "linkname": "lib"}),
                                ((L + "usr/to-lib/evil.py", b"x"), {})], "written through the link"),
    "setuid": ([((L + "usr/bin/su", b"x"), {"mode": 0o4755})], "setuid"),
    "hard link": ([((L + "usr/bin/py2",), {"type": tarfile.LNKTYPE, "linkname": L + "usr/bin/python3"})],
                  "hard link"),
    "device": ([((L + "usr/null",), {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})], "device"),
    "traversal": ([((L + "usr/../../escaped", b"x"), {})], "not a plain relative path"),
    "content hash": ([], "not the sha256:0000"),
    "not the kernelspec's": ([], "is not the kernelspec's"),
}


def _layer_manifest(manifest: dict, digest: str) -> dict:
    import platform

    m = json.loads(json.dumps(manifest))
    m["kernelspec"]["options"]["kernel_layer"] = "layer"
    m["kernel_layer"] = {"choice": "layer", "digest": digest, "machine": platform.machine()}
    m["notebooks"] = []
    return m


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_hostile_kernel_layer_in_a_bundle_is_refused_and_installs_nothing(case, good_parts, jupyter_path,
                                                                           tmp_path, monkeypatch):
    from jupyter_contain.kernel import kernel_layer

    manifest, image, _ = good_parts
    manifest = _layer_manifest(manifest, _tiny_layer(tmp_path / "tree"))
    extra, why = LAYER_CASES[case]
    if case == "content hash":
        manifest["kernel_layer"]["digest"] = "sha256:" + "0" * 64
    if case == "not the kernelspec's":
        manifest["kernel_layer"]["choice"] = "site:3.11"
    layers = tmp_path / "layers"
    monkeypatch.setenv(kernel_layer.CACHE_ENV, str(layers))
    bundle = _bundle(tmp_path / "hostile.tar", manifest, image, [*_TINY, *extra])
    fresh = Store(tmp_path / "fresh")
    index = (fresh.root / "index.json").read_bytes()
    with pytest.raises(errors.ContainError, match=why.replace(".", r"\.")):
        classroom.import_bundle(bundle, store=fresh, prefix=str(jupyter_path))
    assert not layers.exists() or not _names(layers)
    assert (fresh.root / "index.json").read_bytes() == index
    assert not list((jupyter_path / "share/jupyter/kernels").iterdir())
    assert not list(fresh.tmp_dir.iterdir())
    assert not (tmp_path.parent / "escaped").exists()


def test_valid_small_kernel_layer_bundle_imports(good_parts, jupyter_path, tmp_path, monkeypatch):
    """The control for the hostile layer cases: the tiny tree installs under its content's name."""
    from jupyter_contain.kernel import kernel_layer

    manifest, image, _ = good_parts
    digest = _tiny_layer(tmp_path / "tree")
    layers = tmp_path / "layers"
    monkeypatch.setenv(kernel_layer.CACHE_ENV, str(layers))
    bundle = _bundle(tmp_path / "ok.tar", _layer_manifest(manifest, digest), image, _TINY)
    stale = layers / f".bundle-layer-{digest.split(':')[1]}.99.1.tmp"   # a killed import's
    (stale / "usr").mkdir(parents=True)
    info, path, _ = classroom.import_bundle(bundle, store=Store(tmp_path / "fresh"), prefix=str(jupyter_path))
    cfg = json.loads((Path(path) / "kernel.json").read_text())["metadata"]["kernel_provisioner"]["config"]
    assert cfg["kernel_layer"] == f"layer@{digest}"
    final = layers / f"bundle-layer-{digest.split(':')[1]}"
    assert _names(layers) == [final.name] and not stale.exists()
    assert os.readlink(final / "usr/bin/python") == "python3"
    assert (final / "usr/bin/python3").stat().st_mode & 0o7777 == 0o755
    assert (final / "usr/lib/site.py").stat().st_mode & 0o7777 == 0o644
