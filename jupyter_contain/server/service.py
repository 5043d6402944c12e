"""The work behind each REST route: runtime calls off the event loop, and their JSON.

Owns the server's view of the store and containers (one :class:`Service` per
server): the JSON shapes of images, containers, stats, diffs and kernels'
containers (``openapi.yaml``), the mapping of
runtime exceptions to HTTP status and error codes, finding the container behind
a kernel of this server (through its provisioner's public ``container``), and
starting pulls, pushes, commits and builds as operations. Must not know tornado (the
handlers own HTTP), must not block the loop (every runtime call goes through
:meth:`Service.run` or an operation's worker thread), and talks to the runtime
and kernel rooms through their public names only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .. import __version__, errors, runtime
from . import validate
from .operations import Cancelled, Item, Operation, Operations
from .validate import BadRequest, KernelspecRequest, Limits

if TYPE_CHECKING:
    from ..runtime import Change, Container, ExitInfo, ImageRecord, Runtime, Store

log = logging.getLogger(__name__)

T = TypeVar("T")

#: label the provisioner puts on a kernel's container (kernel/containers.py)
KERNEL_LABEL = "jupyter-contain.kernel-id"
KERNEL_NAME_LABEL = "jupyter-contain.kernel-name"
#: at most this many changes in a diff answer (the summary always counts them all)
MAX_DIFF_CHANGES = 1000
#: at most this much of a container's log in one answer (the end of it)
MAX_LOG_BYTES = 1 << 20
#: a build step's instruction in its progress item, and the end of a failed RUN's output in the error
MAX_STEP_TEXT = 200
MAX_BUILD_OUTPUT = 4096

# --- errors ---------------------------------------------------------------------------

#: exception class -> (HTTP status, error code); the first match in this order wins
_ERRORS: tuple[tuple[type[BaseException], int, str], ...] = (
    (BadRequest, 400, "bad_request"),
    (errors.BuildStepFailed, 400, "build_step_failed"),
    (errors.BuildError, 400, "build_failed"),
    (errors.ImageInUse, 409, "image_in_use"),
    (errors.ImageNotFound, 404, "image_not_found"),
    (errors.ContainerNotFound, 404, "container_not_found"),
    (errors.InvalidReference, 400, "invalid_reference"),
    (errors.InvalidSpec, 400, "invalid_spec"),
    (Cancelled, 409, "cancelled"),
    (errors.AuthenticationError, 502, "registry_auth"),
    (errors.RegistryError, 502, "registry_error"),
    (errors.DigestMismatch, 502, "digest_mismatch"),
    (errors.ManifestError, 400, "manifest_error"),
    (errors.SpawnError, 500, "spawn_failed"),
    (errors.CgroupError, 500, "cgroup_error"),
    (errors.ContainerError, 409, "container_error"),
    (errors.KernelError, 400, "kernel_error"),
    (errors.StoreError, 500, "store_error"),
    (errors.ImageError, 400, "image_error"),
    (errors.ContainError, 500, "runtime_error"),
)


class NotFound(errors.ContainError):
    """Something a path names does not exist (HTTP 404)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class Conflict(errors.ContainError):
    """The request conflicts with the state of things (HTTP 409)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def error_status(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and ``{"code", "message"[, "step"]}`` for an exception (500 for the unexpected)."""
    if isinstance(exc, NotFound):
        return 404, {"code": exc.code, "message": str(exc)}
    if isinstance(exc, Conflict):
        return 409, {"code": exc.code, "message": str(exc)}
    for cls, status, code in _ERRORS:
        if isinstance(exc, cls):
            body: dict[str, Any] = {"code": getattr(exc, "code", code) if cls is BadRequest else code,
                                    "message": str(exc).splitlines()[0] if str(exc) else code}
            step = getattr(exc, "step", None)
            if step:
                body["step"] = step
            if isinstance(exc, errors.BuildError):
                body.update(build_error_json(exc))
            return status, body
    return 500, {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"[:500]}


def error_json(exc: BaseException) -> dict[str, Any]:
    return error_status(exc)[1]


def build_error_json(exc: errors.BuildError) -> dict[str, Any]:
    """Where a build failed (line, instruction) and, for a RUN, its exit code and the end of its output."""
    out: dict[str, Any] = {"line": exc.line or None, "instruction": exc.instruction or None}
    if isinstance(exc, errors.BuildStepFailed):
        out["exit_code"] = exc.code
        out["output"] = exc.output[-MAX_BUILD_OUTPUT:]
    return out


# --- JSON views (worker threads: they read the store) ------------------------------------


def image_json(rec: ImageRecord) -> dict[str, Any]:
    return {
        "name": rec.name, "familiar": rec.familiar, "id": rec.id, "digest": rec.digest, "size": rec.size,
        "created": rec.config.created, "labels": dict(rec.config.labels),
        "platform": str(rec.config.platform), "layer_count": len(rec.manifest.layers),
    }


def image_detail_json(rec: ImageRecord) -> dict[str, Any]:
    return {**image_json(rec), "media_type": rec.descriptor.media_type,
            "index_digest": getattr(rec, "index_digest", None), "config": rec.config.raw.get("config", {}),
            "diff_ids": list(rec.config.diff_ids), "history": rec.config.raw.get("history", []),
            "layers": [{"digest": d.digest, "size": d.size, "media_type": d.media_type}
                       for d in rec.manifest.layers]}


def _kernel_snapshots() -> Any:
    """The kernel room's commit and diff (Jupyter labels, what a snapshot leaves out), loaded on first use."""
    from ..kernel import snapshots

    return snapshots


def container_json(info: Mapping[str, Any], *, kernel_ids: set[str] | frozenset[str] = frozenset(),
                   paths: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A container's summary from ``Container.info()``; ``kernel_ids``: kernels this server runs."""
    labels = info.get("labels") or {}
    kid = labels.get(KERNEL_LABEL) or None
    lim = info.get("limits") or {}
    return {
        "id": info["id"], "name": info["name"], "image": info["image"], "status": info["status"],
        "created": info["created"], "command": list(info.get("command") or ()),
        "kernel_id": kid, "kernel_name": labels.get(KERNEL_NAME_LABEL) or None,
        "kernel_of_this_server": bool(kid and kid in kernel_ids),
        "notebook_path": (paths or {}).get(kid) if kid else None,
        "limits": {"memory": lim.get("memory"), "cpus": lim.get("cpus"), "pids": lim.get("pids")},
        "network": info.get("network"), "reason": info.get("reason"), "exit": info.get("exit"),
    }


def death_json(info: ExitInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {"reason": info.describe(), "oom_killed": info.oom_killed, "signal": info.signal, "code": info.code,
            "memory_limit": info.memory_limit, "memory_peak": info.memory_peak, "finished": info.finished or None}


def diff_json(changes: list[Change], left_out: list[Change] | None = None) -> dict[str, Any]:
    """A diff answer; ``left_out``: what a snapshot would leave out (the kernel's runtime state)."""
    folders: dict[str, dict[str, int]] = {}
    for ch in changes:
        top = "/" + ch.path.lstrip("/").split("/", 1)[0]
        f = folders.setdefault(top, {"added": 0, "changed": 0, "deleted": 0, "bytes": 0})
        f[{"A": "added", "C": "changed", "D": "deleted"}[ch.kind]] += 1
        f["bytes"] += ch.size
    return {
        "total": len(changes), "bytes": sum(c.size for c in changes),
        "summary": [{"path": p, **v} for p, v in sorted(folders.items())],
        "changes": [c.to_json() for c in changes[:MAX_DIFF_CHANGES]],
        "truncated": len(changes) > MAX_DIFF_CHANGES,
        "left_out": [c.to_json() for c in (left_out or [])[:MAX_DIFF_CHANGES]],
    }


class _CpuSamples:
    """The previous CPU reading per container, so a stats answer can say a percentage."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, float]] = {}

    def percent(self, cid: str, usage_ns: int | None, now: float) -> float | None:
        if usage_ns is None:
            return None
        prev = self._last.get(cid)
        self._last[cid] = (usage_ns, now)
        if len(self._last) > 4096:   # containers come and go: forget the oldest
            self._last.pop(next(iter(self._last)))
        if prev is None or now - prev[1] <= 0 or now - prev[1] > 300 or usage_ns < prev[0]:
            return None
        return round((usage_ns - prev[0]) / ((now - prev[1]) * 1e9) * 100, 2)


def stats_json(raw: Mapping[str, Any], *, cpus: float | None, percent: float | None, now: float) -> dict[str, Any]:
    return {
        "memory": {"current": raw.get("memory_current"), "peak": raw.get("memory_peak"),
                   "limit": raw.get("memory_limit")},
        "cpu": {"usage_ns": raw.get("cpu_usage_ns"), "percent": percent, "limit": cpus},
        "pids": {"current": raw.get("pids_current"), "limit": raw.get("pids_limit")},
        "oom_kills": raw.get("oom_kills"), "time": now,
    }


def read_log_tail(path: Path, limit: int = MAX_LOG_BYTES) -> tuple[str, bool]:
    """The end of a container's log file (written by the container: a regular file, no symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "", False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.ContainerError("the container's log is not a regular file")
        start = max(0, st.st_size - limit)
        data = os.pread(fd, limit, start)
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="replace"), start > 0


# --- progress adapters (worker threads) ---------------------------------------------------


def registry_progress(op: Operation) -> Callable[[Any], None]:
    """A pull/push progress callback feeding ``op``; the cancel checkpoint sits where undo is complete.

    Events with a final status (done, exists, mounted) and the finish are never
    cancellation points: a pull emits them also while it commits.
    """
    from ..runtime.images import progress as p

    final = {p.DONE, p.EXISTS, p.MOUNTED}

    def callback(ev: p.ProgressEvent) -> None:
        item = None
        if ev.layer:
            state = "done" if ev.status in final else ("waiting" if ev.status == p.WAITING else "running")
            item = Item(ev.layer, ev.layer_bytes, ev.layer_total, state, status=ev.status, index=ev.layer_index)
        stage = {p.RESOLVED: "resolved", p.FINISHED: "done"}.get(ev.kind, "transfer")
        op.update(stage=stage, done=ev.bytes_done, total=ev.bytes_total, item=item, rate=ev.rate,
                  count=ev.layer_count)
        if ev.kind != p.FINISHED and ev.status not in final:
            op.checkpoint()

    return callback


def snapshot_progress(op: Operation) -> Callable[[str, int, int], None]:
    def callback(stage: str, done: int, total: int) -> None:
        op.update(stage=stage, done=done, total=total)
        if stage == "archive":   # the blob is still a temp file: undone on the way out
            op.checkpoint()

    return callback


def build_reporter(op: Operation) -> Any:
    """A build's Reporter feeding ``op``: one item per step; the cancel checkpoint at step boundaries.

    The builder tags only after its last step and undoes everything on any
    exception (its contract), so raising :class:`Cancelled` as a step begins or
    ends stops the build with no tag and no container left.
    """
    from ..runtime.build import Reporter

    class StepItems(Reporter):
        def __init__(self) -> None:
            self.item: Item | None = None
            self.total = 0

        def step(self, n: int, total: int, stage: str, text: str) -> None:
            op.checkpoint()
            self.total = total
            self.item = Item(f"step-{n}", n - 1, total, "running", status="running", index=n,
                             text=text if len(text) <= MAX_STEP_TEXT else text[:MAX_STEP_TEXT - 3] + "...")
            op.update(stage="step", done=n - 1, total=total, count=total, item=self.item)

        def done(self, *, cached: bool, seconds: float, layer: Any) -> None:
            item = self.item
            if item is not None:
                item = Item(item.id, item.index, self.total, "done", status="cached" if cached else "ran",
                            index=item.index, text=item.text, seconds=round(seconds, 3))
                self.item = item
                op.update(done=item.index, item=item)
            op.checkpoint()

        def note(self, text: str) -> None:
            if text.startswith("COMMIT"):
                op.update(stage="commit")

    return StepItems()


def _open_inside(root: Path, path: Path, *, directory: bool) -> int:
    """``path`` opened (no symlink as its last name), and where the open file really is checked: inside ``root``.

    The request was checked by name; the folder is written by kernels meanwhile, so what
    the build reads is pinned by this descriptor, after the check of what it refers to.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else os.O_NONBLOCK)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise BadRequest(f"{path}: {exc.strerror}", "invalid_path") from None
    real = Path(os.path.realpath(f"/proc/self/fd/{fd}"))
    base = root.resolve()
    if (real != base and base not in real.parents) or (not directory and not stat.S_ISREG(os.fstat(fd).st_mode)):
        os.close(fd)
        raise BadRequest(f"{path}: outside the allowed root or not a regular file", "path_outside_root")
    return fd


def pinned_build(opts: Any, req: validate.BuildRequest, root: Path, stack: contextlib.ExitStack) -> Any:
    """``opts`` with the context as a held descriptor and a named Containerfile read through one (worker thread)."""
    ctx_fd = _open_inside(root, req.context, directory=True)
    stack.callback(os.close, ctx_fd)
    if req.file is None:
        return dataclasses.replace(opts, context=Path(f"/proc/self/fd/{ctx_fd}"))
    fd = _open_inside(root, req.file, directory=False)
    with os.fdopen(fd, "rb") as f:
        text = f.read(8 << 20)
    try:   # named relative to the context where it is inside it (error messages, <name>.containerignore)
        name = req.file.relative_to(req.context)
    except ValueError:
        name = Path(req.file.name)
    return dataclasses.replace(opts, context=Path(f"/proc/self/fd/{ctx_fd}"), containerfile=name,
                               containerfile_text=text)


# --- the service ---------------------------------------------------------------------------


class Service:
    """The REST API's work for one server, over one store."""

    def __init__(self, *, store: Store, allowed_root: Path, limits: Limits, kernel_manager: Any,
                 session_manager: Any = None, kernel_spec_manager: Any = None, max_workers: int = 4,
                 max_operations: int = 2, tls_verify: bool = True, kernelspec_user: bool = True,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.store = store
        self.runtime: Runtime = runtime.Runtime(store)
        self.allowed_root = allowed_root
        self.limits = limits
        self.km = kernel_manager
        self.sessions = session_manager
        self.ksm = kernel_spec_manager
        self.tls_verify = tls_verify
        self.kernelspec_user = kernelspec_user
        self.on_event = on_event
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="jc-api")
        self.operations = Operations(max_workers=max_operations, error_json=error_json)
        self._cpu = _CpuSamples()
        #: why each kernel's previous run ended (recorded before a restart rewrites the exit record)
        self.deaths: dict[str, ExitInfo] = {}

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread (every runtime call of a request goes through here)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def close(self) -> None:
        await self.operations.shutdown()
        self._pool.shutdown(wait=True)

    def config_json(self) -> dict[str, Any]:
        return {"version": __version__,
                "limits": {"max_memory": self.limits.max_memory, "max_cpus": self.limits.max_cpus,
                           "max_pids": self.limits.max_pids, "networks": list(self.limits.networks)},
                "start_options": True, "store": str(self.store.root)}

    # --- images ---------------------------------------------------------------------

    async def images(self) -> list[dict[str, Any]]:
        recs = await self.run(self.store.images)
        return [image_json(r) for r in sorted(recs, key=lambda r: r.name)]

    async def image(self, name: str) -> dict[str, Any]:
        rec = await self.run(self.store.resolve, validate.image_name(name))
        return image_detail_json(rec)

    async def rmi(self, name: str) -> None:
        await self.run(self.store.rmi, validate.image_name(name))

    async def tag(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        target = validate.text(body, "target", required=True) or ""
        ref = validate.reference(target, "target")
        if ref.digest:
            raise BadRequest("cannot tag by digest", "invalid_reference")

        def work() -> dict[str, Any]:
            rec = self.store.resolve(validate.image_name(name))
            new = self.store.tag(target, rec.descriptor)
            return image_json(self.store.resolve(new))

        return await self.run(work)

    async def gc(self) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            cleaned = self.runtime.gc(sweep_unknown_network=False)   # containers first: they release images
            rep = self.store.gc()
            return {"blobs": rep.blobs_removed, "layers": rep.layers_removed, "bytes": rep.bytes_freed,
                    "containers": cleaned}

        return {"removed": await self.run(work)}

    async def df(self) -> dict[str, Any]:
        du = await self.run(self.store.disk_usage)
        return {"images": len(du.images), "bytes": du.blobs_bytes + du.layers_bytes + du.containers_bytes,
                "blobs_bytes": du.blobs_bytes, "layers_bytes": du.layers_bytes,
                "containers_bytes": du.containers_bytes,
                "per_image": [{"name": n, "unique": u, "shared": s} for n, u, s in du.images]}

    def pull(self, body: Mapping[str, Any]) -> Operation:
        reference = validate.text(body, "reference", required=True) or ""
        ref = validate.reference(reference)
        platform_text = validate.text(body, "platform", limit=64)
        try:
            platform = runtime.Platform.parse(platform_text) if platform_text else None
        except errors.InvalidReference as exc:
            raise BadRequest(str(exc), "invalid_platform") from None

        def work(op: Operation) -> dict[str, Any]:
            from ..runtime.images import registry

            rec = registry.pull(self.store, reference, platform=platform, progress=registry_progress(op),
                                tls_verify=self.tls_verify)
            return {"image": image_json(rec)}

        return self.operations.start("pull", str(ref), work)

    async def build(self, body: Mapping[str, Any]) -> Operation:
        """Start a build (``docker build``'s options, the context a folder inside the allowed root)."""
        from ..runtime.build import BuildOptions

        req = await self.run(validate.build_request, body, self.allowed_root, self.limits)
        try:   # the options check themselves as they are made: a bad one is a 400 before any work
            opts = BuildOptions(context=req.context, containerfile=req.file,
                                containerfile_text=req.containerfile.encode() if req.containerfile else None,
                                tags=req.tags, build_args=dict(req.build_args), target=req.target,
                                network=req.network, no_cache=req.no_cache, pull=req.pull)  # type: ignore[arg-type]
        except (errors.BuildError, errors.InvalidReference) as exc:
            raise BadRequest(str(exc), "invalid_field") from None
        if req.kernelspec and self.ksm is not None and req.kernelspec in await self.run(self.ksm.find_kernel_specs):
            raise Conflict(f"a kernelspec named {req.kernelspec} exists already", "kernelspec_exists")

        def work(op: Operation) -> dict[str, Any]:
            from ..runtime.build import build

            with contextlib.ExitStack() as stack:
                res = build(self.store, pinned_build(opts, req, self.allowed_root, stack), reporter=build_reporter(op))
                rec = res.record if res.record is not None else self.store.resolve(res.digest)
            out: dict[str, Any] = {"image": image_json(rec), "names": list(res.names), "image_id": res.image_id,
                                   "steps": res.steps, "cached": res.cached, "seconds": round(res.seconds, 3),
                                   "kernelspec": None}
            if req.kernelspec is not None:
                from ..kernel import kernelspec

                # a build has no resource options: the kernelspec starts with the defaults, no probe (the
                # result's Python is found at the first start, as for a snapshot's kernelspec)
                out["kernelspec"], _path = kernelspec.install(
                    store=self.store, image_name=res.names[0], name=req.kernelspec or None, probe=False,
                    user=self.kernelspec_user)
            return out

        target = req.tags[0] if req.tags else str(req.context.relative_to(self.allowed_root.resolve()) or ".")
        return self.operations.start("build", target, work)

    async def push(self, name: str, body: Mapping[str, Any]) -> Operation:
        target = validate.text(body, "target")
        if target is not None:
            validate.reference(target, "target")
        rec = await self.run(self.store.resolve, validate.image_name(name))

        def work(op: Operation) -> dict[str, Any]:
            from ..runtime.images import registry

            res = registry.push(self.store, rec.name, target, progress=registry_progress(op),
                                tls_verify=self.tls_verify)
            return {"reference": res.reference, "digest": res.digest, "uploaded": list(res.uploaded),
                    "mounted": list(res.mounted), "existing": list(res.existing)}

        return self.operations.start("push", target or rec.name, work)

    async def import_image(self, body: Mapping[str, Any]) -> dict[str, Any]:
        # resolving walks the file system: off the loop like every other read
        path = await self.run(lambda: validate.path_inside(
            self.allowed_root, validate.text(body, "path", required=True, limit=4096) or "", must_exist=True))
        name = validate.text(body, "name")
        if name is not None:
            validate.reference(name, "name")
        fmt = body.get("format", "auto")
        if fmt not in validate.IMPORT_FORMATS:
            raise BadRequest(f"unknown format {str(fmt)[:30]!r} ({', '.join(validate.IMPORT_FORMATS)})",
                             "invalid_field")

        def work() -> dict[str, Any]:
            from ..runtime.images import archive

            kind = fmt if fmt != "auto" else archive.detect_format(path)
            if kind == "rootfs":
                if not name:
                    raise BadRequest("importing a root filesystem tarball needs a name", "missing_field")
                rec = archive.import_rootfs(self.store, path, name)
            elif kind == "oci":
                rec = archive.import_oci_layout(self.store, path, name=name)
            elif kind == "oci-archive":
                rec = archive.import_oci_archive(self.store, path, name=name)
            elif kind == "docker-archive":
                rec = archive.import_docker_archive(self.store, path, name=name)
            else:
                raise BadRequest(f"unknown import format {kind!r}", "invalid_field")
            return image_json(rec)

        return {"image": await self.run(work)}

    async def save_image(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        path = await self.run(lambda: validate.path_inside(
            self.allowed_root, validate.text(body, "path", required=True, limit=4096) or "", must_exist=False))
        fmt = body.get("format", "oci-archive")
        if fmt not in validate.SAVE_FORMATS:
            raise BadRequest(f"unknown format {str(fmt)[:30]!r} ({', '.join(validate.SAVE_FORMATS)})",
                             "invalid_field")

        def work() -> dict[str, Any]:
            from ..runtime.images import archive

            rec = self.store.resolve(validate.image_name(name))
            (archive.save_oci_archive if fmt == "oci-archive" else archive.save_docker_archive)(self.store, rec, path)
            return {"image": image_json(rec), "path": str(path.relative_to(self.allowed_root.resolve())),
                    "format": fmt, "size": path.stat().st_size}

        return await self.run(work)

    # --- containers -----------------------------------------------------------------

    async def _kernel_paths(self) -> dict[str, str]:
        """kernel id -> notebook path (relative to the server's root), from the session manager."""
        if self.sessions is None:
            return {}
        try:
            sessions = await self.sessions.list_sessions()
        except Exception:   # the session store is not ours: a listing without paths beats a 500
            log.debug("cannot list sessions", exc_info=True)
            return {}
        return {s["kernel"]["id"]: s.get("path") for s in sessions if s.get("kernel")}

    def kernel_ids(self) -> set[str]:
        return set(self.km.list_kernel_ids()) if self.km is not None else set()

    async def containers(self, *, all_: bool = True) -> list[dict[str, Any]]:
        def work() -> list[dict[str, Any]]:
            out = []
            for c in self.runtime.containers():
                try:
                    out.append(c.info())
                except errors.ContainError:   # removed meanwhile
                    continue
            return out

        infos = await self.run(work)
        paths = await self._kernel_paths()
        kids = self.kernel_ids()
        return [container_json(i, kernel_ids=kids, paths=paths) for i in infos
                if all_ or i["status"] == "running"]

    async def _get(self, ref: str) -> Container:
        return await self.run(self.runtime.get, validate.container_ref(ref))

    async def container(self, ref: str) -> dict[str, Any]:
        c = await self._get(ref)
        info = await self.run(c.info)
        return container_json(info, kernel_ids=self.kernel_ids(), paths=await self._kernel_paths())

    def _stats(self, c: Container) -> dict[str, Any]:   # worker thread
        raw = c.stats()
        now = time.time()
        cpus = c.state.limits.cpus
        return stats_json(raw, cpus=cpus, percent=self._cpu.percent(c.id, raw.get("cpu_usage_ns"), now), now=now)

    async def stats(self, ref: str) -> dict[str, Any]:
        c = await self._get(ref)
        return await self.run(self._stats, c)

    async def diff(self, ref: str) -> dict[str, Any]:
        c = await self._get(ref)
        return await self.run(self._diff, c)

    async def logs(self, ref: str) -> dict[str, Any]:
        c = await self._get(ref)
        text, truncated = await self.run(read_log_tail, c.dir / "log")
        return {"logs": text, "truncated": truncated}

    async def commit(self, ref: str, body: Mapping[str, Any]) -> Operation:
        tag, message, compress = self._commit_args(body)
        leave = validate.leave_out(body)
        c = await self._get(ref)
        return self._start_commit(c, tag, message, compress, leave=leave)

    @staticmethod
    def _diff(c: Container) -> dict[str, Any]:   # worker thread
        left: list[Change] = []
        changes = _kernel_snapshots().diff(c, left_out=left)
        return diff_json(changes, left)

    def _commit_args(self, body: Mapping[str, Any]) -> tuple[str, str, str]:
        tag = validate.snapshot_tag(validate.text(body, "tag", required=True) or "")
        message = validate.text(body, "message", limit=validate.MAX_MESSAGE) or ""
        return tag, message, validate.compression(body)

    def _start_commit(self, c: Container, tag: str, message: str, compress: str, *,
                      after: Callable[[Any], dict[str, Any]] | None = None,
                      on_done: Callable[[Operation], None] | None = None,
                      leave: Mapping[str, Any] | None = None) -> Operation:
        def work(op: Operation) -> dict[str, Any]:
            left: list[Change] = []
            rec = _kernel_snapshots().snapshot(c.runtime, c, tag, message=message, compress=compress,
                                               progress=snapshot_progress(op), left_out=left, **(leave or {}))
            out = {"image": image_json(rec), "left_out": [ch.to_json() for ch in left[:MAX_DIFF_CHANGES]]}
            if after is not None:
                out.update(after(rec))
            return out

        return self.operations.start("commit", c.id, work, on_done=on_done)

    async def _check_not_kernel(self, c: Container, what: str) -> None:
        kid = (await self.run(lambda: c.state.labels.get(KERNEL_LABEL)))
        if kid and kid in self.kernel_ids():
            raise Conflict(f"container {c.id[:12]} belongs to kernel {kid} of this server: shut the kernel down "
                           f"instead of {what} its container", "kernel_container")

    async def stop(self, ref: str, body: Mapping[str, Any]) -> dict[str, Any]:
        timeout = body.get("timeout", 10)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 300:
            raise BadRequest("field timeout must be a number of seconds from 0 to 300", "invalid_field")
        c = await self._get(ref)
        await self._check_not_kernel(c, "stopping")
        info = await self.run(lambda: c.stop(timeout=float(timeout)))
        return {"container": c.id, "death": death_json(info)}

    async def remove(self, ref: str, *, force: bool) -> None:
        c = await self._get(ref)
        await self._check_not_kernel(c, "removing")
        await self.run(lambda: c.remove(force=force))

    async def reset(self, ref: str) -> None:
        c = await self._get(ref)
        await self._check_not_kernel(c, "resetting")
        await self.run(c.reset)

    # --- kernels' containers ----------------------------------------------------------

    def provisioner(self, kid: str) -> Any:
        """The provisioner of kernel ``kid`` of this server (404 for an unknown kernel)."""
        validate.kernel_id(kid)
        if self.km is None or kid not in self.km:
            raise NotFound(f"no kernel {kid} on this server", "kernel_not_found")
        return getattr(self.km.get_kernel(kid), "provisioner", None)

    def kernel_container(self, kid: str) -> Container | None:
        """The container of kernel ``kid``, None for a kernel that is not contained."""
        from ..kernel.provisioner import ContainedProvisioner

        prov = self.provisioner(kid)
        if not isinstance(prov, ContainedProvisioner):
            return None
        c = prov.container
        if c is None:
            raise Conflict(f"kernel {kid} has no container right now (starting or shutting down)", "no_container")
        return c

    def _contained(self, kid: str) -> Container:
        c = self.kernel_container(kid)
        if c is None:
            raise Conflict(f"kernel {kid} is not a contained kernel", "not_contained")
        return c

    async def kernel(self, kid: str) -> dict[str, Any]:
        c = self.kernel_container(kid)
        if c is None:
            return {"contained": False, "kernel_id": kid}

        def work() -> dict[str, Any]:
            info = c.info()
            exit_ = c.exit_info()
            rec = c.image()
            return {"info": info, "exit": exit_, "image": {"name": rec.name, "digest": rec.digest,
                                                            "familiar": rec.familiar}}

        got = await self.run(work)
        chosen = getattr(self.provisioner(kid), "start_options", None)
        death = got["exit"] or self.deaths.get(kid)
        return {"contained": True, "kernel_id": kid,
                "container": container_json(got["info"], kernel_ids=self.kernel_ids(),
                                            paths=await self._kernel_paths()),
                "image": got["image"], "death": death_json(death),
                "start_options": chosen.to_json() if chosen is not None else None}

    async def start_kernel(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Start a contained kernel with per-start options (the Lab's start dialog).

        Jupyter's own kernel and session APIs take only a kernelspec name, so
        the options come here; they are checked against this server's ceilings
        and handed to the kernel manager as a :class:`StartOptions` object, which
        the provisioner validates again with the kernelspec's config. The client
        then attaches its session to the returned kernel id.
        """
        from ..kernel.start_options import StartLimits, StartOptions, retag

        name = validate.kernel_name(validate.text(body, "name", required=True) or "")
        path = validate.text(body, "path", limit=4096)
        if self.km is None:
            raise Conflict("this server has no kernel manager", "no_kernel_manager")
        spec = (await self.run(self._contained_specs)).get(name)
        if spec is None:
            raise NotFound(f"no contained kernelspec {name}", "kernelspec_not_found")
        limits = StartLimits(max_memory=self.limits.max_memory, max_cpus=self.limits.max_cpus,
                             networks=self.limits.networks)
        try:
            options = StartOptions.parse(body.get("options"), limits=limits)
            image = retag(str(spec["image"] or ""), options.tag) if options.tag else None
        except errors.InvalidSpec as exc:
            raise BadRequest(f"start options: {exc}", "invalid_field") from None
        if image is not None:
            try:
                # a tag the store has: a start never pulls a name typed into a dialog
                await self.run(self.store.resolve, image)
            except errors.ImageNotFound:
                raise BadRequest(f"image {image} is not in this server's store (pull it first)",
                                 "image_not_found") from None
        kid = await self.km.start_kernel(kernel_name=name, path=path, contain_options=options)
        return {"kernel": {"id": kid, "name": name}, "options": options.to_json()}

    async def kernel_stats(self, kid: str) -> dict[str, Any]:
        return await self.run(self._stats, self._contained(kid))

    async def kernel_diff(self, kid: str) -> dict[str, Any]:
        c = self._contained(kid)
        return await self.run(self._diff, c)

    async def kernel_commit(self, kid: str, body: Mapping[str, Any]) -> Operation:
        tag, message, compress = self._commit_args(body)
        leave = validate.leave_out(body)
        install = validate.flag(body, "install_kernelspec", False)
        display = validate.text(body, "display_name", limit=200)
        c = self._contained(kid)
        prov = self.provisioner(kid)
        options = prov.options()

        def after(rec: ImageRecord) -> dict[str, Any]:   # worker thread, after the snapshot
            if not install:
                return {}
            from ..kernel import kernelspec

            name, _path = kernelspec.install(
                store=c.runtime.store, image_name=rec.name, display_name=display,
                memory=str(options.memory) if options.memory else None,
                cpus=str(options.cpus) if options.cpus else None, pids=options.pids or 0,
                network=options.network, probe=False, user=self.kernelspec_user,
                kernel_layer=options.kernel_layer)
            return {"kernelspec": name}

        def done(op: Operation) -> None:   # on the loop
            if op.state == "succeeded" and self.on_event is not None and op.result:
                self.on_event({"event": "snapshot", "kernel_id": kid, "container_id": c.id,
                               "image": op.result["image"]["name"]})

        return self._start_commit(c, tag, message, compress, after=after, on_done=done, leave=leave)

    async def kernel_reset(self, kid: str) -> dict[str, Any]:
        self._contained(kid)
        prov = self.provisioner(kid)
        prov.request_reset()
        if self.on_event is not None:
            self.on_event({"event": "reset", "kernel_id": kid, "container_id": prov.container_id or ""})
        return {"reset": "requested", "message": "the next restart of this kernel starts from a fresh writable layer"}

    # --- kernelspecs ------------------------------------------------------------------

    def _contained_specs(self) -> dict[str, dict[str, Any]]:   # worker thread
        from ..kernel.kernelspec import PROVISIONER_NAME

        out = {}
        for name, info in sorted((self.ksm.get_all_specs() if self.ksm is not None else {}).items()):
            spec = info.get("spec", {})
            prov = (spec.get("metadata") or {}).get("kernel_provisioner") or {}
            if prov.get("provisioner_name") == PROVISIONER_NAME:
                cfg = prov.get("config") or {}
                out[name] = {"name": name, "display_name": spec.get("display_name"), "image": cfg.get("image"),
                             "memory": cfg.get("memory"), "cpus": cfg.get("cpus"), "pids": cfg.get("pids"),
                             "network": cfg.get("network", "none"),
                             "start_dialog": bool(((spec.get("metadata") or {}).get("jupyter_contain") or {})
                                                  .get("start_dialog"))}
        return out

    async def kernelspecs(self) -> list[dict[str, Any]]:
        return list((await self.run(self._contained_specs)).values())

    async def install_kernelspec(self, req: KernelspecRequest) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            from ..kernel import kernelspec

            if req.name is not None and req.name in (self.ksm.get_all_specs() if self.ksm is not None else {}):
                raise Conflict(f"a kernelspec named {req.name} exists already", "kernelspec_exists")
            name, _path = kernelspec.install(store=self.store, image_name=req.image, name=req.name,
                                             display_name=req.display_name, memory=req.memory, cpus=req.cpus,
                                             pids=req.pids, network=req.network, probe=req.probe,
                                             user=self.kernelspec_user, start_dialog=req.start_dialog)
            got = self._contained_specs().get(name)
            if got is None:
                raise errors.KernelError(f"kernelspec {name} was installed where this server does not look")
            return got

        return await self.run(work)

    async def remove_kernelspec(self, name: str) -> None:
        validate.kernel_name(name)

        def work() -> None:
            if name not in self._contained_specs():
                raise NotFound(f"no contained kernelspec {name}", "kernelspec_not_found")
            self.ksm.remove_kernel_spec(name)

        await self.run(work)
