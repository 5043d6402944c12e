"""The ``ExtensionApp``: configuration, start and stop of jupyter-contain inside a Jupyter Server.

Owns the traitlets configuration (``ContainApp.*``: the store, the allowed root
for import/save paths, the ceilings for limits a client may ask, worker
counts), building the :class:`~.service.Service` and the
:class:`~.events.KernelWatcher` at start, and the clean-up at stop: running
operations cancelled (their undo runs), then every contained kernel of this
server shut down and any container still labelled with one of its kernels
removed, so a stopped server leaves no container behind. Must not serve
requests itself (:mod:`.handlers`) or do runtime work on the loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Int, List, Unicode, default

from .. import __version__, errors
from . import contents, events, handlers, validate
from .service import KERNEL_LABEL, Service


class ContainApp(ExtensionApp):
    """jupyter-contain's REST API (``/jupyter-contain/api/v1/``) and kernel-container events."""

    name = "jupyter_contain"
    description = "REST API for jupyter-contain's images, containers and contained kernels"
    version = __version__
    load_other_extensions = True

    store_root = Unicode("", config=True,
                         help="Image store the API works on (default: jupyter-contain's default root, "
                              "$JUPYTER_CONTAIN_ROOT or /var/lib/jupyter-contain for root).")
    allowed_root = Unicode("", config=True,
                           help="Server-side paths for image import and save must resolve inside this folder "
                                "(default: the server's root_dir).")
    max_memory = Unicode("", config=True,
                         help="Largest memory limit a client may give a kernelspec, e.g. '8g' (empty: no ceiling).")
    max_cpus = Unicode("", config=True, help="Largest CPU quota a client may give a kernelspec (empty: none).")
    max_pids = Int(0, config=True, help="Largest process limit a client may give a kernelspec (0: no ceiling).")
    allowed_networks = List(Unicode(), ["none", "bridge"], config=True,
                            help="Network modes a client may give a kernelspec ('host' would let kernels reach "
                                 "this server's API on 127.0.0.1).")
    workers = Int(4, config=True, help="Threads for the API's short blocking work (listings, stats, diffs).")
    max_operations = Int(2, config=True, help="Pulls, pushes and commits that run at once (more wait).")
    tls_verify = Bool(True, config=True, help="Verify registries' TLS certificates.")
    kernelspec_user = Bool(True, config=True,
                           help="Install kernelspecs made through the API for the server's user (else "
                                "system-wide).")
    switch_interval = Float(0.001, config=True,
                            help="The interpreter's thread switch interval in seconds (sys.setswitchinterval) "
                                 "while the extension runs; 0: leave Python's 0.005.")
    kernel_pool = Int(1, config=True,
                      help="Kernels kept warm per contained kernelspec that sets no 'pool' of its own (0: none): "
                           "filled after the kernelspec's first start, ready in milliseconds; idle ones end after "
                           "10 minutes (see the README's 'Warm pools').")
    shutdown_kernels = Bool(True, config=True,
                            help="At stop, shut down this server's contained kernels and remove their containers.")
    guard_contents = Bool(True, config=True,
                          help="Refuse contents API paths that lead out of the server's root through a symlink "
                               "(contained kernels write the notebook folder; Jupyter Server follows symlinks).")

    service: Service | None = None
    watcher: events.KernelWatcher | None = None

    @default("allowed_root")
    def _default_allowed_root(self) -> str:
        return str(getattr(self.serverapp, "root_dir", "") or os.getcwd())

    def _limits(self) -> validate.Limits:
        from ..runtime import parse_cpus, parse_memory

        try:
            return validate.Limits(
                max_memory=parse_memory(self.max_memory) if self.max_memory else None,
                max_cpus=parse_cpus(self.max_cpus) if self.max_cpus else None,
                max_pids=self.max_pids or None,
                networks=tuple(n for n in self.allowed_networks if n in ("none", "bridge", "host")),
            )
        except errors.InvalidSpec as exc:
            raise ValueError(f"ContainApp configuration: {exc}") from None

    def initialize_settings(self) -> None:
        from ..runtime import Store

        sa = self.serverapp
        assert sa is not None   # jupyter_server sets it before initialize_settings
        from ..kernel import pool

        pool.set_default(pool.PoolSettings(size=max(0, self.kernel_pool)))
        # kernelspecs that set a pool of their own fill it now, in the background (a class's kernelspec
        # with pool 30 is ready before the first student clicks); the others at their first start
        threading.Thread(target=pool.prefill_kernelspecs, args=(sa.kernel_spec_manager, sa.kernel_manager),
                         name="jc-pool-prefill", daemon=True).start()
        store = Store(self.store_root or None)
        if self.switch_interval > 0:
            # a pull runs 4-5 threads that take the GIL in turns of the switch interval; the loop's
            # thread waited several turns: 54-72 ms of lag at 5 ms during a 300 MB pull, see
            # bench/bench_server.py and the README (Benchmarks) for the figures at 1 ms
            sys.setswitchinterval(self.switch_interval)
        events.register(sa.event_logger)
        if self.guard_contents and contents.guard(sa.contents_manager):
            self.log.info("jupyter-contain: contents paths that leave %s through a symlink are refused",
                          sa.contents_manager.root_dir)
        self.service = Service(
            store=store, allowed_root=Path(self.allowed_root).resolve(), limits=self._limits(),
            kernel_manager=sa.kernel_manager, session_manager=getattr(sa, "session_manager", None),
            kernel_spec_manager=sa.kernel_spec_manager, max_workers=self.workers,
            max_operations=self.max_operations, tls_verify=self.tls_verify, kernelspec_user=self.kernelspec_user)
        self.watcher = events.KernelWatcher(event_logger=sa.event_logger, kernel_manager=sa.kernel_manager,
                                            container_of=self.service.kernel_container,
                                            deaths=self.service.deaths)
        self.service.on_event = self.watcher.emit
        self.watcher.start()
        self.settings["jupyter_contain_service"] = self.service
        self.log.info("jupyter-contain %s: API at %sjupyter-contain/api/v1/ over store %s", __version__,
                      sa.base_url, store.root)

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers.handlers())

    async def stop_extension(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        # warm pools (kernel/pool.py): their idle kernels go with the server, whatever shutdown_kernels says
        from ..kernel import pool

        await asyncio.get_running_loop().run_in_executor(None, pool.drain_all)
        service = self.service
        if service is None:
            return
        await service.operations.shutdown()
        if self.shutdown_kernels:
            await self._shutdown_contained_kernels(service)
        await service.close()

    async def _shutdown_contained_kernels(self, service: Service) -> None:
        """Shut down this server's contained kernels (their provisioners remove their containers)."""
        assert self.serverapp is not None
        km = self.serverapp.kernel_manager
        kids = []
        containers = []
        for kid in list(km.list_kernel_ids()):
            try:
                c = service.kernel_container(kid)
            except errors.ContainError:
                c = None
            if c is not None:
                kids.append(kid)
                containers.append(c)
        if kids:
            self.log.info("jupyter-contain: shutting down %d contained kernel(s)", len(kids))
            results = await asyncio.gather(*(km.shutdown_kernel(k, now=True) for k in kids), return_exceptions=True)
            for kid, res in zip(kids, results):
                if isinstance(res, BaseException):
                    self.log.warning("jupyter-contain: shutting down kernel %s: %s", kid, res)

        def sweep() -> list[str]:
            # what a failed shutdown left: containers labelled with a kernel of this server
            removed = []
            known = set(kids)
            for c in [*containers, *service.runtime.containers()]:
                try:
                    kid = c.state.labels.get(KERNEL_LABEL)
                except errors.ContainError:
                    continue   # gone already
                if kid in known:
                    try:
                        c.remove(force=True)
                        removed.append(c.id)
                    except errors.ContainError as exc:
                        self.log.warning("jupyter-contain: removing container %s: %s", c.id[:12], exc)
            return removed

        removed = await asyncio.get_running_loop().run_in_executor(None, sweep)
        if removed:
            self.log.warning("jupyter-contain: removed %d container(s) left by kernels: %s", len(removed),
                             ", ".join(r[:12] for r in removed))
