"""The notebooks in notebooks/ executed with nbclient against a contained kernel, outputs checked."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import nbformat
import pytest
from kernel_fixtures import *  # noqa: F403
from kernel_fixtures import KERNEL_NAME, make_spec
from nbclient import NotebookClient

from jupyter_contain.runtime import Runtime

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _text(nb, tag: str) -> str:
    cell = next(c for c in nb.cells if tag in c.get("metadata", {}).get("tags", []))
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"cell {tag} raised: {errors[0]['ename']}: {errors[0]['evalue']}"
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _execute(path: Path, kernel_name: str, cwd: Path):
    """Execute as `jupyter execute` would: nbclient makes (and shuts down) its own kernel manager."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=120, startup_timeout=120, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


@pytest.fixture
def jupyter_path(kernel_env, monkeypatch):
    """The test kernelspecs come first on JUPYTER_PATH (as `jupyter contain bootstrap --sys-prefix` would)."""
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_env.data_dir))


def test_tour(jupyter_path, kernel_env, kernel_runtime, tmp_path):
    name = make_spec(kernel_env, "t-tour", memory="256m")
    nb = _execute(NOTEBOOKS / "tour.ipynb", name, tmp_path)

    iso = _text(nb, "isolation")
    hostname = re.search(r"hostname:\s+(\S+)", iso).group(1)
    assert hostname != socket.gethostname() and re.fullmatch(r"[0-9a-f]{12}", hostname)
    assert int(re.search(r"kernel pid:\s+(\d+)", iso).group(1)) < 10
    assert "PID 1:          jc-init" in iso
    assert int(re.search(r"processes seen:\s+(\d+)", iso).group(1)) < 10

    net = _text(nb, "network")
    assert "network interfaces: ['lo']" in net and "outside unreachable" in net

    lim = _text(nb, "limits")
    assert "memory limit:  256 MiB" in lim and "process limit: 512" in lim

    layer = _text(nb, "layer")
    assert "root filesystem: overlay" in layer and "hello.txt" in layer

    pip = _text(nb, "pip")
    assert "pip exit code: 1" in pip and "tqdm" in pip

    assert "marker found, written at" in _text(nb, "marker-read")
    # the container is gone with the kernel; the image did not get the tour's files
    assert Runtime(kernel_env.store).containers() == []
    image = kernel_env.store.resolve("localhost/debian:bookworm")
    for layer_dir in kernel_env.store.layer_dirs(image):
        assert not (layer_dir / "opt/hello.txt").exists()


def test_tour_with_default_kernelspec(jupyter_path, kernel_env, kernel_runtime, tmp_path):
    """The kernelspec `jupyter contain bootstrap` installs (no limits given): the tour runs clean
    and shows the machine's default memory limit (half its memory, at most 8 GiB)."""
    from jupyter_contain.runtime import default_memory_limit
    nb = _execute(NOTEBOOKS / "tour.ipynb", KERNEL_NAME, tmp_path)
    assert f"memory limit:  {default_memory_limit() >> 20} MiB" in _text(nb, "limits")
