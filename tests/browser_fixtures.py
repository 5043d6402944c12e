"""The real-browser lane: JupyterLab 4 in headless Chromium (Playwright), contained kernels behind it.

What is real: a JupyterLab server (this venv's, the ``test`` extra) on
127.0.0.1 with a random port and token, the jupyter-contain provisioner in it,
kernels in containers from the cached Debian image (``kernel_fixtures``),
Debian's ``/usr/bin/chromium`` driven by Playwright (the Python package only:
Playwright's own browser download cannot work on these machines). Installed by
``scripts/setup``; a machine without them skips the lane with the reason.

Fixtures and helpers for any test module in ``tests/browser/``:

``lab`` (module scope) -> :class:`Lab`
    One JupyterLab server per test module: ``lab.url`` (no trailing slash),
    ``lab.token``, ``lab.notebook_dir`` (its root folder, a temp dir),
    ``lab.kernels_dir`` (where its kernelspecs live; kernelspec
    :data:`KERNEL_NAME` "Contained Python (debian)" is there),
    ``lab.store`` (the image store of the kernels), ``lab.log_path`` (the
    server's output), ``lab.api(method, path, body=None)`` (REST with the
    token). Its runtime, data, config and settings folders are temp folders
    (news and update checks off: no traffic leaves the machine). Torn down
    with its kernels and their containers; a container left behind fails the
    module's last test.
``browser`` (module scope)
    Chromium, launched with ``--no-sandbox --disable-gpu
    --disable-background-networking --disable-component-update --disable-sync
    --no-first-run``; Playwright gives every launch a fresh temp profile
    (``--user-data-dir``).
``page`` (function scope) -> Playwright ``Page``
    A fresh browser context at 1400x900, logged in (token) and on
    ``{lab.url}/lab/workspaces/<test name>`` (a workspace of its own, so no
    notebook of an earlier test is restored and starts a kernel). Console errors and uncaught page errors fail the test
    unless matched by a regex in ``page.expected_console_errors`` (a list the
    test may append to; :data:`EXPECTED_CONSOLE_ERRORS` is always allowed).
    After the test every kernel and session of the server is shut down (so the
    leak check sees no container cgroup). On failure the report gets a
    ``browser`` section with a screenshot path and the console log.

``tests/browser/conftest.py`` star-imports this module (fixtures and hooks);
a test module imports the helpers: ``from browser_fixtures import open_notebook, ...``.

Helpers:

``open_notebook(page, lab, name, cells=(), kernel=KERNEL_NAME)``
    Writes ``name`` (an .ipynb in the notebook dir, the given cell sources,
    kernelspec ``kernel`` in its metadata), opens it and waits for the kernel
    to be idle.
``run_cell(page, index, timeout=60)`` -> the cell's output text
    Selects cell ``index`` (0-based) of the current notebook, runs it
    (Shift+Enter) and waits until it has an execution count.
``add_cell(page, code)`` -> the new cell's index
    Appends a code cell with ``code`` at the end of the notebook.
``cell(page, index)`` -> Locator of that cell.
``wait_kernel_idle(page, timeout=120)``
    Until the current widget's kernel is connected and idle (the app is
    exposed as ``window.jupyterapp`` for such questions).
``screenshot(page, label)`` -> Path
    ``out/browser/<test name>-<label>.png`` (``out/`` is git-ignored: CI's
    artifact).
``run_cli(lab, *args)`` -> CompletedProcess of ``jupyter-contain --root <lab.store>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kernel_fixtures import IMAGE, kernel_env  # noqa: F401 - the session fixture this lane builds on

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "browser"
CHROMIUM = Path(os.environ.get("JC_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run")
KERNEL_NAME = "contained-debian"
KERNEL_DISPLAY_NAME = "Contained Python (debian)"
#: console errors every page may show: none so far (extend with a reason when one is expected)
EXPECTED_CONSOLE_ERRORS: tuple[str, ...] = ()
#: the server's start, in seconds (2 busy cores: JupyterLab takes 3-10 s)
SERVER_START = 60

__all__ = ["lab", "browser", "page", "kernel_env", "pytest_collection_modifyitems", "pytest_runtest_makereport",
           "Lab", "KERNEL_NAME", "KERNEL_DISPLAY_NAME", "OUT", "open_notebook", "run_cell", "add_cell", "cell",
           "wait_kernel_idle", "screenshot", "run_cli", "shutdown_kernels", "notebook_json"]


def _skip_reason() -> str | None:
    try:
        import jupyterlab  # noqa: F401
        import playwright  # noqa: F401
    except ImportError as exc:
        return f"the browser lane needs the test extra's jupyterlab and playwright ({exc}): run scripts/setup"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found: run scripts/setup (apt-get install chromium)"
    return None


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent / "browser"
    mine = [item for item in items if Path(str(item.fspath)).is_relative_to(here)]
    reason = _skip_reason() if mine else None
    for item in mine:
        item.add_marker(pytest.mark.slow)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


# ------------------------------------------------------------------- the server

@dataclass
class Lab:
    url: str
    token: str
    notebook_dir: Path
    kernels_dir: Path
    store: Any
    log_path: Path
    proc: subprocess.Popen = field(repr=False)

    def api(self, method: str, path: str, body: Any = None, *, timeout: float = 30) -> Any:
        """One REST call (``path`` under ``/api/``...: give it with its leading slash); the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings_dir: Path) -> None:
    """No news and no update check (they would fetch from the internet), no first-run toasts."""
    d = settings_dir / "@jupyterlab" / "apputils-extension"
    d.mkdir(parents=True, exist_ok=True)
    (d / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True}))


def shutdown_kernels(lab: Lab, *, timeout: float = 60) -> None:
    """Delete every session and kernel of ``lab``, then wait until their containers are gone."""
    from jupyter_contain.runtime import Runtime

    with contextlib.suppress(urllib.error.URLError, OSError):
        for s in lab.api("GET", "/api/sessions"):
            with contextlib.suppress(urllib.error.URLError, OSError):
                lab.api("DELETE", f"/api/sessions/{s['id']}")
        for k in lab.api("GET", "/api/kernels"):
            with contextlib.suppress(urllib.error.URLError, OSError):
                lab.api("DELETE", f"/api/kernels/{k['id']}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _lab_containers(lab, Runtime, pooled=False):
            return
        time.sleep(0.2)


def _lab_containers(lab: Lab, runtime_cls, *, pooled: bool = True) -> list:
    """Containers of kernels of this server (kernel containers labelled with our kernelspecs' names).

    ``pooled=False`` leaves out warm kernels waiting in a pool (a module with a pool keeps them
    until the server stops, which removes them: the lab fixture checks that with ``pooled=True``).
    """
    names = {p.name for p in lab.kernels_dir.iterdir()} if lab.kernels_dir.is_dir() else set()
    return [c for c in runtime_cls(lab.store).containers()
            if c.state.labels.get("jupyter-contain.kernel-name") in names
            and (pooled or not c.state.labels.get("jupyter-contain.pool"))]


@pytest.fixture(scope="module")
def lab(kernel_env, tmp_path_factory, request) -> Iterator[Lab]:  # noqa: F811 - kernel_env is the imported fixture
    from jupyter_contain.kernel import kernelspec
    from jupyter_contain.runtime import Runtime

    base = tmp_path_factory.mktemp("lab")
    prefix, nbdir = base / "prefix", base / "notebooks"
    nbdir.mkdir()
    # a prefix of its own: kernelspecs a test installs ("Install as kernel") go there and away
    kernelspec.install(store=kernel_env.store, image_name=IMAGE, name=KERNEL_NAME,
                       display_name=KERNEL_DISPLAY_NAME, prefix=str(prefix), probe=False)
    kernels_dir = prefix / "share" / "jupyter" / "kernels"
    _write_settings(base / "settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))}
    env.update(
        JUPYTER_PATH=str(prefix / "share" / "jupyter"),
        JUPYTER_DATA_DIR=str(base / "data"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        JUPYTER_CONFIG_DIR=str(base / "config"),
        JUPYTERLAB_SETTINGS_DIR=str(base / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"),
        JUPYTER_PLATFORM_DIRS="1",
    )
    log_path = base / "server.log"
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={nbdir}",
            "--ServerApp.open_browser=False", "--allow-root", "--KernelSpecManager.ensure_native_kernel=False",
            "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            # window.jupyterapp: the helpers ask the app itself whether a kernel is connected and idle
            "--LabApp.expose_app_in_browser=True",
            # the REST API (jupyter_contain.server) works on the test store, never the machine's
            f"--ContainApp.store_root={kernel_env.store.root}",
            # no warm pool: each test's kernels are gone after it (shutdown_kernels waits for their containers)
            "--ContainApp.kernel_pool=0",
            # a module's own server options (LAB_ARGS), after ours: later ones win
            *getattr(request.module, "LAB_ARGS", ())]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, cwd=nbdir, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    the_lab = Lab(url=f"http://127.0.0.1:{port}", token=token, notebook_dir=nbdir, kernels_dir=kernels_dir,
                  store=kernel_env.store, log_path=log_path, proc=proc)
    try:
        deadline = time.monotonic() + SERVER_START
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{the_lab.log_tail()}")
            try:
                the_lab.api("GET", "/api/status", timeout=5)
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer in {SERVER_START} s:\n{the_lab.log_tail()}")
                time.sleep(0.2)
        yield the_lab
    finally:
        if proc.poll() is None:
            shutdown_kernels(the_lab)
            proc.send_signal(signal.SIGTERM)   # the server shuts its kernels down too
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        left = _lab_containers(the_lab, Runtime)
        for c in left:
            c.remove(force=True)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"the server left kernel containers behind: {[c.id[:12] for c in left]}"


# ------------------------------------------------------------------- the browser

@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        try:
            yield b
        finally:
            b.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed:
        return
    page = item.funcargs.get("page")
    if page is None:
        return
    lines = []
    with contextlib.suppress(Exception):
        lines.append(f"screenshot: {screenshot(page, 'FAILED')}")
    lines.append("console:")
    lines += [f"  {m}" for m in getattr(page, "console_log", [])] or ["  (empty)"]
    lab_ = item.funcargs.get("lab")
    if lab_ is not None:
        lines += ["server log (tail):", lab_.log_tail(25)]
    rep.sections.append(("browser", "\n".join(lines)))


@pytest.fixture
def page(browser, lab, request):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.console_log = []            # every message, for the failure report
    pg.console_errors = []         # errors only, checked after the test
    pg.expected_console_errors = list(EXPECTED_CONSOLE_ERRORS)
    pg.test_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)

    def on_console(msg) -> None:
        # "Failed to load resource" names no URL in its text: the location does
        where = (msg.location or {}).get("url") or ""
        text = f"{msg.text} ({where})" if where and msg.text.startswith("Failed to load resource") else msg.text
        pg.console_log.append(f"[{msg.type}] {text}")
        if msg.type == "error":
            pg.console_errors.append(text)

    def on_error(exc) -> None:
        pg.console_log.append(f"[pageerror] {exc}")
        pg.console_errors.append(f"uncaught: {exc}")

    pg.on("console", on_console)
    pg.on("pageerror", on_error)
    # a workspace of its own: nothing an earlier test left open (and its kernel) comes back
    pg.workspace = pg.test_name[:100]
    pg.goto(f"{lab.url}/lab/workspaces/{pg.workspace}?token={lab.token}")
    pg.wait_for_selector("#jp-main-dock-panel", timeout=60_000)
    try:
        yield pg
    finally:
        with contextlib.suppress(Exception):
            context.close()
        shutdown_kernels(lab)
    unexpected = [e for e in pg.console_errors
                  if not any(re.search(p, e) for p in pg.expected_console_errors)]
    if unexpected:
        pytest.fail("the page logged console errors:\n" + "\n".join(unexpected)
                    + "\n(all console messages:)\n" + "\n".join(pg.console_log[-60:]))


# ------------------------------------------------------------------- helpers

def screenshot(page, label: str) -> Path:
    """Save a full-window screenshot as ``out/browser/<test>-<label>.png``; returns its path."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{getattr(page, 'test_name', 'page')}-{label}.png"
    page.screenshot(path=str(path))
    return path


def notebook_json(cells, kernel: str = KERNEL_NAME, display_name: str = KERNEL_DISPLAY_NAME) -> dict:
    return {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": kernel, "display_name": display_name, "language": "python"},
                     "language_info": {"name": "python"}},
        "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "source": src, "outputs": [],
                   "execution_count": None} for i, src in enumerate(cells)],
    }


def wait_kernel_idle(page, timeout: float = 120) -> None:
    """Until the current widget's kernel is connected and idle (started, or restarted).

    Asks the app (``window.jupyterapp``, exposed by the ``lab`` fixture): the
    toolbar's indicator says "idle" before the kernel's websocket is up, and a
    cell run then is dropped.
    """
    page.wait_for_function(
        """() => {
            const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
            const s = w && w.sessionContext;
            const k = s && s.session && s.session.kernel;
            return !!k && k.connectionStatus === 'connected' && k.status === 'idle' && !s.pendingInput;
        }""", timeout=timeout * 1000)


def open_notebook(page, lab: Lab, name: str, cells=(), *, kernel: str = KERNEL_NAME,
                  display_name: str = KERNEL_DISPLAY_NAME) -> None:
    """Write notebook ``name`` with ``cells`` on kernelspec ``kernel``, open it, wait for an idle kernel."""
    lab.api("PUT", f"/api/contents/{name}",
            {"type": "notebook", "format": "json", "content": notebook_json(cells, kernel, display_name)})
    ws = getattr(page, "workspace", "default")
    page.goto(f"{lab.url}/lab/workspaces/{ws}/tree/{name}?token={lab.token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    wait_kernel_idle(page)


def cell(page, index: int):
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").nth(index)


def run_cell(page, index: int, *, timeout: float = 60) -> str:
    """Run cell ``index`` of the open notebook; return its output area's text once it has finished."""
    c = cell(page, index)
    c.locator(".jp-InputArea-prompt").click()      # select the cell (command mode) without editing it
    page.keyboard.press("Shift+Enter")
    prompt = c.locator(".jp-InputArea-prompt")
    page.wait_for_function(
        """(el) => /\\[\\d+\\]/.test(el.textContent)""", arg=prompt.element_handle(), timeout=timeout * 1000)
    return c.locator(".jp-Cell-outputArea").inner_text()


def add_cell(page, code: str) -> int:
    """Append a code cell holding ``code``; returns its index."""
    cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
    n = cells.count()
    cells.nth(n - 1).locator(".jp-InputArea-prompt").click()
    page.keyboard.press("b")                        # command mode: insert a cell below
    new = cells.nth(n)
    new.locator(".cm-content").click()
    page.keyboard.insert_text(code)                 # no per-key auto-closing of brackets
    page.keyboard.press("Escape")
    return n


def run_cli(lab: Lab, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("jupyter-contain")
    return subprocess.run([str(exe), "--root", str(lab.store.root), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
