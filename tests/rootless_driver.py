"""What the rootless tests run as an unprivileged user: one container, reported as JSON.

``python rootless_driver.py REQUEST_JSON`` imports ``image_tar`` into the
user's own store (``$HOME/.local/share/jupyter-contain``) unless it is there,
runs ``sh -c cmd`` in a container made from it, and prints one JSON line:
``{"code": N, "out": "...", "upper": [[path, uid, gid], ...]}``, or
``{"error": "ExceptionClass", "message": "..."}`` for a refused request.
Only the library's public names are used, as a user's Jupyter server would.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import tempfile
import time

from jupyter_contain import errors
from jupyter_contain.runtime import ContainerSpec, Limits, Runtime, Store, parse_bind, snapshot
from jupyter_contain.runtime.images import archive


def _snapshot(rt: Runtime, c, then: str, *, unpack: bool = False) -> dict:
    """Snapshot ``c`` as ``snap:1``; the new layer's (name, uid, gid) entries, and ``sh -c then`` in the snapshot."""
    rec = snapshot(rt, c, "snap:1", unpack=unpack)
    with rt.store.open_blob(rec.manifest.layers[-1].digest) as f, tarfile.open(fileobj=f, mode="r|gz") as tar:
        entries = [[m.name, m.uid, m.gid] for m in tar]
    with tempfile.TemporaryFile() as out, open(os.devnull, "rb") as null:
        info = rt.run(ContainerSpec(image="snap:1", command=("sh", "-c", then)),
                      stdio=(null.fileno(), out.fileno(), out.fileno()), remove=True)
        out.seek(0)
        return {"layer": entries, "then_code": info.code, "then_out": out.read().decode(errors="replace")}


def main() -> int:
    req = json.loads(sys.argv[1])
    store = Store()
    tag = req.get("tag", "busybox:rootless")
    try:
        store.resolve(tag)
    except errors.ContainError:
        archive.import_rootfs(store, req["image_tar"], tag, cmd=["/bin/sh"])
    rt = Runtime(store)
    limits = Limits(**req["limits"]) if "limits" in req else Limits()
    try:
        spec = ContainerSpec(image=tag, command=("sh", "-c", req["cmd"]), limits=limits,
                             user=req.get("user"), network=req.get("network", "none"),
                             binds=tuple(parse_bind(b) for b in req.get("binds", ())),
                             seccomp=req.get("seccomp", "default"))
        c = rt.create(spec)
    except errors.ContainError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                          "containers": len(rt.containers())}))
        return 0
    with tempfile.TemporaryFile() as out, open(os.devnull, "rb") as null:
        try:
            c.start(stdio=(null.fileno(), out.fileno(), out.fileno()))
            info = c.wait()
            upper = []
            for dirpath, dirnames, filenames in os.walk(c.upper):
                for n in dirnames + filenames:
                    p = os.path.join(dirpath, n)
                    st = os.lstat(p)
                    upper.append([os.path.relpath(p, c.upper), st.st_uid, st.st_gid])
            report = {}
            helper = (c.state.net or {}).get("helper_pid")
            if helper:
                # slirp4netns ends with the container's init (it watches a pipe init held)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and os.path.exists(f"/proc/{helper}"):
                    time.sleep(0.02)
                report["helper_gone"] = not os.path.exists(f"/proc/{helper}")
            if req.get("snapshot"):
                report = _snapshot(rt, c, req["snapshot"], unpack=req.get("snapshot_unpack", False))
        finally:
            c.remove(force=True)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if req.get("gc"):
        # the image goes, and with it every layer folder (some hold other users' files)
        store.untag(store.resolve(tag).name)
        store.gc()
        report["layers_left"] = sorted(p.name for p in store.layers_dir.iterdir())
    print(json.dumps({"code": info.code if info else None, "out": text, "upper": upper,
                      "containers": len(rt.containers()), **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
