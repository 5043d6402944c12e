"""The host side of a contained kernel's channel: the sandbox's one narrow line to the host.

Owns the unix socket ``<kernel folder>/host.sock`` (the folder is bind-mounted
at the same path inside the kernel's container) and the fixed set of requests
it answers, always about *that* kernel's container only: ``stats``, ``diff``,
``snapshot``, ``install_kernelspec``, ``reset``, ``images``, ``ps`` and
``run_cell`` (``%%container``). Also owns :func:`run_code`, running a piece of
code in a fresh container with its output on pipes, shared with the host-side
magics.

Must not: accept anything from the sandbox that names another container, a
host path or a command outside those requests (every field is validated; an
unknown field is an error); hand host paths back; block the event loop it
serves on (snapshots, diffs, container starts run in worker threads); run
inside the container (the server freezes the container for a snapshot, the
channel must keep running meanwhile, so it lives in the host process).

Protocol: newline-delimited JSON, one request per line (at most 64 KiB). An
answer is zero or more event lines (``{"event": "progress", ...}`` while a
snapshot runs, ``{"event": "output", ...}`` while a ``%%container`` cell runs)
and then one final line ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import re
import selectors
import threading
import time
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import errors
from ..runtime import (
    Container,
    ContainerSpec,
    ExitInfo,
    ImageRecord,
    Limits,
    Reference,
    Runtime,
    diff,
    parse_cpus,
    parse_memory,
    snapshot,
    summarize,
)

log = logging.getLogger(__name__)

__all__ = [
    "MAX_LINE", "OPS", "SOCKET_NAME", "HostChannel", "KernelContext", "parse_display_name", "parse_snapshot_tag",
    "run_code", "socket_path",
]

SOCKET_NAME = "host.sock"
#: longest request line; longer ones are refused and the connection closed
MAX_LINE = 64 * 1024
MAX_CONNECTIONS = 8
MAX_MESSAGE = 2000
MAX_DISPLAY_NAME = 100
MAX_TAG = 128
MAX_DIFF_CHANGES = 1000
#: snapshot progress lines at most this often (the asking kernel is frozen meanwhile: its
#: socket buffer must absorb them all without the host ever waiting for it)
PROGRESS_INTERVAL = 0.25
#: output chunks of a %%container cell in flight before the container's pipe waits
OUTPUT_WINDOW = 256

#: the kernel label snapshots carry (set by the runtime from the container's label)
IMAGE_KERNEL_LABEL = "io.jupyter-contain.kernel-id"
#: the label of containers a kernel's ``%%container`` cells run in
CELL_LABEL = "jupyter-contain.cell-of"

#: op -> the fields it takes (anything else in a request is refused)
OPS: Mapping[str, frozenset[str]] = {
    "stats": frozenset(),
    "diff": frozenset({"limit"}),
    "snapshot": frozenset({"tag", "message", "compress"}),
    "install_kernelspec": frozenset({"image", "display_name"}),
    "reset": frozenset(),
    "images": frozenset(),
    "ps": frozenset(),
    "run_cell": frozenset({"code", "image", "shell", "memory", "cpus", "network"}),
}


def socket_path(kernel_dir: Path) -> Path:
    return Path(kernel_dir) / SOCKET_NAME


# --- validation ----------------------------------------------------------------------------


def parse_snapshot_tag(text: Any) -> Reference:
    """A snapshot tag from the sandbox: a plain local name (``myenv:v1``), never a registry or digest.

    Returns the store name it gets (``localhost/myenv:v1``). Raises ChannelError.
    """
    if not isinstance(text, str) or not text.strip():
        raise errors.ChannelError("a snapshot needs a tag, e.g. myenv:v1")
    if len(text) > MAX_TAG:
        raise errors.ChannelError(f"tag too long ({len(text)} characters, at most {MAX_TAG})")
    if "@" in text:
        raise errors.ChannelError(f"invalid tag {text!r}: a snapshot cannot be named by digest")
    first, sep, _ = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        raise errors.ChannelError(f"invalid tag {text!r}: only a local name like myenv:v1 (no registry or host part)")
    try:
        parsed = Reference.parse(text)
    except errors.InvalidReference as exc:
        raise errors.ChannelError(f"invalid tag {text!r}: {exc}") from None
    return Reference("localhost", parsed.repository.removeprefix("library/"), parsed.tag, None)


def parse_display_name(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise errors.ChannelError("a display name must be a non-empty string")
    text = text.strip()
    if len(text) > MAX_DISPLAY_NAME:
        raise errors.ChannelError(f"display name too long (at most {MAX_DISPLAY_NAME} characters)")
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        raise errors.ChannelError("a display name must not hold control characters")
    return text


def _str_field(req: Mapping[str, Any], name: str, *, default: str | None = None, limit: int = 256) -> str | None:
    v = req.get(name, default)
    if v is None:
        return None
    if not isinstance(v, str):
        raise errors.ChannelError(f"{name} must be a string")
    if len(v) > limit:
        raise errors.ChannelError(f"{name} too long (at most {limit} characters)")
    return v


_SAFE_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")


# --- running code in a fresh container (shared with the host-side magics) ---------------------


def run_code(rt: Runtime, spec: ContainerSpec, *, on_output: Callable[[str, str], None],
             cancel: threading.Event | None = None, image: ImageRecord | None = None) -> ExitInfo:
    """Run ``spec`` in a fresh container, its stdout/stderr on pipes, to its end; remove it.

    ``on_output(stream, text)`` gets decoded text as it comes ("stdout" or
    "stderr"). ``cancel`` set: the container is killed (its output so far is
    still delivered). Blocking: call it in a worker thread from async code.
    """
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    to_close = [out_w, err_w]
    c: Container | None = None
    sel = selectors.DefaultSelector()
    try:
        c = rt.create(spec, image=image)
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        to_close.append(null)
        try:
            c.start(stdio=(null, out_w, err_w))
        finally:
            for fd in to_close:
                os.close(fd)
            to_close = []
        names = {out_r: "stdout", err_r: "stderr"}
        decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in names}
        for fd in names:
            sel.register(fd, selectors.EVENT_READ)
        open_fds = len(names)
        sizes = dict.fromkeys(names.values(), 0)
        killed = False
        while open_fds:
            if cancel is not None and cancel.is_set() and not killed:
                killed = True
                c.kill()   # the pid namespace goes with its init: the pipes close
            for key, _ in sel.select(0.1):
                fd = key.fd
                data = os.read(fd, 65536)
                if not data:
                    sel.unregister(fd)
                    open_fds -= 1
                    text = decoders[fd].decode(b"", final=True)
                else:
                    sizes[names[fd]] += len(data)
                    text = decoders[fd].decode(data)
                if text:
                    on_output(names[fd], text)
        info = c.wait(30)
        if info is None:   # the pipes closed but the init lives on: end it
            c.kill()
            info = c.wait(10)
        assert info is not None
        # what the pipes carried: tells "the container wrote nothing" from "its output was lost later"
        log.debug("cell container %s %s: %d bytes on stdout, %d on stderr", c.id[:12], info.describe(),
                  sizes["stdout"], sizes["stderr"])
        return info
    finally:
        sel.close()
        for fd in (*to_close, out_r, err_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        if c is not None:
            c.remove(force=True)


# --- the per-kernel context ------------------------------------------------------------------


@dataclass(frozen=True)
class KernelContext:
    """What the channel may know about its kernel (given by the provisioner, never by the sandbox)."""

    kernel_id: str
    runtime: Runtime
    #: the kernel's container now (the provisioner may replace it at a restart with ``reset``)
    container: Callable[[], Container | None]
    python: tuple[str, ...] = ("python3",)
    limits: Limits = field(default_factory=Limits)
    network: str = "none"
    #: the folder of the kernel's own kernelspec: kernelspecs for its snapshots go beside it
    kernelspec_dir: Path | None = None
    #: mark the container for a fresh writable layer at the next restart
    request_reset: Callable[[], None] | None = None
    #: the kernel's own sandbox, which its ``%%container`` cells get too: a cell
    #: must not run with more than the kernel it comes from (host root, no filter)
    userns: str = "host"
    seccomp: str = "default"


Send = Callable[[dict[str, Any]], Awaitable[None]]


class HostChannel:
    """One kernel's channel server: on the caller's event loop (:meth:`start`) or its own thread."""

    def __init__(self, ctx: KernelContext, path: Path) -> None:
        self.ctx = ctx
        self.path = Path(path)
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()
        # long work (snapshots, diffs, container runs) happens here, never on the loop
        self._pool = ThreadPoolExecutor(3, thread_name_prefix=f"jc-channel-{ctx.kernel_id[:8]}")
        self._snapshot_lock: asyncio.Lock | None = None
        self._cell_running = False
        self._cancels: set[threading.Event] = set()
        self._made: set[str] = set()   # images this channel made (install_kernelspec accepts these)

    # --- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve on the running event loop (the Jupyter server's)."""
        self._loop = asyncio.get_running_loop()
        self._snapshot_lock = asyncio.Lock()
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path), limit=MAX_LINE + 1)
        os.chmod(self.path, 0o600)
        # whoever owns the kernel folder (the kernel's user, if it is mapped to another) may connect
        folder = self.path.parent.stat()
        if (folder.st_uid, folder.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(self.path, folder.st_uid, folder.st_gid)
        log.debug("kernel %s: host channel at %s", self.ctx.kernel_id, self.path)

    def start_thread(self) -> None:
        """Serve on an event loop of its own in a daemon thread (no event loop to borrow)."""
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name=f"jc-channel-{self.ctx.kernel_id[:8]}", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    async def _stop(self) -> None:
        for ev in list(self._cancels):
            ev.set()   # %%container runs: kill their containers
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        self.path.unlink(missing_ok=True)

    async def aclose(self) -> None:
        """Stop serving; kill running ``%%container`` cells (from the loop that started it, or any)."""
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.close)
            return
        if self._loop is not None:
            await self._stop()
        await asyncio.get_running_loop().run_in_executor(None, self._finish_pool)

    def close(self) -> None:
        """Blocking stop (thread mode, or from outside any loop)."""
        if self._thread is not None and self._loop is not None:
            loop = self._loop
            with contextlib.suppress(RuntimeError):   # the loop may be gone already
                asyncio.run_coroutine_threadsafe(self._stop(), loop).result(15)
                loop.call_soon_threadsafe(loop.stop)
            self._thread.join(15)
            self._thread = None
        self._finish_pool()

    def _finish_pool(self) -> None:
        # a snapshot cannot be interrupted halfway; a %%container run was told to stop: wait for it
        # (it removes its container) so a shutdown leaves nothing behind
        self._pool.shutdown(wait=True, cancel_futures=True)

    # --- connections --------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)

        async def send(msg: dict[str, Any], *, drain: bool = True) -> None:
            writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
            if drain:
                await writer.drain()

        try:
            if len(self._tasks) > MAX_CONNECTIONS:
                await send({"ok": False, "error": f"too many connections (at most {MAX_CONNECTIONS})"})
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await send({"ok": False, "error": f"request too long (at most {MAX_LINE} bytes a line)"})
                    return
                if not line:
                    return
                if len(line) > MAX_LINE:
                    await send({"ok": False, "error": f"request too long (at most {MAX_LINE} bytes a line)"})
                    return
                await send(await self._answer(line, send, reader))
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:   # never let one request take the channel down
            log.exception("kernel %s: host channel request failed", self.ctx.kernel_id)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes, send: Callable[..., Awaitable[None]],
                      reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "malformed request: not a JSON line"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "malformed request: not a JSON object"}
        op = req.get("op")
        if not isinstance(op, str) or op not in OPS:
            shown = op if isinstance(op, str) and len(op) < 40 else "?"
            return {"ok": False, "error": f"unknown request {shown!r} (known: {', '.join(sorted(OPS))})"}
        extra = sorted(set(req) - OPS[op] - {"op"})
        if extra:
            return {"ok": False, "error": f"{op}: unknown field(s) {', '.join(extra)[:200]}"}
        try:
            return await getattr(self, f"_op_{op}")(req, send, reader)
        except errors.ContainError as exc:
            return {"ok": False, "error": str(exc)}
        except OSError as exc:
            log.warning("kernel %s: %s: %s", self.ctx.kernel_id, op, exc)
            return {"ok": False, "error": f"{op} failed: {exc.strerror or exc}"}

    def _container(self) -> Container:
        c = self.ctx.container()
        if c is None:
            raise errors.ChannelError("this kernel has no container")
        return c

    async def _work(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # --- the requests ---------------------------------------------------------------------------

    async def _op_stats(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        c = self._container()
        st = await self._work(c.stats)
        cpus = (c.state.get("limits") or {}).get("cpus")
        return {"ok": True, "stats": {**st, "cpus_limit": cpus, "cpu_count": os.cpu_count() or 1,
                                      "time": time.time()}}

    async def _op_diff(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        limit = req.get("limit", 100)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_DIFF_CHANGES:
            raise errors.ChannelError(f"diff: limit must be a number from 0 to {MAX_DIFF_CHANGES}")
        c = self._container()
        changes = await self._work(diff, c)
        return {"ok": True, "total": len(changes), "bytes": sum(ch.size for ch in changes),
                "summary": [s.to_json() for s in summarize(changes)],
                "changes": [ch.to_json() for ch in changes[:limit]], "truncated": len(changes) > limit}

    def _own_image(self, name: str) -> ImageRecord | None:
        """The store's image named exactly ``name`` (no fallbacks), or None."""
        return next((r for r in self.ctx.runtime.store.images() if r.name == name), None)

    def _made_here(self, rec: ImageRecord) -> bool:
        labels = (rec.config.raw.get("config") or {}).get("Labels") or {}
        return rec.name in self._made or labels.get(IMAGE_KERNEL_LABEL) == self.ctx.kernel_id

    async def _op_snapshot(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        ref = parse_snapshot_tag(req.get("tag"))
        message = _str_field(req, "message", default="", limit=MAX_MESSAGE) or ""
        compress = req.get("compress", "gzip")
        if compress not in ("gzip", "zstd"):
            raise errors.ChannelError(f"snapshot: unknown compression {str(compress)[:20]!r} (gzip or zstd)")
        c = self._container()
        existing = await self._work(self._own_image, str(ref))
        if existing is not None and not self._made_here(existing):
            # never let a sandbox replace an image that kernels (its own base, say) start from
            raise errors.ChannelError(f"image {ref.familiar} already exists and was not made by this kernel: "
                                      "choose another tag")
        assert self._snapshot_lock is not None
        if self._snapshot_lock.locked():
            raise errors.ChannelError("a snapshot of this kernel is already running")
        async with self._snapshot_lock:
            loop = asyncio.get_running_loop()
            latest: list[tuple[str, int, int]] = []
            wake = asyncio.Event()
            last = [0.0, ""]

            def progress(stage: str, done: int, total: int) -> None:   # worker thread
                now = time.monotonic()
                if stage == last[1] and now - last[0] < PROGRESS_INTERVAL and done < total:
                    return
                last[0], last[1] = now, stage

                def post() -> None:
                    latest[:] = [(stage, done, total)]
                    wake.set()
                loop.call_soon_threadsafe(post)

            fut = loop.run_in_executor(self._pool, lambda: snapshot(
                self.ctx.runtime, c, str(ref), message=message, compress=compress, progress=progress))
            while True:
                waiter = asyncio.ensure_future(wake.wait())
                await asyncio.wait({fut, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if latest:
                    stage, done, total = latest.pop()
                    wake.clear()
                    # no drain: the asking kernel is frozen while the layer is archived; the few
                    # throttled lines wait in the socket buffer
                    await send({"event": "progress", "stage": stage, "done": done, "total": total}, drain=False)
                if fut.done():
                    break
            rec: ImageRecord = fut.result()
        self._made.add(rec.name)
        return {"ok": True, "image": rec.familiar, "name": rec.name, "digest": rec.digest, "id": rec.id,
                "size": rec.size}

    async def _op_install_kernelspec(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        name = _str_field(req, "image", limit=MAX_TAG + 20)
        if not name:
            raise errors.ChannelError("install_kernelspec: which image? (a snapshot this kernel made)")
        ref = parse_snapshot_tag(name.removeprefix("localhost/"))
        rec = await self._work(self._own_image, str(ref))
        if rec is None or not self._made_here(rec):
            raise errors.ChannelError(f"install_kernelspec: {ref.familiar} is not a snapshot this kernel made")
        display = req.get("display_name")
        display = parse_display_name(display) if display is not None else None
        kernel_name, shown = await self._work(self._install, rec, display)
        return {"ok": True, "kernel_name": kernel_name, "display_name": shown}

    def _install(self, rec: ImageRecord, display: str | None) -> tuple[str, str]:
        from . import kernelspec

        name = kernelspec.default_kernel_name(rec)
        shown = display or kernelspec.default_display_name(rec)
        target: dict[str, Any] = {"user": True}
        kernels_dir = None
        spec_dir = self.ctx.kernelspec_dir
        # beside the asking kernel's own kernelspec: the server that found that one finds this one
        if spec_dir is not None and spec_dir.parent.parts[-3:] == ("share", "jupyter", "kernels"):
            kernels_dir = spec_dir.parent
            target = {"prefix": str(kernels_dir.parents[2])}
        if kernels_dir is not None:
            existing = kernels_dir / name / "kernel.json"
            if existing.exists():
                try:
                    old = json.loads(existing.read_text())
                    same = old["metadata"]["kernel_provisioner"]["config"]["image"] == rec.name
                except (OSError, ValueError, KeyError, TypeError):
                    same = False
                if not same:
                    raise errors.ChannelError(f"a kernelspec named {name} already exists for another image")
        lim = self.ctx.limits
        kernel_name, _path = kernelspec.install(
            store=self.ctx.runtime.store, image_name=rec.name, name=name, display_name=shown,
            memory=str(lim.memory) if lim.memory else None, cpus=str(lim.cpus) if lim.cpus else None,
            pids=lim.pids or 0, network=self.ctx.network, probe=False, **target)
        log.info("kernel %s: installed kernelspec %s for %s", self.ctx.kernel_id, kernel_name, rec.familiar)
        return kernel_name, shown

    async def _op_reset(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        if self.ctx.request_reset is None:
            raise errors.ChannelError("reset is not available for this kernel")
        self.ctx.request_reset()
        return {"ok": True, "message": "the next restart of this kernel starts from a fresh writable layer"}

    async def _op_images(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        recs = await self._work(self.ctx.runtime.store.images)
        return {"ok": True, "images": sorted({r.familiar for r in recs})}

    async def _op_ps(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        c = self._container()
        info = await self._work(c.info)
        keep = ("id", "name", "image", "status", "created", "reason", "limits", "network")
        return {"ok": True, "container": {k: info.get(k) for k in keep}}

    async def _op_run_cell(self, req: dict[str, Any], send: Send, reader: asyncio.StreamReader) -> dict[str, Any]:
        code = _str_field(req, "code", limit=MAX_LINE)
        if code is None:
            raise errors.ChannelError("run_cell: no code")
        shell = req.get("shell", False)
        if not isinstance(shell, bool):
            raise errors.ChannelError("run_cell: shell must be true or false")
        limits = self._cell_limits(req)
        network = req.get("network", "none")
        if network not in ("none", self.ctx.network):
            raise errors.ChannelError(f"run_cell: network {str(network)[:20]!r} not allowed "
                                      f"(none, or this kernel's own: {self.ctx.network})")
        image_text = _str_field(req, "image", limit=256)
        c = self._container()
        if image_text:
            if not _SAFE_IMAGE.match(image_text):
                raise errors.ChannelError(f"run_cell: invalid image name {image_text!r}")
            image = await self._work(self.ctx.runtime.store.resolve, image_text)
        else:
            image = await self._work(c.image)
        if self._cell_running:
            raise errors.ChannelError("another %%container cell of this kernel is running")
        argv = ("/bin/sh", "-c", code) if shell else (*self.ctx.python, "-c", code)
        spec = ContainerSpec(image=image.name, command=argv, entrypoint=(), limits=limits, network=network,
                             userns=self.ctx.userns,  # type: ignore[arg-type]
                             seccomp=self.ctx.seccomp,
                             labels={CELL_LABEL: self.ctx.kernel_id}, owner_pid=os.getpid())
        self._cell_running = True
        cancel = threading.Event()
        self._cancels.add(cancel)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        window = threading.Semaphore(OUTPUT_WINDOW)

        def on_output(stream: str, text: str) -> None:   # worker thread
            while not window.acquire(timeout=0.2):
                if cancel.is_set():
                    return   # nobody reads any more: drop it
            loop.call_soon_threadsafe(queue.put_nowait, (stream, text))

        fut = loop.run_in_executor(self._pool, lambda: run_code(self.ctx.runtime, spec, on_output=on_output,
                                                                  cancel=cancel, image=image))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({fut, getter}, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    items = [getter.result()]
                else:
                    getter.cancel()
                    items = []
                if fut.done():
                    while not queue.empty():
                        items.append(queue.get_nowait())
                for stream, text in items:
                    window.release()
                    if not cancel.is_set():
                        await send({"event": "output", "stream": stream, "text": text})
                if reader.at_eof() and not cancel.is_set():
                    cancel.set()   # the guest hung up (an interrupt): kill the run (read nothing: a
                    # request sent behind this one stays in the buffer for the next readline)
                if fut.done():
                    break
            info: ExitInfo = fut.result()
        finally:
            cancel.set()
            self._cancels.discard(cancel)
            self._cell_running = False
        return {"ok": True, "exit": {"code": info.code, "signal": info.signal, "oom_killed": info.oom_killed,
                                     "reason": info.describe()}}

    def _cell_limits(self, req: Mapping[str, Any]) -> Limits:
        """The kernel's own limits, lowered (never raised) by what the cell asks."""
        own = self.ctx.limits
        memory, cpus = own.memory, own.cpus
        text = _str_field(req, "memory", limit=32)
        if text:
            try:
                memory = parse_memory(text)
            except errors.InvalidSpec as exc:
                raise errors.ChannelError(f"run_cell: {exc}") from None
            if own.memory and memory > own.memory:
                raise errors.ChannelError(f"run_cell: memory {text} is above this kernel's own limit")
        text = _str_field(req, "cpus", limit=32)
        if text:
            try:
                cpus = parse_cpus(text)
            except errors.InvalidSpec as exc:
                raise errors.ChannelError(f"run_cell: {exc}") from None
            if own.cpus and cpus > own.cpus:
                raise errors.ChannelError(f"run_cell: cpus {text} is above this kernel's own limit")
        return Limits(memory=memory, cpus=cpus, pids=own.pids)
