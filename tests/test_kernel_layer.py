"""Any image becomes a kernel (#18): the kernel layer and the kernel site, on real stand-ins of stock images.

Stand-ins (``tests/standin_images.py``, built once per machine, imported once per
session): busybox (no Python, no libc), Debian minbase (no python3, as stock
``debian``/``ubuntu``), Debian minbase with python3 only (no ipykernel, no pip); and Debian bullseye
minbase, whose glibc (2.31) is older than the kernel layer's (2.36).
For each, ``kernelspec install`` (auto) chooses, and a real kernel over ZMQ
executes, sees the image as ``/`` with the image's own tools and libc, is
interrupted, opens an ipywidgets 8 comm, ``%pip install``\\ s a local wheel that a
restart keeps, is snapshotted (the snapshot holds the wheel and nothing of the
kernel layer or site) and a kernel from the snapshot imports the wheel.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from kernel_fixtures import run_cell
from standin_images import STANDINS

from jupyter_contain import errors
from jupyter_contain.kernel import containers, kernel_layer, kernelspec, snapshots
from jupyter_contain.runtime import Runtime, Store

READY = 90
#: what auto chooses for each stand-in
CHOICES = {"busybox": "layer", "minbase": "layer", "python3": "site:3.11", "bullseye": "layer"}
SHOWN = {"busybox": "busybox", "minbase": "minbase", "python3": "python3only", "bullseye": "bullseye"}


@dataclass(frozen=True)
class Standins:
    store: Store
    kernels_dir: Path
    names: dict[str, str]          # stand-in -> kernel name
    images: dict[str, str]         # stand-in -> image name
    ready_seconds: dict[str, float]

    def ksm(self) -> KernelSpecManager:
        return KernelSpecManager(kernel_dirs=[str(self.kernels_dir)])


@pytest.fixture(scope="session")
def standins(tmp_path_factory) -> Standins:
    """The three stand-ins in a temp store, each with a kernelspec installed by ``kernelspec install``."""
    from jupyter_core.utils import ensure_event_loop

    from jupyter_contain.runtime.images import archive, bootstrap

    ensure_event_loop()   # jupyter_client's per-thread loop lives as long as the process: before the leak check
    base = tmp_path_factory.mktemp("standins")
    store = Store(base / "store")
    prefix = base / "prefix"
    names, images = {}, {}
    for key, (recipe, _) in STANDINS.items():
        image = f"localhost/{SHOWN[key]}:latest"
        cfg = recipe.config
        archive.import_rootfs(store, bootstrap.cached_rootfs_tar(recipe), image, env=cfg.get("Env", ()),
                              cmd=cfg.get("Cmd", ()), workdir=cfg.get("WorkingDir", ""))
        names[key], _ = kernelspec.install(store=store, image_name=image, prefix=str(prefix))
        images[key] = image
    yield Standins(store=store, kernels_dir=prefix / "share/jupyter/kernels", names=names, images=images,
                   ready_seconds={})
    for c in Runtime(store).containers():
        c.remove(force=True)
    shutil.rmtree(base, ignore_errors=True)


def _wheel(folder: Path, name: str = "jcprobe", version: str = "1.0") -> Path:
    """A tiny pure-Python wheel, made here (no network, no build tools)."""
    files = {
        f"{name}.py": f"VALUE = 'from the {name} wheel'\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                             "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    out = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return out


#: what the kernel says about itself and the image it sees
_PROBE = r"""
import json, os, subprocess, sys
where = [l.split() for l in open('/proc/self/mountinfo') if l.split()[4] in ('/.jupyter-contain-kernel', '/.jupyter-contain-site')]
try:
    open('/.jupyter-contain-kernel/usr/bin/x' if os.path.isdir('/.jupyter-contain-kernel') else '/.jupyter-contain-site/x', 'w')
    wrote = 0
except OSError as e:
    wrote = e.errno
sh = subprocess.run(['sh', '-c', 'readlink /proc/$$/exe; grep -m1 -o "/[^ ]*libc[.-][^ ]*" /proc/$$/maps || echo static'],
                    capture_output=True, text=True).stdout.split()
print(json.dumps({'executable': sys.executable, 'env': sorted(os.environ), 'etc': sorted(os.listdir('/etc')),
                  'mounts': [(w[4], w[5]) for w in where], 'wrote': wrote, 'sh': sh,
                  'libc': sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libc.so' in l}),
                  'child_ipykernel': subprocess.run([sys.executable, '-c', 'import ipykernel'],
                                                    capture_output=True).returncode}))
"""


@pytest.mark.parametrize("which", ["busybox", "minbase", "python3"])
def test_a_stock_image_becomes_a_kernel(which, standins, tmp_path):
    name = standins.names[which]
    spec = json.loads((standins.kernels_dir / name / "kernel.json").read_text())
    assert spec["display_name"] == f"Contained Python ({SHOWN[which]})"
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config.get("kernel_layer") == CHOICES[which]
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    wheel = _wheel(notebooks)
    rt = Runtime(standins.store)
    km = KernelManager(kernel_name=name, kernel_spec_manager=standins.ksm())
    t0 = time.monotonic()
    km.start_kernel(cwd=str(notebooks))
    kc = km.client()
    kc.start_channels()
    snap = f"localhost/kernel-layer-test/{SHOWN[which]}:1"
    try:
        kc.wait_for_ready(READY)
        standins.ready_seconds[which] = time.monotonic() - t0
        c = km.provisioner.container
        r = run_cell(kc, _PROBE)
        assert r["error"] is None, r
        seen = json.loads(r["stdout"].strip().splitlines()[-1])
        # the kernel's Python: the layer's, or the image's own with the site on sys.path
        layered = CHOICES[which] == "layer"
        assert seen["executable"] == (kernel_layer.LAYER_PYTHON if layered else "/usr/bin/python3")
        assert seen["libc"] == (["/.jupyter-contain-kernel/lib/libc.so.6"] if layered
                                else ["/usr/lib/x86_64-linux-gnu/libc.so.6"])
        # nothing of it leaks to the image's programs
        assert not {"LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME", "PYTHONPATH"} & set(seen["env"])
        # sys.executable runs in a subprocess; the site is on the kernel's sys.path only, not the image's Python's
        assert seen["child_ipykernel"] == (0 if layered else 1)
        # the image is `/`: its /etc, its shell, its libc (or none: busybox is static)
        if which == "busybox":
            assert "passwd" in seen["etc"] and "debian_version" not in seen["etc"]
            assert seen["sh"] == ["/bin/busybox", "static"]
        else:
            assert "debian_version" in seen["etc"]
            assert seen["sh"] == ["/usr/bin/dash", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
        # read-only, nosuid, nodev: the container cannot write the host-made folder
        [(target, opts)] = seen["mounts"]
        assert target == (kernel_layer.LAYER_DIR if layered else kernel_layer.SITE_DIR)
        assert {"ro", "nosuid", "nodev"} <= set(opts.split(",")), opts
        assert seen["wrote"] == errno.EROFS

        r = run_cell(kc, "%%sh\necho from $(readlink /proc/$$/exe)")   # %%sh and ! run the image's shell
        assert r["stdout"].strip() == ("from /bin/busybox" if which == "busybox" else "from /usr/bin/dash")
        if which != "busybox":   # busybox has no bash
            r = run_cell(kc, "%%bash\necho bash $BASH_VERSION")
            assert r["stdout"].startswith("bash 5."), r
        r = run_cell(kc, "!cat /etc/hostname")
        assert r["stdout"].strip() == c.id[:12]
        # the guest module (magics, host channel) is loaded as in every contained kernel
        r = run_cell(kc, "%container ps")
        assert c.id[:12] in r["stdout"] and r["error"] is None, r

        # interrupt: a long sleep ends with KeyboardInterrupt
        msg_id = kc.execute("import time; time.sleep(100)", stop_on_error=False)
        time.sleep(1.0)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"

        # widgets: ipywidgets 8 (protocol 2, what JupyterLab 4 renders) opens its comm to the client
        msgs: list[dict] = []
        kc.execute_interactive("import ipywidgets\nw = ipywidgets.IntSlider(value=7)\ndisplay(w)",
                               timeout=60, output_hook=msgs.append)
        opens = [m["content"] for m in msgs if m["msg_type"] == "comm_open"
                 and m["content"]["target_name"] == "jupyter.widget"]
        state = opens[-1]["data"]["state"]
        assert state["_model_name"] == "IntSliderModel" and state["value"] == 7
        assert state["_model_module_version"] == "2.0.0"
        views = [m["content"]["data"] for m in msgs if m["msg_type"] == "display_data"]
        assert views and views[-1]["application/vnd.jupyter.widget-view+json"]["version_major"] == 2

        # %pip: a local wheel into the container's own writable layer, kept across a restart
        r = run_cell(kc, f"%pip install --no-index --no-deps {wheel}", timeout=120)
        assert "Successfully installed jcprobe-1.0" in r["stdout"], r
        # importable at once, also when pip just made the site folder (a first %pip in a layer kernel)
        r = run_cell(kc, "import jcprobe; print(jcprobe.VALUE)")
        assert r["stdout"].strip() == "from the jcprobe wheel", r
        km.restart_kernel()
        kc.wait_for_ready(READY)
        assert km.provisioner.container.id == c.id
        r = run_cell(kc, "import jcprobe; print(jcprobe.VALUE); print(jcprobe.__file__)")
        value, where = r["stdout"].strip().splitlines()
        assert value == "from the jcprobe wheel", r
        assert where == ("/root/.local/lib/python3.11/site-packages/jcprobe.py" if layered
                         else "/usr/local/lib/python3.11/dist-packages/jcprobe.py")
        assert (c.upper / where.lstrip("/")).is_file()
        # the layer or site is a bind mount: nothing of it is in the writable layer
        for d in (kernel_layer.LAYER_DIR, kernel_layer.SITE_DIR):
            inside = c.upper / d.lstrip("/")
            assert not inside.exists() or not any(inside.iterdir())

        # a snapshot holds the wheel and nothing of the kernel layer or site
        rec = snapshots.snapshot(rt, c, snap)
        with standins.store.open_blob(rec.manifest.layers[-1].digest) as blob, \
                tarfile.open(fileobj=blob, mode="r|*") as tar:
            names = [m.name.removeprefix("./").rstrip("/") for m in tar]
        assert where.lstrip("/") in names
        assert not [n for n in names if n.startswith((".jupyter-contain-kernel", ".jupyter-contain-site"))]
        standins.store.untag(snap)

        # the kernel's own snapshot and kernelspec (%container): a kernelspec with the kernel's choice
        # (its kernels need the kernel layer or site as much as this one did)
        r = run_cell(kc, f"%container snapshot kl-{which}:1\n%container install kl-{which}:1", timeout=120)
        assert r["error"] is None and "installed kernel" in r["stdout"], r
        snap = f"localhost/kernel-snapshot/kl-{which}:1"
        snap_name = r["stdout"].strip().splitlines()[-1].rsplit("(", 1)[1].rstrip(")")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

    # a kernel from that snapshot: the same choice, and the wheel is there
    path = standins.kernels_dir / snap_name
    try:
        assert json.loads((path / "kernel.json").read_text())["metadata"]["kernel_provisioner"]["config"].get(
            "kernel_layer") == CHOICES[which]
        _kernel_from_snapshot(standins, snap_name, notebooks)
    finally:
        shutil.rmtree(path, ignore_errors=True)
        standins.store.untag(snap)


def _kernel_from_snapshot(standins: Standins, snap_name: str, notebooks: Path) -> None:
    km = KernelManager(kernel_name=snap_name, kernel_spec_manager=standins.ksm())
    km.start_kernel(cwd=str(notebooks))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(READY)
        r = run_cell(kc, "import jcprobe; print(jcprobe.VALUE)")
        assert r["stdout"].strip() == "from the jcprobe wheel", r
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_never_refuses_images_without_python_or_ipykernel(standins, tmp_path):
    for which, expected in (("busybox", "has no python3"), ("python3", "has no ipykernel")):
        with pytest.raises(errors.KernelError) as ei:
            kernelspec.install(store=standins.store, image_name=standins.images[which], name=f"never-{which}",
                               prefix=str(tmp_path), kernel_layer_mode="never")
        assert expected in str(ei.value) and "--kernel-layer never" in str(ei.value)
        assert not (tmp_path / f"share/jupyter/kernels/never-{which}").exists()
    assert Runtime(standins.store).containers() == []   # the probe containers are gone


def test_always_runs_the_layer_even_where_the_image_has_python(standins, tmp_path, caplog):
    with caplog.at_level("INFO", logger="jupyter_contain.kernel.kernelspec"):
        _, path = kernelspec.install(store=standins.store, image_name=standins.images["python3"],
                                        name="always-python3", prefix=str(tmp_path), kernel_layer_mode="always")
    spec = json.loads((Path(path) / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"]["kernel_layer"] == "layer"
    assert spec["display_name"] == "Contained Python (python3only)"
    assert any("kernel layer (--kernel-layer always)" in r.getMessage() for r in caplog.records)


def test_auto_says_which_it_chose(standins, tmp_path, caplog):
    with caplog.at_level("INFO", logger="jupyter_contain.kernel.kernelspec"):
        kernelspec.install(store=standins.store, image_name=standins.images["busybox"], name="said-busybox",
                           prefix=str(tmp_path))
        kernelspec.install(store=standins.store, image_name=standins.images["python3"], name="said-python3",
                           prefix=str(tmp_path))
    said = [r.getMessage() for r in caplog.records]
    assert any("busybox:latest has no python3: kernels run from the kernel layer" in s for s in said), said
    assert any("Python 3.11 without ipykernel: kernels run on its own Python with ipykernel from the kernel site"
               in s for s in said), said


def test_a_bad_kernel_layer_option_fails_clearly():
    with pytest.raises(errors.InvalidSpec, match="option kernel_layer"):
        containers.KernelOptions.from_config({"kernel_layer": "site:2.7"})
    with pytest.raises(errors.InvalidSpec, match="option kernel_layer"):
        containers.KernelOptions.from_config({"kernel_layer": "/usr/bin/python"})
    o = containers.KernelOptions.from_config({"kernel_layer": "site:3.12"})
    assert o.kernel_choice == kernel_layer.KernelChoice("site", (3, 12))
    cmd = containers.kernel_command(o, "/c.json")
    assert cmd[0] == "python3" and "sys.path.append('/.jupyter-contain-site')" in cmd[2]
    assert containers.kernel_command(containers.KernelOptions.from_config({"kernel_layer": "layer"}),
                                     "/c.json")[0] == kernel_layer.LAYER_PYTHON


def test_the_layer_is_content_addressed_and_its_python_relinked(standins, monkeypatch):
    layer = kernel_layer.cached_kernel_layer()
    # a kernel start finds it without the bootstrap tarball (removed from the cache since, say)
    from jupyter_contain.runtime.images import bootstrap

    def no_tar(*a, **kw):
        raise AssertionError("a kernel start must not need the bootstrap tarball")

    monkeypatch.setattr(bootstrap, "cached_rootfs_tar", no_tar)
    monkeypatch.setattr(kernel_layer, "_memo", {})
    assert kernel_layer.cached_kernel_layer() == layer
    assert layer.name.startswith("layer-") and layer.parent == kernel_layer.default_cache_dir()
    meta = json.loads((layer / "jupyter-contain-kernel.json").read_text())
    assert meta["size"] > 50e6 and meta["source_diff_id"].startswith("sha256:")
    exe = layer / "usr/bin/python3.11"
    info = kernel_layer.read_elf(exe.read_bytes())
    assert info is not None and info.interpreter == f"{kernel_layer.LAYER_DIR}/lib/ld-linux-x86-64.so.2"
    # the same as patchelf reads it; every library it needs is in the layer
    needed = subprocess.run(["patchelf", "--print-needed", str(exe)], capture_output=True, text=True,
                            check=True).stdout.split()
    assert list(info.needed) == needed and "libstdc++.so.6" in needed
    assert subprocess.run(["patchelf", "--print-rpath", str(exe)], capture_output=True, text=True,
                          check=True).stdout.strip() == f"{kernel_layer.LAYER_DIR}/lib"
    assert all((layer / "lib" / n).is_file() for n in needed)
    # host-made: no file a container could have written, none setuid, none writable by others
    for dirpath, dirnames, files in os.walk(layer):
        for n in dirnames + files:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISLNK(st.st_mode):
                continue   # relative links inside the layer (Python's own)
            assert st.st_uid == os.geteuid() and not st.st_mode & 0o7022, os.path.join(dirpath, n)


def test_a_killed_build_leaves_nothing_and_the_next_one_cleans_up(tmp_path):
    def fails(tmp: Path, say) -> dict:
        (tmp / "half").write_text("half-made")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        kernel_layer._cached(tmp_path, "layer-0123456789abcdef", fails, progress=None, meta={})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".layer-0123456789abcdef.lock"]
    # a build killed with SIGKILL leaves its temp folder: the next build under the lock removes it
    stale = tmp_path / ".layer-0123456789abcdef.999.1.tmp"
    stale.mkdir()
    (stale / "half").write_text("half-made")

    def works(tmp: Path, say) -> dict:
        (tmp / "whole").write_text("made")
        return {"made": True}

    final = kernel_layer._cached(tmp_path, "layer-0123456789abcdef", works, progress=None, meta={"k": 1})
    assert final == tmp_path / "layer-0123456789abcdef" and (final / "whole").read_text() == "made"
    assert not stale.exists()
    meta = json.loads((final / "jupyter-contain-kernel.json").read_text())
    assert meta["k"] == 1 and meta["made"] is True
    # found as it is, never rebuilt
    assert kernel_layer._cached(tmp_path, "layer-0123456789abcdef", fails, progress=None, meta={}) == final


def test_argv_launcher_runs_a_layer_kernel(standins, tmp_path):
    """Clients that ignore provisioners run the kernelspec's argv: the launcher mounts the layer too."""
    spec = json.loads((standins.kernels_dir / standins.names["busybox"] / "kernel.json").read_text())
    del spec["metadata"]["kernel_provisioner"]
    d = tmp_path / "kernels/argv-busybox"
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps(spec))
    km = KernelManager(kernel_name="argv-busybox", kernel_spec_manager=KernelSpecManager(
        kernel_dirs=[str(tmp_path / "kernels")]))
    km.start_kernel(cwd=str(tmp_path))
    assert type(km.provisioner).__name__ == "LocalProvisioner"
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(READY)
        r = run_cell(kc, "import sys, subprocess; print(sys.executable); "
                         "print(subprocess.run(['readlink', '/proc/self/exe'], capture_output=True, text=True).stdout)")
        assert r["stdout"].split() == [kernel_layer.LAYER_PYTHON, "/bin/busybox"], r
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert Runtime(standins.store).containers() == []


def test_an_image_with_an_older_glibc_keeps_it_for_its_programs(standins, tmp_path):
    """glibc of any age: the kernel runs on the layer's glibc 2.36, the image's programs on its own 2.31."""
    name = standins.names["bullseye"]
    spec = json.loads((standins.kernels_dir / name / "kernel.json").read_text())
    assert spec["display_name"] == "Contained Python (bullseye)"
    assert spec["metadata"]["kernel_provisioner"]["config"]["kernel_layer"] == "layer"
    km = KernelManager(kernel_name=name, kernel_spec_manager=standins.ksm())
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(READY)
        r = run_cell(kc, "import os, subprocess\n"
                         "print(os.confstr('CS_GNU_LIBC_VERSION'))\n"
                         "print(subprocess.run(['getconf', 'GNU_LIBC_VERSION'], capture_output=True, text=True)"
                         ".stdout.strip())\n"
                         "print(open('/etc/debian_version').read().split('.')[0])")
        assert r["stdout"].split("\n")[:3] == ["glibc 2.36", "glibc 2.31", "11"], r
        msgs: list[dict] = []
        kc.execute_interactive("import ipywidgets\ndisplay(ipywidgets.Button(description='ok'))",
                               timeout=60, output_hook=msgs.append)
        assert any(m["msg_type"] == "comm_open" and m["content"]["data"]["state"]["_model_name"] == "ButtonModel"
                   for m in msgs)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


#: what a %%container Python cell says about the Python that runs it and the layer it sees
_CELL_PROBE = r"""
import errno, os, sys
where = [l.split() for l in open('/proc/self/mountinfo') if l.split()[4] == '/.jupyter-contain-kernel']
try:
    open('/.jupyter-contain-kernel/usr/bin/x', 'w')
    wrote = 0
except OSError as e:
    wrote = errno.errorcode.get(e.errno, e.errno)
print(sys.version.split()[0], sys.executable, os.path.exists('/bin/busybox'), wrote,
      [w[5] for w in where])
"""


def test_container_cells_of_a_layer_kernel_run_where_the_image_has_no_python(standins, tmp_path):
    """``%%container`` in a busybox kernel: Python cells run the layer's Python (read-only bind), the
    image's own python3 where an allowed image has one, and ``--shell`` cells the image's shell."""
    spec = json.loads((standins.kernels_dir / standins.names["busybox"] / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"]["config"]["allowed_images"] = [standins.images["python3"]]
    d = tmp_path / "kernels/cells-busybox"
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps(spec))
    km = KernelManager(kernel_name="cells-busybox", kernel_spec_manager=KernelSpecManager(
        kernel_dirs=[str(tmp_path / "kernels")]))
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(READY)
        r = run_cell(kc, "%%container\n" + _CELL_PROBE, timeout=60)
        assert r["error"] is None, r
        version, exe, busybox, wrote, opts = r["stdout"].strip().split(" ", 4)
        assert version.startswith("3.11.") and exe == kernel_layer.LAYER_PYTHON and busybox == "True", r
        # the same bind as the kernel's: the cell cannot write the host-made layer
        assert wrote == "EROFS", r
        assert {"ro", "nosuid", "nodev"} <= set(opts.strip("[]'").split(",")), opts
        # a failing cell reaches the notebook as a failure, its traceback from the layer's Python
        r = run_cell(kc, "%%container\nimport sys\nprint('before')\nraise SystemExit(3)", timeout=60)
        assert r["stdout"].strip() == "before" and r["error"] is not None, r
        # --shell: the image's own shell, never the layer
        r = run_cell(kc, "%%container --shell\nreadlink /proc/$$/exe; ls /.jupyter-contain-kernel 2>&1 | head -1",
                     timeout=60)
        assert r["stdout"].split("\n")[0] == "/bin/busybox" and "No such file" in r["stdout"], r
        # an allowed image with a python3 of its own runs the cell with it (its packages, its version)
        r = run_cell(kc, f"%%container {standins.images['python3']}\nimport sys; print(sys.executable)",
                     timeout=60)
        assert r["error"] is None and r["stdout"].strip() == "/usr/bin/python3", r
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert Runtime(standins.store).containers() == []


def test_nbclient_runs_a_notebook_on_a_kernel_from_an_image_without_python(standins, tmp_path, monkeypatch):
    """As `jupyter execute` / papermill would: nbclient makes its own kernel manager from the kernelspec."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("JUPYTER_PATH", str(standins.kernels_dir.parent))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os, sys\nprint(os.path.realpath('/bin/sh'), sys.version_info[:2])\n"
                                          "open('from-nbclient.txt', 'w').write('hi')")]
    NotebookClient(nb, timeout=120, startup_timeout=120, kernel_name=standins.names["busybox"],
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream")
    assert "/bin/busybox (3, 11)" in out, nb.cells[0].outputs
    assert (tmp_path / "from-nbclient.txt").read_text() == "hi"   # the notebook's folder, mounted
