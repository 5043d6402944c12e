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
