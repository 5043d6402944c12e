"""Making a kernel's container: options, command, environment, image, the container itself.

Owns what the provisioner and the argv launcher share: validating a
kernelspec's options (:class:`KernelOptions`), the per-kernel folder, the
kernel's command line and environment, resolving (or pulling) the image,
creating the container, and the once-per-process clean-up of what a dead
server left. Must not start, signal or wait for kernels (the provisioner and
the launcher do that), and talks to the runtime through
``jupyter_contain.runtime``'s public names only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import errors
from ..runtime import (
    NETWORK_MODES,
    Bind,
    Container,
    ContainerSpec,
    ImageRecord,
    Limits,
    Runtime,
    Store,
    default_memory_limit,
    parse_bind,
    parse_cpus,
    parse_memory,
)
from . import guest_files, kernel_layer
from .channel import KernelContext, parse_allowed_images
from .folder import KernelFolder, kernel_runtime_dir
from .kernel_layer import KernelChoice  # by name: the field kernel_layer hides the module in the class

log = logging.getLogger(__name__)

#: where the guest module is mounted inside every kernel container
GUEST_DIR = "/.jupyter-contain"
#: kernel boot: the guest module goes LAST on sys.path (the image's own packages win)
BOOT = (
    "import sys; sys.path.append(%r); "
    # which ipywidgets: the image's, or the one the host lends (guest_files.lent_widgets)
    "from jupyter_contain_guest.boot import choose_widgets; choose_widgets(); "
    "from ipykernel.kernelapp import launch_new_instance; launch_new_instance()" % GUEST_DIR
)
#: environment variables of the server that a kernel may see; nothing else leaks in
PASS_ENV = ("JPY_SESSION_NAME", "LANG", "LC_ALL", "TZ")
#: provisioner options a kernelspec may set (anything else is a typo worth an error)
OPTION_NAMES = frozenset({
    "image", "memory", "cpus", "pids", "network", "mounts", "env", "pull_policy", "mount_cwd", "reset",
    "store_root", "python", "shutdown_wait", "userns", "seccomp", "allowed_images", "kernel_layer",
    "pool",   # the warm pool's settings (kernel/pool.py), not the container's
})


@dataclass(frozen=True)
class KernelOptions:
    """A contained kernel's options, validated (from a kernelspec's provisioner config)."""

    image: str = "debian:bookworm"
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = 512
    network: str = "none"
    mounts: tuple[Bind, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    pull_policy: str = "missing"
    mount_cwd: bool = True
    reset: bool = False
    store_root: str = ""
    python: tuple[str, ...] = ("python3",)
    #: "auto" (container root is an unprivileged subordinate uid), "host", or "" (the default):
    #: auto when this machine gives ``jupyter-contain`` subordinate ids, else host (said once).
    #: A server that is not root always gets a user namespace of its own ids.
    userns: str = ""
    #: "default" (Docker's profile) or "unconfined": without Docker's profile, yet with the
    #: host-file guard (:attr:`container_seccomp`), logged as a warning at every start
    seccomp: str = "default"
    #: images the kernel's %%container cells and ``%container images`` may use besides its own
    #: image and its snapshots: references or glob patterns (``channel.image_allowed``)
    allowed_images: tuple[str, ...] = ()
    #: how the kernel gets ipykernel (``kernel_layer.KernelChoice``): "" the image's own, "layer"
    #: the kernel layer's Python, "site:3.N" the image's Python with the kernel site; chosen by
    #: ``kernelspec install`` (which probed the image), checked here
    kernel_layer: str = ""

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, where: str = "kernelspec") -> KernelOptions:
        """Validate ``config``; every problem is an :class:`~jupyter_contain.errors.InvalidSpec` naming it."""
        unknown = sorted(set(config) - OPTION_NAMES)
        if unknown:
            raise errors.InvalidSpec(f"{where}: unknown option(s) {', '.join(unknown)} "
                                     f"(known: {', '.join(sorted(OPTION_NAMES))})")

        def bad(option: str, exc: Exception) -> errors.InvalidSpec:
            return errors.InvalidSpec(f"{where}: option {option}: {exc}")

        kw: dict[str, Any] = {}
        if config.get("image"):
            kw["image"] = str(config["image"])
        mem = config.get("memory")
        if mem in (None, ""):
            # not set by the kernelspec nor the server: half the machine, at most 8 GiB
            kw["memory"] = default_memory_limit()
        elif str(mem).strip().lower() in ("none", "0"):
            kw["memory"] = None   # asked for: no limit
        else:
            try:
                kw["memory"] = mem if isinstance(mem, int) and mem > 0 else parse_memory(str(mem))
            except errors.InvalidSpec as exc:
                raise bad("memory", exc) from None
        cpus = config.get("cpus")
        if cpus not in (None, ""):
            try:
                kw["cpus"] = parse_cpus(str(cpus))
            except errors.InvalidSpec as exc:
                raise bad("cpus", exc) from None
        if "pids" in config:
            pids = config["pids"]
            if not isinstance(pids, int) or isinstance(pids, bool) or pids < 0:
                raise errors.InvalidSpec(f"{where}: option pids: {pids!r} is not a process count (0: no limit)")
            kw["pids"] = pids or None
        net = config.get("network", "none")
        if net not in NETWORK_MODES:
            raise errors.InvalidSpec(f"{where}: option network: unknown mode {net!r} (none, bridge or host)")
        kw["network"] = net
        try:
            kw["mounts"] = tuple(parse_bind(m) for m in config.get("mounts", ()))
        except errors.InvalidSpec as exc:
            raise bad("mounts", exc) from None
        env = config.get("env", {})
        if not isinstance(env, Mapping) or not all(isinstance(v, str) for v in env.values()):
            raise errors.InvalidSpec(f"{where}: option env must map names to strings")
        kw["env"] = dict(env)
        pp = config.get("pull_policy", "missing")
        if pp not in ("missing", "always", "never"):
            raise errors.InvalidSpec(f"{where}: option pull_policy: {pp!r} (missing, always or never)")
        kw["pull_policy"] = pp
        kw["mount_cwd"] = bool(config.get("mount_cwd", True))
        kw["reset"] = bool(config.get("reset", False))
        kw["store_root"] = str(config.get("store_root") or "")
        py = config.get("python", ("python3",))
        kw["python"] = (py,) if isinstance(py, str) else tuple(py)
        if not kw["python"]:
            raise errors.InvalidSpec(f"{where}: option python must not be empty")
        userns = config.get("userns") or ""
        if userns not in ("", "host", "auto"):
            raise errors.InvalidSpec(f"{where}: option userns: {userns!r} (auto, host, or empty for auto "
                                     "where subordinate ids are set up)")
        kw["userns"] = userns
        sec = config.get("seccomp") or "default"
        if sec not in ("default", "unconfined"):
            raise errors.InvalidSpec(f"{where}: option seccomp: {sec!r} (default or unconfined)")
        kw["seccomp"] = sec
        try:
            kw["allowed_images"] = parse_allowed_images(config.get("allowed_images") or ())
        except errors.InvalidSpec as exc:
            raise bad("allowed_images", exc) from None
        choice = config.get("kernel_layer") or ""
        if not isinstance(choice, str):
            raise errors.InvalidSpec(f"{where}: option kernel_layer: {choice!r} is not a string")
        try:
            kw["kernel_layer"] = str(kernel_layer.KernelChoice.parse(choice))
        except errors.InvalidSpec as exc:
            raise bad("kernel_layer", exc) from None
        return cls(**kw)

    @property
    def kernel_choice(self) -> KernelChoice:
        return kernel_layer.KernelChoice.parse(self.kernel_layer)

    def limits(self) -> Limits:
        return Limits(memory=self.memory, cpus=self.cpus, pids=self.pids)

    @property
    def container_seccomp(self) -> str:
        """The runtime's seccomp mode for this kernel's containers (and its %%container cells).

        A kernel's notebook folder is a host folder: "unconfined" drops Docker's
        profile but keeps the guard that refuses setuid/setgid files, device
        nodes and xattrs there (``nosuid`` protects only the container's view).
        """
        return "guard" if self.seccomp == "unconfined" else "default"


def kernel_command(options: KernelOptions, connection_file: str, extra: Sequence[str] = ()) -> list[str]:
    """The kernel's argv inside the container."""
    choice = options.kernel_choice
    boot = "import sys; " + kernel_layer.boot_path_lines(choice) + BOOT.removeprefix("import sys; ")
    return [*kernel_layer.kernel_python(choice, options.python), "-c", boot, "-f", str(connection_file),
            f"--IPKernelApp.extra_extensions={guest_files.EXTENSION}", *extra]


def kernel_env(options: KernelOptions, *, kernel_id: str, folder: KernelFolder,
               launch_env: Mapping[str, str] | None = None, spec_env: Mapping[str, str] | None = None,
               previous_death: str | None = None) -> dict[str, str]:
    """The kernel's environment: a few of the server's, the kernelspec's, the options', ours."""
    launch_env = launch_env or {}
    env = {k: launch_env[k] for k in PASS_ENV if k in launch_env}
    for k, v in (spec_env or {}).items():    # the kernelspec's env stanza (already substituted)
        env[k] = launch_env.get(k, v)
    env.update(options.env)
    env["JUPYTER_CONTAIN_KERNEL_ID"] = kernel_id
    env["JUPYTER_CONTAIN_KERNEL_DIR"] = folder.inside   # the guest's side of the per-kernel folder
    # the kernel's parent is the container's init (pid 1): tell ipykernel so, which also
    # keeps it from printing the "Ctrl-C will not work" banner meant for terminals
    env["JPY_PARENT_PID"] = "1"
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    if previous_death:
        env["JUPYTER_CONTAIN_PREVIOUS_DEATH"] = previous_death
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def resolve_image(rt: Runtime, options: KernelOptions) -> ImageRecord:
    """The image record for ``options.image``, pulling it as the pull policy says."""
    if "@" in options.image:   # pinned by digest: exactly that content, or an error saying how to get it
        from .classroom import resolve_pinned

        return resolve_pinned(rt, options.image, pull_policy=options.pull_policy)
    if options.pull_policy == "always":
        return _pull(rt, options.image)
    try:
        return rt.store.resolve(options.image)
    except errors.ImageNotFound:
        if options.pull_policy == "never":
            raise errors.KernelError(
                f"image {options.image} is not in the store and pull_policy is 'never' "
                f"(run `jupyter contain pull {options.image}` or `jupyter contain bootstrap`)") from None
        return _pull(rt, options.image)


def _pull(rt: Runtime, image: str) -> ImageRecord:
    try:
        from ..runtime.images.registry import pull
    except ImportError:  # pragma: no cover - registry client missing
        raise errors.KernelError(f"image {image} is not in the store") from None
    log.info("pulling %s", image)
    return pull(rt.store, image)


_said_no_subids = False


def resolve_userns(rt: Runtime, mode: str) -> str:
    """A kernel's user namespace mode: ``mode``, or for "" auto where subordinate ids exist.

    Sandbox first: a kernel's root is not host root once the machine has
    subordinate ids for containers (``scripts/setup`` and the README say
    how); without them it is, and the log says so once per process.
    """
    global _said_no_subids
    if mode:
        return mode
    if rt.rootless:
        return "host"   # the runtime gives every container a namespace of the user's own ids
    reason = rt.userns_unavailable_reason()
    if reason:
        if not _said_no_subids:
            _said_no_subids = True
            log.warning("kernels run with the host's ids (container root is host root): %s", reason)
        return "host"
    return "auto"


def create_container(rt: Runtime, options: KernelOptions, *, kernel_id: str, folder: KernelFolder,
                     cmd: Sequence[str], env: Mapping[str, str], cwd: str | None = None,
                     kernel_name: str = "", owner_pid: int | None = None) -> Container:
    """Create (not start) the container of kernel ``kernel_id`` with its folder mounted in place."""
    image = resolve_image(rt, options)
    # the kernel's folder: read-only, with a tmpfs of its own for the sockets (folder.py);
    # idmapped (with userns=auto), the notebook folder: the kernel's root saves files there
    # as their host owner would
    binds = [*folder.binds(), Bind(guest_files.guest_path(), GUEST_DIR, readonly=True)]
    # the kernel layer or site (host-made, read-only, never in the image or a snapshot): built
    # once per machine, normally by `kernelspec install`; here only a stat
    binds += kernel_layer.binds(options.kernel_choice)
    lent = guest_files.lent_widgets()
    binds += [Bind(src, dst, readonly=True) for src, dst in (lent.binds if lent else ())]
    workdir = None
    if options.mount_cwd and cwd and Path(cwd).is_dir():
        cwd = str(Path(cwd).resolve())
        binds.append(Bind(Path(cwd), cwd, idmap=True))
        workdir = cwd
    # the kernelspec's own mounts are folders meant for the kernel: idmapped too
    binds += [dataclasses.replace(b, idmap=True) for b in options.mounts]
    spec = ContainerSpec(
        image=image.name,
        command=tuple(cmd),
        entrypoint=(),
        env=dict(env),
        workdir=workdir,
        binds=tuple(binds),
        tmpfs=tuple(folder.tmpfs()),
        limits=options.limits(),
        network=options.network,  # type: ignore[arg-type]
        userns=resolve_userns(rt, options.userns),  # type: ignore[arg-type]
        seccomp=options.container_seccomp,
        labels={"jupyter-contain.kernel-id": kernel_id, "jupyter-contain.kernel-name": kernel_name},
        owner_pid=owner_pid if owner_pid is not None else os.getpid(),
    )
    c = rt.create(spec, image=image)
    log.info("kernel %s: container %s from %s", kernel_id, c.id[:12], image.familiar)
    return c


def kernel_context(options: KernelOptions, *, kernel_id: str, runtime: Runtime,
                   container: Callable[[], Container | None], kernelspec_dir: Path | None = None,
                   request_reset: Callable[[], None] | None = None) -> KernelContext:
    """What a kernel's host channel may know about it: the same for the provisioner and the launcher."""
    return KernelContext(kernel_id=kernel_id, runtime=runtime, container=container, python=options.python,
                         limits=options.limits(), network=options.network, kernelspec_dir=kernelspec_dir,
                         request_reset=request_reset, userns=resolve_userns(runtime, options.userns),
                         seccomp=options.container_seccomp, allowed_images=options.allowed_images,
                         kernel_layer=options.kernel_layer)


def runtime_for(options: KernelOptions) -> Runtime:
    return Runtime(Store(options.store_root or None))


_gc_lock = threading.Lock()
_gc_done: set[tuple[int, str]] = set()


def gc_once(rt: Runtime, *, logger: logging.Logger | logging.LoggerAdapter | None = None) -> list[str]:
    """Clean, once per process and store, the containers a dead server left (``Runtime.gc``).

    A server killed with its kernels running leaves their containers (and
    cgroups, and kernel folders) behind; they carry that server's pid as their
    owner, so the next server's first kernel start finds and removes them.
    Cheap: one pass over the store's container folders (a few ms).
    """
    say = logger or log
    key = (os.getpid(), str(rt.store.root))
    with _gc_lock:
        if key in _gc_done:
            return []
        _gc_done.add(key)
        t0 = time.monotonic()
        try:
            kernel_ids = {c.id: c.state.labels.get("jupyter-contain.kernel-id") for c in rt.containers()}
            # stray cgroups and leases are freed only under this store's tag anyway; veths and
            # rules no lease names are left alone too (another store may be between the two)
            removed = rt.gc(sweep_unknown_network=False)
        except (errors.ContainError, OSError) as exc:
            say.warning("jupyter-contain: clean-up of containers left by dead servers failed: %s", exc)
            return []
        for cid in removed:
            kid = kernel_ids.get(cid)
            if kid and "/" not in kid and kid not in (".", ".."):
                shutil.rmtree(kernel_runtime_dir() / kid, ignore_errors=True)
        ms = (time.monotonic() - t0) * 1000
        if removed:
            say.warning("jupyter-contain: removed %d container(s) left by dead processes (%.0f ms): %s",
                        len(removed), ms, ", ".join(r[:12] for r in removed))
        else:
            say.info("jupyter-contain: no containers left by dead servers in %s (%.0f ms)", rt.store.root, ms)
        return removed
