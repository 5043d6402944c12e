"""Kernelspecs for contained kernels: install, list, remove, and the image probe.

Owns the ``kernel.json`` of a contained kernel: the provisioner stanza
(``metadata.kernel_provisioner``) that JupyterLab and every provisioner-aware
client use, and an ``argv`` that starts the same container through the
launcher for clients that ignore provisioners. Must not start kernels itself
(only the probe container).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .. import errors
from ..runtime import (
    NETWORK_MODES,
    ContainerSpec,
    ImageRecord,
    Runtime,
    Store,
    parse_cpus,
    parse_memory,
)
from . import guest_files, kernel_layer

log = logging.getLogger(__name__)

PROVISIONER_NAME = "jupyter-contain"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def default_kernel_name(image: ImageRecord) -> str:
    """``contained-debian`` for ``localhost/debian:bookworm``, ``contained-foo-v2`` for ``foo:v2``."""
    from ..runtime import Reference

    ref = Reference.parse(image.name)
    base = ref.repository.rsplit("/", 1)[-1]
    tag = ref.tag or "latest"
    default_tags = {"latest", "bookworm"} if base == "debian" else {"latest"}
    name = f"contained-{base}" + ("" if tag in default_tags else f"-{tag}")
    return re.sub(r"[^a-z0-9._-]", "-", name.lower())


def default_display_name(image: ImageRecord) -> str:
    from ..runtime import Reference

    ref = Reference.parse(image.name)
    base = ref.repository.rsplit("/", 1)[-1]
    tag = ref.tag or "latest"
    shown = base if tag in ("latest", "bookworm") and base == "debian" or tag == "latest" else f"{base}:{tag}"
    return f"Contained Python ({shown})"


#: kernelspecs a kernel installs for its snapshots are named ``snapshot-...``: never a name the
#: user's own ``jupyter contain install`` gives (``contained-...``), nor a stock kernel's
SNAPSHOT_PREFIX = "snapshot-"


def snapshot_kernel_name(image: ImageRecord) -> str:
    """``snapshot-myenv-v1`` for a kernel's snapshot ``localhost/kernel-snapshot/myenv:v1``."""
    from ..runtime import Reference

    ref = Reference.parse(image.name)
    base = ref.repository.rsplit("/", 1)[-1]
    tag = ref.tag or "latest"
    name = SNAPSHOT_PREFIX + base + ("" if tag == "latest" else f"-{tag}")
    return re.sub(r"[^a-z0-9._-]", "-", name.lower())[:100]


def snapshot_display_name(shown: str, *, source: str) -> str:
    """What a kernel-made kernelspec is called in launchers: always says it is a snapshot, and of what.

    A kernel may choose ``shown``, never the suffix, so its tile cannot pass
    for the normal kernel ("Python 3 (ipykernel)" becomes "Python 3
    (ipykernel) (snapshot of Contained Python (debian))").
    """
    return f"{shown} (snapshot of {source})"


def probe_image(runtime: Runtime, image: ImageRecord, *, python: str = "python3") -> str:
    """Check the image can run a kernel (python3 with ipykernel); returns ipykernel's version."""
    return probe_versions(runtime, image, python=python)["ipykernel"] or "?"


#: what the probe prints: ``ipywidgets=<version or ->`` then ipykernel's version (last line)
_PROBE = ("import ipykernel, sys\n"
          "try:\n    import ipywidgets; w = ipywidgets.__version__\nexcept Exception:\n    w = '-'\n"
          "print('ipywidgets=' + str(w)); print(ipykernel.__version__)")


def probe_versions(runtime: Runtime, image: ImageRecord, *, python: str = "python3") -> dict[str, str | None]:
    """Check the image can run a kernel; returns {"ipykernel": version, "ipywidgets": version or None}."""
    script = _PROBE
    with tempfile.TemporaryFile() as out, open(os.devnull, "rb") as null:
        try:
            # the image's own code, run as a kernel would be: not as host root where avoidable
            userns = "auto" if not runtime.rootless and runtime.userns_unavailable_reason() is None else "host"
            info = runtime.run(ContainerSpec(image=image.name, command=(python, "-c", script), entrypoint=(),
                                             userns=userns),  # type: ignore[arg-type]
                               stdio=(null.fileno(), out.fileno(), out.fileno()), remove=True)
        except errors.CommandNotFound:
            raise errors.KernelError(
                f"image {image.familiar} has no {python}: a contained kernel needs Python 3 with ipykernel "
                f"(for Debian/Ubuntu images: apt-get install python3-ipykernel)") from None
        out.seek(0)
        text = out.read().decode(errors="replace").strip()
    if info.code != 0:
        raise errors.KernelError(
            f"image {image.familiar} cannot run a kernel: its {python} has no ipykernel "
            f"(install it in the image: pip install ipykernel, or apt-get install python3-ipykernel)\n{text[-500:]}")
    lines = text.splitlines()
    widgets = next((ln.split("=", 1)[1].strip() for ln in lines if ln.startswith("ipywidgets=")), "-")
    return {"ipykernel": lines[-1] if lines else None, "ipywidgets": None if widgets in ("-", "") else widgets}


#: what the kernel-layer probe prints: one JSON line about the image's Python (any Python 3)
_PYTHON_PROBE = (
    "import json, platform, sys\n"
    "def v(name):\n"
    "    try:\n"
    "        m = __import__(name)\n"
    "        return str(getattr(m, '__version__', '?'))\n"
    "    except Exception:\n"
    "        return None\n"
    "libc = platform.libc_ver()\n"
    "print(json.dumps({'python': list(sys.version_info[:2]), 'ipykernel': v('ipykernel'),"
    " 'ipywidgets': v('ipywidgets'), 'libc': libc[0], 'libc_version': libc[1],"
    " 'machine': platform.machine()}))\n"
)

#: --kernel-layer values
KERNEL_LAYER_MODES = ("auto", "always", "never")


def probe_python(runtime: Runtime, image: ImageRecord, *, python: str = "python3") -> dict[str, Any] | None:
    """What the image's Python is: version, ipykernel, ipywidgets, libc; None when it has no ``python``."""
    with tempfile.TemporaryFile() as out, open(os.devnull, "rb") as null:
        try:
            userns = "auto" if not runtime.rootless and runtime.userns_unavailable_reason() is None else "host"
            info = runtime.run(ContainerSpec(image=image.name, command=(python, "-c", _PYTHON_PROBE), entrypoint=(),
                                             userns=userns),  # type: ignore[arg-type]
                               stdio=(null.fileno(), out.fileno(), out.fileno()), remove=True)
        except errors.CommandNotFound:
            return None
        out.seek(0)
        text = out.read(1 << 16).decode(errors="replace").strip()
    if info.code != 0:
        # a python3 that is not Python 3, or cannot run here: as good as none
        log.info("image %s: %s -c ... exited %s: %s", image.familiar, python, info.code, text[-300:])
        return None
    try:
        # the image's output is untrusted: one JSON object of known fields, checked
        doc = json.loads(text.splitlines()[-1])
        got = {"python": (int(doc["python"][0]), int(doc["python"][1])),
               "ipykernel": None if doc.get("ipykernel") is None else str(doc["ipykernel"])[:40],
               "ipywidgets": None if doc.get("ipywidgets") is None else str(doc["ipywidgets"])[:40],
               "libc": str(doc.get("libc") or "")[:20], "libc_version": str(doc.get("libc_version") or "")[:20],
               "machine": str(doc.get("machine") or "")[:20]}
    except (ValueError, KeyError, IndexError, TypeError):
        log.info("image %s: its %s printed no probe result: %s", image.familiar, python, text[-300:])
        return None
    return got


def choose_kernel(runtime: Runtime, image: ImageRecord, *, mode: str = "auto", probe: bool = True,
                  python: str = "python3", progress: Callable[[str], None] | None = None) -> tuple[kernel_layer.KernelChoice, dict[str, Any] | None]:
    """How kernels of ``image`` get ipykernel (``--kernel-layer``), logging which was chosen and why.

    auto: the image's own Python when it has ipykernel; else its Python with the
    kernel site when the site can be made for it (CPython 3.8+ on glibc 2.17+,
    this machine's architecture); else the kernel layer. always: the kernel
    layer. never: the image's own, or a clear error. Makes the folder the choice
    needs (once per machine), so the first kernel starts without that wait.
    """
    if mode not in KERNEL_LAYER_MODES:
        raise errors.InvalidSpec(f"unknown --kernel-layer {mode!r} (auto, always or never)")
    img = image.familiar
    if mode == "always":
        log.info("image %s: kernels run from the kernel layer (--kernel-layer always)", img)
        kernel_layer.cached_kernel_layer(progress=progress or log.debug)
        return kernel_layer.KernelChoice("layer"), None
    if not probe:
        return kernel_layer.KernelChoice(), None
    info = probe_python(runtime, image, python=python)
    if info is not None and info["ipykernel"] is not None:
        log.info("image %s: kernels run on its own Python %d.%d with its ipykernel %s", img, *info["python"],
                 info["ipykernel"])
        return kernel_layer.KernelChoice(), info
    if mode == "never":
        if info is None:
            raise errors.KernelError(
                f"image {img} has no {python}, and --kernel-layer never forbids the kernel layer: a contained "
                f"kernel needs Python 3 with ipykernel in the image (for Debian/Ubuntu images: apt-get install "
                f"python3-ipykernel), or drop --kernel-layer never")
        raise errors.KernelError(
            f"image {img} cannot run a kernel: its {python} (Python {info['python'][0]}.{info['python'][1]}) has no "
            f"ipykernel, and --kernel-layer never forbids adding one (install it in the image: pip install "
            f"ipykernel, or apt-get install python3-ipykernel; or drop --kernel-layer never)")
    if info is None:
        log.info("image %s has no %s: kernels run from the kernel layer (a Python with ipykernel, "
                 "mounted read-only; the image is unchanged)", img, python)
        kernel_layer.cached_kernel_layer(progress=progress or log.debug)
        return kernel_layer.KernelChoice("layer"), None
    why = kernel_layer.site_unsupported(info)
    if why is None:
        try:
            kernel_layer.cached_kernel_site(info["python"], progress=progress or log.debug)
        except errors.KernelError as exc:
            why = f"its site could not be made: {exc}"
        else:
            log.info("image %s has Python %d.%d without ipykernel: kernels run on its own Python with ipykernel "
                     "from the kernel site (mounted read-only; the image is unchanged)", img, *info["python"])
            return kernel_layer.KernelChoice("site", info["python"]), info
    log.info("image %s has Python %d.%d without ipykernel, and %s: kernels run from the kernel layer "
             "(a Python with ipykernel, mounted read-only; the image is unchanged)", img, *info["python"], why)
    kernel_layer.cached_kernel_layer(progress=progress or log.debug)
    return kernel_layer.KernelChoice("layer"), info


def describe_kernel_layer(config: Mapping[str, Any]) -> str | None:
    """One line for people about a kernelspec config's ``kernel_layer`` (None: the image's own ipykernel)."""
    choice = kernel_layer.KernelChoice.parse(str(config.get("kernel_layer") or ""))
    if choice.mode == "layer":
        return (f"kernels run from the kernel layer (a Python with ipykernel and ipywidgets 8, mounted read-only "
                f"at {kernel_layer.LAYER_DIR}); the image is unchanged and its tools are what the kernel runs")
    if choice.mode == "site":
        assert choice.python_version is not None
        return (f"kernels run on the image's own Python {choice.python_version[0]}.{choice.python_version[1]} "
                f"with ipykernel and ipywidgets 8 from the kernel site (mounted read-only at "
                f"{kernel_layer.SITE_DIR}); the image is unchanged")
    return None


def _given_choice(text: str, *, progress: Callable[[str], None] | None) -> kernel_layer.KernelChoice:
    """A choice made before (a kernel's own, for its snapshot), checked, its folder made if missing."""
    choice = kernel_layer.KernelChoice.parse(text)
    kernel_layer.binds(choice, progress=progress or log.debug)
    return choice


def kernel_json(*, image: ImageRecord, display_name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "argv": [sys.executable, "-m", "jupyter_contain.kernel.launcher", "-f", "{connection_file}",
                 "--kernelspec-dir", "{resource_dir}",
                 "--config", json.dumps({"image": image.name, **config})],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "kernel_provisioner": {
                "provisioner_name": PROVISIONER_NAME,
                "config": {"image": image.name, **config},
            },
            "debugger": False,
        },
    }


#: the contained-kernel logo, shipped in the package (kernel/resources) and copied into every
#: kernelspec folder this module writes, so launchers show it instead of a letter
_LOGOS = ("logo-64x64.png", "logo-svg.svg")


def write_logos(folder: Path) -> None:
    """Copy the logo files into a kernelspec folder (Jupyter serves them as the kernel's icon)."""
    resources = Path(__file__).with_name("resources")
    for logo in _LOGOS:
        shutil.copyfile(resources / logo, folder / logo)


def install(*, store: Store, image_name: str, name: str | None = None, display_name: str | None = None,
            memory: str | None = None, cpus: str | None = None, pids: int | None = None,
            network: str | None = None, user: bool = False, prefix: str | None = None,
            probe: bool = True, userns: str | None = None, seccomp: str | None = None,
            create_only: bool = False, start_dialog: bool = False,
            kernel_layer_mode: str = "auto", progress: Callable[[str], None] | None = None,
            kernel_layer: str | None = None, pin: bool = False) -> tuple[str, str]:
    """Install a kernelspec for ``image_name``; returns (kernel name, install path).

    ``create_only`` (a kernel's request through its host channel): the
    kernelspec must be new. Refused (KernelError) when a kernelspec of that
    name exists in any kernel folder Jupyter searches, and the folder is
    created exclusively (``mkdir``), so nothing existing is ever replaced,
    not even by a request racing this one. ``kernel_layer_mode`` (auto, always,
    never): whether kernels may run from the kernel layer or site when the image
    has no Python with ipykernel (:func:`choose_kernel`); the display name is
    "Contained Python (<image>)" either way. ``progress`` hears about a kernel
    layer or site being built (once per machine: seconds, or a minute when the
    bootstrap root filesystem is built first). ``kernel_layer`` (a kernel's own
    ``kernel_layer`` option, for a kernelspec of its snapshot): that choice, with
    no probe: a snapshot of a kernel-layer kernel has no Python of its own either.
    ``pin``: the kernelspec names the image by its digest (``NAME@sha256:...``,
    :func:`.classroom.pinned_reference`), so its kernels start from exactly
    this content or not at all.
    """
    image = store.resolve(image_name)
    name = name or default_kernel_name(image)
    if not _NAME_RE.match(name):
        raise errors.InvalidSpec(f"invalid kernel name {name!r} (lowercase letters, digits, . _ -)")
    config: dict[str, Any] = {}
    if memory:
        # unset: the machine's default at each start (half its memory, at most 8 GiB); "none": no limit
        if memory.strip().lower() not in ("none", "0"):
            parse_memory(memory)
        config["memory"] = "none" if memory.strip().lower() in ("none", "0") else memory
    if cpus:
        parse_cpus(cpus)
        config["cpus"] = cpus
    if pids is not None:
        config["pids"] = pids
    if network:
        if network not in NETWORK_MODES:
            raise errors.InvalidSpec(f"unknown network mode {network!r} (none, bridge or host)")
        config["network"] = network
    if userns is not None:
        if userns not in ("host", "auto"):
            raise errors.InvalidSpec(f"unknown user namespace mode {userns!r} (host or auto)")
        config["userns"] = userns
    if seccomp not in (None, "default"):
        if seccomp != "unconfined":
            raise errors.InvalidSpec(f"unknown seccomp mode {seccomp!r} (default or unconfined)")
        log.warning("kernelspec %s: kernels will run without Docker's seccomp profile (the host-file guard stays)", name)
        config["seccomp"] = seccomp
    if store.root != Store().root:
        config["store_root"] = str(store.root)
    if kernel_layer is not None:
        choice, info = _given_choice(kernel_layer, progress=progress), None
    else:
        choice, info = choose_kernel(Runtime(store), image, mode=kernel_layer_mode, probe=probe, progress=progress)
    if choice.mode != "image":
        config["kernel_layer"] = str(choice)
    elif info is not None:
        versions = {"ipykernel": info["ipykernel"], "ipywidgets": info["ipywidgets"]}
        # widgets: the image's ipywidgets, the host's lent one (guest_files), or a warning saying what to do
        fine, said = guest_files.widgets_plan(versions["ipywidgets"], image=image.familiar)
        (log.info if fine else log.warning)("%s", said)
    if pin:
        from .classroom import pinned_reference

        config["image"] = pinned_reference(image)
    spec = kernel_json(image=image, display_name=display_name or default_display_name(image), config=config)
    if start_dialog:
        # read by the Lab extension only: ask for memory/CPUs/network/tag before a kernel of it starts
        spec["metadata"]["jupyter_contain"] = {"start_dialog": True}
    if create_only:
        return name, _create(spec, name, user=user, prefix=prefix)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "kernel.json").write_text(json.dumps(spec, indent=1))
        write_logos(Path(d))
        path = KernelSpecManager().install_kernel_spec(d, name, user=user, prefix=prefix)
    return name, path


def _create(spec: dict[str, Any], name: str, *, user: bool, prefix: str | None) -> str:
    ksm = KernelSpecManager()
    if name in ksm.find_kernel_specs():
        raise errors.KernelError(f"a kernelspec named {name} exists already (kernels cannot replace kernelspecs)")
    dest = Path(ksm._get_destination_dir(name, user=user, prefix=prefix))
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(dest, 0o755)
    except FileExistsError:
        raise errors.KernelError(f"a kernelspec named {name} exists already (kernels cannot replace kernelspecs)"
                                 ) from None
    try:
        tmp = dest / ".kernel.json.tmp"
        tmp.write_text(json.dumps(spec, indent=1))
        write_logos(dest)
        os.rename(tmp, dest / "kernel.json")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return str(dest)


def list_specs() -> list[dict[str, Any]]:
    out = []
    ksm = KernelSpecManager()
    for name, info in sorted(ksm.get_all_specs().items()):
        spec = info.get("spec", {})
        prov = spec.get("metadata", {}).get("kernel_provisioner", {})
        if prov.get("provisioner_name") != PROVISIONER_NAME:
            continue
        out.append({"name": name, "display_name": spec.get("display_name"), "path": info.get("resource_dir"),
                    "config": prov.get("config", {})})
    return out


def remove(name: str) -> str:
    ksm = KernelSpecManager()
    try:
        spec = ksm.get_kernel_spec(name)
    except NoSuchKernel:
        raise errors.KernelError(f"no such kernelspec: {name}") from None
    if (spec.metadata or {}).get("kernel_provisioner", {}).get("provisioner_name") != PROVISIONER_NAME:
        raise errors.KernelError(f"kernelspec {name} is not a jupyter-contain kernel: not removing it")
    ksm.remove_kernel_spec(name)
    return name
