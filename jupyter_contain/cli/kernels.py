"""``jupyter contain`` verbs about kernels: kernelspec install/list/remove, bootstrap, reset."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import ModuleType

from .. import runtime  # lazy: a name loads its module when a verb first uses it
from ..errors import ContainerError
from ..runtime.containers import NETWORK_MODES
from .containers import seccomp_mode
from .output import emit_json, table

log = logging.getLogger(__name__)

BOOTSTRAP_IMAGE = "localhost/debian:bookworm"


def _kernelspec() -> ModuleType:
    # jupyter_client costs ~80 ms to import: only the verbs that handle kernelspecs pay it,
    # not every CLI start (a pull, a run)
    from ..kernel import kernelspec

    return kernelspec


def _install_location(args: argparse.Namespace) -> dict:
    if args.sys_prefix:
        import sys

        return {"prefix": sys.prefix}
    return {"user": args.user, "prefix": args.prefix}


def cmd_ks_install(args: argparse.Namespace) -> int:
    store = runtime.Store(args.root)
    name, path = _kernelspec().install(
        store=store, image_name=args.image, name=args.name, display_name=args.display_name,
        memory=args.memory, cpus=args.cpus, pids=args.pids_limit, network=args.network,
        userns=args.userns, seccomp=seccomp_mode(args.security_opt),
        probe=not args.no_probe, kernel_layer_mode=args.kernel_layer, start_dialog=args.start_dialog,
        pin=args.pin,
        progress=lambda msg: print(f"kernelspec: {msg}", flush=True), **_install_location(args))
    print(f"installed kernelspec {name} in {path}")
    _say_kernel_layer(path)
    return 0


def _say_kernel_layer(path: str) -> None:
    """Say how the kernels get ipykernel when it is not the image's own (the kernel layer or site)."""
    import json
    from pathlib import Path

    try:
        spec = json.loads((Path(path) / "kernel.json").read_text())
    except (OSError, ValueError):
        return
    said = _kernelspec().describe_kernel_layer(spec.get("metadata", {}).get("kernel_provisioner", {}).get("config", {}))
    if said:
        print(said)


def cmd_ks_export(args: argparse.Namespace) -> int:
    from ..kernel import classroom

    info = classroom.export_bundle(args.name, args.output, notebooks=args.notebooks,
                                   store=runtime.Store(args.root) if args.root else None,
                                   progress=lambda msg: print(f"export: {msg}", flush=True))
    print(f"wrote {args.output}: kernelspec {info.kernel_name}, image {info.image}"
          + (f", {len(info.notebooks)} notebook files" if info.notebooks else ""))
    return 0


def cmd_ks_import(args: argparse.Namespace) -> int:
    from ..kernel import classroom

    info, path, notebooks = classroom.import_bundle(
        args.bundle, store=runtime.Store(args.root), name=args.name, notebooks_dir=args.notebooks_dir,
        progress=lambda msg: print(f"import: {msg}", flush=True), **_install_location(args))
    print(f"installed kernelspec {args.name or info.kernel_name} in {path} (image {info.image})")
    if notebooks is not None:
        print(f"notebooks in {notebooks}")
    return 0


def cmd_ks_list(args: argparse.Namespace) -> int:
    specs = _kernelspec().list_specs()
    if args.json:
        emit_json(specs)
    else:
        table(["NAME", "DISPLAY NAME", "IMAGE", "PATH"],
              [(s["name"], s["display_name"], s["config"].get("image", ""), s["path"]) for s in specs])
    return 0


def cmd_ks_remove(args: argparse.Namespace) -> int:
    for name in args.names:
        _kernelspec().remove(name)
        print(f"removed kernelspec {name}")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from ..runtime.images import archive, bootstrap

    store = runtime.Store(args.root)

    def say(msg: str) -> None:
        print(f"bootstrap: {msg}", flush=True)

    recipe = bootstrap.DEBIAN_KERNEL
    say(f"building the Debian {recipe.suite} root filesystem with mmdebstrap (cached after the first time)")
    tar = bootstrap.cached_rootfs_tar(recipe, mirror=args.mirror, progress=say)
    cfg = recipe.config
    try:
        existing = store.resolve(BOOTSTRAP_IMAGE)
    except Exception:
        existing = None
    if existing is not None and not args.force and _same_rootfs(existing, tar):
        rec = existing
        say(f"image {rec.familiar} is up to date")
    else:
        say(f"importing {tar.name} as {BOOTSTRAP_IMAGE}")
        # created at SOURCE_DATE_EPOCH: the same rootfs gives the same image digest on every machine
        rec = archive.import_rootfs(store, tar, BOOTSTRAP_IMAGE, env=cfg.get("Env", ()), cmd=cfg.get("Cmd", ()),
                                    workdir=cfg.get("WorkingDir", ""), created=bootstrap.created_rfc3339(),
                                    labels={"org.opencontainers.image.title": "jupyter-contain default kernel image"})
    say(f"image {rec.familiar} {rec.digest}")
    if not args.no_kernelspec:
        name, path = _kernelspec().install(store=store, image_name=rec.name, name="contained-debian",
                                        display_name="Contained Python (debian)", **_install_location(args))
        say(f"kernelspec {name} installed in {path}")
    return 0


def _same_rootfs(image: runtime.ImageRecord, tar: Path) -> bool:
    import json

    meta = tar.with_suffix(".json")
    try:
        diff_id = json.loads(meta.read_text()).get("diff_id")
    except (OSError, ValueError):
        return False
    return bool(diff_id) and image.config.diff_ids == (diff_id,)


def cmd_reset(args: argparse.Namespace) -> int:
    rt = runtime.Runtime(runtime.Store(args.root))
    c = rt.get(args.container)
    if c.refresh_status() == "running":
        raise ContainerError(f"container {c.name} is running: reset needs it stopped "
                             "(for a kernel: restart it with the provisioner's reset option)")
    c.reset()
    print(f"reset {c.name} to its image")
    return 0


def _location_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--user", action="store_true", help="install for this user only")
    g.add_argument("--sys-prefix", action="store_true", help="install into this Python's prefix (venv)")
    g.add_argument("--prefix", metavar="DIR", help="install under DIR/share/jupyter/kernels")


def register(sub: argparse._SubParsersAction) -> None:
    ks = sub.add_parser("kernelspec", help="install, list and remove contained-kernel kernelspecs")
    kss = ks.add_subparsers(dest="ks_verb", metavar="ACTION")
    kss.required = True
    p = kss.add_parser("install", help="install a kernelspec that starts kernels in IMAGE",
                       description="Probe IMAGE and install a kernelspec whose kernels run in containers from "
                                   "it. Any image works: one with python3 and ipykernel runs its own; one with "
                                   "python3 but no ipykernel gets ipykernel from a read-only site folder; one "
                                   "without Python (busybox, alpine, ubuntu) runs the kernel layer, a Python "
                                   "with ipykernel mounted read-only. The image itself is never changed.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--name", help="kernel name (default: contained-<image name>)")
    p.add_argument("--display-name", help='default: "Contained Python (<image name>)"')
    p.add_argument("-m", "--memory", help="memory limit per kernel, e.g. 1g; 'none': no limit "
                                           "(default: half this machine's memory, at most 8 GiB)")
    p.add_argument("--cpus", help="CPU quota per kernel, e.g. 1.5")
    p.add_argument("--pids-limit", type=int, help="process limit per kernel")
    p.add_argument("--network", choices=list(NETWORK_MODES),
                   help="network mode: none (default, loopback only), bridge (NAT egress, pip works), host")
    p.add_argument("--userns", choices=["host", "auto"], default=None,
                   help="auto: each kernel's container root is an unprivileged subordinate uid; host: the "
                        "host's ids (default; a server that is not root always gets a user namespace)")
    p.add_argument("--security-opt", action="append", metavar="OPT",
                   help="seccomp=unconfined: kernels run without Docker's seccomp profile, keeping only the host-file guard (default: the profile)")
    p.add_argument("--no-probe", action="store_true", help="skip the check that the image can run a kernel")
    p.add_argument("--kernel-layer", choices=["auto", "always", "never"], default="auto",
                   help="auto (default): the image's own Python and ipykernel when it has them, else ipykernel or a "
                        "whole Python added read-only; always: the kernel layer's Python whatever the image has; "
                        "never: the image's own Python and ipykernel, or an error")
    p.add_argument("--start-dialog", action="store_true",
                   help="in JupyterLab, ask for memory, CPUs, network and image tag before each kernel of it "
                        "starts (within the server's ceilings)")
    p.add_argument("--pin", action="store_true",
                   help="name the image by its digest (NAME@sha256:...): kernels start from exactly this "
                        "content or refuse, saying how to get it")
    _location_options(p)
    p.set_defaults(func=cmd_ks_install)
    p = kss.add_parser("export", help="write a kernelspec, its image and notebooks into one archive (a class bundle)",
                       description="Write kernelspec NAME, its image (pinned to the digest it has now) and, "
                                   "with --notebooks, a folder of notebooks into one tar that `kernelspec import` "
                                   "installs on another machine with no network.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="FILE", help="the archive to write")
    p.add_argument("--notebooks", type=Path, metavar="DIR", help="a folder of notebooks to include")
    p.set_defaults(func=cmd_ks_export)
    p = kss.add_parser("import", help="install a class bundle: its image into the store, its kernelspec, "
                                      "its notebooks (no network)",
                       description="Install a bundle written by `kernelspec export`: every blob is verified and "
                                   "the image must have the pinned digest; the kernelspec is rebuilt from a few "
                                   "allowed options (never the bundle's mounts, environment or security "
                                   "settings). Nothing existing is replaced; a failed import leaves nothing.")
    p.add_argument("bundle", type=Path, metavar="FILE")
    p.add_argument("--name", help="kernel name (default: the bundle's)")
    p.add_argument("--notebooks-dir", type=Path, metavar="DIR",
                   help="where the notebooks go (default: ./<kernel name>-notebooks; must not exist)")
    _location_options(p)
    p.set_defaults(func=cmd_ks_import)
    p = kss.add_parser("list", help="list contained-kernel kernelspecs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ks_list)
    p = kss.add_parser("remove", help="remove contained-kernel kernelspecs")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_ks_remove)

    p = sub.add_parser("bootstrap", help="build the default kernel image offline and install its kernelspec",
                       description="Build Debian bookworm with python3, ipykernel, pip and ipywidgets using "
                                   "mmdebstrap (from the Debian mirrors this machine uses), import it as "
                                   f"{BOOTSTRAP_IMAGE} and install the 'Contained Python (debian)' kernelspec.")
    p.add_argument("--mirror", help="Debian mirror URL (default: the one apt uses here)")
    p.add_argument("--force", action="store_true", help="re-import even if the image is up to date")
    p.add_argument("--no-kernelspec", action="store_true", help="only build and import the image")
    _location_options(p)
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("reset", help="give a stopped container a fresh writable layer (back to its image)")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(func=cmd_reset)
