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
serves on (every store, container and kernelspec read, snapshots, diffs and
container starts run in worker threads); run inside the container (the
server freezes the container for a snapshot, the channel must keep running
meanwhile, so it lives in the host process).

Scope (everything the kernel asks is hostile input, and about this kernel only):
- images it makes land under ``localhost/kernel-snapshot/`` (:data:`SNAPSHOT_NAMESPACE`),
  which no short name of another image resolves to (``debian:latest`` is
  looked up as ``docker.io/library/debian:latest``, then
  ``localhost/debian:latest``); a tag another made, or one a kernelspec
  starts from, is never replaced;
- ``install_kernelspec`` only creates kernelspecs, for images this kernel
  made, named ``snapshot-...`` and displayed as "... (snapshot of <this kernel>)";
- ``run_cell`` and ``images`` see only the images the policy allows: the
  kernel's own image, the images it made, and what the kernelspec's
  ``allowed_images`` option adds (:func:`image_allowed`).

Protocol: newline-delimited JSON, one request per line (at most 64 KiB,
nested at most :data:`MAX_DEPTH` deep, arriving within :data:`IDLE_TIMEOUT`
seconds of the previous answer or of the connection; a client that reads no
answer for :data:`WRITE_TIMEOUT` seconds is dropped). An answer is zero or
more event lines (``{"event": "progress", ...}`` while a snapshot runs,
``{"event": "output", ...}`` while a ``%%container`` cell runs) and then one
final line ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fnmatch
import json
import logging
import os
import re
import selectors
import stat
import threading
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import errors
from ..runtime import (
    Bind,
    Container,
    ContainerSpec,
    ExitInfo,
    ImageRecord,
    Limits,
    Reference,
    Runtime,
    local_alternative,
    parse_cpus,
    parse_memory,
)
from . import kernel_layer, snapshots
from .snapshots import diff_summary, snapshot  # with the kernel's labels and what a snapshot leaves out

log = logging.getLogger(__name__)

__all__ = [
    "MAX_DEPTH", "MAX_LINE", "OPS", "SNAPSHOT_NAMESPACE", "SOCKET_NAME", "HostChannel", "KernelContext",
    "image_allowed", "parse_allowed_images", "parse_display_name", "parse_snapshot_tag", "run_code",
    "socket_path",
]

SOCKET_NAME = "host.sock"
#: longest request line; longer ones are refused and the connection closed
MAX_LINE = 64 * 1024
#: deepest nesting of a request (all fields are scalars: one object is depth 1); checked before
#: parsing, so ``[`` x 60000 is a clean refusal and never a RecursionError in the server's log
MAX_DEPTH = 4
#: connections of one kernel at a time (each kernel has its own channel: others are not affected)
MAX_CONNECTIONS = 8
#: seconds a connection may take to send a whole request line (from connecting, or from the last
#: answer): an idle or trickling client is dropped, and frees its place among MAX_CONNECTIONS
IDLE_TIMEOUT = 30.0
#: seconds the host waits for a client to read an answer line (a %%container cell's output)
WRITE_TIMEOUT = 60.0
MAX_MESSAGE = 2000
MAX_DISPLAY_NAME = 100
MAX_TAG = 128
MAX_DIFF_CHANGES = 1000
#: left-out entries a diff or snapshot answer lists (all are counted)
MAX_LEFT_OUT_SHOWN = 50
#: snapshot progress lines at most this often (the asking kernel is frozen meanwhile: its
#: socket buffer must absorb them all without the host ever waiting for it)
PROGRESS_INTERVAL = 0.25
#: output chunks of a %%container cell in flight before the container's pipe waits
OUTPUT_WINDOW = 256

#: where a kernel's snapshots go: ``localhost/kernel-snapshot/<name>:<tag>``. Short names never
#: resolve here (``name`` is looked up as ``docker.io/library/name``, then ``localhost/name``), so
#: a kernel cannot change what ``jupyter contain run debian`` or a kernelspec's image means
SNAPSHOT_NAMESPACE = "kernel-snapshot"
_SNAPSHOT_PREFIX = f"localhost/{SNAPSHOT_NAMESPACE}/"
#: the kernel label snapshots carry (set by the runtime from the container's label)
IMAGE_KERNEL_LABEL = "io.jupyter-contain.kernel-id"
#: the label of containers a kernel's ``%%container`` cells run in
CELL_LABEL = "jupyter-contain.cell-of"

#: op -> the fields it takes (anything else in a request is refused)
OPS: Mapping[str, frozenset[str]] = {
    "stats": frozenset(),
    "diff": frozenset({"limit", "include_runtime_state", "exclude", "include"}),
    "snapshot": frozenset({"tag", "message", "compress", "include_runtime_state", "exclude", "include"}),
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

    Returns the store name it gets, in the kernels' namespace
    (``localhost/kernel-snapshot/myenv:v1``); that name, or
    ``kernel-snapshot/myenv:v1``, given back means the same. Raises ChannelError.
    """
    if not isinstance(text, str) or not text.strip():
        raise errors.ChannelError("a snapshot needs a tag, e.g. myenv:v1")
    for given in (_SNAPSHOT_PREFIX, SNAPSHOT_NAMESPACE + "/"):   # the name an answer gave back
        if text.startswith(given):
            text = text[len(given):]
            break
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
    return Reference("localhost", f"{SNAPSHOT_NAMESPACE}/{parsed.repository.removeprefix('library/')}", parsed.tag,
                     None)


def in_snapshot_namespace(name: str) -> bool:
    return name.startswith(_SNAPSHOT_PREFIX)


_PATTERN_CHARS = re.compile(r"^[A-Za-z0-9._/:@*?\[\]-]+$")


def parse_allowed_images(value: Any) -> tuple[str, ...]:
    """Validate a kernelspec's ``allowed_images``: image references or glob patterns (``python:*``).

    Raises InvalidSpec naming the bad entry. A string is one entry.
    """
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise errors.InvalidSpec("a list of image names or patterns, e.g. [\"python:3.12-slim\", \"localhost/team/*\"]")
    out = []
    for v in value:
        if not isinstance(v, str) or not v or len(v) > 256 or not _PATTERN_CHARS.match(v):
            raise errors.InvalidSpec(f"{str(v)[:60]!r} is not an image name or pattern")
        if not any(ch in v for ch in "*?["):
            try:
                Reference.parse(v)
            except errors.InvalidReference as exc:
                raise errors.InvalidSpec(str(exc)) from None
        out.append(v)
    return tuple(out)


def image_allowed(name: str, patterns: Iterable[str]) -> bool:
    """Whether store image ``name`` (a full name) is one ``patterns`` (from ``allowed_images``) allow.

    A reference allows the image it names by Docker's rules or under
    ``localhost/`` (``python:3.12`` allows ``docker.io/library/python:3.12``
    and ``localhost/python:3.12``); a glob pattern is matched against the
    full name and the short form (``python:*``, ``localhost/team/*``; ``*``
    allows every image in the store).
    """
    short = name
    with contextlib.suppress(errors.ContainError):
        short = Reference.parse(name).familiar
    for p in patterns:
        if any(ch in p for ch in "*?["):
            if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(short, p):
                return True
            continue
        try:
            names = {str(Reference.parse(p))}
            alt = local_alternative(p)
        except errors.ContainError:
            continue
        if alt is not None:
            names.add(str(alt))
        if name in names:
            return True
    return False


_BRACKETS = re.compile(rb"[\[\]{}]")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _too_deep(line: bytes) -> bool:
    """Whether the JSON ``line`` nests deeper than MAX_DEPTH (strings' contents do not count)."""
    if line.count(b"[") + line.count(b"{") <= MAX_DEPTH:
        return False
    depth = 0
    for m in _BRACKETS.finditer(_JSON_STRING.sub(b'""', line)):
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


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


def _leave_out_fields(req: Mapping[str, Any], op: str) -> dict[str, Any]:
    """What a diff or snapshot request asks to leave out or keep (``kernel.snapshots.LeaveOut``), checked."""
    keep = req.get("include_runtime_state", False)
    if not isinstance(keep, bool):
        raise errors.ChannelError(f"{op}: include_runtime_state must be true or false")
    out: dict[str, Any] = {"include_runtime_state": keep}
    for name in ("exclude", "include"):
        v = req.get(name, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise errors.ChannelError(f"{op}: {name} must be a list of path patterns")
        out[name] = v
    try:
        snapshots.leave_out(**out).check()
    except errors.InvalidSpec as e:
        raise errors.ChannelError(f"{op}: {e}") from None
    return out


_SAFE_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")


#: striped locks by tag name (a fixed few: kernels asking for many names cannot grow a table)
_TAG_LOCKS = tuple(threading.Lock() for _ in range(16))
#: layer walks (diffs) of all kernels of this server at once; more wait in their channel's worker
#: thread (each walk keeps a core busy: 8 kernels diffing 300,000-file layers took 120 s together)
_WALKS = threading.BoundedSemaphore(2)


def _tag_lock(name: str) -> threading.Lock:
    return _TAG_LOCKS[hash(name) % len(_TAG_LOCKS)]


# --- running code in a fresh container (shared with the host-side magics) ---------------------

#: a kernel-layer kernel's Python cell, run by the layer's Python (``-I``: nothing of the image's
#: environment shapes this step): argv is ``PYTHON [ARGS...] CODE``, the kernel's ``python``
#: option and the cell. The image's own Python runs the cell where the image has one (its
#: packages, as in a kernel from the image's own Python); else the layer's Python does, started
#: afresh (not ``-I``: a snapshot's ``%pip``-installed user site is on its path, as in the kernel)
CELL_DISPATCH = (
    "import os, shutil, sys\n"
    "py, code = sys.argv[1:-1], sys.argv[-1]\n"
    "own = shutil.which(py[0])\n"
    "if own and not os.path.realpath(own).startswith('/.jupyter-contain-kernel/'):\n"
    "    os.execv(own, [py[0], *py[1:], '-c', code])\n"
    "os.execv(sys.executable, [sys.executable, '-c', code])\n"
)


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
    #: what ``run_cell`` and ``images`` may see besides the kernel's own image and its snapshots
    #: (the kernelspec's ``allowed_images``: references or glob patterns, see :func:`image_allowed`)
    allowed_images: tuple[str, ...] = ()
    #: the kernel's ``kernel_layer`` option: a kernelspec for its snapshot gets the same
    kernel_layer: str = ""


class Send(Protocol):
    """How an op answers: one JSON line to the asking kernel (``drain=False``: no wait for the socket)."""

    def __call__(self, msg: dict[str, Any], *, drain: bool = True) -> Awaitable[None]: ...


class HostChannel:
    """One kernel's channel server: on the caller's event loop (:meth:`start`) or its own thread."""

    #: per-instance overrides of the module's timeouts (tests use short ones)
    idle_timeout: float = IDLE_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT

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
        self._diff_running = False
        self._cancels: set[threading.Event] = set()
        self._made: set[str] = set()   # images this channel made (install_kernelspec accepts these)

    # --- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve on the running event loop (the Jupyter server's)."""
        self._loop = asyncio.get_running_loop()
        self._snapshot_lock = asyncio.Lock()
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path), limit=MAX_LINE + 1)
        try:
            self._own_socket_file()
        except OSError:
            self._server.close()
            self._server = None
            raise
        log.debug("kernel %s: host channel at %s", self.ctx.kernel_id, self.path)

    def _own_socket_file(self) -> None:
        """Make the socket file 0600 and the folder owner's, without following what the kernel put there.

        The kernel folder is the kernel's too: between the bind and these
        calls it may have swapped ``host.sock`` for a symlink to a host file.
        So the file is opened ``O_PATH|O_NOFOLLOW``, must be a socket, and is
        changed through that fd (its ``/proc/self/fd`` link), never by name.
        """
        fd = os.open(self.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError(f"{self.path} was replaced by something that is not a socket")
            via = f"/proc/self/fd/{fd}"
            os.chmod(via, 0o600)
            # whoever owns the kernel folder (the kernel's user, if it is mapped to another) may connect
            folder = self.path.parent.stat()
            if (folder.st_uid, folder.st_gid) != (os.geteuid(), os.getegid()):
                os.chown(via, folder.st_uid, folder.st_gid)
        finally:
            os.close(fd)

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
                try:
                    await asyncio.wait_for(writer.drain(), self.write_timeout)
                except asyncio.TimeoutError:
                    raise ConnectionError("the client reads no answers") from None

        try:
            if len(self._tasks) > MAX_CONNECTIONS:
                await send({"ok": False, "error": f"too many connections (at most {MAX_CONNECTIONS})"})
                return
            while True:
                try:
                    # the whole line within the timeout: an idle client, or one that never sends its
                    # newline, is dropped (and frees its place among MAX_CONNECTIONS)
                    line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
                except asyncio.TimeoutError:
                    await send({"ok": False, "error": f"no complete request in {self.idle_timeout:g} s: "
                                                      "closing the connection"}, drain=False)
                    return
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
        if _too_deep(line):
            return {"ok": False, "error": f"malformed request: nested deeper than {MAX_DEPTH} levels"}
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):
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

        def read() -> tuple[dict[str, Any], Any]:
            return c.stats(), c.state.limits.cpus
        st, cpus = await self._work(read)
        return {"ok": True, "stats": {**st, "cpus_limit": cpus, "cpu_count": os.cpu_count() or 1,
                                      "time": time.time()}}

    async def _op_diff(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        limit = req.get("limit", 100)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= MAX_DIFF_CHANGES:
            raise errors.ChannelError(f"diff: limit must be a number from 0 to {MAX_DIFF_CHANGES}")
        leave = _leave_out_fields(req, "diff")
        c = self._container()
        # one walk of the layer at a time per kernel: a layer of 300,000 files takes seconds to walk
        if self._diff_running:
            raise errors.ChannelError("a diff of this kernel is already running")
        self._diff_running = True
        try:
            def walk() -> Any:
                with _WALKS:
                    return diff_summary(c, limit=limit, **leave)
            d = await self._work(walk)
        finally:
            self._diff_running = False
        return {"ok": True, "total": d.total, "bytes": d.bytes, "summary": [f.to_json() for f in d.folders],
                "changes": [ch.to_json() for ch in d.changes], "truncated": d.truncated,
                "left_out_total": d.left_out_total, "left_out_bytes": d.left_out_bytes,
                "left_out": [ch.to_json() for ch in d.left_out[:MAX_LEFT_OUT_SHOWN]]}

    # --- what this kernel may see and make (worker threads: they read the store and kernelspecs) ---

    def _own_image(self, name: str) -> ImageRecord | None:
        """The store's image named exactly ``name`` (no fallbacks), or None."""
        return next((r for r in self.ctx.runtime.store.images() if r.name == name), None)

    def _made_here(self, rec: ImageRecord) -> bool:
        if not in_snapshot_namespace(rec.name):
            return False
        labels = (rec.config.raw.get("config") or {}).get("Labels") or {}
        return rec.name in self._made or labels.get(IMAGE_KERNEL_LABEL) == self.ctx.kernel_id

    def _allowed(self, rec: ImageRecord, own: str) -> bool:
        """The image policy: the kernel's own image, its snapshots, and ``allowed_images``."""
        return rec.name == own or self._made_here(rec) or image_allowed(rec.name, self.ctx.allowed_images)

    def _policy(self) -> str:
        extra = f", and {', '.join(self.ctx.allowed_images)[:200]}" if self.ctx.allowed_images else ""
        return f"this kernel's own image and its snapshots{extra}"

    def _own_image_name(self, c: Container) -> str:
        return c.state.image_name

    def _visible(self, c: Container) -> list[ImageRecord]:
        own = self._own_image_name(c)
        return [r for r in self.ctx.runtime.store.images() if self._allowed(r, own)]

    def _cell_image(self, c: Container, text: str) -> ImageRecord:
        """The image ``text`` names, if the policy allows it (the same refusal whether or not it exists)."""
        own = self._own_image_name(c)
        found: list[ImageRecord] = []
        with contextlib.suppress(errors.ContainError):
            found.append(self.ctx.runtime.store.resolve(text))
        with contextlib.suppress(errors.ContainError):   # the kernel's own snapshot, by the tag it gave
            rec = self._own_image(str(parse_snapshot_tag(text)))
            if rec is not None:
                found.append(rec)
        for rec in found:
            if self._allowed(rec, own):
                return rec
        raise errors.ChannelError(f"run_cell: image {text!r} is not one this kernel may use ({self._policy()}; "
                                  "`%container images` lists them)")

    def _kernel_dirs(self) -> list[str]:
        from jupyter_client.kernelspec import KernelSpecManager

        dirs = list(KernelSpecManager().kernel_dirs)
        if self.ctx.kernelspec_dir is not None and str(self.ctx.kernelspec_dir.parent) not in dirs:
            dirs.append(str(self.ctx.kernelspec_dir.parent))
        return dirs

    def _kernelspec_using(self, name: str) -> str | None:
        """A kernelspec (anywhere Jupyter looks, and beside this kernel's) that starts image ``name``."""
        from jupyter_client.kernelspec import KernelSpecManager

        ksm = KernelSpecManager(kernel_dirs=self._kernel_dirs())
        for spec_name, spec_dir in ksm.find_kernel_specs().items():
            try:
                with open(os.path.join(spec_dir, "kernel.json"), "rb") as f:
                    spec = json.loads(f.read(1 << 20))
                image = spec["metadata"]["kernel_provisioner"]["config"]["image"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(image, str) and image_allowed(name, [image]):
                return spec_name
        return None

    def _check_snapshot_target(self, ref: Reference) -> None:
        existing = self._own_image(str(ref))
        if existing is not None and not self._made_here(existing):
            # never let a sandbox replace an image another kernel (or the user) made
            raise errors.ChannelError(f"image {ref.familiar} already exists and was not made by this kernel: "
                                      "choose another tag")
        using = self._kernelspec_using(str(ref))
        if using is not None:
            raise errors.ChannelError(f"kernelspec {using} starts from {ref.familiar}: a kernel cannot replace "
                                      "that image; choose another tag")

    async def _op_snapshot(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        ref = parse_snapshot_tag(req.get("tag"))
        message = _str_field(req, "message", default="", limit=MAX_MESSAGE) or ""
        if any(unicodedata.category(ch).startswith("C") and ch not in "\n\t" for ch in message):
            # it is shown on the host (`jupyter contain history`, the server's API): no terminal escapes
            raise errors.ChannelError("snapshot: a message must not hold control characters")
        compress = req.get("compress", "gzip")
        if compress not in ("gzip", "zstd"):
            raise errors.ChannelError(f"snapshot: unknown compression {str(compress)[:20]!r} (gzip or zstd)")
        leave = _leave_out_fields(req, "snapshot")
        left: list[Any] = []
        c = self._container()
        assert self._snapshot_lock is not None
        if self._snapshot_lock.locked():
            raise errors.ChannelError("a snapshot of this kernel is already running")
        async with self._snapshot_lock:
            loop = asyncio.get_running_loop()
            latest: list[tuple[str, int, int]] = []
            wake = asyncio.Event()
            last_at, last_stage = [0.0], [""]

            def progress(stage: str, done: int, total: int) -> None:   # worker thread
                now = time.monotonic()
                if stage == last_stage[0] and now - last_at[0] < PROGRESS_INTERVAL and done < total:
                    return
                last_at[0], last_stage[0] = now, stage

                def post() -> None:
                    latest[:] = [(stage, done, total)]
                    wake.set()
                loop.call_soon_threadsafe(post)

            def make() -> ImageRecord:   # worker thread
                # the check and the tag under one lock: two kernels asking for the same new tag at
                # once cannot both find it free and the second replace the first's
                with _tag_lock(str(ref)):
                    self._check_snapshot_target(ref)
                    return snapshot(self.ctx.runtime, c, str(ref), message=message, compress=compress,
                                    progress=progress, left_out=left, **leave)

            fut = loop.run_in_executor(self._pool, make)
            while True:
                waiter: asyncio.Future[Any] = asyncio.ensure_future(wake.wait())
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
                "size": rec.size, "left_out_total": len(left), "left_out_bytes": sum(ch.size for ch in left),
                "left_out": [ch.to_json() for ch in left[:MAX_LEFT_OUT_SHOWN]]}

    async def _op_install_kernelspec(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        name = _str_field(req, "image", limit=MAX_TAG + 40)
        if not name:
            raise errors.ChannelError("install_kernelspec: which image? (a snapshot this kernel made)")
        ref = parse_snapshot_tag(name)
        display = req.get("display_name")
        display = parse_display_name(display) if display is not None else None
        kernel_name, shown = await self._work(self._install, ref, display)
        return {"ok": True, "kernel_name": kernel_name, "display_name": shown}

    def _source_name(self) -> str:
        """How this kernel shows in launchers (its kernelspec's display name), for a snapshot's name."""
        if self.ctx.kernelspec_dir is not None:
            try:
                with open(self.ctx.kernelspec_dir / "kernel.json", "rb") as f:
                    shown = json.loads(f.read(1 << 20)).get("display_name")
                if isinstance(shown, str) and shown.strip():
                    return shown.strip()[:MAX_DISPLAY_NAME]
            except (OSError, ValueError, AttributeError):
                pass
        return f"kernel {self.ctx.kernel_id[:8]}"

    def _install(self, ref: Reference, display: str | None) -> tuple[str, str]:
        from . import kernelspec

        rec = self._own_image(str(ref))
        if rec is None or not self._made_here(rec):
            raise errors.ChannelError(f"install_kernelspec: {ref.familiar} is not a snapshot this kernel made")
        name = kernelspec.snapshot_kernel_name(rec)
        base = ref.repository.removeprefix(SNAPSHOT_NAMESPACE + "/")
        shown = kernelspec.snapshot_display_name(display or f"{base}:{ref.tag}", source=self._source_name())
        target: dict[str, Any] = {"user": True}
        spec_dir = self.ctx.kernelspec_dir
        # beside the asking kernel's own kernelspec: the server that found that one finds this one
        if spec_dir is not None and spec_dir.parent.parts[-3:] == ("share", "jupyter", "kernels"):
            target = {"prefix": str(spec_dir.parent.parents[2])}
        lim = self.ctx.limits
        try:
            kernel_name, _path = kernelspec.install(
                store=self.ctx.runtime.store, image_name=rec.name, name=name, display_name=shown,
                memory=str(lim.memory) if lim.memory else None, cpus=str(lim.cpus) if lim.cpus else None,
                pids=lim.pids or 0, network=self.ctx.network, probe=False, create_only=True,
                kernel_layer=self.ctx.kernel_layer, **target)
        except errors.KernelError as exc:
            raise errors.ChannelError(f"install_kernelspec: {exc}; remove it on the host "
                                      f"(jupyter kernelspec remove {name}) or snapshot under another tag") from None
        log.info("kernel %s: installed kernelspec %s for %s", self.ctx.kernel_id, kernel_name, rec.familiar)
        return kernel_name, shown

    async def _op_reset(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        if self.ctx.request_reset is None:
            raise errors.ChannelError("reset is not available for this kernel")
        self.ctx.request_reset()
        return {"ok": True, "message": "the next restart of this kernel starts from a fresh writable layer"}

    async def _op_images(self, req: dict[str, Any], send: Send, reader: Any) -> dict[str, Any]:
        c = self._container()
        recs = await self._work(self._visible, c)
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
            image = await self._work(self._cell_image, c, image_text)
        else:
            image = await self._work(c.image)
        if self._cell_running:
            raise errors.ChannelError("another %%container cell of this kernel is running")
        argv, binds = await self._work(self._cell_command, code, shell)
        spec = ContainerSpec(image=image.name, command=argv, entrypoint=(), binds=binds, limits=limits,
                             network=network,
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
                getter: asyncio.Future[Any] = asyncio.ensure_future(queue.get())
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

    def _cell_command(self, code: str, shell: bool) -> tuple[tuple[str, ...], tuple[Bind, ...]]:
        """A cell's argv and binds: the image's shell or Python, or the kernel layer's Python.

        A kernel-layer kernel's image may have no Python (busybox): its Python
        cells get the kernel's own layer, the same read-only ``nosuid,nodev``
        bind at the same path, and :data:`CELL_DISPATCH` run by the layer's
        Python picks inside the container: the image's ``python3`` where the
        image has one (its packages), else the layer's. Inside, not here: the
        cell's image may be any allowed image, and the container's own view of
        its PATH is the only one that needs no host-side reading of image files.
        ``--shell`` cells always run the image's shell.
        """
        if shell:
            return ("/bin/sh", "-c", code), ()
        choice = kernel_layer.KernelChoice.parse(self.ctx.kernel_layer)
        if choice.mode != "layer":
            return (*self.ctx.python, "-c", code), ()
        binds = kernel_layer.binds(choice)   # the kernel's own layer (a bundle's, if it came with one)
        return (kernel_layer.LAYER_PYTHON, "-I", "-c", CELL_DISPATCH, *self.ctx.python, code), tuple(binds)

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
