"""Warm pools: contained kernels started before anyone asks, handed out at a kernel start.

Owns: the pool settings a kernelspec (or the server's config) gives
(:class:`PoolSettings`), which starts a pooled kernel may serve (:func:`pool_key`:
same kernelspec file, image digest, options and environment, so that a start
with other per-start options gets a cold start), the pooled kernels themselves
(a container started with the image's Python running the cold start's boot
line up to ipykernel's ``initialize``, on a connection file of the pool's, then
blocked on a FIFO in its folder's read-only part before its event loop
starts), the background refill (paced: at most one container made at a time,
no more kernels warming than there are cores, none within
:data:`REFILL_QUIET` of a hand-out; none while the host is short of memory or
its memory pressure stalls, nor beyond the pool's memory budget), idle
expiry, draining (a changed kernelspec or image, :func:`drain_all` at server
shutdown and at exit), and the hand-out (:func:`hand_out`): the notebook
folder attached at its path in the running container, the container's record
amended so that a restart runs the kernel as a cold start would, then the
FIFO message (environment, working directory) that lets it start.

Must not: start, signal or wait for a kernel once handed out (the provisioner
owns it from then on, as it owns a cold one), hand a kernel out twice (a
kernel leaves the pool under the pool's lock before anything else touches
it), take back a kernel that was handed out, or read anything a container
wrote: the host only writes into the kernel's folder (``ch/`` is read-only
inside) and looks at ``/proc`` for the waiting kernel's state.

Crash rule: a pooled container carries the server's pid as its owner like
every kernel container, so a killed server's pool is removed by the next
server's ``gc_once`` (label ``jupyter-contain.kernel-id`` = the pool folder's
name, which ``gc_once`` removes too).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import errors
from ..runtime import Bind, Container, Runtime, parse_memory
from . import containers, guest_files
from .containers import KernelOptions
from .folder import KernelFolder, write_connection_file

log = logging.getLogger(__name__)

__all__ = ["HANDOUT_FIFO", "PoolSettings", "PooledKernel", "Recipe", "default_settings", "drain", "drain_all",
           "hand_out", "pool_key", "pools", "prefill", "prefill_kernelspecs", "set_default", "take", "wait_ready"]

#: the FIFO in the kernel folder's read-only part (``ch/``) a pooled kernel waits on
HANDOUT_FIFO = "handout"
#: the label that tells a pooled container (``ps``, the server's container list)
POOL_LABEL = "jupyter-contain.pool"
#: environment keys that differ per kernel; everything else must equal the pool's
PER_KERNEL_ENV = ("JPY_SESSION_NAME", "JUPYTER_CONTAIN_KERNEL_ID")
#: the largest hand-out message (its environment): one write into the FIFO, never blocking
_MAX_MESSAGE = 60 * 1024

#: how a cold start's boot line (``containers.kernel_command``) ends: ipykernel starts
LAUNCH_TAIL = "from ipykernel.kernelapp import launch_new_instance; launch_new_instance()"
#: what a pooled kernel's boot does instead: ipykernel imported and initialised (its sockets bound on
#: the pool's connection file, its shell built, the guest extension loaded), then it waits for the
#: hand-out (the kernel's environment and working directory) and only starts its event loop
POOL_TAIL = (
    "import json, os; from ipykernel.kernelapp import IPKernelApp as _A; "
    "_app = _A.instance(); _app.initialize(%(argv)r); "
    "f = open(%(fifo)r, 'rb'); m = json.loads(f.read() or b'null'); f.close(); "
    "m or sys.exit(0); "
    "os.environ.clear(); os.environ.update(m['env']); os.chdir(m['cwd']); "
    # IPython's directory history (_dh) began where the kernel was made: it begins at the notebook
    "_dh = getattr(_app, 'shell', None) and _app.shell.user_ns.get('_dh'); "
    "isinstance(_dh, list) and _dh.__setitem__(slice(None), [m['cwd']]); "
    "_app.start()"
)
#: the ipc "ports" of every pooled kernel: names of its sockets in its own socket tmpfs and of the
#: host's links in its own folder, so they never collide; the kernel manager takes them at hand-out
POOL_PORTS = (1, 2, 3, 4, 5)


def pool_command(options: KernelOptions, fifo: str, connection_file: str) -> list[str] | None:
    """The pooled kernel's argv: a cold start's Python and boot line, waiting for the hand-out at the end.

    Made from :func:`containers.kernel_command` so that whatever a cold start
    puts before ipykernel (the kernel layer's paths, the guest, the widgets
    choice) is the same; None if that boot line does not end as expected.
    """
    cold = containers.kernel_command(options, "/dev/null")
    try:
        i = cold.index("-c")
    except ValueError:
        return None
    boot = cold[i + 1]
    if not boot.endswith(LAUNCH_TAIL):
        return None
    argv = guest_argv(connection_file, ())
    return [*cold[:i], "-c", boot[: -len(LAUNCH_TAIL)] + POOL_TAIL % {"fifo": fifo, "argv": argv}]


@dataclass(frozen=True)
class PoolSettings:
    """A kernelspec's pool: ``size`` kernels kept warm (0: no pool).

    ``idle_ttl``: seconds a pooled kernel lives unused, and the pool refills
    only while a start happened within it (0: forever). ``memory_budget``:
    bytes all of this pool's idle kernels may use together (None: no budget
    beyond ``size``). ``min_available``: the share of the host's memory that
    must stay available for a refill; ``max_pressure``: the memory PSI
    (``some avg10``, percent) above which refills wait.
    """

    size: int = 0
    idle_ttl: float = 600.0
    memory_budget: int | None = None
    min_available: float = 0.15
    max_pressure: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 0 <= self.size <= 256:
            raise errors.InvalidSpec(f"pool size {self.size!r} is not 0..256")
        if not self.idle_ttl >= 0:
            raise errors.InvalidSpec(f"pool idle_ttl {self.idle_ttl!r} must be >= 0 seconds")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise errors.InvalidSpec(f"pool memory_budget {self.memory_budget!r} must be positive")
        if not 0 <= self.min_available < 1:
            raise errors.InvalidSpec(f"pool min_available {self.min_available!r} must be in [0, 1)")

    @classmethod
    def from_config(cls, value: Any, *, where: str = "kernelspec") -> PoolSettings:
        """``{"size": 2, "idle_ttl": 600, "memory_budget": "2g"}``, or a bare size; ``None``/``{}``: no pool."""
        if value in (None, "", {}):
            return cls()
        if isinstance(value, int) and not isinstance(value, bool):
            value = {"size": value}
        if not isinstance(value, Mapping):
            raise errors.InvalidSpec(f"{where}: option pool must be a size or a mapping (size, idle_ttl, "
                                     "memory_budget, min_available, max_pressure)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise errors.InvalidSpec(f"{where}: option pool: unknown key(s) {', '.join(unknown)} "
                                     f"(known: {', '.join(sorted(known))})")
        kw = dict(value)
        try:
            if kw.get("memory_budget") not in (None, ""):
                mb = kw["memory_budget"]
                kw["memory_budget"] = mb if isinstance(mb, int) else parse_memory(str(mb))
            else:
                kw.pop("memory_budget", None)
            for k in ("idle_ttl", "min_available", "max_pressure"):
                if k in kw:
                    kw[k] = float(kw[k])
            return cls(**kw)
        except (TypeError, ValueError, errors.InvalidSpec) as exc:
            raise errors.InvalidSpec(f"{where}: option pool: {exc}") from None


@dataclass(frozen=True)
class Recipe:
    """What a pool's kernels are made from: the same inputs a cold start of the kernelspec takes."""

    kernel_name: str
    options: KernelOptions
    settings: PoolSettings
    #: the kernel's environment less what differs per kernel (:data:`PER_KERNEL_ENV`)
    env: Mapping[str, str]
    spec_file: Path | None          # the kernelspec's kernel.json: a change drains the pool
    spec_digest: str
    image_digest: str
    key: str = ""


def _file_digest(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "missing"


def pool_key(*, kernel_name: str, options: KernelOptions, settings: PoolSettings, env: Mapping[str, str],
             spec_file: Path | None, image_digest: str) -> Recipe:
    """The recipe (and its key) of the pool that may serve a start with these inputs."""
    stable_env = {k: v for k, v in env.items() if k not in PER_KERNEL_ENV and k != "JUPYTER_CONTAIN_KERNEL_DIR"}
    spec_digest = _file_digest(spec_file)
    doc = json.dumps({"kernel": kernel_name, "options": dataclasses.asdict(options), "env": stable_env,
                      "spec": spec_digest, "image": image_digest, "settings": dataclasses.asdict(settings)},
                     sort_keys=True, default=str)
    return Recipe(kernel_name=kernel_name, options=options, settings=settings, env=stable_env,
                  spec_file=spec_file, spec_digest=spec_digest, image_digest=image_digest,
                  key=hashlib.sha256(doc.encode()).hexdigest()[:16])


@dataclass
class PooledKernel:
    """One warm kernel: its container (started by this process), its folder, when it was made."""

    container: Container
    folder: KernelFolder
    pool_id: str
    made: float
    #: the environment its process started with (the hand-out replaces the per-kernel part)
    env: Mapping[str, str] = field(default_factory=dict)
    #: the HMAC key of its connection file (its ports are :data:`POOL_PORTS`): the kernel manager's at hand-out
    key: str = ""

    def waiting(self) -> bool:
        """Whether the kernel's Python has imported ipykernel and waits on its FIFO (read in /proc)."""
        try:
            pid = self.container.pid
        except errors.ContainError:   # removed meanwhile (expired, drained)
            return False
        if pid is None:
            return False
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            return any(Path(f"/proc/{c}/wchan").read_text() in ("wait_for_partner", "fifo_open")
                       for c in children)
        except OSError:
            return False

    def alive(self) -> bool:
        try:
            return self.container.attached and self.container.poll() is None
        except errors.ContainError:
            return False

    def discard(self) -> None:
        try:
            self.container.remove(force=True)
        except errors.ContainerNotFound:
            self.container.close()   # removed by someone else: our handle's process and fds still go
        except errors.ContainError as exc:
            log.warning("pool: removing pooled container %s: %s", self.container.id[:12], exc)
        self.folder.remove()


class _Pool:
    """The kernels of one recipe; its lock guards ``ready`` and ``making``."""

    def __init__(self, recipe: Recipe, runtime: Runtime) -> None:
        self.recipe = recipe
        self.runtime = runtime
        self.ready: deque[PooledKernel] = deque()
        self.making = 0
        self.last_demand = time.monotonic()
        self.lock = threading.Lock()
        self.closed = False
        self.per_kernel_memory: int | None = None   # measured on the first idle kernel

    def wanted(self, now: float) -> int:
        s = self.recipe.settings
        if self.closed or (s.idle_ttl and now - self.last_demand > s.idle_ttl):
            return 0
        n = s.size
        if s.memory_budget is not None and self.per_kernel_memory:
            n = min(n, s.memory_budget // self.per_kernel_memory)
        return n


_lock = threading.Lock()
_pools: dict[str, _Pool] = {}
#: the pool of a kernelspec that names none: none, unless a Jupyter server set one (set_default)
_default = PoolSettings()


def set_default(settings: PoolSettings) -> None:
    """The pool of kernelspecs that do not set ``pool`` (the server extension's ``ContainApp.kernel_pool``)."""
    global _default
    _default = settings


def default_settings() -> PoolSettings:
    return _default


_wake = threading.Event()
_thread: threading.Thread | None = None
_stopping = False
_at_exit = False
#: refills wait this long after the last hand-out: a burst of starts (a class clicking at once)
#: gets the CPU first; 30 hand-outs with refills running beside them took 6.3 s (p50), see the README
REFILL_QUIET = 2.0
_last_take = 0.0


def pools() -> dict[str, tuple[str, int, int]]:
    """key -> (kernel name, ready kernels, kernels being made): for tests and benchmarks."""
    with _lock:
        return {k: (p.recipe.kernel_name, len(p.ready), p.making) for k, p in _pools.items()}


def take(recipe: Recipe, runtime: Runtime) -> PooledKernel | None:
    """A warm kernel for ``recipe`` (it leaves the pool for good), or None; notes the demand.

    Pools of the same kernelspec with another recipe (the kernelspec file or
    its image changed) are drained. A pool is made on the first demand and
    filled in the background.
    """
    global _thread, _at_exit, _last_take
    if recipe.settings.size <= 0:
        return None
    stale: list[_Pool] = []
    with _lock:
        if _stopping:
            return None
        for k, p in list(_pools.items()):
            if p.recipe.kernel_name == recipe.kernel_name and k != recipe.key and \
                    (p.recipe.spec_digest != recipe.spec_digest or p.recipe.image_digest != recipe.image_digest):
                stale.append(_pools.pop(k))
        pool = _pools.get(recipe.key)
        if pool is None:
            pool = _pools[recipe.key] = _Pool(recipe, runtime)
        if _thread is None or not _thread.is_alive():
            if not _at_exit:
                _at_exit = True
                atexit.register(drain_all)   # a process that made pooled kernels removes them when it ends
            _thread = threading.Thread(target=_refill_loop, name="jc-pool", daemon=True)
            _thread.start()
    for p in stale:
        log.info("pool: kernelspec %s or its image changed: draining %d pooled kernel(s)",
                 p.recipe.kernel_name, len(p.ready))
        _close(p)
    got = None
    with pool.lock:
        pool.last_demand = _last_take = time.monotonic()
        while pool.ready:
            pk = pool.ready.popleft()
            if pk.alive():
                got = pk
                break
            threading.Thread(target=pk.discard, daemon=True).start()
    _wake.set()
    return got


def prefill(recipe: Recipe, runtime: Runtime) -> None:
    """Make ``recipe``'s pool now, before any start (the server's start: kernelspecs that set ``pool``)."""
    global _thread, _at_exit
    if recipe.settings.size <= 0:
        return
    with _lock:
        if _stopping or recipe.key in _pools:
            return
        _pools[recipe.key] = _Pool(recipe, runtime)
        if _thread is None or not _thread.is_alive():
            if not _at_exit:
                _at_exit = True
                atexit.register(drain_all)
            _thread = threading.Thread(target=_refill_loop, name="jc-pool", daemon=True)
            _thread.start()
    log.info("pool %s: filling %d kernel(s) ahead of the first start", recipe.kernel_name, recipe.settings.size)
    _wake.set()


def prefill_kernelspecs(kernel_spec_manager: Any, parent: Any) -> list[str]:
    """Fill the pools of every contained kernelspec that sets ``pool`` itself (at a server's start).

    Made as its first start would make it: a provisioner of the kernelspec
    under a kernel manager of ``parent`` (so the server's configuration
    applies), with the server's environment as the launch environment.
    Kernelspecs without their own ``pool`` (the server default) fill at
    their first start instead: a server with many kernelspecs would
    otherwise start one kernel for each of them at every start. Returns the
    kernelspec names; a kernelspec that fails is logged and skipped.
    """
    import uuid

    from jupyter_client.manager import KernelManager
    from jupyter_client.provisioning import KernelProvisionerFactory

    from .kernelspec import PROVISIONER_NAME

    done = []
    for name, info in sorted(kernel_spec_manager.get_all_specs().items()):
        prov_cfg = ((info.get("spec") or {}).get("metadata") or {}).get("kernel_provisioner") or {}
        if prov_cfg.get("provisioner_name") != PROVISIONER_NAME or not (prov_cfg.get("config") or {}).get("pool"):
            continue
        try:
            km = KernelManager(kernel_name=name, kernel_spec_manager=kernel_spec_manager, parent=parent)
            prov = KernelProvisionerFactory.instance(parent=parent).create_provisioner_instance(
                str(uuid.uuid4()), km.kernel_spec, parent=km)
            warm = getattr(prov, "warm_pool", None)
            if warm is None:
                continue
            warm()
            done.append(name)
        except Exception as exc:   # a pool is an optimisation: the kernelspec still starts cold
            log.warning("pool %s: not filled ahead: %s", name, exc)
    return done


def wait_ready(kernel_name: str, n: int, *, timeout: float = 60.0) -> bool:
    """Wait until ``kernel_name``'s pools hold ``n`` kernels waiting for a hand-out (tests, benchmarks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _lock:
            ps = [p for p in _pools.values() if p.recipe.kernel_name == kernel_name]
        count = 0
        for p in ps:
            with p.lock:
                ready = list(p.ready)
            count += sum(1 for k in ready if k.waiting())
        if count >= n:
            return True
        time.sleep(0.05)
    return False


def drain(kernel_name: str | None = None) -> int:
    """Remove the pools (of ``kernel_name``, or all) and their kernels; returns how many kernels went."""
    with _lock:
        gone = [_pools.pop(k) for k, p in list(_pools.items()) if kernel_name in (None, p.recipe.kernel_name)]
    return sum(_close(p) for p in gone)


def drain_all() -> int:
    """Server shutdown (and process exit): every pool drained, the refill thread stopped; nothing stays."""
    global _stopping, _thread
    with _lock:
        _stopping = True
        t, _thread = _thread, None
    _wake.set()
    if t is not None and t is not threading.current_thread():
        t.join(30)
    n = drain()
    with _lock:
        _stopping = False
    return n



def _close(p: _Pool) -> int:
    with p.lock:
        p.closed = True
        kernels = list(p.ready)
        p.ready.clear()
    for pk in kernels:
        pk.discard()
    return len(kernels)


# --- the refill thread -----------------------------------------------------------------


def _memory_ok(settings: PoolSettings) -> tuple[bool, str]:
    """Whether the host has memory to spare for another idle kernel (``/proc/meminfo``, memory PSI)."""
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info[k] = int(v.split()[0]) * 1024
        total, avail = info.get("MemTotal", 0), info.get("MemAvailable", 0)
        if total and avail / total < settings.min_available:
            return False, f"{avail >> 20} MiB of {total >> 20} MiB available"
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, ValueError, IndexError):
        # "some avg10=0.00 avg60=..." (absent where PSI is off: no veto then)
        some = Path("/proc/pressure/memory").read_text().splitlines()[0]
        avg10 = float(some.split()[1].split("=")[1])
        if avg10 > settings.max_pressure:
            return False, f"memory pressure {avg10:.1f}%"
    return True, ""


def _refill_loop() -> None:
    """The refill thread: never ends on an error (a pool that cannot refill leaves starts cold)."""
    state: dict[str, Any] = {"said": {}, "busy": False}
    while True:
        try:
            if not _refill_once(state):
                return
        except Exception:
            log.exception("pool: refill")
            time.sleep(1.0)


def _refill_once(state: dict[str, Any]) -> bool:
    """One round of the refill thread (at most one pooled kernel made); False once it should stop."""
    said: dict[str, str] = state["said"]
    # while kernels warm up or starts come in, look again soon
    _wake.wait(0.1 if state["busy"] else 1.0)
    _wake.clear()
    state["busy"] = False
    with _lock:
        if _stopping:
            return False
        pools_now = list(_pools.values())
    now = time.monotonic()
    if now - state.get("checked", 0.0) > 5.0:
        # a kernelspec file changed (reinstalled, edited): its pool goes now, not at its next start
        state["checked"] = now
        for p in pools_now:
            if p.recipe.spec_file is not None and _file_digest(p.recipe.spec_file) != p.recipe.spec_digest:
                with _lock:
                    _pools.pop(p.recipe.key, None)
                log.info("pool %s: the kernelspec changed: draining its pool", p.recipe.kernel_name)
                _close(p)
        with _lock:
            pools_now = list(_pools.values())
    for p in pools_now:
        _expire(p, now)
    if now - _last_take < REFILL_QUIET:
        state["busy"] = True
        return True
    warming = sum(1 for p in pools_now for k in list(p.ready) if not k.waiting())
    for p in pools_now:
        with p.lock:
            need = p.wanted(now) - len(p.ready) - p.making
        if need <= 0:
            continue
        # pacing: one container made at a time, and no more kernels importing than cores
        if warming >= (os.cpu_count() or 1):
            state["busy"] = True
            return True
        ok, why = _memory_ok(p.recipe.settings)
        if not ok:
            if said.get(p.recipe.key) != why:
                log.info("pool %s: not refilling: %s", p.recipe.kernel_name, why)
                said[p.recipe.key] = why
            continue
        said.pop(p.recipe.key, None)
        with p.lock:
            p.making += 1
        try:
            pk = _make(p)
        except Exception as exc:   # a pool that cannot fill must never hurt the server: cold starts
            log.warning("pool %s: could not start a pooled kernel: %s", p.recipe.kernel_name, exc)
            with p.lock:
                p.making -= 1
                p.closed = True    # no retry loop; the next change of the kernelspec makes a new pool
            continue
        with p.lock:
            p.making -= 1
            keep = not p.closed
            if keep:
                p.ready.append(pk)
        if not keep:
            pk.discard()
        _wake.set()   # more to do: come back at once
        return True
    return True


def _expire(p: _Pool, now: float) -> None:
    ttl = p.recipe.settings.idle_ttl
    with p.lock:
        old = [k for k in p.ready if not k.alive() or (ttl and now - k.made > ttl)]
        for k in old:
            p.ready.remove(k)
        if p.per_kernel_memory is None and p.ready and p.ready[0].waiting():
            with contextlib.suppress(errors.ContainError, KeyError, TypeError):
                p.per_kernel_memory = int(p.ready[0].container.stats()["memory_current"]) or None
    for k in old:
        log.info("pool %s: pooled kernel %s expired", p.recipe.kernel_name, k.pool_id)
        k.discard()


def _make(p: _Pool) -> PooledKernel:
    """Create and start one pooled kernel (refill thread)."""
    r = p.recipe
    pool_id = f"pool-{secrets.token_hex(8)}"
    folder = KernelFolder.make(pool_id)
    try:
        fifo = folder.channel_dir / HANDOUT_FIFO
        os.mkfifo(fifo, 0o600)
        os.chmod(fifo, 0o644)   # the image's kernel user reads it through the idmapped ch/
        env = {**r.env, "JUPYTER_CONTAIN_KERNEL_ID": pool_id, "JUPYTER_CONTAIN_KERNEL_DIR": folder.inside}
        cmd = pool_command(r.options, f"{folder.inside}/{HANDOUT_FIFO}", folder.connection_file_inside)
        if cmd is None:
            raise errors.KernelError("this kernel's boot line cannot wait for a hand-out")
        c = containers.create_container(p.runtime, r.options, kernel_id=pool_id, folder=folder,
                                        cmd=cmd, env=env, cwd=None,
                                        kernel_name=r.kernel_name)
        try:
            c.amend(labels={POOL_LABEL: r.key})
            key = secrets.token_hex(32)
            info = {"shell_port": POOL_PORTS[0], "iopub_port": POOL_PORTS[1], "stdin_port": POOL_PORTS[2],
                    "control_port": POOL_PORTS[3], "hb_port": POOL_PORTS[4], "ip": folder.kernel_ip, "key": key,
                    "transport": "ipc", "signature_scheme": "hmac-sha256", "kernel_name": r.kernel_name}

            def connection(pinned: Mapping[str, int]) -> None:
                # as a cold start's: through the socket tmpfs pinned before the container runs anything
                write_connection_file(pinned[folder.sockets_inside], info, owner=c.process_host_ids())

            null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            try:
                c.start(stdio=(null, 1, 2), pin=[folder.sockets_inside], prepare=connection)
            finally:
                os.close(null)
        except BaseException:
            c.remove(force=True)
            raise
    except BaseException:
        folder.remove()
        raise
    log.debug("pool %s: pooled kernel %s started (container %s)", r.kernel_name, pool_id, c.id[:12])
    return PooledKernel(container=c, folder=folder, pool_id=pool_id, made=time.monotonic(), env=env, key=key)


# --- the hand-out ---------------------------------------------------------------------


def hand_out(pk: PooledKernel, *, kernel_id: str, options: KernelOptions, env: Mapping[str, str],
             cwd: str | None, cold_cmd: Sequence[str], kernel_name: str,
             trace: Callable[[str], None] = lambda _: None, timeout: float = 30.0) -> None:
    """Make the pooled kernel ``pk`` kernel ``kernel_id`` (worker thread; the provisioner owns it after).

    ``env``: the kernel's environment as a cold start computes it;
    ``cold_cmd``: the command a cold start would run, recorded for restarts
    (the connection file it names is the pooled one's: same folder, and the
    kernel manager took its ports and key). On any failure the caller
    removes the kernel (it was never seen by a client).
    """
    c = pk.container
    workdir = None
    if options.mount_cwd and cwd and Path(cwd).is_dir():
        workdir = str(Path(cwd).resolve())
        c.attach_bind(Bind(Path(workdir), workdir, idmap=True))
        trace("notebook folder bound")
    st = c.state
    # the process's environment as a cold start's would be: the image's and the runtime's
    # defaults with the kernel's over them (the pooled one's per-kernel values replaced)
    full = {k: v for k, v in st.process.env.items() if k not in pk.env}
    full.update(env)
    cwd_inside = workdir or st.process.cwd
    c.amend(argv=cold_cmd, env=full, cwd=cwd_inside,
            labels={"jupyter-contain.kernel-id": kernel_id, "jupyter-contain.kernel-name": kernel_name,
                    POOL_LABEL: ""})
    msg = json.dumps({"env": full, "cwd": cwd_inside}).encode()
    if len(msg) > _MAX_MESSAGE:
        raise errors.KernelError(f"the kernel's environment is too large for a pooled start ({len(msg)} bytes)")
    _send(pk.folder.channel_dir / HANDOUT_FIFO, msg, alive=pk.alive, timeout=timeout)
    trace("handed out")


def _send(fifo: Path, data: bytes, *, alive: Callable[[], bool], timeout: float) -> None:
    """Write ``data`` into the FIFO the kernel reads (waiting for the reader, never blocking on it)."""
    st = os.lstat(fifo)
    if not stat.S_ISFIFO(st.st_mode):   # ch/ is the host's own: only a bug gets here
        raise errors.KernelError(f"{fifo} is not the hand-out FIFO")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
            break
        except OSError as exc:
            if exc.errno != 6:   # ENXIO: no reader yet (the kernel is still importing)
                raise
        if not alive() or time.monotonic() > deadline:
            raise errors.KernelError("the pooled kernel did not wait for its hand-out")
        time.sleep(0.002)
    try:
        n = os.write(fd, data)
        if n != len(data):
            raise errors.KernelError("the hand-out message was cut short")
    finally:
        os.close(fd)


def guest_argv(connection_file: str, extra: Sequence[str]) -> list[str]:
    """ipykernel's arguments, as :func:`containers.kernel_command` gives them after ``-c BOOT``."""
    return ["-f", connection_file, f"--IPKernelApp.extra_extensions={guest_files.EXTENSION}", *extra]
