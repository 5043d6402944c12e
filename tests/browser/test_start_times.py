"""A click on a launcher tile to an idle kernel, in JupyterLab: pooled, cold and a local ipykernel (issue #19).

The lab of this module runs with the server's default warm pool (``ContainApp.kernel_pool=1``)
beside a second kernelspec of the same image that keeps no pool (``pool: 0``), and Jupyter's own
"Python 3 (ipykernel)". Each round clicks the three tiles in turn (a new notebook each) and waits
until the notebook's kernel is connected and idle, as a person sees it. What is asserted is the
behaviour: the pooled tile's notebook got the very container that waited in the pool, with the
notebook's folder mounted and as its working directory; the cold one got a new container. The
times are printed (the note and the README quote them), never asserted: speed is measured by
benchmarks, and a timed assertion on a shared machine would only measure the machine.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
from browser_fixtures import (
    IMAGE,
    KERNEL_DISPLAY_NAME,
    run_cell,
    screenshot,
    shutdown_kernels,
    wait_kernel_idle,
)

from jupyter_contain.kernel import kernelspec
from jupyter_contain.runtime import Runtime

#: the lab fixture's server options for this module: Jupyter Server's default pool
LAB_ARGS = ("--ContainApp.kernel_pool=1",)
API = "/jupyter-contain/api/v1"
COLD = "contained-cold"
COLD_NAME = "Contained Python (debian, no pool)"
POOL_LABEL = "jupyter-contain.pool"
ROUNDS = 3


@pytest.fixture(scope="module")
def cold_spec(lab):
    image = lab.store.resolve(IMAGE)
    spec = kernelspec.kernel_json(image=image, display_name=COLD_NAME,
                                  config={"store_root": str(lab.store.root), "pool": 0})
    spec_dir = lab.kernels_dir / COLD
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    kernelspec.write_logos(spec_dir)
    return COLD


def _waiting_pooled(lab) -> list[str]:
    """Ids of pooled containers whose kernel waits for a hand-out (blocked on its FIFO, read in /proc)."""
    out = []
    for c in Runtime(lab.store).containers():
        if not c.state.labels.get(POOL_LABEL) or c.pid is None:
            continue
        try:
            children = Path(f"/proc/{c.pid}/task/{c.pid}/children").read_text().split()
            if any(Path(f"/proc/{p}/wchan").read_text() in ("wait_for_partner", "fifo_open") for p in children):
                out.append(c.id)
        except OSError:
            continue
    return out


def _wait_pool(lab, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got = _waiting_pooled(lab)
        if got:
            return got[0]
        assert time.monotonic() < deadline, f"no pooled kernel waited within {timeout} s:\n{lab.log_tail()}"
        time.sleep(0.2)


def _click_to_idle(page, display_name: str) -> float:
    """Seconds from a click on ``display_name``'s launcher tile to its notebook's idle kernel."""
    page.evaluate("() => window.jupyterapp.commands.execute('launcher:create')")
    card = page.locator(".jp-Launcher:visible .jp-LauncherCard", has_text=display_name).first
    card.wait_for(timeout=30000)
    t0 = time.monotonic()
    card.click()
    wait_kernel_idle(page)
    return time.monotonic() - t0


def _current_kernel(page, lab) -> dict:
    kid = page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.id")
    return lab.api("GET", f"{API}/kernels/{kid}/container")


def test_click_to_idle_kernel_pooled_cold_and_local(page, lab, cold_spec):
    # kernels are shut down behind their open notebooks between rounds: the status bar meter's next
    # poll of a gone kernel's stats is a 404, which the browser logs as a failed resource
    page.expected_console_errors.append(r"status of 404 .*/jupyter-contain/api/v1/kernels/[0-9a-f-]+/container/stats")
    page.evaluate("() => window.jupyterapp.serviceManager.kernelspecs.refreshSpecs()")
    times: dict[str, list[float]] = {"pooled": [], "cold": [], "local": []}
    # the default pool fills after a kernelspec's first start (itself cold): start it once
    _click_to_idle(page, KERNEL_DISPLAY_NAME)
    shutdown_kernels(lab)
    for _ in range(ROUNDS):
        waiting = _wait_pool(lab)
        times["pooled"].append(_click_to_idle(page, KERNEL_DISPLAY_NAME))
        info = _current_kernel(page, lab)
        assert info["container"]["id"] == waiting, (info, waiting)   # the warm one was handed out
        times["cold"].append(_click_to_idle(page, COLD_NAME))
        cold = _current_kernel(page, lab)
        assert cold["container"]["id"] != waiting and cold["container"]["id"] not in _waiting_pooled(lab)
        times["local"].append(_click_to_idle(page, "Python 3 (ipykernel)"))
        assert _current_kernel(page, lab)["contained"] is False
        shutdown_kernels(lab)
    screenshot(page, "after-rounds")
    # the pooled kernel's notebook folder and working directory, as a cold start gives them
    waiting = _wait_pool(lab)
    _click_to_idle(page, KERNEL_DISPLAY_NAME)
    assert _current_kernel(page, lab)["container"]["id"] == waiting
    page.evaluate("""() => {
        const nb = window.jupyterapp.shell.currentWidget.content;
        nb.model.sharedModel.insertCell(0, {cell_type: 'code', source:
            "import os; print('cwd', os.getcwd()); print('files', sorted(os.listdir('.'))[:50])"});
    }""")
    out = run_cell(page, 0)
    assert f"cwd {lab.notebook_dir}" in out, out
    assert ".ipynb" in out, out
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nclick -> idle kernel in JupyterLab, {ROUNDS} rounds, median (all): "
          + "; ".join(f"{k} {med[k] * 1000:.0f} ms ({', '.join(f'{x * 1000:.0f}' for x in v)})"
                      for k, v in times.items())
          + f"; pooled/local {med['pooled'] / med['local']:.2f}x, cold/local {med['cold'] / med['local']:.2f}x")
