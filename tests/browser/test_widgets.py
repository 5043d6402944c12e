"""JupyterLab 4 in Chromium with contained kernels: the launcher tile, cells, and widgets rendering.

Every test saves screenshots under ``out/browser/`` (CI keeps them). The
widgets are the ones a user sees: an ``ipywidgets.IntSlider`` (rendered by
JupyterLab's own widget manager: widget protocol 2, ipywidgets 8 in the
kernel), the resources panel and the snapshot form (``%container``). One
JupyterLab server serves the whole module (``lab``); each test gets a fresh
page and leaves no kernel running.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest
from browser_fixtures import (
    KERNEL_DISPLAY_NAME,
    cell,
    open_notebook,
    run_cell,
    run_cli,
    screenshot,
    wait_kernel_idle,
)

WIDGET_ERRORS = ("Error displaying widget", "Widget Javascript not detected", "model not found")


def _assert_no_widget_errors(text: str) -> None:
    for bad in WIDGET_ERRORS:
        assert bad not in text, text


def _launcher_card(page, display_name: str):
    return page.locator(".jp-Launcher .jp-LauncherCard", has_text=display_name)


def test_launcher_shows_the_contained_kernel_tile(page):
    card = _launcher_card(page, KERNEL_DISPLAY_NAME)
    card.first.wait_for(state="visible")
    shot = screenshot(page, "launcher")
    # one tile in the Notebook section and one in the Console section
    assert sorted(c.get_attribute("data-category") for c in card.all()) == ["Console", "Notebook"], shot


def test_a_notebook_on_the_contained_kernel_runs_a_cell(page, lab):
    open_notebook(page, lab, "hello.ipynb", [
        "import os, socket\n"
        "print('pid', os.getpid(), 'host', socket.gethostname())\n"
        "print('init', open('/proc/1/comm').read().strip())",
    ])
    out = run_cell(page, 0)
    shot = screenshot(page, "cell")
    # a container of its own: the kernel sees a small pid space, with our init as pid 1
    m = re.search(r"pid (\d+) host (\S+)", out)
    assert m and int(m.group(1)) < 100, (out, shot)
    assert "init jc-init" in out, (out, shot)
    assert page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-KernelName").inner_text() == KERNEL_DISPLAY_NAME


def test_int_slider_renders_and_moving_it_changes_the_kernel_value(page, lab):
    open_notebook(page, lab, "slider.ipynb", [
        "import ipywidgets\n"
        "s = ipywidgets.IntSlider(value=3, min=0, max=10, description='n')\n"
        "print('ipywidgets', ipywidgets.__version__)\n"
        "s",
        "print('value is', s.value)",
    ])
    out = run_cell(page, 0)
    _assert_no_widget_errors(out)
    slider = cell(page, 0).locator(".jupyter-widgets.widget-slider")
    slider.wait_for(state="visible")
    readout = cell(page, 0).locator(".widget-readout")
    assert readout.inner_text().strip() == "3"
    screenshot(page, "slider-3")
    # the keyboard moves a focused noUiSlider handle one step per press
    cell(page, 0).locator(".noUi-handle").click()
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    page.wait_for_function("(el) => el.textContent.trim() === '7'", arg=readout.element_handle())
    shot = screenshot(page, "slider-7")
    out = run_cell(page, 1)
    assert "value is 7" in out, (out, shot)
    # a saved notebook, reloaded, gets the live widget back from the kernel (the widget-control
    # comm, which the guest answers from the kernel's start on), at its current value
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    page.reload()
    restored = cell(page, 0).locator(".widget-readout")
    restored.wait_for(state="visible", timeout=60_000)
    assert restored.inner_text().strip() == "7"
    screenshot(page, "slider-restored")
    assert "No such comm target registered: jupyter.widget.control" not in lab.log_path.read_text()


def _label_after(text: str, pattern: str) -> re.Match:
    m = re.search(pattern, text)
    assert m, text
    return m


def test_resources_widget_shows_memory_and_processes_and_updates(page, lab):
    open_notebook(page, lab, "resources.ipynb", [
        "%container resources",
        "import subprocess\n"
        "sleepers = [subprocess.Popen(['sleep', '120']) for _ in range(5)]\n"
        "ballast = bytearray(96 * 2**20)",
        "for p in sleepers:\n    p.kill(); p.wait()\n",
    ])
    out = run_cell(page, 0)
    _assert_no_widget_errors(out)
    panel = cell(page, 0).locator(".jp-OutputArea-output .jupyter-widgets").first
    panel.wait_for(state="visible")
    text = cell(page, 0).locator(".jp-Cell-outputArea").inner_text()
    for label in ("Memory", "CPU", "Processes"):
        assert label in text, text
    procs_before = int(_label_after(text, r"(\d+) of 512").group(1))
    mem_before = _label_after(text, r"([\d.]+ [KMG]iB) of (?:no limit|[\d.]+ [KMG]iB)")
    # the labels are not cut off: the description column fits "Processes"
    for label in cell(page, 0).locator(".widget-label-basic, .widget-label").all():
        assert label.evaluate("el => el.scrollWidth <= el.clientWidth + 1"), label.inner_text()
    screenshot(page, "resources-before")
    run_cell(page, 1)
    # the panel polls every second: five more processes and ~96 MiB more show up
    page.wait_for_function(
        """([el, before]) => { const m = /(\\d+) of 512/.exec(el.innerText); return m && +m[1] >= before + 5; }""",
        arg=[cell(page, 0).locator(".jp-Cell-outputArea").element_handle(), procs_before], timeout=20_000)
    text = cell(page, 0).locator(".jp-Cell-outputArea").inner_text()
    shot = screenshot(page, "resources-after")
    assert _label_after(text, r"([\d.]+ [KMG]iB) of (?:no limit|[\d.]+ [KMG]iB)").group(1) != mem_before.group(1), (text, shot)
    run_cell(page, 2)


def test_snapshot_widget_validates_the_tag_makes_an_image_and_installs_a_kernel(page, lab):
    tag = f"browsertest{int(time.time()) % 100000}:v1"
    display = f"Browser snapshot {tag}"
    open_notebook(page, lab, "snapshot.ipynb", [
        "open('/root/made-in-the-browser.txt', 'w').write('hello')",
        "%container snapshot",
    ])
    run_cell(page, 0)
    out = run_cell(page, 1)
    _assert_no_widget_errors(out)
    form = cell(page, 1)
    tag_input = form.locator(".widget-text", has_text="Tag").locator("input")
    button = form.locator("button", has_text=re.compile(r"^\s*Snapshot\s*$"))
    tag_input.wait_for(state="visible")
    # the labels are not cut off ("Compression", "Kernel name")
    for name in ("Compression", "Kernel name"):
        label = form.locator("label", has_text=name).first
        assert label.evaluate("el => el.scrollWidth <= el.clientWidth + 1"), name
    tag_input.fill("Bad Tag!")
    tag_input.press("Tab")
    page.wait_for_function("(b) => b.disabled", arg=button.element_handle())
    assert "lowercase letters" in form.inner_text()
    screenshot(page, "snapshot-invalid-tag")
    tag_input.fill(tag)
    tag_input.press("Tab")
    page.wait_for_function("(b) => !b.disabled", arg=button.element_handle())
    button.click()
    form.get_by_text("Created").wait_for(timeout=120_000)
    shot = screenshot(page, "snapshot-created")
    made = re.search(r"Created (\S+)", form.inner_text())
    assert made and made.group(1).endswith("/" + tag), (form.inner_text(), shot)
    image = made.group(1)
    images = run_cli(lab, "images")
    assert images.returncode == 0, images.stderr
    repo = image.rsplit(":", 1)[0]
    assert any(len(cols) >= 2 and repo.endswith(cols[0]) and cols[0].endswith(tag.split(":")[0]) and cols[1] == "v1"
               for cols in map(str.split, images.stdout.splitlines())), (images.stdout, shot)

    installed = []
    try:
        form.locator(".widget-text", has_text="Kernel name").locator("input").fill(display)
        form.locator("button", has_text="Install as kernel").click()
        form.get_by_text("installed kernel").wait_for(timeout=60_000)
        installed = [p for p in lab.kernels_dir.iterdir() if display in p.joinpath("kernel.json").read_text()]
        assert len(installed) == 1
        screenshot(page, "snapshot-installed")
        # JupyterLab asks the server for kernelspecs every minute or so: ask now, then a new launcher
        page.evaluate("() => window.jupyterapp.serviceManager.kernelspecs.refreshSpecs()")
        page.evaluate("() => window.jupyterapp.commands.execute('launcher:create')")
        _launcher_card(page, display).first.wait_for(state="visible", timeout=30_000)
        screenshot(page, "snapshot-launcher")
    finally:
        for d in installed:
            shutil.rmtree(d, ignore_errors=True)
        run_cli(lab, "rmi", image)


def test_a_restarted_kernel_keeps_its_file_and_widgets_still_render(page, lab):
    open_notebook(page, lab, "restart.ipynb", [
        "open('/root/kept.txt', 'w').write('still here')",
        "import ipywidgets\nprint(open('/root/kept.txt').read())\nipywidgets.IntSlider(value=5)",
    ])
    run_cell(page, 0)
    # Kernel menu -> Restart Kernel... -> Restart
    page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Restart Kernel…$")).click()
    page.locator(".jp-Dialog-button.jp-mod-accept").click()
    wait_kernel_idle(page)
    out = run_cell(page, 1)
    shot = screenshot(page, "restarted")
    _assert_no_widget_errors(out)
    assert "still here" in out, (out, shot)
    cell(page, 1).locator(".jupyter-widgets.widget-slider").wait_for(state="visible")


@pytest.fixture
def image_without_ipywidgets(lab):
    """An image like the default one minus ipywidgets and comm (as an image with only ipykernel 6.17)."""
    from jupyter_contain.kernel import kernelspec

    name = "localhost/nowidgets:test"
    site = "/usr/local/lib/python3.11/dist-packages"
    rm = run_cli(lab, "run", "--name", "jc-browser-nowidgets", "localhost/debian:bookworm", "sh", "-c",
                 f"rm -rf {site}/ipywidgets {site}/ipywidgets-* {site}/comm {site}/comm-*")
    assert rm.returncode == 0, rm.stderr
    try:
        made = run_cli(lab, "commit", "jc-browser-nowidgets", name)
        assert made.returncode == 0, made.stderr
    finally:
        run_cli(lab, "rm", "-f", "jc-browser-nowidgets")
    spec_name, path = kernelspec.install(store=lab.store, image_name=name, name="contained-nowidgets",
                                         display_name="Contained Python (no widgets)",
                                         prefix=str(lab.kernels_dir.parents[2]), probe=False)
    yield spec_name
    shutil.rmtree(path, ignore_errors=True)
    run_cli(lab, "rmi", name)


def test_an_image_without_ipywidgets_borrows_the_hosts_and_its_slider_renders(page, lab, image_without_ipywidgets):
    open_notebook(page, lab, "borrowed.ipynb", [
        "import ipywidgets, comm\n"
        "print(ipywidgets.__version__, ipywidgets.__file__, comm.__file__)\n"
        "ipywidgets.IntSlider(value=4)",
        "import subprocess\n"
        "print(subprocess.run(['python3', '-c', 'import ipywidgets'], capture_output=True).returncode)",
    ], kernel=image_without_ipywidgets, display_name="Contained Python (no widgets)")
    out = run_cell(page, 0)
    _assert_no_widget_errors(out)
    cell(page, 0).locator(".jupyter-widgets.widget-slider").wait_for(state="visible")
    shot = screenshot(page, "borrowed-slider")
    assert "/.jupyter-contain-widgets/first/ipywidgets/" in out, (out, shot)
    assert "/.jupyter-contain-widgets/last/comm/" in out, (out, shot)
    # lent to the kernel process only: a python it starts sees the image as it is
    assert run_cell(page, 1).strip() == "1"
