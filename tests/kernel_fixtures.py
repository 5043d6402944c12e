"""Fixtures for the contained-kernel tests: a Debian kernel image and kernelspecs in temp places.

``kernel_env`` imports the cached Debian rootfs (``bootstrap.DEBIAN_KERNEL``)
into a temp store once per session and installs kernelspecs for it under a
temp prefix, so the user's own kernelspecs are never touched. Test modules
use ``from kernel_fixtures import *``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from jupyter_contain.kernel import kernelspec
from jupyter_contain.runtime import Runtime, Store

__all__ = ["KernelEnv", "kernel_env", "ksm", "kernel_runtime", "make_spec", "run_cell", "KERNEL_NAME"]

KERNEL_NAME = "contained-debian"
IMAGE = "localhost/debian:bookworm"


@dataclass(frozen=True)
class KernelEnv:
    store: Store
    prefix: Path
    kernels_dir: Path       # prefix/share/jupyter/kernels
    data_dir: Path          # prefix/share/jupyter (for JUPYTER_PATH)

    def spec_dir(self, name: str) -> Path:
        return self.kernels_dir / name


def make_spec(env: KernelEnv, name: str, *, provisioner: bool = True, **config: object) -> str:
    """Write a kernelspec ``name`` for the test image with provisioner ``config`` (no probe: fast)."""
    image = env.store.resolve(IMAGE)
    spec = kernelspec.kernel_json(image=image, display_name=f"Test {name}",
                                  config={"store_root": str(env.store.root), **config})
    if not provisioner:
        del spec["metadata"]["kernel_provisioner"]
    d = env.spec_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps(spec, indent=1))
    return name


#: each test module that star-imports this file gets its own copy of the session fixture;
#: they share one environment (made once, removed when the last copy is torn down)
_shared: dict[str, object] = {}


def _make_kernel_env(base: Path) -> KernelEnv:
    from jupyter_contain.runtime.images import archive, bootstrap

    tar = bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL)
    cfg = bootstrap.DEBIAN_KERNEL.config
    store = Store(base / "store")
    archive.import_rootfs(store, tar, IMAGE, env=cfg.get("Env", ()), cmd=cfg.get("Cmd", ()),
                          workdir=cfg.get("WorkingDir", ""))
    prefix = base / "prefix"
    # the real install path (with the image probe) for the main kernelspec
    name, path = kernelspec.install(store=store, image_name=IMAGE, name=KERNEL_NAME,
                                    display_name="Contained Python (debian)", prefix=str(prefix))
    assert Path(path).is_dir()
    return KernelEnv(store=store, prefix=prefix, kernels_dir=prefix / "share/jupyter/kernels",
                     data_dir=prefix / "share/jupyter")


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory) -> KernelEnv:
    """A store holding localhost/debian:bookworm and a prefix holding kernelspec ``contained-debian``."""
    from jupyter_core.utils import ensure_event_loop

    # jupyter_client's blocking calls run on a per-thread event loop that lives as long as the
    # process (its self-pipe is two sockets): make it now, before the leak check looks
    ensure_event_loop()
    if "env" not in _shared:
        base = tmp_path_factory.mktemp("kernel-env")
        _shared.update(env=_make_kernel_env(base), base=base, users=0)
    _shared["users"] = int(_shared["users"]) + 1  # type: ignore[call-overload]
    env = _shared["env"]
    assert isinstance(env, KernelEnv)
    yield env
    _shared["users"] = int(_shared["users"]) - 1  # type: ignore[call-overload]
    if _shared["users"] == 0:
        # containers a failed test left behind (kill them before the store goes)
        for c in Runtime(env.store).containers():
            c.remove(force=True)
        shutil.rmtree(_shared["base"], ignore_errors=True)  # type: ignore[arg-type]
        _shared.clear()


@pytest.fixture
def ksm(kernel_env):
    """A KernelSpecManager that sees only the test kernelspecs."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KernelSpecManager(kernel_dirs=[str(kernel_env.kernels_dir)])


@pytest.fixture
def kernel_runtime(kernel_env):
    """A Runtime over the test store; fails the test if it leaves a container behind."""
    rt = Runtime(kernel_env.store)
    before = {c.id for c in rt.containers()}
    yield rt
    left = [c for c in Runtime(kernel_env.store).containers() if c.id not in before]
    for c in left:
        c.remove(force=True)
    assert not left, f"test left containers behind: {[c.id[:12] for c in left]}"


def run_cell(kc, code: str, *, timeout: float = 60, stop_on_error: bool = False) -> dict:
    """Execute ``code`` with a blocking client; returns {'reply', 'stdout', 'stderr', 'error', 'result'}.

    ``stop_on_error`` is off by default: with it, a cell that fails makes
    ipykernel abort every execute request that arrives until it has flushed
    its queue, and a test's next cell, sent the moment the failure's reply
    came back, sometimes arrives inside that window ("aborted", no output).
    """
    out: dict = {"stdout": "", "stderr": "", "error": None, "result": None}

    def hook(msg: dict) -> None:
        t, c = msg["msg_type"], msg["content"]
        if t == "stream":
            out[c["name"]] += c["text"]
        elif t == "error":
            out["error"] = c
        elif t == "execute_result":
            out["result"] = c["data"].get("text/plain")

    out["reply"] = kc.execute_interactive(code, timeout=timeout, output_hook=hook, stop_on_error=stop_on_error)
    return out


def environ_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
