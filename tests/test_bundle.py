"""OCI runtime bundles we write are run by runc and crun (through the workplace's run-peer)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from jupyter_contain.runtime.containers.bundle import write_bundle

RUN_PEER = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "run-peer"


@pytest.mark.skipif(not RUN_PEER.exists(), reason="run-peer (shared/tools) not available")
@pytest.mark.parametrize("engine", ["runc", "crun"])
def test_peer_runs_our_bundle(image_store, tmp_path, engine):
    if not shutil.which(engine):
        pytest.skip(f"{engine} not installed")
    bundle = tmp_path / "bundle"
    write_bundle(image_store, image_store.resolve("busybox:test"), bundle,
                 command=("sh", "-c", "echo hello; id -u; cat /proc/self/status | grep NoNewPrivs"))
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["root"]["path"] == "rootfs" and cfg["process"]["args"][0] == "sh"
    assert (bundle / "rootfs" / "bin" / "busybox").is_file()
    cid = f"jc-bundle-test-{engine}-{tmp_path.name[-6:]}"
    res = subprocess.run([str(RUN_PEER), engine, "run", "-b", str(bundle), cid],
                         capture_output=True, text=True, timeout=60)
    subprocess.run([str(RUN_PEER), engine, "delete", "-f", cid], capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["hello", "0"]
    assert "NoNewPrivs:\t1" in res.stdout


def test_bundle_refuses_non_empty_dir(image_store, tmp_path):
    (tmp_path / "x").write_text("keep")
    from jupyter_contain.errors import ContainerError

    with pytest.raises(ContainerError, match="not empty"):
        write_bundle(image_store, image_store.resolve("busybox:test"), tmp_path)
    assert (tmp_path / "x").read_text() == "keep"
