"""The Lab extension's TypeScript unit tests (jest, labextension/test/*.spec.ts), run by pytest
so `scripts/test` covers them; and the built extension's metadata as JupyterLab reads it.

Owns: nothing but running ``npx jest`` in labextension/ and reading the build. Skips (with the
reason) where scripts/setup has not installed node_modules or built the extension.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

LABEXT = Path(__file__).resolve().parents[1] / "labextension"
BUILT = LABEXT.parent / "jupyter_contain" / "labextension"


def test_typescript_unit_tests_pass():
    npx = shutil.which("npx")
    if npx is None or not (LABEXT / "node_modules" / ".bin" / "jest").exists():
        pytest.skip("node_modules missing: scripts/setup installs them (npm ci in labextension/)")
    proc = subprocess.run([npx, "--no-install", "jest", "--ci", "--silent"], cwd=LABEXT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # jest reports on stderr: "Tests: 53 passed, 53 total"
    summary = [line for line in proc.stderr.splitlines() if line.startswith("Tests:")]
    assert summary and "failed" not in summary[0] and "passed" in summary[0], proc.stderr[-2000:]


def test_built_extension_is_what_jupyterlab_installs():
    if not (BUILT / "package.json").is_file():
        pytest.skip("labextension not built: scripts/setup builds it")
    meta = json.loads((BUILT / "package.json").read_text())
    assert meta["name"] == "jupyter-contain"
    remote = meta["jupyterlab"]["_build"]["load"]
    assert (BUILT / remote).is_file(), remote
    assert json.loads((BUILT / "install.json").read_text())["packageName"] == "jupyter-contain"
    assert (BUILT / "schemas" / "jupyter-contain" / "plugin.json").is_file()
    # the version of the sources is the one built (scripts/setup rebuilds when they change)
    assert meta["version"] == json.loads((LABEXT / "package.json").read_text())["version"]
