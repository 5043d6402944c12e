"""Host-side magics: ``%load_ext jupyter_contain`` in an ordinary ipykernel on the host.

The kernel is this venv's Python (``python -m ipykernel_launcher``) started by
jupyter_client from a temp kernelspec whose env points ``JUPYTER_CONTAIN_ROOT``
at the session's test store, so the magics see that store and its Debian image.
Covered: ``%container images|ps|stats``, ``%%container IMAGE`` running Python
and shell cells in fresh containers (other hostname, output streamed, failures
raising, limits applied), an interrupt killing the cell's container, usage
errors, and that importing ``jupyter_contain`` loads nothing of IPython.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from kernel_fixtures import *
from kernel_fixtures import IMAGE, run_cell

from jupyter_contain.runtime import ContainerSpec, Runtime

pytestmark = pytest.mark.slow


@pytest.fixture
def host_kernel(tmp_path, kernel_env, kernel_runtime):
    d = tmp_path / "kernels" / "host-python"
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Host Python (test)", "language": "python",
        "env": {"JUPYTER_CONTAIN_ROOT": str(kernel_env.store.root)},
    }))
    km = KernelManager(kernel_name="host-python", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(d.parent)]))
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(60)
        r = run_cell(kc, "%load_ext jupyter_contain")
        assert r["reply"]["content"]["status"] == "ok", r
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def ok(kc, code: str, **kw) -> dict:
    r = run_cell(kc, code, **kw)
    assert r["reply"]["content"]["status"] == "ok", (r["error"], r["stdout"], r["stderr"])
    return r


def test_import_has_no_side_effects():
    code = ("import sys, jupyter_contain; print(sorted(m for m in ('IPython', 'jupyter_contain.kernel.magics', "
            "'jupyter_contain.runtime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out


def test_host_magics_run_cells_in_containers(host_kernel, kernel_env, kernel_runtime):
    _km, kc = host_kernel
    assert "debian:bookworm" in ok(kc, "%container images")["stdout"]
    r = ok(kc, "import socket; print(socket.gethostname())")
    host = r["stdout"].strip()
    r = ok(kc, f"%%container {IMAGE}\nimport socket, sys\nprint(socket.gethostname())\n"
               "print(open('/etc/debian_version').read()[:2]); print('warn', file=sys.stderr)")
    name, version = r["stdout"].split()
    assert name != host and version == "12" and r["stderr"] == "warn\n"
    r = ok(kc, "%%container debian:bookworm --shell\necho $((6 * 7))")
    assert r["stdout"] == "42\n"
    r = run_cell(kc, "%%container debian:bookworm --shell\necho out; exit 4")
    assert r["stdout"] == "out\n" and r["error"]["ename"] == "ContainerError"
    assert "exited with code 4" in r["error"]["evalue"]
    r = run_cell(kc, "%%container debian:bookworm --memory 64m\nx = b'x' * (256 << 20)")
    assert "out of memory (limit 64 MiB" in r["error"]["evalue"], r["error"]
    r = run_cell(kc, "%%container\nprint(1)")
    assert r["reply"]["content"]["status"] == "error" and "UsageError" in r["stderr"] and "IMAGE" in r["stderr"], r
    r = run_cell(kc, "%%container no-such-image:1\nprint(1)")
    assert r["error"]["ename"] == "ImageNotFound"
    r = run_cell(kc, "%container frobnicate")
    assert r["reply"]["content"]["status"] == "error" and "invalid choice: 'frobnicate'" in r["stderr"], r
    assert Runtime(kernel_env.store).containers() == []   # every cell's container is gone


def test_host_magics_ps_and_stats(host_kernel, kernel_runtime):
    _km, kc = host_kernel
    c = kernel_runtime.create(ContainerSpec(image=IMAGE, command=("sleep", "100")))
    try:
        c.start()
        r = ok(kc, "%container ps")
        line = next(ln for ln in r["stdout"].splitlines() if ln.startswith(c.id[:12]))
        assert "running" in line
        r = ok(kc, f"%container stats {c.id[:12]}")
        assert r["stdout"].startswith(c.id[:12]) and "memory" in r["stdout"] and "pids 2 of 512" in r["stdout"], r   # jc-init + sleep
    finally:
        c.remove(force=True)


def test_host_cell_interrupt_removes_its_container(host_kernel, kernel_env, kernel_runtime):
    km, kc = host_kernel
    msg_id = kc.execute(f"%%container {IMAGE} --shell\necho started; sleep 100", stop_on_error=False)
    seen = ""
    while "started" not in seen:   # streamed live: the first line comes while the cell runs
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
    assert len(Runtime(kernel_env.store).containers()) == 1
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=30)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    deadline = time.monotonic() + 15
    while Runtime(kernel_env.store).containers():
        assert time.monotonic() < deadline, "the cell's container outlived the interrupt"
        time.sleep(0.1)
