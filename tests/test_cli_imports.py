"""What a command imports: ``--version`` and ``ps`` load no module they do not use.

Start-up time of the CLI is mostly imports, and a timing test would be flaky on
a shared machine, so these tests assert on ``sys.modules`` after the command
ran in a fresh interpreter: a heavy module that creeps back into their import
chain fails here, whatever the machine's load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_contain import cli

REPO = Path(__file__).resolve().parent.parent

# run the command in-process, then list what it imported (stdout is the command's)
_PROBE = """
import sys
from jupyter_contain.cli import main
rc = main(sys.argv[2:])
modules = sorted(sys.modules)
import json
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "modules": modules}, f)
"""

#: imported by no command that does not use them
HEAVY = (
    "jupyter_client", "traitlets", "jupyter_server", "tornado", "IPython", "requests", "urllib3",
    "pyroute2", "zstandard", "isal", "cffi", "pycparser", "tarfile", "ssl", "http.client",
    "jupyter_contain.kernel", "jupyter_contain.server", "jupyter_contain.native._native",
    "jupyter_contain.runtime.images.layers", "jupyter_contain.runtime.images.registry",
    "jupyter_contain.runtime.images.archive", "jupyter_contain.runtime.images.snapshot",
    "jupyter_contain.cli.images", "jupyter_contain.cli.registry", "jupyter_contain.cli.kernels",
    "jupyter_contain.cli.snapshot", "jupyter_contain.cli.remote",
)


def _imported(tmp_path: Path, *args: str) -> set[str]:
    out = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JUPYTER_CONTAIN_URL", None)
    res = subprocess.run([sys.executable, "-c", _PROBE, str(out), *args], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["rc"] == 0, res.stderr
    return set(data["modules"])


def _loaded(modules: set[str], name: str) -> bool:
    return name in modules or any(m.startswith(name + ".") for m in modules)


def test_version_imports_no_verb_module_and_no_runtime(tmp_path):
    modules = _imported(tmp_path, "--version")
    jc = sorted(m for m in modules if m.startswith("jupyter_contain"))
    assert jc == ["jupyter_contain", "jupyter_contain.cli", "jupyter_contain.errors"]
    # nor what argparse's help formatter or logging would pull in
    for name in ("logging", "shutil", "textwrap", "json", *HEAVY):
        assert not _loaded(modules, name), name


def test_ps_loads_only_its_own_verb_module(tmp_path):
    modules = _imported(tmp_path, "--root", str(tmp_path / "store"), "ps", "-a")
    assert "jupyter_contain.cli.containers" in modules
    for name in HEAVY:
        assert not _loaded(modules, name), name


@pytest.mark.parametrize("argv, verb", [
    (["ps"], "ps"),
    (["--root", "/x", "run", "img"], "run"),
    (["--root=/x", "--debug", "images"], "images"),
    (["--ro", "/x", "pull", "a"], "pull"),            # argparse's abbreviation of --root takes a value
    (["--url", "http://h", "--token", "t", "ps"], "ps"),
    (["--debug", "--", "rm", "x"], "rm"),
    (["--version"], None),
    (["-h"], None),
])
def test_the_verb_is_found_before_parsing(argv, verb):
    assert cli._find_verb(argv) == verb


def test_verb_table_matches_what_the_modules_register():
    import argparse

    for module_name in sorted(set(cli.VERBS.values())):
        module = cli._module(module_name)
        if module is None:   # a verb module another change has not added yet
            continue
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="verb")
        module.register(sub)
        registered = set(sub.choices)
        assert registered == {v for v, m in cli.VERBS.items() if m == module_name}, module_name


def test_run_of_an_unpacked_image_loads_no_layer_codecs_and_compiles_no_seccomp_program(tmp_path, image_store,
                                                                                       monkeypatch):
    """``run --rm``: no tarfile/zstandard (layers are unpacked); the second run reads the cached program."""
    cache = tmp_path / "seccomp-cache"
    monkeypatch.setenv("JUPYTER_CONTAIN_SECCOMP_CACHE", str(cache))
    args = ("--root", str(image_store.root), "run", "--rm", "busybox:test", "/bin/true")
    _imported(tmp_path, *args)     # the first run compiles the program and caches it
    (entry,) = cache.glob("*.bpf")
    written = entry.stat()
    modules = _imported(tmp_path, *args)
    # not compiled again: a compile replaces the file (a new inode, by rename)
    assert (entry.stat().st_ino, entry.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    for name in HEAVY:
        if name != "jupyter_contain.native._native":   # run starts a container: the extension, nothing else
            assert not _loaded(modules, name), name
