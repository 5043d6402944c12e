"""An image without Python becomes a kernel in JupyterLab (issue #18): busybox through the kernel layer.

In the browser lane (``tests/browser_fixtures.py``): the busybox base image goes into the lab's
store and ``kernelspec install`` (auto) gives it "Contained Python (busybox)", which runs from the
read-only kernel layer. The launcher shows the tile; a notebook on it runs a cell that sees busybox
as ``/`` (its shell, no Debian), and an ipywidgets 8 slider from the layer renders and moves the
kernel's value. Screenshots go to ``out/browser/``. The kernelspec and the image are removed after
the module; the lab fixture removes its kernels.
"""

from __future__ import annotations

import shutil

import pytest
from browser_fixtures import cell, open_notebook, run_cell, screenshot

from jupyter_contain.kernel import kernelspec

NAME = "contained-busybox"
DISPLAY = "Contained Python (busybox)"
IMAGE = "localhost/busybox:lab"


@pytest.fixture(scope="module")
def busybox_kernel(lab):
    from jupyter_contain.runtime.images import archive, bootstrap

    recipe = bootstrap.BUSYBOX
    archive.import_rootfs(lab.store, bootstrap.cached_rootfs_tar(recipe), IMAGE,
                          env=recipe.config.get("Env", ()), cmd=recipe.config.get("Cmd", ()))
    prefix = lab.kernels_dir.parents[2]
    name, path = kernelspec.install(store=lab.store, image_name=IMAGE, name=NAME, display_name=DISPLAY,
                                    prefix=str(prefix))
    try:
        yield name
    finally:
        shutil.rmtree(path, ignore_errors=True)
        lab.store.untag(IMAGE)


def test_busybox_kernel_runs_cells_and_widgets_in_jupyterlab(page, lab, busybox_kernel):
    import json

    spec = json.loads((lab.kernels_dir / NAME / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"]["kernel_layer"] == "layer", spec
    page.evaluate("() => window.jupyterapp.serviceManager.kernelspecs.refreshSpecs()")
    page.locator(".jp-Launcher .jp-LauncherCard:visible", has_text=DISPLAY).first.wait_for(timeout=30000)
    screenshot(page, "busybox-tile")

    open_notebook(page, lab, "busybox.ipynb", [
        "import os, subprocess, sys\n"
        "print('sh is', os.path.realpath('/bin/sh'))\n"
        "print('debian?', os.path.exists('/etc/debian_version'))\n"
        "print(subprocess.run(['sh', '-c', 'busybox | head -1'], capture_output=True, text=True).stdout)",
        "import ipywidgets\n"
        "s = ipywidgets.IntSlider(value=2, min=0, max=9)\n"
        "print('ipywidgets', ipywidgets.__version__)\n"
        "s",
        "print('value is', s.value)",
    ], kernel=NAME, display_name=DISPLAY)
    out = run_cell(page, 0)
    assert "sh is /bin/busybox" in out and "debian? False" in out and "BusyBox v" in out, out
    out = run_cell(page, 1)
    assert "ipywidgets 8." in out and "Error displaying widget" not in out, out
    slider = cell(page, 1).locator(".jupyter-widgets.widget-slider")
    slider.wait_for(state="visible")
    readout = cell(page, 1).locator(".widget-readout")
    assert readout.inner_text().strip() == "2"
    cell(page, 1).locator(".noUi-handle").click()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.wait_for_function("(el) => el.textContent.trim() === '5'", arg=readout.element_handle())
    assert "value is 5" in run_cell(page, 2)
    screenshot(page, "busybox-notebook")
