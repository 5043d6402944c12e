"""The jupyter_client kernel provisioner that starts kernels inside containers.

Owns the mapping from a Jupyter kernel's life (pre_launch, launch, poll,
signal, restart, shutdown) to a container's: one container per kernel, kept
across restarts (the writable layer survives, so what the user installed is
still there), removed at shutdown. Must not talk to the runtime except through
``jupyter_contain.runtime``'s public names, and must never block the server's
event loop: pulls, mounts and spawns run in a worker thread.

Connection: ZMQ over ``ipc`` sockets in a small tmpfs of the container's own,
which the server reaches only through fds pinned to the kernel's socket inodes
(:mod:`jupyter_contain.kernel.folder`), so the kernel needs no network at all,
kernels never collide on ports, and nothing the kernel writes can point the
server at another socket or file.

Death reasons: when a kernel dies by itself (OOM kill, a signal, a non-zero
exit), the reason is written to ``previous-death`` in the kernel folder's
read-only part before the next start (the container's environment is fixed at
creation, so a file is what reaches a restart in place); the guest extension shows it as the first
output of the next cell. The container-making part is shared with the argv
launcher in :mod:`jupyter_contain.kernel.containers`.

Host channel: each kernel gets a :class:`~jupyter_contain.kernel.channel.HostChannel`
on ``host.sock`` in its folder's read-only part, started before the first launch and stopped at
``cleanup(restart=False)`` (and started again by ``load_provisioner_info`` when
a server reconnects to a running kernel whose socket nobody serves); it serves
on the server's event loop (an async kernel manager), or on a thread of its own
when the manager is a blocking one (whose event loop only runs during its calls).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Any as TAny
from traitlets import Bool, Dict, Float, Int, List, Unicode
from traitlets import Enum as TEnum

from .. import errors
from ..runtime import NETWORK_MODES, ExitInfo, Runtime
from . import containers, pool
from .channel import socket_path
from .containers import KernelOptions
from .folder import KernelFolder, SocketPins, kernel_runtime_dir, write_connection_file
from .pool import PooledKernel, Recipe  # by name: the traitlet ``pool`` hides the module in the class
from .start_options import StartLimits, StartOptions, from_kwargs
from .trace import StartTrace

log = logging.getLogger(__name__)

__all__ = ["ContainedProvisioner", "kernel_runtime_dir"]


class ContainedProvisioner(KernelProvisionerBase):
    """Start each kernel in its own container from an OCI image."""

    image = Unicode("debian:bookworm", config=True, help="Image the kernel container starts from.")
    memory = Unicode("", config=True, help="Memory limit, e.g. '1g' (no swap beyond it). Empty: the machine's "
                                             "default (half its memory, at most 8 GiB); 'none': no limit.")
    cpus = Unicode("", config=True, help="CPU quota in cores, e.g. '1.5'. Empty: none.")
    pids = Int(512, config=True, help="Process limit (0: none).")
    network = TEnum(list(NETWORK_MODES), "none", config=True,
                    help="none: own network namespace with loopback only (default); bridge: egress through "
                         "NAT on the jupyter-contain bridge (lets pip install); host: share the host's network.")
    mounts = List(Unicode(), [], config=True, help="Extra bind mounts, 'SRC:DST[:ro]'.")
    env = Dict(value_trait=Unicode(), default_value={}, config=True, help="Extra environment for the kernel.")
    pull_policy = TEnum(["missing", "always", "never"], "missing", config=True,
                        help="Pull the image: when missing from the store, always, or never.")
    mount_cwd = Bool(True, config=True, help="Mount the notebook's folder at the same path and start there.")
    reset = Bool(False, config=True, help="Start from a fresh writable layer at every restart.")
    store_root = Unicode("", config=True, help="Image store (default: jupyter-contain's default root).")
    python = List(Unicode(), ["python3"], config=True, help="The image's Python command.")
    shutdown_wait = Float(5.0, config=True, help="Seconds to wait for a kernel to end before killing it.")
    # plain strings, checked by KernelOptions: a bad kernelspec gets our message, not a TraitError
    userns = Unicode("", config=True,
                   help="auto: container root is an unprivileged subordinate uid (needs /etc/subuid entries); "
                        "host: the host's ids. A server that is not root always uses a user namespace.")
    seccomp = Unicode("default", config=True,
                    help="default: Docker's seccomp profile; unconfined: without it, keeping only the guard against "
                         "setuid/setgid files, device nodes and xattrs (a warning at every start).")
    allowed_images = List(Unicode(), [], config=True,
                          help="Images %%container cells and %container images may use besides the kernel's own "
                               "image and its snapshots: references or glob patterns ('python:*'; '*': all).")
    pool = TAny(None, allow_none=True, config=True,
               help="A warm pool of pre-started kernels of this kernelspec: a size, or {'size': N, 'idle_ttl': "
                    "seconds (600), 'memory_budget': '2g', 'min_available': 0.15, 'max_pressure': 10}. "
                    "0: none. Unset: the Jupyter server's ContainApp.kernel_pool (1), or none outside a server.")
    kernel_layer = Unicode("", config=True,
                           help="How the kernel gets ipykernel (set by `jupyter contain kernelspec install`): empty: the "
                                "image's own; 'layer': the host-made kernel layer's Python (images without Python); "
                                "'site:3.N': the image's Python 3.N with ipykernel from a host-made site folder.")

    # --- state -----------------------------------------------------------------------

    container_id: str | None = None
    folder: KernelFolder | None = None
    _pins: SocketPins | None = None
    _kernel_info: dict[str, Any] | None = None   # the kernel's side of the connection info
    _started_once = False
    _container: Any = None
    _shutdown_requested = False
    _previous_death: str | None = None
    _killed_by_us = False
    _exit_recorded = False
    _channel: Any = None
    _reset_requested = False
    _handed_out = False    # a pooled kernel taken at this start: it runs already
    _trace: StartTrace | None = None
    _start_options: StartOptions | None = None   # the start dialog's choices, kept for restarts

    @property
    def has_process(self) -> bool:
        return self._container is not None and self._container.attached

    @property
    def container(self) -> Any:
        """This kernel's container (None before the first launch and after shutdown): for the server extension."""
        return self._container

    @property
    def start_options(self) -> StartOptions | None:
        """What the start dialog chose for this kernel (None: the kernelspec's values)."""
        return self._start_options

    def request_reset(self) -> None:
        """Give the next restart of this kernel a fresh writable layer (as ``%container reset`` does)."""
        self._reset_requested = True

    def options(self) -> KernelOptions:
        """The provisioner's options, validated (a bad kernelspec fails here, before any work)."""
        names = containers.OPTION_NAMES - {"shutdown_wait"}
        config = {n: getattr(self, n) for n in names}
        spec_cfg = ((getattr(self.kernel_spec, "metadata", None) or {}).get("kernel_provisioner") or {}).get(
            "config") or {}
        unknown = sorted(set(spec_cfg) - containers.OPTION_NAMES)
        where = f"kernelspec {getattr(self.parent, 'kernel_name', '') or '?'}"
        if unknown:
            raise errors.InvalidSpec(f"{where}: unknown option(s) {', '.join(unknown)} "
                                     f"(known: {', '.join(sorted(containers.OPTION_NAMES))})")
        if self._start_options is not None:
            # the start dialog's choices over the kernelspec's, validated below like the kernelspec's own
            config = self._start_options.apply(config)
            where += " with start options"
        return KernelOptions.from_config(config, where=where)

    def _where(self) -> str:
        return f"kernelspec {getattr(self.parent, 'kernel_name', '') or '?'}"

    def _runtime(self) -> Runtime:
        if not hasattr(self, "_rt"):
            self._rt = containers.runtime_for(self.options())
        return self._rt

    # --- launch ---------------------------------------------------------------------

    @property
    def kernel_dir(self) -> Path | None:
        """The kernel's folder on the host (see :mod:`jupyter_contain.kernel.folder`)."""
        return self.folder.base if self.folder is not None else None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        # per-start options (StartOptions, from the server's kernel start API): taken at the first
        # start; a restart carries the same object again (jupyter_client keeps the start's kwargs)
        start = from_kwargs(kwargs)
        if start is not None and self._container is None and self._pins is None:
            self._start_options = None if start.empty else start
        options = self.options()
        km = self.parent
        if km is None:
            raise errors.KernelError("a contained kernel needs a kernel manager (its connection file)")
        first = self._container is None and self._pins is None
        try:
            return await self._pre_launch(options, km, kwargs)
        except BaseException:
            # jupyter_client cleans nothing up after a failed start: a first start undoes its own
            # work (folder, pins, channel, container); a restart keeps the container and its layer
            if first:
                await self._abandon()
            raise

    async def _pre_launch(self, options: KernelOptions, km: Any, kwargs: dict[str, Any], *,
                          pooling: bool = True) -> dict[str, Any]:
        kernel_id = str(kwargs.get("kernel_id") or self.kernel_id)
        trace = self._trace = StartTrace(kernel_id)
        loop = asyncio.get_running_loop()
        given = dict(kwargs)
        extra = kwargs.pop("extra_arguments", [])
        kwargs = await super().pre_launch(**kwargs)   # the kernel's launch environment, finalised
        pooled = None
        if pooling and self._container is None and self._pins is None and self._start_options is None:
            # a warm kernel of this kernelspec, if its pool has one (never with per-start options)
            pooled = await loop.run_in_executor(None, self._take_pooled, options, kwargs, extra)
            trace.mark("pool looked up")
        if pooled is not None:
            self.folder = pooled.folder
            self._container = pooled.container
            self.container_id = pooled.container.id
        else:
            # a restart keeps its folder (a pooled kernel's is named after its pool slot)
            self.folder = KernelFolder.make(self.folder.kernel_id if self.folder is not None else kernel_id)
        if self._pins is None:
            if pooled is not None:
                # the pooled kernel listens already: its ports (socket names) and HMAC key become the manager's
                (km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port) = pool.POOL_PORTS
                km.session.key = pooled.key.encode()
            # the host's side: ipc paths in the host-only links folder, pinned to the kernel's sockets
            km.transport = "ipc"
            km.ip = self.folder.host_ip
            km.write_connection_file()
            self.connection_info = km.get_connection_info()
            self._pins = SocketPins(self.folder.links_dir, _ports(self.connection_info))
            # the kernel's side: the same ports and key, its own socket folder
            self._kernel_info = {**json.loads(Path(km.connection_file).read_text()), "ip": self.folder.kernel_ip}
        kwargs["cmd"] = containers.kernel_command(options, self.folder.connection_file_inside, extra)
        trace.mark("folder and pins")
        # before the container exists: host.sock is bound into it at creation
        await self._start_channel()
        trace.mark("host channel")
        if pooled is not None:
            try:
                await loop.run_in_executor(None, self._hand_out, pooled, options, kwargs, extra)
            except (errors.ContainError, OSError) as exc:
                # never seen by a client: removed, and this start goes on cold
                log.warning("kernel %s: the pooled kernel could not be handed out (%s); starting it cold",
                            self.kernel_id, exc)
                await self._abandon()
                self.container_id, self.folder = None, None
                km.cleanup_connection_file()
                return await self._pre_launch(options, km, given, pooling=False)
        else:
            await loop.run_in_executor(None, self._prepare_container, options, kwargs)
            trace.mark("container made" if self._container is not None else "container kept")
        return kwargs

    def _pool_recipe(self, options: KernelOptions, launch_env: dict[str, str]) -> Recipe | None:
        """This kernelspec's pool recipe for a start with ``launch_env`` (None: no pool for it)."""
        settings = (pool.PoolSettings.from_config(self.pool, where=self._where()) if self.pool is not None
                    else pool.default_settings())
        rt = self._runtime()
        if settings.size <= 0 or rt.rootless:
            return None
        containers.gc_once(rt, logger=self.log)
        image = containers.resolve_image(rt, options)
        env = containers.kernel_env(options, kernel_id=str(self.kernel_id), folder=KernelFolder(Path("/")),
                                    launch_env=launch_env, spec_env=self.kernel_spec.env or {})
        spec_dir = getattr(self.kernel_spec, "resource_dir", None)
        return pool.pool_key(kernel_name=getattr(self.parent, "kernel_name", "") or "", options=options,
                             settings=settings, env=env, image_digest=image.digest,
                             spec_file=Path(spec_dir) / "kernel.json" if spec_dir else None)

    def _take_pooled(self, options: KernelOptions, kwargs: dict[str, Any],
                     extra: list[str]) -> PooledKernel | None:
        """A pooled kernel for this start, if the kernelspec has a pool holding one (worker thread)."""
        if extra:
            return None   # a pooled kernel is initialised already: a client's extra arguments need a cold one
        recipe = self._pool_recipe(options, kwargs.get("env") or {})
        return pool.take(recipe, self._runtime()) if recipe is not None else None

    def warm_pool(self) -> None:
        """Fill this kernelspec's pool before its first start (blocking: may pull the image).

        The launch environment is the one a start by this process would
        give: its own environment (``KernelProvisionerBase.pre_launch``).
        """
        env = dict(os.environ)
        self._finalize_env(env)
        recipe = self._pool_recipe(self.options(), env)
        if recipe is not None:
            pool.prefill(recipe, self._runtime())

    def _hand_out(self, pk: PooledKernel, options: KernelOptions, kwargs: dict[str, Any],
                  extra: list[str]) -> None:
        """Make the pooled kernel this one (worker thread): folder, env, cwd, connection file, then go."""
        assert self.folder is not None and self._pins is not None
        env = containers.kernel_env(options, kernel_id=str(self.kernel_id), folder=self.folder,
                                    launch_env=kwargs.get("env") or {}, spec_env=self.kernel_spec.env or {})
        pool.hand_out(pk, kernel_id=str(self.kernel_id), options=options, env=env, cwd=kwargs.get("cwd"),
                      cold_cmd=kwargs["cmd"], kernel_name=getattr(self.parent, "kernel_name", "") or "",
                      trace=self._trace.mark if self._trace is not None else lambda _: None)
        c = pk.container
        self._pins.watch(c.pinned(self.folder.sockets_inside), alive=lambda: c.poll() is None)
        self._handed_out = True
        self._previous_death = None
        log.info("kernel %s: a pooled kernel (container %s) handed out", self.kernel_id, c.id[:12])

    def _prepare_container(self, options: KernelOptions, kwargs: dict[str, Any]) -> None:
        """Find or make this kernel's container (worker thread: may pull and unpack)."""
        rt = self._runtime()
        containers.gc_once(rt, logger=self.log)
        # why the previous kernel died, for the guest to show on the first cell; a file in
        # the kernel folder, because a restart in place keeps the container's environment
        assert self.folder is not None
        self.folder.write_previous_death(self._previous_death)
        if self._container is not None and options.reset:
            self._container.remove(force=True)
            self._container = None
        if self._container is not None and self._reset_requested:
            # `%container reset` asked for it: same container, fresh writable layer
            self._container.reset()
        self._reset_requested = False
        if self._container is not None:
            return  # a restart: same container, same writable layer
        env = containers.kernel_env(options, kernel_id=str(self.kernel_id), folder=self.folder,
                                    launch_env=kwargs.get("env") or {},
                                    spec_env=self.kernel_spec.env or {})
        self._container = containers.create_container(
            rt, options, kernel_id=str(self.kernel_id), folder=self.folder, cmd=kwargs["cmd"],
            env=env, cwd=kwargs.get("cwd"), kernel_name=getattr(self.parent, "kernel_name", "") or "")
        self.container_id = self._container.id

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        loop = asyncio.get_running_loop()
        try:
            if self._handed_out:
                # a pooled kernel runs already (its restarts start below); it binds its sockets within
                # milliseconds: return once they are pinned, so that clients connecting now are not
                # refused and left to ZMQ's reconnect interval (100 ms)
                self._handed_out = False
                await self._await_pins(5.0)
            else:
                await loop.run_in_executor(None, self._start)
            if self._trace is not None:
                self._trace.mark("container started")
                self._trace.log()
        except BaseException:
            if not self._started_once:
                await self._abandon()
            raise
        self._started_once = True
        self._shutdown_requested = False
        self._killed_by_us = False
        self._exit_recorded = False
        return self.connection_info

    async def _await_pins(self, timeout: float) -> None:
        # on the event loop, not in a worker thread: 30 hand-outs at once would hold every worker
        pins, c, t0 = self._pins, self._container, time.monotonic()
        while pins is not None and not pins.complete and c is not None and c.poll() is None \
                and time.monotonic() - t0 < timeout:
            await asyncio.sleep(0.002)
        if self._trace is not None:
            self._trace.mark("sockets bound")

    async def _abandon(self) -> None:
        """Undo a first start that failed: nothing of this kernel stays (jupyter_client will not clean up)."""
        await self._stop_channel()
        c, self._container = self._container, None
        if c is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, lambda: c.remove(force=True))
            except errors.ContainError as exc:
                log.warning("kernel %s: removing the container of a failed start: %s", self.kernel_id, exc)
        if self._pins is not None:
            self._pins.close()
            self._pins = None
        if self.folder is not None:
            self.folder.remove()

    async def _start_channel(self) -> None:
        if self._channel is not None or self.folder is None:
            return
        from jupyter_client.manager import AsyncKernelManager

        from .channel import HostChannel

        spec_dir = getattr(self.kernel_spec, "resource_dir", None)

        def request_reset() -> None:
            self._reset_requested = True

        ctx = containers.kernel_context(self.options(), kernel_id=str(self.kernel_id), runtime=self._runtime(),
                                        container=lambda: self._container,
                                        kernelspec_dir=Path(spec_dir) if spec_dir else None,
                                        request_reset=request_reset)
        ch = HostChannel(ctx, socket_path(self.folder.channel_dir))
        try:
            if isinstance(self.parent, AsyncKernelManager):
                await ch.start()
            else:
                await asyncio.get_running_loop().run_in_executor(None, ch.start_thread)
        except OSError as exc:
            # the kernel works without it; only the %container magics and widgets say they cannot reach it
            log.warning("kernel %s: no host channel: %s", self.kernel_id, exc)
            await ch.aclose()
            return
        self._channel = ch

    async def _stop_channel(self) -> None:
        ch, self._channel = self._channel, None
        if ch is not None:
            try:
                await ch.aclose()
            except Exception:   # a channel that fails to stop must not keep the kernel's clean-up from running
                log.exception("kernel %s: stopping the host channel", self.kernel_id)

    def _start(self) -> None:
        c = self._container
        assert c is not None
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # the kernel's own stdout/stderr (tracebacks at startup, C-level prints) go to the
            # server's log like a local kernel's do; its connection file goes into its fresh
            # socket tmpfs before it runs anything
            assert self.folder is not None and self._pins is not None
            self._pins.unpin()
            c.start(stdio=(null, 1, 2), pin=[self.folder.sockets_inside], prepare=self._write_connection_file)
            self._pins.watch(c.pinned(self.folder.sockets_inside), alive=lambda: c.poll() is None)
        finally:
            os.close(null)
        self._previous_death = None

    def _write_connection_file(self, pinned: Mapping[str, int]) -> None:
        c, folder = self._container, self.folder
        assert c is not None and folder is not None and self._kernel_info is not None
        write_connection_file(pinned[folder.sockets_inside], self._kernel_info, owner=c.process_host_ids())

    # --- running ---------------------------------------------------------------------

    async def poll(self) -> int | None:
        c = self._container
        if c is None or not c.attached:
            return 0
        code = c.poll()
        if code is not None and not self._exit_recorded:
            # record how it ended now (cgroup OOM counters, peak), so `jupyter contain ps -a`
            # shows the reason while the restarter has not yet started the next kernel
            self._exit_recorded = True
            await asyncio.get_running_loop().run_in_executor(None, c.wait, 0)
        return code

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
            if c.poll() is None:
                self._killed_by_us = True   # our SIGKILL is no death to report
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
            if (info is not None and not self._shutdown_requested and not self._killed_by_us
                    and (info.oom_killed or info.signal or info.code != 0)):
                self._previous_death = f"the previous kernel was {info.describe()}"
                log.warning("kernel %s: %s", self.kernel_id, self._previous_death)
        if self._pins is not None:
            # the dead kernel's sockets: let go, so the next kernel's are pinned at the same links
            # and connected clients (the server's channels) reconnect to it by themselves
            self._pins.unpin()
        if not restart:
            await self._stop_channel()
            if c is not None:
                await loop.run_in_executor(None, lambda: c.remove(force=True))
            self._container = None
            if self._pins is not None:
                self._pins.close()
                self._pins = None
            if self.folder is not None:
                self.folder.remove()
        elif c is not None:
            c.close()

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return max(recommended, self.shutdown_wait)

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return recommended

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update({"container_id": self.container_id,
                     "kernel_dir": str(self.kernel_dir) if self.kernel_dir else None,
                     "kernel_info": self._kernel_info,
                     "ports": self._pins.ports if self._pins is not None else None,
                     "start_options": self._start_options.to_json() if self._start_options else None})
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.container_id = provisioner_info.get("container_id")
        kd = provisioner_info.get("kernel_dir")
        self.folder = KernelFolder.make(Path(kd).name) if kd else None
        if self.folder is not None and kd and self.folder.base != Path(kd):
            raise errors.KernelError(f"kernel folder {kd} is not under {kernel_runtime_dir()}")
        self._kernel_info = provisioner_info.get("kernel_info")
        chosen = provisioner_info.get("start_options")
        if chosen:
            # written by our own get_provisioner_info; re-checked as any start's (no server ceilings here)
            self._start_options = StartOptions.parse(chosen, limits=StartLimits(networks=tuple(NETWORK_MODES)))
        if self.container_id:
            try:
                self._container = self._runtime().get(self.container_id)
            except errors.ContainerNotFound:
                self._container = None
        # a server reconnecting to a running kernel: the previous server's channel and its pinned
        # sockets died with it (the state file and the socket are looked at in a worker thread)
        c, folder = self._container, self.folder
        if c is None or folder is None or not await asyncio.get_running_loop().run_in_executor(
                None, lambda: c.refresh_status() == "running"):
            return
        ports = provisioner_info.get("ports") or []
        if ports and self._pins is None:
            self._pins = SocketPins(folder.links_dir, ports)
            fd = await asyncio.get_running_loop().run_in_executor(None, c.pin, folder.sockets_inside)
            try:
                self._pins.pin(fd)
            finally:
                os.close(fd)
        if not await asyncio.get_running_loop().run_in_executor(
                None, lambda: _served(socket_path(folder.channel_dir))):
            await self._start_channel()

    def resolve_path(self, path_str: str) -> str | None:
        return None  # never reveal host paths to a client asking about a contained kernel


def _ports(info: Mapping[str, Any]) -> list[int]:
    return [int(info[f"{ch}_port"]) for ch in ("shell", "iopub", "stdin", "control", "hb")]


def _served(path: Path) -> bool:
    """Whether something listens on the unix socket ``path`` (a stale file left by a dead server: no)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
