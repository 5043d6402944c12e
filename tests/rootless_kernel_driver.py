"""What the rootless kernel test runs as an unprivileged user: a contained kernel, end to end.

``python rootless_kernel_driver.py REQUEST_JSON``: imports the Debian kernel
image tarball (``image_tar``) into the user's own store, installs kernelspec
``contained-debian`` under ``$HOME/prefix`` the real way (with the image
probe, itself a rootless container), starts the kernel through
jupyter_client's KernelManager (our provisioner), runs ``code`` in it, shuts
it down (with ``after_restart``: first a second client and a restart in place, then that
code too), and prints one JSON line: ``{"stdout": ..., "error": ..., "left": N}``
(``left``: containers still in the store afterwards).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    from jupyter_contain.kernel import kernelspec
    from jupyter_contain.runtime import Runtime, Store
    from jupyter_contain.runtime.images import archive

    req = json.loads(sys.argv[1])
    store = Store()
    image = "localhost/debian:rootless"
    cfg = req["config"]
    archive.import_rootfs(store, req["image_tar"], image, env=cfg.get("Env", ()), cmd=cfg.get("Cmd", ()),
                          workdir=cfg.get("WorkingDir", ""))
    prefix = Path(os.environ["HOME"]) / "prefix"
    name, _ = kernelspec.install(store=store, image_name=image, name="contained-debian", prefix=str(prefix))
    km = KernelManager(kernel_name=name,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(prefix / "share/jupyter/kernels")]))
    km.start_kernel()
    out: dict = {"stdout": "", "error": None}
    try:
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)

            def hook(msg: dict) -> None:
                if msg["msg_type"] == "stream":
                    out["stdout"] += msg["content"]["text"]
                elif msg["msg_type"] == "error":
                    out["error"] = msg["content"]["ename"] + ": " + msg["content"]["evalue"]

            kc.execute_interactive(req["code"], timeout=60, output_hook=hook)
            if req.get("after_restart"):
                # a second client connects (as a new browser tab does), then a restart in place
                kc2 = km.client()
                kc2.start_channels()
                time.sleep(1.0)
                kc2.stop_channels()
                km.restart_kernel(now=True)
                kc.wait_for_ready(timeout=60)
                kc.execute_interactive(req["after_restart"], timeout=60, output_hook=hook)
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel(now=False)
    out["left"] = len(Runtime(store).containers())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
