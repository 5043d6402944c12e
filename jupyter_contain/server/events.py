"""Kernel-container events through Jupyter Server's event system (``jupyter_events``).

Owns the schema id, registering the schema file shipped beside this module,
and :class:`KernelWatcher`: it listens to the server's own kernel action events
(start, restart, shutdown) and to each contained kernel's restarter (a death
the restarter saw), and emits ``started``, ``oom_killed``, ``died`` and
``restarted``; the routes emit ``reset`` and ``snapshot``. Must not poll
containers, block the loop (the one synchronous read, of a dead kernel's exit
record, is one small file and must happen before the restart rewrites it), or
act on kernels: it only watches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_ID = "https://jupyter-contain.org/events/kernel-container/v1"
SCHEMA_PATH = Path(__file__).parent / "events" / "kernel-container.yaml"
KERNEL_ACTIONS = "https://events.jupyter.org/jupyter_server/kernel_actions/v1"
EVENTS = ("started", "oom_killed", "died", "restarted", "reset", "snapshot")


def register(event_logger: Any) -> None:
    from jupyter_events.schema_registry import SchemaRegistryException

    try:
        event_logger.register_event_schema(SCHEMA_PATH)
    except SchemaRegistryException:   # a second extension instance in one process
        pass


class KernelWatcher:
    """Turns the kernel manager's doings into kernel-container events."""

    def __init__(self, *, event_logger: Any, kernel_manager: Any, container_of: Callable[[str], Any],
                 deaths: dict[str, Any]) -> None:
        self._events = event_logger
        self._km = kernel_manager
        self._container_of = container_of
        self._deaths = deaths
        self._watched: dict[str, Callable[[], None]] = {}

    def start(self) -> None:
        self._events.add_listener(schema_id=KERNEL_ACTIONS, listener=self._on_action)

    def stop(self) -> None:
        self._events.remove_listener(schema_id=KERNEL_ACTIONS, listener=self._on_action)
        for kid, cb in list(self._watched.items()):
            self._unwatch(kid, cb)

    def emit(self, data: dict[str, Any]) -> None:
        clean = {k: v for k, v in data.items() if v is not None or k in ("memory_limit", "memory_peak",
                                                                         "signal", "code")}
        try:
            self._events.emit(schema_id=SCHEMA_ID, data=clean)
        except Exception:   # an event that does not validate is our bug, not the caller's failure
            log.exception("cannot emit %s", data)

    def _container(self, kid: str) -> Any:
        try:
            return self._container_of(kid)
        except Exception:   # not contained, gone, or between containers
            return None

    async def _on_action(self, logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        kid, action = data.get("kernel_id"), data.get("action")
        if not kid or data.get("status") != "success":
            return
        if action == "shutdown":
            cb = self._watched.pop(kid, None)
            if cb is not None:
                self._unwatch(kid, cb)
            self._deaths.pop(kid, None)
            return
        c = self._container(kid)
        if c is None:
            return
        if action == "start":
            self._watch(kid)
            image = await asyncio.get_running_loop().run_in_executor(None, lambda: c.state.image_name)
            self.emit({"event": "started", "kernel_id": kid, "container_id": c.id, "image": image})
        elif action == "restart":
            self.emit({"event": "restarted", "kernel_id": kid, "container_id": c.id})

    def _watch(self, kid: str) -> None:
        if kid in self._watched or kid not in self._km:
            return

        def on_restart() -> None:
            self._died(kid)

        self._km.get_kernel(kid).add_restart_callback(on_restart, "restart")
        self._watched[kid] = on_restart

    def _unwatch(self, kid: str, cb: Callable[[], None]) -> None:
        self._watched.pop(kid, None)
        if kid in self._km:
            try:
                self._km.get_kernel(kid).remove_restart_callback(cb, "restart")
            except (KeyError, ValueError):
                pass

    def _died(self, kid: str) -> None:
        """The restarter found the kernel dead and is about to start it again (on the loop)."""
        c = self._container(kid)
        if c is None:
            return
        try:
            # synchronous on purpose: the restart that follows at once rewrites the exit record;
            # one small state file (the provisioner's poll already recorded the exit)
            info = c.exit_info()
        except Exception:
            log.debug("kernel %s: no exit record", kid, exc_info=True)
            info = None
        if info is None:
            return
        self._deaths[kid] = info
        base = {"kernel_id": kid, "container_id": c.id, "reason": info.describe()}
        if info.oom_killed:
            self.emit({"event": "oom_killed", **base, "memory_limit": info.memory_limit,
                       "memory_peak": info.memory_peak})
        else:
            self.emit({"event": "died", **base, "signal": info.signal, "code": info.code})
