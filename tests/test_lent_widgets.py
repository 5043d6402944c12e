"""Which ipywidgets a contained kernel uses: the image's, or the host's lent one; and what install says.

The guest's boot decision (``jupyter_contain_guest/boot.py``) runs in a fresh
``python3 -S`` against fake site folders (an image's ipywidgets 6 with
ipykernel 6.17, comm or not, an old ipykernel), so each case is exact and
fast; a real kernel on an image without ipywidgets is in
``tests/browser/test_widgets.py`` (its slider renders). ``kernelspec
install`` probes real images: the default one (ipywidgets 8: fine) and one
without ipywidgets (lent, or a warning saying what to do when the host has
none to lend).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from kernel_fixtures import *
from kernel_fixtures import IMAGE

from jupyter_contain.kernel import guest_files, kernelspec
from jupyter_contain.runtime import ContainerSpec, snapshot


def _site(base: Path, **packages: str) -> Path:
    """A site folder with empty packages and their metadata: name -> version ("" for no metadata)."""
    base.mkdir(parents=True, exist_ok=True)
    for name, version in packages.items():
        (base / name).mkdir()
        (base / name / "__init__.py").write_text(f"__version__ = {version!r}\n")
        if version:
            # Debian's layout for ipywidgets 6 is an egg-info folder; pip's a dist-info one
            suffix = "egg-info" if name == "ipywidgets" and version.startswith("6") else "dist-info"
            (base / f"{name}-{version}.{suffix}").mkdir()
    return base


def _lent_dir(base: Path) -> Path:
    _site(base / "first", ipywidgets="8.1.9")
    _site(base / "last", comm="0.2.3")
    return base


def _boot(site: Path, lent: Path) -> dict:
    """Run the guest's choose_widgets in a python3 -S that sees only ``site``; what it chose and said."""
    code = (
        "import json, sys\n"
        f"sys.path[:] = [{str(site)!r}] + [p for p in sys.path if 'python3' in p and 'site-packages' not in p]\n"
        f"sys.path.append({str(guest_files.guest_path())!r})\n"
        "from jupyter_contain_guest import boot\n"
        f"boot.WIDGETS_DIR = {str(lent)!r}\n"
        "said = []\n"
        "chose = boot.choose_widgets(say=said.append)\n"
        "import ipywidgets\n"
        "try:\n    import comm; c = comm.__file__\nexcept ImportError:\n    c = None\n"
        "print(json.dumps({'chose': chose, 'said': said, 'ipywidgets': ipywidgets.__version__,"
        " 'comm': c, 'path': sys.path}))\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_an_image_with_ipywidgets_6_gets_the_lent_8_first_and_comm_last(tmp_path):
    r = _boot(_site(tmp_path / "site", ipywidgets="6.0.0", ipykernel="6.17.0"), _lent_dir(tmp_path / "lent"))
    assert r["chose"] == "lent"
    assert r["ipywidgets"] == "8.1.9"
    assert r["path"][0] == str(tmp_path / "lent" / "first")
    assert r["path"][-1] == str(tmp_path / "lent" / "last")
    assert r["comm"] == str(tmp_path / "lent" / "last" / "comm" / "__init__.py")
    assert r["said"] == ["the image's ipywidgets 6.0.0 cannot render in JupyterLab 4 (widget protocol 2 needs "
                         "ipywidgets 8): this kernel uses ipywidgets 8.1.9 and comm 0.2.3 lent by the host "
                         "(the image is unchanged)"]


def test_an_image_with_its_own_comm_keeps_it(tmp_path):
    # ipykernel >= 6.18 uses the image's comm: the lent one must not shadow it
    site = _site(tmp_path / "site", ipywidgets="7.7.1", ipykernel="6.29.0", comm="0.1.4")
    r = _boot(site, _lent_dir(tmp_path / "lent"))
    assert r["chose"] == "lent" and r["ipywidgets"] == "8.1.9"
    assert r["comm"] == str(site / "comm" / "__init__.py")
    assert str(tmp_path / "lent" / "last") not in r["path"]


def test_an_image_with_ipywidgets_8_keeps_its_own(tmp_path):
    r = _boot(_site(tmp_path / "site", ipywidgets="8.0.4", ipykernel="6.17.0"), _lent_dir(tmp_path / "lent"))
    assert (r["chose"], r["ipywidgets"], r["said"]) == ("image", "8.0.4", [])
    assert not any(str(tmp_path / "lent") in p for p in r["path"])


def test_no_lending_to_a_kernel_it_would_break(tmp_path):
    r = _boot(_site(tmp_path / "site", ipywidgets="6.0.0", ipykernel="4.10.0"), _lent_dir(tmp_path / "lent"))
    assert r["chose"] == "none" and r["ipywidgets"] == "6.0.0"
    assert "needs ipykernel >= 5 (the image has 4.10.0)" in r["said"][0]


def test_nothing_lent_is_said(tmp_path):
    r = _boot(_site(tmp_path / "site", ipywidgets="6.0.0", ipykernel="6.17.0"), tmp_path / "nothing-here")
    assert r["chose"] == "none"
    assert r["said"] == ["the image's ipywidgets 6.0.0 cannot render in JupyterLab 4 (widget protocol 2 needs "
                         "ipywidgets 8), and the host lent none: widgets will not render"]


def test_the_host_lends_its_own_ipywidgets_8_and_comm_read_only():
    lent = guest_files.lent_widgets()
    import comm
    import ipywidgets

    assert lent is not None and lent.ipywidgets_version == ipywidgets.__version__
    sources = {dst: src for src, dst in lent.binds}
    assert sources[f"{guest_files.WIDGETS_DIR}/first/ipywidgets"] == Path(ipywidgets.__file__).resolve().parent
    assert sources[f"{guest_files.WIDGETS_DIR}/last/comm"] == Path(comm.__file__).resolve().parent
    assert f"{guest_files.WIDGETS_DIR}/first/ipywidgets-{ipywidgets.__version__}.dist-info" in sources


@pytest.fixture
def no_widgets_image(kernel_env, kernel_runtime):
    """The default image minus ipywidgets and comm (as an image with only Debian's ipykernel)."""
    name = "localhost/nowidgets:probe"
    site = "/usr/local/lib/python3.11/dist-packages"
    rt = kernel_runtime
    c = rt.create(ContainerSpec(image=IMAGE, command=("sh", "-c", f"rm -rf {site}/ipywidgets* {site}/comm*"),
                                entrypoint=()))
    try:
        c.start()
        assert c.wait().code == 0
        snapshot(rt, c, name)
    finally:
        c.remove(force=True)
    yield name
    kernel_env.store.untag(name)


def _install_messages(caplog, kernel_env, tmp_path, image: str) -> list[logging.LogRecord]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jupyter_contain.kernel.kernelspec"):
        kernelspec.install(store=kernel_env.store, image_name=image, name="widgets-probe", prefix=str(tmp_path))
    return [r for r in caplog.records if "ipywidgets" in r.getMessage()]


def test_kernelspec_install_says_the_default_image_renders_widgets(caplog, kernel_env, kernel_runtime, tmp_path):
    [rec] = _install_messages(caplog, kernel_env, tmp_path, IMAGE)
    assert rec.levelno == logging.INFO
    assert "has ipywidgets 8." in rec.getMessage() and "render" in rec.getMessage()


def test_kernelspec_install_lends_or_warns_for_an_image_without_ipywidgets(
        caplog, kernel_env, kernel_runtime, tmp_path, no_widgets_image, monkeypatch):
    [rec] = _install_messages(caplog, kernel_env, tmp_path / "a", no_widgets_image)
    assert rec.levelno == logging.INFO
    assert "has no ipywidgets: its kernels get ipywidgets 8." in rec.getMessage()
    # a host without ipywidgets 8 to lend: a warning that says why and what to do
    monkeypatch.setattr(guest_files, "_lent", [None])
    [rec] = _install_messages(caplog, kernel_env, tmp_path / "b", no_widgets_image)
    assert rec.levelno == logging.WARNING
    assert "will not render" in rec.getMessage() and "pip install 'ipywidgets>=8'" in rec.getMessage()


def test_a_lent_folder_gone_under_a_running_server_is_looked_up_again(monkeypatch, tmp_path):
    # e.g. `pip install -U ipywidgets` beside a running server: the old dist-info folder is gone
    stale = guest_files.LentWidgets(ipywidgets_version="8.0.0", comm_version="0.1.0",
                                    binds=((tmp_path / "gone", f"{guest_files.WIDGETS_DIR}/first/ipywidgets"),))
    monkeypatch.setattr(guest_files, "_lent", [stale])
    fresh = guest_files.lent_widgets()
    assert fresh is not None and fresh != stale
    assert all(src.is_dir() for src, _ in fresh.binds)
