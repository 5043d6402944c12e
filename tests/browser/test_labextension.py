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

Runs in the browser lane (``tests/browser_fixtures.py``: ``lab``, ``page``, the helpers);
adds a kernelspec with limits beside the lane's and one registry for the module. Must not:
leave an image, a kernelspec or a container behind (what a test makes it removes, through
the UI where the UI can).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import uuid
from pathlib import Path

import pytest
from browser_fixtures import (
    IMAGE,
    KERNEL_DISPLAY_NAME,
    cell,
    notebook_json,
    open_notebook,
    run_cell,
    screenshot,
    shutdown_kernels,
    wait_kernel_idle,
)

from jupyter_contain.kernel import kernelspec
from jupyter_contain.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]
LIMITED = "contained-limited"
LIMITED_NAME = "Contained Python (debian, 256 MiB)"
API = "/jupyter-contain/api/v1"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def limited(lab):
    """A second kernelspec for the test image with a 256 MiB memory and a 128 process limit."""
    image = lab.store.resolve(IMAGE)
    spec = kernelspec.kernel_json(image=image, display_name=LIMITED_NAME,
                                  config={"store_root": str(lab.store.root), "memory": "256m", "pids": 128})
    spec_dir = lab.kernels_dir / LIMITED
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    kernelspec.write_logos(spec_dir)
    return LIMITED   # the lab's prefix, and this folder in it, go with the lab


def _contained_kernel_id(lab) -> str:
    for k in lab.api("GET", "/api/kernels"):
        if lab.api("GET", f"{API}/kernels/{k['id']}/container").get("contained"):
            return k["id"]
    raise AssertionError("no contained kernel is running")


def _save(page) -> None:
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty")


def _type_and_run(page, index: int, code: str) -> None:
    """Types ``code`` into cell ``index`` and runs it, without waiting for it to finish."""
    c = cell(page, index)
    c.locator(".cm-content").click()
    page.keyboard.insert_text(code)
    page.keyboard.press("Shift+Enter")


def test_extension_installed_enabled_and_loads_clean(page, lab, limited):
    out = subprocess.run([sys.executable, "-m", "jupyterlab.labextensions", "list"], capture_output=True, text=True,
                         timeout=60)
    listing = out.stdout + out.stderr
    assert "jupyter-contain v0.1.0" in listing, listing
    assert "enabled" in listing.split("jupyter-contain v0.1.0", 1)[1][:40], listing

    page.wait_for_selector(".jp-Launcher .jp-LauncherCard", timeout=60000)
    activated = page.evaluate("() => performance.getEntriesByName('jupyter-contain:activated').map(e => e.startTime)")
    assert activated, "the extension's plugin never activated"
    remote = page.evaluate(
        """() => performance.getEntriesByType('resource').filter(r => r.name.includes('/jupyter-contain/static/'))
                 .map(r => ({name: r.name.split('/').pop().split('?')[0], ms: Math.round(r.duration)}))""")
    assert any(r["name"].startswith("remoteEntry.") for r in remote), remote
    app_ready = page.evaluate("() => performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
    static = REPO / "jupyter_contain" / "labextension" / "static"
    bundle = sum(f.stat().st_size for f in static.glob("*.js"))
    print(f"\nlabextension: bundle {bundle / 1024:.1f} KiB in {len(list(static.glob('*.js')))} files; plugin "
          f"activated {activated[0]:.0f} ms after navigation (DOMContentLoaded {app_ready:.0f} ms); "
          f"fetching its files took {sum(r['ms'] for r in remote)} ms: {remote}")

    # the launcher shows the contained kernels' logo, served from the kernelspec folder
    for name in (KERNEL_DISPLAY_NAME, LIMITED_NAME):
        logo = page.locator(".jp-Launcher .jp-LauncherCard", has_text=name).first.locator("img")
        assert "/logo-svg.svg" in (logo.get_attribute("src") or ""), name  # Lab prefers the SVG
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=logo.element_handle())
    screenshot(page, "launcher-logo")
    # no console error: the lane's page fixture fails the test on any


def test_meter_shows_the_container_limit_and_colours_near_it(page, lab, limited):
    open_notebook(page, lab, "meter.ipynb", [
        "block = bytearray(150 * 1024 * 1024)\nblock[::4096] = b'x' * len(block[::4096])"],
        kernel=LIMITED, display_name=LIMITED_NAME)
    meter = page.locator(".jc-meter")
    page.wait_for_selector(".jc-meter-memory:has-text('/ 256 MiB')", timeout=30000)
    assert "Procs" in meter.inner_text() and "/ 128" in meter.inner_text(), meter.inner_text()
    assert meter.get_attribute("data-level") == "ok"
    screenshot(page, "meter")

    # the image the kernel runs is recorded in the notebook (saved with it)
    info = lab.api("GET", f"{API}/kernels/{_contained_kernel_id(lab)}/container")
    page.wait_for_function(
        "() => !!window.jupyterapp.shell.currentWidget.context.model.getMetadata('jupyter_contain')")
    _save(page)
    record = json.loads((lab.notebook_dir / "meter.ipynb").read_text())["metadata"]["jupyter_contain"]
    assert record["digest"] == info["image"]["digest"] and record["image"] == info["image"]["name"], record

    # 150 MiB more (the idle kernel's cgroup holds ~60 MiB with its page cache): past 75% of 256 MiB,
    # the meter takes its warning colour
    run_cell(page, 0)
    page.wait_for_function(
        "() => ['warn', 'critical'].includes(document.querySelector('.jc-meter-memory')?.dataset.level)",
        timeout=30000)
    screenshot(page, "meter-near-limit")

    # the Containers panel shows the kernel's container with its figures against the limits
    _open_panel(page)
    page.wait_for_selector(".jc-container .jc-item-stats:has-text('/ 256 MiB')", timeout=15000)
    assert page.locator(".jc-container .jc-item-stats").get_attribute("data-level") in ("warn", "critical")
    screenshot(page, "panel-kernel")

    # a kernel that is not contained: the meter goes away
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.changeKernel({name: 'python3'})")
    wait_kernel_idle(page)
    page.wait_for_selector(".jc-meter", state="hidden", timeout=15000)


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
    """``127.0.0.1:PORT/jc-lab/layers:v1`` in a registry of this module: three layers of 6, 10, 14 MiB."""
    from registry_fixture import make_oci_image, push_with_skopeo, start_registry

    base = tmp_path_factory.mktemp("registry")
    try:
        with start_registry(base) as reg:
            layout = base / "layout"
            make_oci_image(layout, "v1", [_layer_tar(base, f"layer{i}", (6 + 4 * i) * MiB) for i in range(3)])
            ref = f"{reg.address}/jc-lab/layers:v1"
            push_with_skopeo(layout, ref, tag="v1")
            yield ref
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _image_names(lab) -> set[str]:
    return {i["name"] for i in lab.api("GET", f"{API}/images")["images"]}


def _remove_image(lab, name: str) -> None:
    try:
        lab.api("DELETE", f"{API}/images/{urllib.parse.quote(name, safe='')}")
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise


def _open_panel(page) -> None:
    page.locator(".jp-SideBar .lm-TabBar-tab[data-id='jupyter-contain-panel']").click()
    page.wait_for_selector(".jc-panel .jc-images-body", timeout=15000)


def test_panel_lists_images_and_pull_shows_a_bar_per_layer(page, lab, pushed_image):
    _open_panel(page)
    page.wait_for_selector(f".jc-image[data-name='{IMAGE}']", timeout=15000)
    try:
        # the reference is checked while typed: an invalid one disables Pull
        field = page.locator(".jc-pull-input")
        field.fill("Not A Ref")
        assert page.locator(".jc-pull-button").is_disabled()
        assert "lowercase" in page.locator(".jc-pull + .jc-field-error").inner_text()
        field.fill(pushed_image)
        assert page.locator(".jc-pull-button").is_enabled()
        page.locator(".jc-pull-button").click()
        page.wait_for_selector(".jc-op[data-kind='pull'] .jc-op-items .jc-progress", timeout=60000)
        screenshot(page, "pull-progress")
        page.wait_for_selector(".jc-op-succeeded[data-kind='pull']", timeout=120000)
        bars = page.locator(".jc-op-succeeded .jc-op-items .jc-progress")
        assert bars.count() >= 3, page.locator(".jc-op").inner_text()  # one per layer (and the config)
        page.wait_for_selector(f".jc-image[data-name='{pushed_image}']", timeout=15000)
        screenshot(page, "panel-pulled")
        assert pushed_image in _image_names(lab)
        # removed through the panel's own button and its confirmation
        page.locator(f".jc-image[data-name='{pushed_image}'] .jc-remove").click()
        page.locator(".jp-Dialog .jp-mod-warn").click()
        page.wait_for_selector(f".jc-image[data-name='{pushed_image}']", state="detached", timeout=15000)
        assert pushed_image not in _image_names(lab)

        # "Kernel": the debian image as a kernel with a memory limit, then in the launcher
        page.locator(f".jc-image[data-name='{IMAGE}'] .jc-install").click()
        form = page.locator(".jp-Dialog .jc-install-form")
        form.locator(".jc-install-name").fill("panel-kernel")
        form.locator(".jc-install-display").fill("Panel kernel (384 MiB)")
        form.locator(".jc-install-memory").fill("384m")
        screenshot(page, "install-kernel")
        page.locator(".jp-Dialog .jp-mod-accept").click()
        page.locator(".jp-Dialog", has_text="Kernel installed").wait_for(timeout=60000)
        page.locator(".jp-Dialog .jp-mod-reject").click()
        spec = [k for k in lab.api("GET", f"{API}/kernelspecs")["kernelspecs"] if k["name"] == "panel-kernel"]
        assert spec and spec[0]["display_name"] == "Panel kernel (384 MiB)", spec
        assert spec[0]["memory"] in (384 * MiB, "384m"), spec
        page.locator(".jp-Launcher .jp-LauncherCard:visible", has_text="Panel kernel (384 MiB)").first.wait_for(
            timeout=30000)
        screenshot(page, "installed-kernel-in-launcher")
    finally:
        _remove_image(lab, pushed_image)
        try:
            lab.api("DELETE", f"{API}/kernelspecs/panel-kernel")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise


def test_snapshot_dialog_makes_an_image_pushes_it_and_starts_a_kernel(page, lab, limited, pushed_image):
    tag = f"jc-lab-snap:{uuid.uuid4().hex[:8]}"
    before = _image_names(lab)
    open_notebook(page, lab, "snap.ipynb", [
        "import os\nos.makedirs('/opt/lab-data', exist_ok=True)\n"
        "open('/opt/lab-data/hello.txt', 'w').write('made in the lab test ' * 1000)"],
        kernel=LIMITED, display_name=LIMITED_NAME)
    run_cell(page, 0)
    page.locator(".jc-snapshot-button").click()
    dialog = page.locator(".jp-Dialog")
    dialog.locator(".jc-diff-table").wait_for(timeout=30000)
    assert "/opt" in dialog.locator(".jc-diff-table").inner_text()
    tag_field = dialog.locator(".jc-snapshot-tag")
    tag_field.fill("Bad Tag")
    assert dialog.locator(".jc-snapshot-tag-error").inner_text() != ""
    assert dialog.locator(".jp-mod-accept").is_disabled()
    screenshot(page, "snapshot-invalid-tag")
    tag_field.fill(tag)
    assert dialog.locator(".jc-snapshot-tag-error").inner_text() == ""
    dialog.locator(".jc-snapshot-message").fill("hello.txt for the lab test")
    dialog.locator(".jc-snapshot-display").fill("Lab snapshot")
    screenshot(page, "snapshot-dialog")
    dialog.locator(".jp-mod-accept").click()
    made: list[str] = []
    try:
        page.wait_for_selector(".jc-result-name", timeout=120000)
        screenshot(page, "snapshot-done")
        made = sorted(_image_names(lab) - before)
        assert len(made) == 1 and made[0].endswith(tag), made
        image = lab.api("GET", f"{API}/images/{urllib.parse.quote(made[0], safe='')}")["image"]
        assert image["digest"] in page.locator(".jc-result-digest").inner_text()
        # "Push to": the registry of this module, read back with skopeo
        from registry_fixture import inspect_with_skopeo

        target = f"{pushed_image.split('/')[0]}/jc-lab/snap:{tag.split(':')[1]}"
        page.locator(".jc-push-target").fill("Bad Target")
        assert page.locator(".jc-push-button").is_disabled()
        page.locator(".jc-push-target").fill(target)
        page.locator(".jc-push-button").click()
        page.wait_for_selector(f".jc-push-done:has-text('{target}')", timeout=120000)
        screenshot(page, "snapshot-pushed")
        assert inspect_with_skopeo(target)["Digest"].startswith("sha256:")
        # "New notebook with it": a kernel from the snapshot sees the file
        page.locator(".jc-open-kernel").click()
        page.wait_for_function("() => window.jupyterapp.shell.currentWidget?.context?.path !== 'snap.ipynb'")
        wait_kernel_idle(page)
        _type_and_run(page, 0, "print(open('/opt/lab-data/hello.txt').read()[:20])")
        page.wait_for_selector(
            ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output:has-text('made in the lab test')",
            timeout=60000)
        screenshot(page, "snapshot-kernel")
    finally:
        from browser_fixtures import shutdown_kernels

        shutdown_kernels(lab)
        # the snapshot's kernelspec is not in the lab's kernels folder: wait for its container here
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(c.state.image_name.endswith(tag)
                                                  for c in Runtime(lab.store).containers()):
            time.sleep(0.2)
        for spec in lab.api("GET", f"{API}/kernelspecs")["kernelspecs"]:
            if spec["image"].endswith(tag):
                lab.api("DELETE", f"{API}/kernelspecs/{spec['name']}")
        for name in made or [n for n in _image_names(lab) - before]:
            _remove_image(lab, name)


def test_oom_kill_shows_the_death_dialog(page, lab, limited):
    # JupyterLab's own, when the kernel it was asking for its info dies under it
    page.expected_console_errors.append("Canceled future for kernel_info_request message before replies were done")
    open_notebook(page, lab, "oom.ipynb", [""], kernel=LIMITED, display_name=LIMITED_NAME)
    _type_and_run(page, 0, "hog = [bytearray(32 * 1024 * 1024) for _ in range(64)]")
    dialog = page.locator(".jp-Dialog", has_text="out of memory")
    dialog.wait_for(timeout=90000)
    text = dialog.inner_text()
    assert "Kernel killed: out of memory" in text and "256 MiB" in text, text
    screenshot(page, "oom-dialog")
    dialog.locator("button", has_text="Restart kernel").click()
    wait_kernel_idle(page)
    # the restarted kernel runs in the same container, with the limit
    page.wait_for_selector(".jc-meter-memory:has-text('/ 256 MiB')", timeout=30000)


def test_notebook_with_another_recorded_digest_warns(page, lab, limited):
    recorded = "sha256:" + "0" * 64
    nb = notebook_json(["print('hi')"], LIMITED, LIMITED_NAME)
    nb["metadata"]["jupyter_contain"] = {"image": IMAGE, "digest": recorded, "kernelspec": LIMITED}
    lab.api("PUT", "/api/contents/pinned.ipynb", {"type": "notebook", "format": "json", "content": nb})
    page.goto(f"{lab.url}/lab/workspaces/{page.workspace}/tree/pinned.ipynb?token={lab.token}")
    dialog = page.locator(".jp-Dialog", has_text="recorded a different image")
    dialog.wait_for(timeout=120000)
    text = dialog.inner_text()
    assert "sha256:000000000000" in text and "not in the image store" in text, text
    screenshot(page, "digest-warning")
    dialog.locator("button", has_text="Record new image").click()
    page.wait_for_function(
        f"() => window.jupyterapp.shell.currentWidget.context.model.getMetadata('jupyter_contain')?.digest !== '{recorded}'")
    _save(page)
    saved = json.loads((lab.notebook_dir / "pinned.ipynb").read_text())["metadata"]["jupyter_contain"]
    assert saved["digest"] != recorded and saved["digest"].startswith("sha256:"), saved


def _wait_operation(lab, op: dict, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while op["state"] == "running":
        assert time.monotonic() < deadline, op
        time.sleep(0.3)
        op = lab.api("GET", f"{API}/operations/{op['id']}")["operation"]
    assert op["state"] == "succeeded", op
    return op


def test_recorded_digest_missing_from_the_store_is_pulled_and_installed(page, lab, limited, pushed_image):
    from registry_fixture import inspect_with_skopeo

    # an image the store does not hold: a kernel's snapshot, pushed to the registry, removed locally
    suffix = uuid.uuid4().hex[:8]
    target = f"{pushed_image.split('/')[0]}/jc-lab/pin:{suffix}"
    kid = lab.api("POST", "/api/kernels", {"name": LIMITED})["id"]
    try:
        deadline = time.monotonic() + 120
        # (no client is connected, so the server never hears the kernel is idle: ask for its container)
        while lab.api("GET", f"{API}/kernels/{kid}/container").get("container", {}).get("status") != "running":
            assert time.monotonic() < deadline, "the kernel's container did not start"
            time.sleep(0.3)
        op = lab.api("POST", f"{API}/kernels/{kid}/container/commit",
                     {"tag": f"jc-lab-pin:{suffix}", "compress": "gzip"})["operation"]
        local = _wait_operation(lab, op)["result"]["image"]["name"]
        _wait_operation(lab, lab.api("POST", f"{API}/images/{urllib.parse.quote(local, safe='')}/push",
                                     {"target": target})["operation"])
        digest = inspect_with_skopeo(target)["Digest"]
    finally:
        lab.api("DELETE", f"/api/kernels/{kid}")
    _remove_image(lab, local)
    hex12 = digest.split(":")[1][:12]
    try:
        nb = notebook_json(["print('hi')"], LIMITED, LIMITED_NAME)
        nb["metadata"]["jupyter_contain"] = {"image": target, "digest": digest, "kernelspec": LIMITED}
        lab.api("PUT", "/api/contents/pinned-missing.ipynb", {"type": "notebook", "format": "json", "content": nb})
        page.goto(f"{lab.url}/lab/workspaces/{page.workspace}/tree/pinned-missing.ipynb?token={lab.token}")
        dialog = page.locator(".jp-Dialog", has_text="recorded a different image")
        dialog.wait_for(timeout=120000)
        assert "not in the image store" in dialog.inner_text()
        dialog.locator("button", has_text="Pull recorded image").click()
        page.wait_for_selector(".jc-pin:has-text('Installed kernel')", timeout=180000)
        screenshot(page, "pinned-digest-installed")
        specs = {k["name"]: k for k in lab.api("GET", f"{API}/kernelspecs")["kernelspecs"]}
        assert f"pinned-pin-{hex12}" in specs, sorted(specs)
        assert digest in specs[f"pinned-pin-{hex12}"]["image"] or any(
            digest == i["digest"] for i in lab.api("GET", f"{API}/images")["images"] if "jc-lab/pin" in i["name"])
    finally:
        try:
            lab.api("DELETE", f"{API}/kernelspecs/pinned-pin-{hex12}")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        for name in _image_names(lab):
            if "jc-lab/pin" in name:
                _remove_image(lab, name)


DIALOG = "contained-dialog"
DIALOG_NAME = "Contained Python (debian, asks)"
DIALOG_TAG = "localhost/debian:lab-dialog"


@pytest.fixture(scope="module")
def dialog_spec(lab):
    """A kernelspec that asks for start options (256 MiB by default), and a second tag of its image."""
    image = lab.store.resolve(IMAGE)
    spec = kernelspec.kernel_json(image=image, display_name=DIALOG_NAME,
                                  config={"store_root": str(lab.store.root), "memory": "256m"})
    spec["metadata"]["jupyter_contain"] = {"start_dialog": True}
    spec_dir = lab.kernels_dir / DIALOG
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    kernelspec.write_logos(spec_dir)
    lab.store.tag(DIALOG_TAG, image.descriptor)
    yield DIALOG
    lab.store.untag(DIALOG_TAG)


def _only_kernel(lab) -> dict:
    kernels = lab.api("GET", "/api/kernels")
    assert len(kernels) == 1, kernels
    return lab.api("GET", f"{API}/kernels/{kernels[0]['id']}/container")


def test_start_options_dialog_starts_with_the_choice_and_the_notebook_keeps_it(page, lab, dialog_spec):
    page.evaluate("() => window.jupyterapp.serviceManager.kernelspecs.refreshSpecs()")
    page.locator(".jp-Launcher .jp-LauncherCard:visible", has_text=DIALOG_NAME).first.click()
    form = page.locator(".jp-Dialog .jc-start-form")
    form.wait_for(timeout=60000)
    assert page.locator(".jp-Dialog-header").inner_text().startswith(f"Start {DIALOG_NAME}")
    assert form.locator(".jc-start-memory").get_attribute("placeholder") == "kernelspec: 256m"
    tags = form.locator(".jc-start-tag option").all_inner_texts()
    assert "bookworm (kernelspec)" in tags and "lab-dialog" in tags, tags
    assert lab.api("GET", "/api/kernels") == []            # nothing started behind the dialog
    # checked while typed
    form.locator(".jc-start-memory").fill("lots")
    page.wait_for_selector(".jc-start-error-memory:has-text('a size such as 512m')")
    screenshot(page, "start-dialog-invalid")
    form.locator(".jc-start-memory").fill("192m")
    form.locator(".jc-start-cpus").fill("0.5")
    form.locator(".jc-start-tag").select_option("lab-dialog")
    assert form.locator(".jc-start-error-memory").inner_text() == ""
    screenshot(page, "start-dialog")
    page.locator(".jp-Dialog .jp-mod-accept").click()
    wait_kernel_idle(page)

    # the container has what was chosen: checked on the host, and in the meter
    info = _only_kernel(lab)
    assert info["container"]["limits"]["memory"] == 192 * MiB and info["container"]["limits"]["cpus"] == 0.5, info
    assert info["image"]["name"] == DIALOG_TAG, info
    assert info["start_options"] == {"memory": "192m", "cpus": "0.5", "tag": "lab-dialog"}
    page.wait_for_selector(".jc-meter-memory:has-text('/ 192 MiB')", timeout=30000)
    screenshot(page, "start-options-meter")

    # recorded in the notebook, and reused when it is opened again (the dialog shows the choice)
    page.wait_for_function("""() => !!window.jupyterapp.shell.currentWidget.context.model
                                  .getMetadata('jupyter_contain')?.start_options""")
    # the context's own save: the docmanager:save command would ask for a name (first save of an Untitled)
    page.evaluate("() => window.jupyterapp.shell.currentWidget.context.save()")
    path = page.evaluate("() => window.jupyterapp.shell.currentWidget.context.path")
    saved = json.loads((lab.notebook_dir / path).read_text())["metadata"]["jupyter_contain"]
    assert saved["start_options"] == {"memory": "192m", "cpus": "0.5", "tag": "lab-dialog"}, saved
    shutdown_kernels(lab)
    page.goto(f"{lab.url}/lab/workspaces/{page.workspace}-again/tree/{path}?token={lab.token}")
    form = page.locator(".jp-Dialog .jc-start-form")
    form.wait_for(timeout=60000)
    assert form.locator(".jc-start-memory").input_value() == "192m"
    assert form.locator(".jc-start-tag").input_value() == "lab-dialog"
    # one click to skip: the kernelspec's own values
    page.locator(".jp-Dialog .jp-mod-reject", has_text="Skip").click()
    wait_kernel_idle(page)
    info = _only_kernel(lab)
    assert info["container"]["limits"]["memory"] == 256 * MiB and info["image"]["name"] == IMAGE, info
    assert info["start_options"] is None


def test_recorded_start_options_are_reused_without_a_dialog(page, lab):
    nb = notebook_json(["import os; print(os.getpid())"])
    nb["metadata"]["jupyter_contain"] = {"start_options": {"memory": "160m", "network": "none", "evil": "x"}}
    lab.api("PUT", "/api/contents/recorded.ipynb", {"type": "notebook", "format": "json", "content": nb})
    page.goto(f"{lab.url}/lab/workspaces/{page.workspace}/tree/recorded.ipynb?token={lab.token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    wait_kernel_idle(page)
    assert page.locator(".jp-Dialog").count() == 0
    info = _only_kernel(lab)
    assert info["container"]["limits"]["memory"] == 160 * MiB, info
    assert info["start_options"] == {"memory": "160m", "network": "none"}
    page.wait_for_selector(".jc-meter-memory:has-text('/ 160 MiB')", timeout=30000)
    screenshot(page, "recorded-start-options")
