"""The jupyter_client kernel provisioner that starts kernels inside containers.

Owns the mapping from a Jupyter kernel's life (pre_launch, launch, poll,
signal, restart, shutdown) to a container's: one container per kernel, kept
across restarts (the writable layer survives, so what the user installed is
still there), removed at shutdown. Must not talk to the runtime except through
``jupyter_contain.runtime``'s public names, and must never block the server's
event loop: pulls, mounts and spawns run in a worker thread.

Connection: ZMQ over ``ipc`` sockets in a per-kernel folder that is bind-mounted
at the same path inside the container, so the kernel needs no network at all
and kernels never collide on ports.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Dict, Float, Int, List, Unicode
from traitlets import Enum as TEnum

from .. import errors
from ..runtime import (
    Bind, ContainerSpec, ExitInfo, Limits, Runtime, Store, parse_bind, parse_cpus, parse_memory,
)
from . import guest_files

log = logging.getLogger(__name__)

#: where the guest module is mounted inside every kernel container
GUEST_DIR = "/.jupyter-contain"
#: kernel boot: the guest module goes LAST on sys.path (the image's own packages win)
BOOT = (
    "import sys; sys.path.append(%r); "
    "from ipykernel.kernelapp import launch_new_instance; launch_new_instance()" % GUEST_DIR
)
#: environment variables of the server that a kernel may see; nothing else leaks in
_PASS_ENV = ("JPY_SESSION_NAME", "LANG", "LC_ALL", "TZ")


def kernel_runtime_dir() -> Path:
    """Per-kernel folders live here (short paths: unix socket paths are limited to 107 bytes)."""
    base = os.environ.get("JUPYTER_CONTAIN_RUN_DIR")
    if base:
        return Path(base)
    if os.geteuid() == 0:
        return Path("/run/jupyter-contain")
    xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/jupyter-contain-{os.geteuid()}"
    return Path(xdg) / "jupyter-contain"


class ContainedProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Start each kernel in its own container from an OCI image."""

    image = Unicode("debian:bookworm", config=True, help="Image the kernel container starts from.")
    memory = Unicode("", config=True, help="Memory limit, e.g. '1g' (no swap beyond it). Empty: none.")
    cpus = Unicode("", config=True, help="CPU quota in cores, e.g. '1.5'. Empty: none.")
    pids = Int(512, config=True, help="Process limit (0: none).")
    network = TEnum(["none", "host"], "none", config=True,
                    help="none: own network namespace with loopback only; host: share the host's network.")
    mounts = List(Unicode(), [], config=True, help="Extra bind mounts, 'SRC:DST[:ro]'.")
    env = Dict(value_trait=Unicode(), default_value={}, config=True, help="Extra environment for the kernel.")
    pull_policy = TEnum(["missing", "always", "never"], "missing", config=True,
                        help="Pull the image: when missing from the store, always, or never.")
    mount_cwd = Bool(True, config=True, help="Mount the notebook's folder at the same path and start there.")
    reset = Bool(False, config=True, help="Start from a fresh writable layer at every restart.")
    store_root = Unicode("", config=True, help="Image store (default: jupyter-contain's default root).")
    python = List(Unicode(), ["python3"], config=True, help="The image's Python command.")
    shutdown_wait = Float(5.0, config=True, help="Seconds to wait for a kernel to end before killing it.")

    # --- state -----------------------------------------------------------------------

    container_id: str | None = None
    kernel_dir: Path | None = None
    _container: Any = None
    _shutdown_requested = False
    _previous_death: str | None = None

    @property
    def has_process(self) -> bool:
        return self._container is not None and self._container.attached

    def _runtime(self) -> Runtime:
        if not hasattr(self, "_rt"):
            self._rt = Runtime(Store(self.store_root or None))
        return self._rt

    # --- launch ---------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        kernel_id = kwargs.get("kernel_id") or self.kernel_id
        self.kernel_dir = kernel_runtime_dir() / str(kernel_id)
        self.kernel_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if km is not None:
            km.transport = "ipc"
            km.ip = str(self.kernel_dir / "k")
            km.write_connection_file()
            self.connection_info = km.get_connection_info()
            shutil.copyfile(km.connection_file, self.kernel_dir / "connection.json")
        extra = kwargs.pop("extra_arguments", [])
        cmd = [*self.python, "-c", BOOT, "-f", str(self.kernel_dir / "connection.json"),
               f"--IPKernelApp.extra_extensions={guest_files.EXTENSION}", *extra]
        kwargs = await super().pre_launch(cmd=cmd, **kwargs)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._prepare_container, kwargs)
        return kwargs

    def _kernel_env(self, launch_env: dict[str, str]) -> dict[str, str]:
        env = {k: launch_env[k] for k in _PASS_ENV if k in launch_env}
        env.update(self.kernel_spec.env or {})     # the kernelspec's env stanza (already substituted)
        for k, v in (self.kernel_spec.env or {}).items():
            if k in launch_env:
                env[k] = launch_env[k]
        env.update(self.env)
        env["JUPYTER_CONTAIN_KERNEL_ID"] = str(self.kernel_id)
        if self._previous_death:
            env["JUPYTER_CONTAIN_PREVIOUS_DEATH"] = self._previous_death
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _prepare_container(self, kwargs: dict[str, Any]) -> None:
        """Find or make this kernel's container (worker thread: may pull and unpack)."""
        rt = self._runtime()
        if self._container is not None and self.reset:
            self._container.remove(force=True)
            self._container = None
        if self._container is not None:
            return  # a restart: same container, same writable layer
        image = self._resolve_image(rt)
        cwd = kwargs.get("cwd")
        binds = [Bind(Path(self.kernel_dir), str(self.kernel_dir)),
                 Bind(guest_files.guest_path(), GUEST_DIR, readonly=True)]
        workdir = None
        if self.mount_cwd and cwd and Path(cwd).is_dir():
            cwd = str(Path(cwd).resolve())
            binds.append(Bind(Path(cwd), cwd))
            workdir = cwd
        binds += [parse_bind(m) for m in self.mounts]
        spec = ContainerSpec(
            image=image.name,
            command=tuple(kwargs["cmd"]),
            entrypoint=(),
            env=self._kernel_env(kwargs.get("env") or {}),
            workdir=workdir,
            binds=tuple(binds),
            limits=Limits(memory=parse_memory(self.memory) if self.memory else None,
                          cpus=parse_cpus(self.cpus) if self.cpus else None,
                          pids=self.pids or None),
            network=self.network,
            labels={"jupyter-contain.kernel-id": str(self.kernel_id),
                    "jupyter-contain.kernel-name": getattr(self.parent, "kernel_name", "") or ""},
            owner_pid=os.getpid(),
        )
        self._container = rt.create(spec, image=image)
        self.container_id = self._container.id
        log.info("kernel %s: container %s from %s", self.kernel_id, self._container.id[:12], image.familiar)

    def _resolve_image(self, rt: Runtime) -> Any:
        if self.pull_policy == "always":
            return self._pull(rt)
        try:
            return rt.store.resolve(self.image)
        except errors.ImageNotFound:
            if self.pull_policy == "never":
                raise errors.KernelError(
                    f"image {self.image} is not in the store and pull_policy is 'never' "
                    f"(run `jupyter contain pull {self.image}` or `jupyter contain bootstrap`)") from None
            return self._pull(rt)

    def _pull(self, rt: Runtime) -> Any:
        try:
            from ..runtime.images.registry import pull
        except ImportError:  # pragma: no cover - registry client missing
            raise errors.KernelError(f"image {self.image} is not in the store") from None
        log.info("kernel %s: pulling %s", self.kernel_id, self.image)
        return pull(rt.store, self.image)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._start)
        self._shutdown_requested = False
        return self.connection_info

    def _start(self) -> None:
        c = self._container
        assert c is not None
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # the kernel's own stdout/stderr (tracebacks at startup, C-level prints) go to the
            # server's log like a local kernel's do
            c.start(stdio=(null, 1, 2))
        finally:
            os.close(null)
        self._previous_death = None

    # --- running ---------------------------------------------------------------------

    async def poll(self) -> int | None:
        c = self._container
        if c is None or not c.attached:
            return 0
        return c.poll()

    async def wait(self) -> int | None:
        c = self._container
        if c is None or not c.attached:
            return 0
        while (code := c.poll()) is None:
            await asyncio.sleep(0.05)
        return code

    async def send_signal(self, signum: int) -> None:
        c = self._container
        if c is not None and c.attached and c.poll() is None:
            # the container's init forwards it to the kernel (SIGINT -> KeyboardInterrupt)
            c.signal(signum)

    async def kill(self, restart: bool = False) -> None:
        c = self._container
        if c is not None and c.attached:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, c.kill)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def shutdown_requested(self, restart: bool = False) -> None:
        self._shutdown_requested = True

    async def cleanup(self, restart: bool = False) -> None:
        c = self._container
        loop = asyncio.get_running_loop()
        if c is not None and c.attached:
            info: ExitInfo | None = await loop.run_in_executor(None, c.wait, 10)
            if info is not None and not self._shutdown_requested and (info.oom_killed or info.signal):
                self._previous_death = f"the previous kernel was {info.describe()}"
                log.warning("kernel %s: %s", self.kernel_id, self._previous_death)
        if not restart:
            if c is not None:
                await loop.run_in_executor(None, lambda: c.remove(force=True))
            self._container = None
            if self.kernel_dir is not None:
                shutil.rmtree(self.kernel_dir, ignore_errors=True)
        elif c is not None:
            c.close()

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return max(recommended, self.shutdown_wait)

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return recommended

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update({"container_id": self.container_id,
                     "kernel_dir": str(self.kernel_dir) if self.kernel_dir else None})
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.container_id = provisioner_info.get("container_id")
        kd = provisioner_info.get("kernel_dir")
        self.kernel_dir = Path(kd) if kd else None
        if self.container_id:
            try:
                self._container = self._runtime().get(self.container_id)
            except errors.ContainerNotFound:
                self._container = None

    def resolve_path(self, path_str: str) -> str | None:
        return None  # never reveal host paths to a client asking about a contained kernel


