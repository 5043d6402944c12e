"""Long work of the REST API as operations: pull, push, commit, build, each one worker thread.

Owns :class:`Operation` (state, progress per item, result, error, the cancel
flag) and :class:`Operations` (the registry: start, look up, cancel, forget old
ones). Must not know HTTP or tornado (handlers turn operations into JSON and
server-sent events) and must not run on the event loop what can block: the work
runs in a thread of the registry's own pool; the loop only reads snapshots.

Cancellation is cooperative and safe by construction: the worker's progress
callbacks call :meth:`Operation.checkpoint`, which raises :class:`Cancelled`
only at points where the runtime undoes everything on the way out (a pull while
its blobs and layers are still in ``tmp/``, a snapshot while its blob is being
written, a build between two steps: it tags only after its last). Past those
points (a pull's commit, a snapshot's ``commit`` stage) a cancel comes too late
and the operation finishes; the store is never left half-written either way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import ContainError

log = logging.getLogger(__name__)

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
KINDS = frozenset({"pull", "push", "commit", "build"})

#: how often a worker's progress wakes the loop's listeners (each wake is one call_soon_threadsafe)
_WAKE_INTERVAL = 0.1


class Cancelled(ContainError):
    """The operation was cancelled before it committed anything."""


@dataclass
class Item:
    """One layer (or blob) of an operation's progress."""

    id: str
    done: int = 0
    total: int | None = None
    state: str = "waiting"    # waiting | running | done
    status: str = ""          # the runtime's word for it (downloading, unpacking, exists, ...)
    index: int = -1           # position in the image's layers (-1: the config); a build's step number
    text: str = ""            # a build step's instruction (truncated)
    seconds: float | None = None   # how long a finished build step took

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "done": self.done, "total": self.total, "state": self.state,
                "status": self.status, "index": self.index, "text": self.text, "seconds": self.seconds}


@dataclass
class Operation:
    """One piece of long work; fields change in the worker thread under ``_lock``."""

    kind: str
    target: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = RUNNING
    created: float = field(default_factory=time.time)
    finished: float | None = None
    stage: str = "starting"
    done: int = 0
    total: int | None = None
    items: dict[str, Item] = field(default_factory=dict)
    rate: float = 0.0         # bytes per second so far
    count: int = 0            # layers in the image (pull/push)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    #: bumped at every change: listeners send only what is new
    version: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _waiters: list[asyncio.Future] = field(default_factory=list, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _last_wake: float = 0.0

    # --- worker side (any thread) ------------------------------------------------------

    def checkpoint(self) -> None:
        """Raise :class:`Cancelled` if a cancel was asked: call only where undo is complete."""
        if self._cancel.is_set():
            raise Cancelled(f"{self.kind} of {self.target} cancelled")

    def update(self, *, stage: str | None = None, done: int | None = None, total: int | None = None,
               item: Item | None = None, rate: float | None = None, count: int | None = None) -> None:
        with self._lock:
            if rate is not None:
                self.rate = rate
            if count is not None:
                self.count = count
            if stage is not None:
                self.stage = stage
            if done is not None:
                self.done = done
            if total is not None:
                self.total = total
            if item is not None:
                self.items[item.id] = item
            self.version += 1
        self._wake()

    def _finish(self, state: str, *, result: dict[str, Any] | None = None,
                error: dict[str, Any] | None = None) -> None:
        with self._lock:
            self.state = state
            self.result = result
            self.error = error
            self.finished = time.time()
            if state == SUCCEEDED:
                self.stage = "done"
            self.version += 1
        self._wake(force=True)

    def _wake(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_wake < _WAKE_INTERVAL:
            return
        self._last_wake = now
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:   # on the loop
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # --- loop side ----------------------------------------------------------------------

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    async def changed(self, since: int, timeout: float) -> None:
        """Return once ``version`` differs from ``since`` (or after ``timeout``)."""
        if self.version != since:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "id": self.id, "kind": self.kind, "target": self.target, "state": self.state,
                "created": self.created, "finished": self.finished,
                "progress": {"stage": self.stage, "done": self.done, "total": self.total,
                             "rate": self.rate, "count": self.count,
                             "items": [i.to_json() for i in self.items.values()]},
                "result": self.result, "error": self.error,
                "cancel_requested": self._cancel.is_set() and self.state == RUNNING,
                "version": self.version,
            }


#: nice value of operation threads (and of the threads they start: Linux threads inherit it)
WORKER_NICE = 10


def _lower_priority() -> None:
    """Run this worker thread (and what it starts) below the event loop's thread.

    A pull keeps both cores busy (downloads, sha256, gunzip, unpack in 4-5
    threads); at equal priority the loop thread waited up to 54 ms for a core
    and the GIL during a 300 MB pull (bench/bench_server.py). Raising a
    thread's own nice value needs no privilege; it is never lowered again, so
    the pool's threads stay background threads.
    """
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < WORKER_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, WORKER_NICE)
    except OSError as exc:   # a seccomp'd or exotic system: run at normal priority
        log.debug("cannot lower the priority of an operation thread: %s", exc)


#: work(op) -> result JSON; runs in a worker thread; errors become the operation's error
Work = Callable[[Operation], dict[str, Any]]
#: what to do on the loop once an operation ended (events, bookkeeping)
Done = Callable[[Operation], None]


class Operations:
    """The registry of operations of one server; finished ones are kept for a while."""

    def __init__(self, *, max_workers: int = 4, keep: int = 100,
                 error_json: Callable[[BaseException], dict[str, Any]]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="jc-operation")
        self._ops: dict[str, Operation] = {}
        self._keep = keep
        self._error_json = error_json
        self._tasks: set[asyncio.Future] = set()

    def start(self, kind: str, target: str, work: Work, *, on_done: Done | None = None) -> Operation:
        """Start ``work`` in a worker thread (call on the loop); returns the running operation."""
        assert kind in KINDS, kind
        loop = asyncio.get_running_loop()
        op = Operation(kind=kind, target=target, _loop=loop)
        self._ops[op.id] = op
        self._forget_old()

        def run() -> None:
            _lower_priority()
            try:
                op.checkpoint()
                result = work(op)
            except Cancelled as exc:
                op._finish(CANCELLED, error={"code": "cancelled", "message": str(exc)})
            except BaseException as exc:   # noqa: BLE001 - every failure becomes the operation's error
                if not isinstance(exc, ContainError):
                    log.exception("operation %s (%s %s) failed", op.id, kind, target)
                op._finish(FAILED, error=self._error_json(exc))
            else:
                op._finish(SUCCEEDED, result=result)

        fut = loop.run_in_executor(self._pool, run)
        self._tasks.add(fut)

        def finished(f: asyncio.Future) -> None:
            self._tasks.discard(f)
            if on_done is not None:
                try:
                    on_done(op)
                except Exception:   # a listener's failure is not the operation's
                    log.exception("after operation %s", op.id)

        fut.add_done_callback(finished)
        return op

    def get(self, op_id: str) -> Operation | None:
        return self._ops.get(op_id)

    def all(self) -> list[Operation]:
        return sorted(self._ops.values(), key=lambda o: o.created)

    def _forget_old(self) -> None:
        finished = [o for o in self.all() if o.state in FINAL]
        for o in finished[: max(0, len(finished) - self._keep)]:
            del self._ops[o.id]

    async def shutdown(self, *, timeout: float = 30.0) -> None:
        """Cancel what runs and wait for the workers (their undo runs before they return)."""
        for o in self._ops.values():
            if o.state == RUNNING:
                o.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        self._pool.shutdown(wait=False)
