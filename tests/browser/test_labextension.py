"""The JupyterLab extension in a real browser: JupyterLab 4 on 127.0.0.1, Debian's chromium
driven by Playwright, real contained kernels, a real registry.

Each step saves a screenshot under ``out/browser/`` (the README's pictures come from
there). What is checked: the extension is installed and enabled and loads without console
errors (its load time and bundle size are printed); the launcher shows the contained
kernels' logo; the status bar meter shows the container's memory limit and colours near
it; the Containers panel lists the store's images and a pull shows a bar per layer; the
snapshot dialog validates the tag while it is typed, makes an image and starts a kernel
from it; an OOM kill shows the death dialog; the image digest is recorded in the
notebook and a notebook whose recorded digest differs says so.

Owns: one JupyterLab server per module (the kernelspecs and store of ``kernel_env``,
isolated Jupyter folders in a temp dir), one chromium, one registry. Must not: touch the
user's Jupyter folders or kernelspecs (every Jupyter path points into the temp dir), or
leave a server, browser, container or kernelspec behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from kernel_fixtures import *  # noqa: F403
from kernel_fixtures import IMAGE

from jupyter_contain.kernel import kernelspec
from jupyter_contain.runtime import Runtime

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is needed for the browser tests")
pytest.importorskip("jupyterlab", reason="JupyterLab is needed for the browser tests")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "out" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LIMITED = "contained-limited"
LIMITED_NAME = "Contained Python (debian, 256 MiB)"
MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server over the test store, with every Jupyter folder in ``base``."""

    def __init__(self, base: Path, kernel_env) -> None:
        self.base = base
        self.port = _free_port()
        self.token = uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = base / "notebooks"
        self.root.mkdir(parents=True)
        self.data_dir = base / "data"
        settings = base / "settings"
        # no "Would you like news?" toast over the screenshots (and no fetch to the internet)
        notif = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notif.parent.mkdir(parents=True)
        notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        self.log_path = base / "lab.log"
        env = dict(os.environ)
        env.update({
            "JUPYTER_PATH": str(kernel_env.data_dir),
            "JUPYTER_CONFIG_DIR": str(base / "config"),
            "JUPYTER_DATA_DIR": str(self.data_dir),      # kernelspecs the API installs land here
            "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(settings),
            "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
            "JUPYTER_PLATFORM_DIRS": "1",
        })
        env.pop("JUPYTER_CONFIG_PATH", None)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.root}", f"--ContainApp.store_root={kernel_env.store.root}",
             f"--ContainApp.allowed_root={base}", "--ContainApp.kernelspec_user=True",
             "--LabApp.news_url=", "--ServerApp.open_browser=False"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=base)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.api("GET", "api/status")
                break
            except (OSError, urllib.error.URLError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"JupyterLab did not start:\n{self.log_text()[-3000:]}") from None
                time.sleep(0.2)

    def api(self, method: str, path: str, body: dict | None = None) -> dict | None:
        req = urllib.request.Request(f"{self.url}/{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
        return json.loads(data) if data else None

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # a clean stop shuts the kernels (and their containers) down
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def lab(kernel_env, tmp_path_factory):
    base = tmp_path_factory.mktemp("lab")
    # a second kernelspec for the test image, with limits (the launcher shows both)
    image = kernel_env.store.resolve(IMAGE)
    spec = kernelspec.kernel_json(image=image, display_name=LIMITED_NAME,
                                  config={"store_root": str(kernel_env.store.root), "memory": "256m", "pids": 128})
    spec_dir = kernel_env.spec_dir(LIMITED)
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    kernelspec.write_logos(spec_dir)
    before = {c.id for c in Runtime(kernel_env.store).containers()}
    server = Lab(base, kernel_env)
    try:
        yield server
    finally:
        server.stop()
        for c in Runtime(kernel_env.store).containers():
            if c.id not in before:
                c.remove(force=True)
        shutil.rmtree(spec_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def chromium():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("Debian's chromium is needed (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


class Page:
    """A Lab page with its console errors collected and a screenshot helper."""

    def __init__(self, browser, lab: Lab) -> None:
        self.lab = lab
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def open(self, path: str = "lab") -> None:
        # ?reset: a fresh workspace, whatever an earlier test left open
        sep = "&" if "?" in path else "?"
        self.page.goto(f"{self.lab.url}/{path}{sep}reset&token={self.lab.token}")
        self.page.wait_for_selector("#jp-main-dock-panel", timeout=60000)

    def shot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def new_notebook(self, display_name: str) -> None:
        self.page.wait_for_selector(".jp-LauncherCard", timeout=30000)
        self.page.locator(".jp-LauncherCard", has_text=display_name).first.click()
        self.wait_idle()

    def wait_idle(self, timeout: float = 120000) -> None:
        self.page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook", timeout=timeout)
        self.page.wait_for_function(
            """() => { const s = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Toolbar-kernelStatus');
                       return s && /Idle/i.test(s.getAttribute('title') || s.getAttribute('aria-label') || ''); }""",
            timeout=timeout)

    def run_cell(self, code: str) -> None:
        """Types ``code`` into the last cell and runs it (Shift+Enter)."""
        cell = self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .cm-content").last
        cell.click()
        self.page.keyboard.insert_text(code)
        self.page.keyboard.press("Shift+Enter")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(chromium, lab):
    p = Page(chromium, lab)
    try:
        yield p
    finally:
        p.close()
        # the kernels this test started go with it (their containers too)
        for session in lab.api("GET", "api/sessions") or []:
            lab.api("DELETE", f"api/sessions/{session['id']}")
        for kernel in lab.api("GET", "api/kernels") or []:
            lab.api("DELETE", f"api/kernels/{kernel['id']}")


def _contained_kernel_id(lab: Lab) -> str:
    kernels = lab.api("GET", "api/kernels") or []
    for k in kernels:
        info = lab.api("GET", f"jupyter-contain/api/v1/kernels/{k['id']}/container")
        if info and info.get("contained"):
            return k["id"]
    raise AssertionError(f"no contained kernel among {kernels}")


def test_extension_installed_enabled_and_loads_clean(page, lab):
    out = subprocess.run([sys.executable, "-m", "jupyterlab.labextensions", "list"], capture_output=True, text=True,
                         timeout=60)
    listing = out.stdout + out.stderr
    assert "jupyter-contain v0.1.0" in listing and "enabled" in listing.split("jupyter-contain v0.1.0", 1)[1][:40], listing

    start = time.monotonic()
    page.open()
    page.page.wait_for_selector(".jp-LauncherCard", timeout=60000)
    wall = time.monotonic() - start
    activated = page.page.evaluate(
        "() => performance.getEntriesByName('jupyter-contain:activated').map(e => e.startTime)")
    assert activated, "the extension's plugin never activated"
    remote = page.page.evaluate(
        """() => performance.getEntriesByType('resource').filter(r => r.name.includes('/jupyter-contain/static/'))
                 .map(r => ({name: r.name.split('/').pop(), ms: r.duration, bytes: r.transferSize || r.encodedBodySize}))""")
    assert any(r["name"].startswith("remoteEntry.") for r in remote), remote
    static = REPO / "jupyter_contain" / "labextension" / "static"
    bundle = sum(f.stat().st_size for f in static.glob("*.js"))
    print(f"\nlabextension: bundle {bundle / 1024:.1f} KiB in {len(list(static.glob('*.js')))} files; "
          f"activated {activated[0]:.0f} ms after navigation; launcher shown after {wall:.2f} s; "
          f"its files took {sum(r['ms'] for r in remote):.0f} ms to fetch: {remote}")

    # the launcher shows the contained kernels' logo (served from the kernelspec), loaded
    card = page.page.locator(".jp-LauncherCard", has_text="Contained Python (debian)").first
    logo = card.locator("img")
    # Lab prefers the SVG when a kernelspec has both
    assert "/kernelspecs/contained-debian/logo-svg.svg" in (logo.get_attribute("src") or "")
    page.page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=logo.element_handle())
    page.shot("01-launcher")
    ours = [e for e in page.errors if "jupyter-contain" in e or "jupyter_contain" in e]
    assert not ours, ours
    assert not [e for e in page.errors if e.startswith("uncaught")], page.errors


def test_meter_shows_the_container_limit_and_colours_near_it(page, lab):
    page.open()
    page.new_notebook(LIMITED_NAME)
    meter = page.page.locator(".jc-meter")
    page.page.wait_for_selector(".jc-meter-memory:has-text('/ 256 MiB')", timeout=30000)
    assert "Procs" in meter.inner_text() and "/ 128" in meter.inner_text()
    assert meter.get_attribute("data-level") == "ok"
    page.shot("02-meter")

    # the record of the image in the notebook's metadata: saved with the notebook
    kernel_id = _contained_kernel_id(lab)
    info = lab.api("GET", f"jupyter-contain/api/v1/kernels/{kernel_id}/container")
    page.page.keyboard.press("Control+s")
    page.page.wait_for_timeout(1500)
    saved = sorted(lab.root.glob("*.ipynb"), key=lambda p: p.stat().st_mtime)[-1]
    record = json.loads(saved.read_text())["metadata"].get("jupyter_contain")
    assert record and record["digest"] == info["image"]["digest"] and record["image"] == info["image"]["name"], record

    # 200 MiB of 256: the meter turns to its warning colour
    page.run_cell("block = bytearray(200 * 1024 * 1024); block[::4096] = b'x' * len(block[::4096])")
    page.page.wait_for_function(
        "() => ['warn', 'critical'].includes(document.querySelector('.jc-meter-memory')?.dataset.level)", timeout=30000)
    page.shot("03-meter-near-limit")

    # a kernel that is not contained: no meter
    page.page.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName").first.click()
    page.page.wait_for_selector(".jp-Dialog")
    page.page.locator(".jp-Dialog select").select_option(label="Python 3 (ipykernel)")
    page.page.locator(".jp-Dialog .jp-mod-accept").click()
    page.wait_idle()
    page.page.wait_for_selector(".jc-meter", state="detached", timeout=15000)


def _layer_tar(path: Path, name: str, size: int) -> Path:
    """A tar holding one file of ``size`` random bytes (incompressible: a visible download)."""
    data = path / name
    data.write_bytes(os.urandom(size))
    tar_path = path / f"{name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(data, arcname=name)
    return tar_path


@pytest.fixture(scope="module")
def pushed_image(tmp_path_factory):
    from registry_fixture import make_oci_image, push_with_skopeo, start_registry

    base = tmp_path_factory.mktemp("registry")
    with start_registry(base) as reg:
        layout = base / "layout"
        tars = [_layer_tar(base, f"layer{i}", (6 + 4 * i) * MiB) for i in range(3)]
        make_oci_image(layout, "v1", tars)
        ref = f"{reg.address}/jc-lab/layers:v1"
        push_with_skopeo(layout, ref, tag="v1")
        yield ref
    shutil.rmtree(base, ignore_errors=True)


def test_panel_lists_images_and_pull_shows_a_bar_per_layer(page, lab, pushed_image, kernel_env):
    page.open()
    page.page.locator(".jp-SideBar .lm-TabBar-tab[data-id='jupyter-contain-panel']").click()
    page.page.wait_for_selector(f".jc-image[data-name='{IMAGE}']", timeout=15000)
    page.shot("04-panel")

    # the tag check while typing: an invalid reference disables Pull
    field = page.page.locator(".jc-pull-input")
    field.fill("Not A Ref")
    assert page.page.locator(".jc-pull-button").is_disabled()
    field.fill(pushed_image)
    assert page.page.locator(".jc-pull-button").is_enabled()
    page.page.locator(".jc-pull-button").click()
    page.page.wait_for_selector(".jc-op[data-kind='pull']", timeout=15000)
    page.shot("05-pull-progress")
    page.page.wait_for_selector(".jc-op-succeeded[data-kind='pull']", timeout=120000)
    bars = page.page.locator(".jc-op-succeeded .jc-op-items .jc-progress")
    assert bars.count() >= 3, page.page.locator(".jc-op").inner_text()  # the layers (and the config blob)
    page.page.wait_for_selector(f".jc-image[data-name='{pushed_image}']", timeout=15000)
    page.shot("06-pull-done")
    try:
        assert any(i["name"] == pushed_image for i in lab.api("GET", "jupyter-contain/api/v1/images")["images"])
    finally:
        # remove it through the panel's own button and dialog
        page.page.locator(f".jc-image[data-name='{pushed_image}'] .jc-remove").click()
        page.page.locator(".jp-Dialog .jp-mod-warn").click()
        page.page.wait_for_selector(f".jc-image[data-name='{pushed_image}']", state="detached", timeout=15000)
    assert not any(i["name"] == pushed_image for i in lab.api("GET", "jupyter-contain/api/v1/images")["images"])


def test_snapshot_dialog_makes_an_image_that_starts_a_kernel(page, lab, kernel_env):
    tag = f"jc-lab-snap:{uuid.uuid4().hex[:8]}"
    page.open()
    page.new_notebook(LIMITED_NAME)
    page.run_cell("import os; os.makedirs('/opt/lab-data', exist_ok=True); "
                  "open('/opt/lab-data/hello.txt', 'w').write('made in the lab test' * 1000)")
    page.page.wait_for_timeout(1000)
    page.wait_idle()
    page.page.locator(".jc-snapshot-button").click()
    dialog = page.page.locator(".jp-Dialog")
    dialog.locator(".jc-diff-table").wait_for(timeout=30000)
    assert "/opt" in dialog.locator(".jc-diff-table").inner_text()
    tag_field = dialog.locator(".jc-snapshot-tag")
    tag_field.fill("Bad Tag")
    assert dialog.locator(".jc-snapshot-tag-error").inner_text() != ""
    assert dialog.locator(".jp-mod-accept").is_disabled()
    page.shot("07-snapshot-invalid-tag")
    tag_field.fill(tag)
    assert dialog.locator(".jc-snapshot-tag-error").inner_text() == ""
    dialog.locator(".jc-snapshot-message").fill("hello.txt for the lab test")
    page.shot("08-snapshot-dialog")
    dialog.locator(".jp-mod-accept").click()
    page.page.wait_for_selector(".jc-result-name", timeout=120000)
    page.shot("09-snapshot-done")
    images = lab.api("GET", "jupyter-contain/api/v1/images")["images"]
    made = [i for i in images if i["name"].endswith(tag)]
    assert made, [i["name"] for i in images]
    assert made[0]["digest"] in page.page.locator(".jc-result-digest").inner_text()
    try:
        # "New notebook with it": a kernel from the snapshot sees the file
        page.page.locator(".jc-open-kernel").click()
        page.page.wait_for_timeout(1000)
        page.wait_idle()
        page.run_cell("print(open('/opt/lab-data/hello.txt').read()[:20])")
        page.page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output:has-text('made in the lab test')",
                                    timeout=60000)
        page.shot("10-snapshot-kernel")
    finally:
        for spec in (lab.api("GET", "jupyter-contain/api/v1/kernelspecs") or {}).get("kernelspecs", []):
            if spec["image"].endswith(tag):
                for session in lab.api("GET", "api/sessions") or []:
                    lab.api("DELETE", f"api/sessions/{session['id']}")
                lab.api("DELETE", f"jupyter-contain/api/v1/kernelspecs/{spec['name']}")
        for image in made:
            try:
                lab.api("DELETE", f"jupyter-contain/api/v1/images/{urllib.request.quote(image['name'], safe='')}")
            except urllib.error.HTTPError:
                pass


def test_oom_kill_shows_the_death_dialog(page, lab):
    page.open()
    page.new_notebook(LIMITED_NAME)
    page.run_cell("hog = [bytearray(32 * 1024 * 1024) for _ in range(64)]")
    dialog = page.page.locator(".jp-Dialog", has_text="out of memory")
    dialog.wait_for(timeout=90000)
    text = dialog.inner_text()
    assert "Kernel killed: out of memory" in text and "256 MiB" in text, text
    page.shot("11-oom-dialog")
    dialog.locator("button", has_text="Restart kernel").click()
    page.wait_idle()


def test_notebook_with_another_recorded_digest_warns(page, lab):
    recorded = "sha256:" + "0" * 64
    nb = {
        "cells": [{"cell_type": "code", "execution_count": None, "id": "a1", "metadata": {}, "outputs": [],
                   "source": "print('hi')"}],
        "metadata": {"kernelspec": {"name": LIMITED, "display_name": LIMITED_NAME, "language": "python"},
                     "jupyter_contain": {"image": IMAGE, "digest": recorded, "kernelspec": LIMITED}},
        "nbformat": 4, "nbformat_minor": 5,
    }
    (lab.root / "pinned.ipynb").write_text(json.dumps(nb))
    page.open("lab/tree/pinned.ipynb")
    dialog = page.page.locator(".jp-Dialog", has_text="recorded a different image")
    dialog.wait_for(timeout=120000)
    text = dialog.inner_text()
    assert "sha256:000000000000" in text and "not in the image store" in text, text
    page.shot("12-digest-warning")
    dialog.locator("button", has_text="Record new image").click()
    page.page.keyboard.press("Control+s")
    page.page.wait_for_timeout(1500)
    saved = json.loads((lab.root / "pinned.ipynb").read_text())["metadata"]["jupyter_contain"]
    assert saved["digest"] != recorded and saved["digest"].startswith("sha256:")
