"""Container lifecycle: create, start, wait, signal, stop, exec, remove, list, gc.

Owns a container's directory in the store (``containers/<id>/``: the writable
layer ``upper/`` + ``work/``, the ``rootfs/`` mount point, prepared ``etc/``
files, the OCI runtime-spec ``config.json``, ``state.json`` and logs), turning a
:class:`ContainerSpec` plus an image into one spawn plan, and the state
machine on disk so that another process (the CLI, a restarted server) sees
every container and can clean what a dead process left. Must not parse
layers, talk to registries or know about Jupyter; syscalls go through
``spawn`` (native) and file I/O only.

The container's init writes how the main process ended to ``exit`` in the
container's directory, so that a process that did not start it (``ps`` after
``run -d``) can still tell the exit code.

States on disk: ``creating`` from :meth:`Runtime.create` until the first
start has released the payload (``creator_pid``/``creator_start`` name the
process responsible; once it is provably gone the container is garbage and
:meth:`Runtime.gc` removes it), ``created`` (a container whose start failed
while its creator lives, or a restart in place under way: ``starter_pid``),
``running`` and ``exited``. Crash rule: whatever a step makes, the state
names before the step makes it (the container's directory holds
``state.json`` before anything else; its cgroup folders and its starter are
recorded before they are made, by the create when the same process starts
it; an unreleased init ends by itself when its starter dies, a released one
is killed with its cgroup, or without cgroups through its pid, recorded
before the release; veths end with the init's namespace and their leases
are gc's, slirp4netns ends with the init), so a process killed at any step
leaves nothing that ``rm -f`` and ``gc`` do not find. The named steps are
:data:`FAULT_STEPS`. A start costs one state write in the common case (the
``running`` record after the release), as before these rules.

The rootfs overlay is mounted inside the container's own mount namespace,
never in the host's: when the last process of a container ends, its mounts
go with it, so a killed server cannot leave overlay mounts behind.

Rootless (this process is not root): every container gets a user namespace
of the caller's ids (``idmap.rootless_mapping``), a ``userxattr`` overlay,
no cgroups where none are delegated (a limit asked for is refused), and
``slirp4netns`` for the bridge mode; what only the container's root may
remove goes through ``spawn.run_in_userns``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import stat
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

from ... import errors
from ..fsutil import (
    RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, atomic_write, file_lock, openat2, read_small, remove_tree,
)
from ..images import rootless as rootless_store
from ..images.store import ImageRecord, Store, now_rfc3339
from . import idmap
from . import network as netmod
from . import NETWORK_MODES, rootfs, seccomp, slirp, spawn
from .cgroups import DEFAULT_PIDS_LIMIT, CgroupRoot, Cgroups, Limits, Stats, find_orphans
from .cgroups import detect as detect_cgroups

log = logging.getLogger(__name__)

#: the "rootless without quotas" warning is given once per process
_warned_no_cgroups = False

Network = Literal["none", "host", "bridge"]
Status = Literal["created", "running", "exited", "dead"]

_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_ETC_FILES = ("hosts", "hostname", "resolv.conf")

#: test hook: with ``JUPYTER_CONTAIN_FAULT=<step>`` in the environment, the
#: process SIGKILLs itself at that step of a create or start (or, with
#: ``JUPYTER_CONTAIN_FAULT_ACTION=raise``, raises ``ContainerError`` there), so
#: tests can stop a start at each step deterministically (tests/test_faults.py)
FAULT_ENV = "JUPYTER_CONTAIN_FAULT"
#: the named steps of a container's create and start, in order
FAULT_STEPS = (
    "create:state",      # the directory holds state.json ("creating"), nothing else yet
    "create:done",       # layer folders and config.json made
    "start:recorded",    # the planned cgroup folders and the starter are recorded, none made
    "start:cgroup",      # cgroup folders made
    "start:spawned",     # init cloned, waiting for its release
    "start:network",     # bridge veth / slirp4netns attached
    "start:pinned",      # folders pinned and prepared (only with ``pin``)
    "start:released",    # the payload runs; status not yet "running"
    "start:running",     # status "running" recorded
)


def _fault(step: str) -> None:
    """The :data:`FAULT_ENV` test hook at ``step`` (one environment lookup when unset)."""
    if os.environ.get(FAULT_ENV) != step:
        return
    if os.environ.get(FAULT_ENV + "_ACTION") == "raise":
        raise errors.ContainerError(f"fault injected at {step}")
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class ContainerSpec:
    """What the caller wants; unset fields come from the image config."""

    image: str
    command: tuple[str, ...] | None = None          # replaces the image's Cmd
    entrypoint: tuple[str, ...] | None = None       # replaces the image's Entrypoint
    env: Mapping[str, str] = field(default_factory=dict)  # over the image's Env
    workdir: str | None = None
    user: str | None = None                          # "name", "uid", "uid:gid", "name:group"
    hostname: str | None = None
    binds: tuple[rootfs.Bind, ...] = ()
    #: small tmpfs mounts of the container's own (Docker's ``--tmpfs``)
    tmpfs: tuple[rootfs.Tmpfs, ...] = ()
    limits: Limits = field(default_factory=Limits)
    network: Network = "none"
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    tty: bool = False
    rlimits: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    readonly_rootfs: bool = False
    #: "default" (Docker's default seccomp profile) or "unconfined" (no filter)
    seccomp: str = "default"
    #: a process that owns the container (a Jupyter server): when it is gone,
    #: gc removes the container even if it still runs
    owner_pid: int | None = None
    #: published ports, Docker's ``-p [IP:]HOST:CONTAINER[/tcp|udp]`` (bridge network only)
    publish: tuple[str, ...] = ()
    #: "host": container ids are host ids (root is host root); "auto": a user
    #: namespace with its own 65536 subordinate host ids (``idmap``)
    userns: Literal["host", "auto"] = "host"

    def __post_init__(self) -> None:
        seccomp.check_mode(self.seccomp)
        if self.userns not in ("host", "auto"):
            raise errors.InvalidSpec(f"unknown user namespace mode {self.userns!r} (host or auto)")
        if self.network not in ("none", "host", "bridge"):
            raise errors.InvalidSpec(f"unknown network mode {self.network!r} (none, host or bridge)")
        object.__setattr__(self, "publish", tuple(str(netmod.parse_publish(p)) for p in self.publish))
        if self.publish and self.network != "bridge":
            raise errors.InvalidSpec("publishing ports (-p) needs --network bridge")
        if self.name is not None:
            check_name(self.name)
        for b in self.binds:
            if not Path(b.source).is_absolute():
                raise errors.InvalidSpec(f"bind source {b.source} must be an absolute path")


def check_name(name: str) -> str:
    if not name or len(name) > 128 or not set(name) <= _NAME_OK or name[0] in ".-":
        raise errors.InvalidSpec(f"invalid container name {name!r} (letters, digits, _ . -)")
    return name


def parse_bind(text: str) -> rootfs.Bind:
    """``SRC:DST[:ro|rw]`` as Docker's ``-v`` takes it (SRC must exist)."""
    parts = text.split(":")
    if len(parts) == 2:
        src, dst, mode = parts[0], parts[1], "rw"
    elif len(parts) == 3:
        src, dst, mode = parts
    else:
        raise errors.InvalidSpec(f"invalid volume {text!r} (expected SRC:DST[:ro])")
    if mode not in ("ro", "rw"):
        raise errors.InvalidSpec(f"invalid volume mode {mode!r} in {text!r} (ro or rw)")
    source = Path(src).expanduser().absolute()
    if not source.exists():
        raise errors.InvalidSpec(f"bind source {source} does not exist")
    return rootfs.Bind(source=source, target=dst, readonly=mode == "ro")


@dataclass(frozen=True)
class ExitInfo:
    """How a container's main process ended."""

    code: int                       # exit code, 128+N for a signal
    signal: int | None = None
    oom_killed: bool = False
    memory_limit: int | None = None
    memory_peak: int | None = None
    finished: str = ""
    #: the process limit, and how many forks it refused (a payload that
    #: failed for want of processes says so)
    pids_limit: int | None = None
    pids_refused: int = 0

    def describe(self) -> str:
        if self.oom_killed:
            mib = lambda n: f"{n / (1 << 20):.0f} MiB" if n else "?"  # noqa: E731
            return f"killed: out of memory (limit {mib(self.memory_limit)}, peak {mib(self.memory_peak)})"
        if self.signal:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            text = f"killed by {name}"
        else:
            text = f"exited with code {self.code}"
        if self.pids_refused:
            n = self.pids_refused
            text += f": process limit {self.pids_limit or '?'} reached ({n} fork{'s' if n != 1 else ''} refused)"
        return text


def _proc_start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), to tell a pid from a reused one."""
    try:
        fields = read_small(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


_own_start: tuple[int, int | None] | None = None


def _own_start_time() -> int | None:
    """:func:`_proc_start_time` of this process (read once per process: it never changes)."""
    global _own_start
    pid = os.getpid()
    if _own_start is None or _own_start[0] != pid:   # first call, or a forked child
        _own_start = (pid, _proc_start_time(pid))
    return _own_start[1]


def _alive(pid: int | None, start_time: int | None) -> bool:
    return bool(pid) and start_time is not None and _proc_start_time(pid) == start_time  # type: ignore[arg-type]


class Container:
    """A container on disk; a handle, cheap to make (``Runtime.get``)."""

    def __init__(self, runtime: "Runtime", cid: str) -> None:
        self.runtime = runtime
        self.id = cid
        self.dir = runtime.store.containers_dir / cid
        self._proc: spawn.ContainerProcess | None = None   # set in the process that started it
        self._pinned: dict[str, int] = {}   # folders pinned at start (O_PATH fds)

    # --- state ----------------------------------------------------------------------

    @property
    def state(self) -> dict[str, Any]:
        try:
            return json.loads(read_small(self.dir / "state.json"))
        except FileNotFoundError:
            raise errors.ContainerNotFound(f"no such container: {self.id}") from None
        except ValueError as exc:
            raise errors.ContainerError(f"container {self.id}: state.json is unreadable: {exc}") from None

    def _update(self, **changes: Any) -> dict[str, Any]:
        with self._lock():
            st = self.state
            st.update(changes)
            atomic_write(self.dir / "state.json", json.dumps(st, separators=(",", ":")).encode(), durable=False)
            return st

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with file_lock(self.dir / "lock"):
            yield

    @property
    def name(self) -> str:
        return self.state["name"]

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def pid(self) -> int | None:
        """Host pid of the container's init while it runs."""
        st = self.state
        return st.get("pid") if _alive(st.get("pid"), st.get("pid_start")) else None

    def status(self, st: dict[str, Any] | None = None) -> Status:
        """``st``: the state just read, if the caller has it (saves reading it again)."""
        st = st if st is not None else self.state
        if st["status"] == "running" and not _alive(st.get("pid"), st.get("pid_start")):
            if self._proc is not None:      # we are its parent: reap and record properly
                self.wait()
                return self.state["status"]
            self._record_exit(None, st)     # its init left the status in the exit file
            return "exited"
        if st["status"] == "creating":
            return "dead" if not _alive(st.get("creator_pid"), st.get("creator_start")) else "created"
        return st["status"]

    @property
    def cgroup_name(self) -> str:
        """``<store tag>-<id>``: tells this store's cgroups from other stores' on one machine."""
        return f"{self.runtime.store_tag}-{self.id}"

    def exit_info(self) -> ExitInfo | None:
        e = self.state.get("exit")
        return ExitInfo(**e) if e else None

    def cgroups(self, st: dict[str, Any] | None = None) -> Cgroups | None:
        paths = (st if st is not None else self.state).get("cgroup")
        if not paths:
            return None
        try:
            return Cgroups.open(self.cgroup_name, paths={k: Path(v) for k, v in paths.items()})
        except errors.CgroupError:
            return None

    def image(self, st: dict[str, Any] | None = None) -> ImageRecord:
        """The image the container was made from (pinned, so present even if untagged since)."""
        st = st if st is not None else self.state
        return self.runtime.store.record(st["image_name"], st["image_digest"])

    # --- start ----------------------------------------------------------------------

    def start(self, *, stdio: tuple[int, int, int] | None = None, pin: Sequence[str] = (),
              prepare: Callable[[Mapping[str, int]], None] | None = None) -> int:
        """Start the main process; returns its host pid once exec succeeded.

        ``pin``: container paths of folders (mount points of this container's
        own, such as a :class:`~rootfs.Tmpfs`) to open for the host once every
        mount is made and before the container runs anything of its own, so
        the container cannot have swapped them; :meth:`pinned` hands out the
        held ``O_PATH`` fds until :meth:`close`. ``prepare(pinned)`` runs then
        too, before the container's first instruction: files the host puts
        into a pinned folder of a fresh tmpfs cannot have been raced.

        ``stdio``: fds for stdin/stdout/stderr (default: ``/dev/null`` in,
        the container's log file out; ignored for a ``tty`` container, whose
        own pty's master is then :attr:`pty_master`). The calling process
        becomes the container init's parent and should call :meth:`wait`
        eventually.
        """
        st = self.state
        status = self.status(st)
        if status not in ("created", "exited"):
            raise errors.ContainerError(f"container {st['name']} is {status}: it cannot be started")
        # what the state says again if this start fails here: a fresh container
        # stays its creator's ("creating"), a restart in place is "created"
        before = "creating" if st["status"] == "creating" else "created"
        # rootless without delegated cgroups: none (create() checked no limit was asked for)
        cg_root = self.runtime.cgroups_here() if st.get("cgroups", True) else None
        # recorded before they exist (crash rule): a process killed after the
        # mkdir leaves only folders the record names, for rm -f and gc
        planned = self.runtime._planned_cgroups(self.id) if cg_root else None
        starter = {"starter_pid": os.getpid(), "starter_start": _own_start_time()}
        if status == "exited":
            # a restart in place: same writable layer, fresh process and cgroup
            self.close()
            st = self._update(status="created", exit=None, pid=None, pid_start=None, cgroup=planned, **starter)
        elif st.get("cgroup") != planned or any(st.get(k) != v for k, v in starter.items()):
            st = self._update(cgroup=planned, **starter)   # else create() in this process recorded it
        proc: spawn.ContainerProcess | None = None
        cg: Cgroups | None = None
        attached = False
        pinned: dict[str, int] = {}
        try:
            _fault("start:recorded")
            image = self.image(st)
            lowers = self.runtime.store.ensure_unpacked(image)
            process = spawn.ProcessSpec(**st["process"], rlimits={k: tuple(v) for k, v in st["rlimits"].items()})
            plan_args: dict[str, Any] = {
                "rootfs_layers": lowers, "upper": self.upper, "work": self.dir / "work",
                "target": self.dir / "rootfs",
                "binds": [rootfs.Bind(Path(b["source"]), b["target"], b["readonly"], idmap=b.get("idmap", False))
                          for b in st["binds"]],
                "tmpfs": [rootfs.Tmpfs(**t) for t in st.get("tmpfs") or ()],
                "etc_files": _etc_files(st),
                "readonly_rootfs": st.get("readonly_rootfs", False),
            }
            userns = idmap.IdMapping.from_json(st["userns"]) if st.get("userns") else None
            rootless = bool(st.get("rootless"))
            if rootless:
                plan_args["overlay_options"] = (("userxattr", None),)   # trusted.* xattrs need host root
            if userns is not None and userns.host_gid(5) is None:
                plan_args["tty_gid"] = None
            if userns is not None and st["network"] == "host":
                plan_args["bind_sysfs"] = True   # sysfs needs a network namespace of the user namespace's
            with contextlib.ExitStack() as stack:
                if stdio is None:
                    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                    stack.callback(os.close, null)
                    out = os.open(self.dir / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                    stack.callback(os.close, out)
                    stdio = (null, out, out)
                seccomp_filter = seccomp.filter_for(st.get("seccomp", "default"),
                                                    capabilities=process.capabilities, name=st["name"])
                # truncated now: what is in it afterwards is this run's end
                exit_fd = os.open(self.dir / "exit", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                stack.callback(os.close, exit_fd)
                limits = Limits(**st["limits"])
                slirp_r = hold_w = None
                if rootless and st["network"] == "bridge":
                    # the container's init holds the write end: slirp4netns ends with it
                    slirp_r, hold_w = os.pipe2(os.O_CLOEXEC)
                    stack.callback(os.close, slirp_r)
                    stack.callback(lambda: hold_w is not None and os.close(hold_w))
                cg = Cgroups.create(self.cgroup_name, limits, root=cg_root) if cg_root is not None else None
                _fault("start:cgroup")
                # the plan includes the container's own cgroups at /sys/fs/cgroup: known only now
                cfg = spawn.SpawnConfig(
                    mounts=tuple(rootfs.plan(**plan_args, cgroupfs=_cgroup_fs(cg) if cg else None)),
                    process=process, stdio=stdio, exit_fd=exit_fd, userns=userns, rootless=rootless,
                    seccomp_filter=seccomp_filter, hold_fd=hold_w,
                    # the child enters them itself (v1) or is cloned into it (v2)
                    **(cg.spawn_args() if cg is not None else {}),
                    # bridge: an own namespace like "none"; eth0 (tap0 rootless) comes before release
                    network="host" if st["network"] == "host" else "none")
                proc = spawn.spawn(cfg)
                if hold_w is not None:
                    os.close(hold_w)   # the child has its own copy
                    hold_w = None
                _fault("start:spawned")
                # read while the child waits: once released, it may end (a zombie has none)
                pid_start = _proc_start_time(proc.pid)
                if cg is None:
                    # nothing else finds a released init then: its pid before the release
                    self._update(pid=proc.pid, pid_start=pid_start)
                net = None
                if slirp_r is not None:
                    helper = slirp.start(proc.pid, exit_fd=slirp_r, userns_fd=proc.ns_fds["user"],
                                         netns_fd=proc.ns_fds["net"], log_path=self.dir / "slirp.log")
                    for fd in proc.ns_fds.values():   # slirp4netns has joined them
                        os.close(fd)
                    proc.ns_fds.clear()
                    net = {"address": slirp.ADDRESS, "gateway": slirp.GATEWAY, "helper": "slirp4netns",
                           "helper_pid": helper.pid}
                elif st["network"] == "bridge":
                    attached = True
                    net = netmod.attach(self.runtime.network_settings, container_id=self.id, pid=proc.pid,
                                        publish=[netmod.parse_publish(p) for p in st.get("publish", ())]).to_json()
                _fault("start:network")
                if pin:
                    # the child mounts while we record it: pin once it has pivoted into its root
                    _await_pivot(proc)
                    pinned = _pin_paths(proc.pid, pin)
                    if prepare is not None:
                        prepare(pinned)
                    _fault("start:pinned")
                proc.release()
                _fault("start:released")
                # "running" only now: a starter killed before this line leaves a container
                # that is garbage (its unreleased init ended with the starter; a released one
                # dies with its cgroup or through its recorded pid)
                self._update(status="running", pid=proc.pid, pid_start=pid_start,
                             started=now_rfc3339(), cgroup={k: str(v) for k, v in cg.paths.items()} if cg else None,
                             net=net)
                _fault("start:running")
        except BaseException as exc:
            early = proc.early_failure() if proc is not None and isinstance(exc, errors.ContainError) else None
            for fd in pinned.values():
                os.close(fd)
            if proc is not None:
                proc.abort()
                proc.close()
            if cg is not None:
                cg.destroy()
            if attached:
                with contextlib.suppress(errors.ContainError):
                    netmod.detach(self.runtime.network_settings, container_id=self.id)
            self._update(status=before, pid=None, pid_start=None, cgroup=None, net=None,
                         starter_pid=None, starter_start=None)
            if early is not None:
                raise early from exc
            raise
        self._proc = proc
        self._pinned = pinned
        log.info("started container %s (pid %d)", st["name"], proc.pid)
        return proc.pid

    # --- running ----------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> ExitInfo | None:
        """Wait for the main process to end; record and return how it ended.

        In the process that started the container this reaps the init and
        knows the exit code; elsewhere it polls until the init is gone.
        Returns None if ``timeout`` expires first.
        """
        st = self.state
        code: int | None = None
        if self._proc is not None:
            # reap first, even if another process already recorded the exit
            code = self._proc.wait(timeout)
            if code is None:
                return None
            self._proc.close()
            st = self.state
        if st.get("exit"):
            return ExitInfo(**st["exit"])
        if st["status"] in ("created", "creating"):
            raise errors.ContainerError(f"container {st['name']} was not started")
        if self._proc is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while _alive(st.get("pid"), st.get("pid_start")):
                if deadline is not None and time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
            code = None
        # not our child: read the state again, another process may have recorded the end meanwhile
        return self._record_exit(code, st if self._proc is not None else None)

    def _record_exit(self, code: int | None, st: dict[str, Any] | None = None) -> ExitInfo:
        """Record how the main process ended.

        ``code``: the init's exit code as its parent saw it (128+N: killed by
        signal N); None when this process is not its parent. ``st``: the
        state as just read by the caller.
        """
        st = st if st is not None else self.state
        if st.get("exit"):       # another process was first
            return ExitInfo(**st["exit"])
        # the init's own word first: it tells the payload's exit code from its
        # death by a signal, which its own exit code (128+N either way) cannot
        reported = _read_exit_file(self.dir / "exit")
        cg = self.cgroups(st)
        oom = limit = peak = pids_limit = None
        refused = 0
        if cg is not None:
            try:
                oom, limit, peak = cg.memory_outcome()
                pids_limit, refused = cg.pids_outcome()
            except errors.CgroupError:
                pass
        sig: int | None
        if reported is not None:
            code, sig = reported
        elif code is not None:
            # the init ended without writing its word: killed, and its parent (we) saw the signal
            sig = code - 128 if code > 128 else None
        else:
            # not our child, and the init ended without a word. It blocks every
            # signal and is PID 1 of its own pid namespace: only SIGKILL (an
            # admin, the OOM killer, `kill -9`) ends it so; the wait status that
            # would say it went to whoever reaped it
            code, sig = 128 + signal.SIGKILL, signal.SIGKILL
        info = ExitInfo(code=code, signal=sig, oom_killed=bool(oom) and sig == signal.SIGKILL,
                        memory_limit=limit, memory_peak=peak, finished=now_rfc3339(),
                        pids_limit=pids_limit, pids_refused=refused)
        if cg is not None:
            # kills whatever the payload left behind, then removes the folders
            # (another process recording the same exit may be at it too)
            with contextlib.suppress(errors.CgroupError):
                cg.destroy()
        self._update(status="exited", exit=asdict(info), cgroup=None, pid=None)
        if st.get("network") == "bridge" and not st.get("rootless"):
            # in a thread: deleting the veth and rules waits for RCU (tens of ms)
            netmod.detach(self.runtime.network_settings, container_id=self.id, background=True)
        log.info("container %s %s", self.id[:12], info.describe())
        return info

    @property
    def pty_master(self) -> int | None:
        """With ``tty``, in the process that started the container: its pty's master.

        Owned by this handle (closed when the container is waited for or the
        handle closed); the caller copies between it and its own terminal.
        """
        return self._proc.pty_master if self._proc is not None else None

    @property
    def attached(self) -> bool:
        """True in the process that started the container and can reap its init."""
        return self._proc is not None

    def poll(self) -> int | None:
        """Exit code of the init if this handle started it and it ended; None while it runs."""
        if self._proc is None:
            return None if self.status() == "running" else (self.exit_info() or ExitInfo(255)).code
        return self._proc.poll()

    def process_host_ids(self, st: dict[str, Any] | None = None) -> tuple[int, int]:
        """The host uid and gid the main process runs as (through the user namespace, if any)."""
        st = st or self.state
        uid, gid = st["process"]["uid"], st["process"]["gid"]
        if st.get("userns"):
            m = idmap.IdMapping.from_json(st["userns"])
            hu, hg = m.host_uid(uid), m.host_gid(gid)
            if hu is None or hg is None:
                raise errors.ContainerError(f"container {st['name']}: user {uid}:{gid} is not mapped")
            return hu, hg
        return uid, gid

    def pin(self, path: str) -> int:
        """An ``O_PATH`` fd of the running container's folder ``path`` (the caller's to close).

        For a container this handle did not start (a server reconnecting to a
        running kernel): resolved in the root of the container's init with
        symlinks kept inside it and no ``/proc`` magic links, so whatever the
        container did, the fd is of something inside the container.
        """
        pid = self.pid
        if pid is None or self.status() != "running":
            raise errors.ContainerError(f"container {self.name} is not running")
        return _pin_paths(pid, [path])[path]

    def pinned(self, path: str) -> int:
        """The ``O_PATH`` fd of a folder :meth:`start` pinned (borrowed: valid until :meth:`close`)."""
        try:
            return self._pinned[path]
        except KeyError:
            raise errors.ContainerError(f"container {self.name}: {path} was not pinned at start") from None

    def close(self) -> None:
        """Drop this handle's process (reaping it if it ended); the container itself stays."""
        for fd in self._pinned.values():
            os.close(fd)
        self._pinned = {}
        if self._proc is not None:
            self._proc.poll()
            self._proc.close()
            self._proc = None

    def signal(self, sig: int) -> None:
        pid = self.pid
        if pid is None:
            raise errors.ContainerError(f"container {self.name} is not running")
        if self._proc is not None:
            self._proc.send_signal(sig)
            return
        fd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)

    def stop(self, *, timeout: float = 10.0) -> ExitInfo | None:
        """SIGTERM, then SIGKILL of everything in the container after ``timeout``."""
        if self.status() != "running":
            return self.exit_info()
        with contextlib.suppress(errors.ContainerError):
            self.signal(signal.SIGTERM)
        info = self.wait(timeout)
        if info is None:
            self.kill()
            info = self.wait(10)
        return info

    def kill(self) -> None:
        """SIGKILL every process of the container (through its cgroup, and its init)."""
        cg = self.cgroups()
        if cg is not None:
            cg.kill_all()
        with contextlib.suppress(errors.ContainerError):
            self.signal(signal.SIGKILL)
        # init died with the rest and could not write the exit file: say what
        # happened (only if it is empty: init may have written first)
        with contextlib.suppress(OSError):
            fd = os.open(self.dir / "exit", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_size == 0:
                    os.write(fd, b"signal %d\n" % signal.SIGKILL)
            finally:
                os.close(fd)

    def stats(self) -> dict[str, Any]:
        cg = self.cgroups()
        if cg is None:
            if self.status() == "running" and not self.state.get("cgroups", True):
                # rootless without delegated cgroups: nothing is counted
                return asdict(Stats(None, None, None, None, None, None, None))
            raise errors.ContainerError(f"container {self.name} is not running")
        return asdict(cg.stats())

    def exec(self, argv: Sequence[str], *, stdio: tuple[int, int, int], env: Mapping[str, str] | None = None,
             workdir: str | None = None, user: str | None = None, tty: bool = False) -> spawn.ContainerProcess:
        """Run ``argv`` inside the running container (same namespaces and cgroup)."""
        st = self.state
        pid = self.pid
        if pid is None:
            raise errors.ContainerError(f"container {st['name']} is not running")
        proc_cfg = dict(st["process"])
        base_env = dict(proc_cfg["env"])
        base_env.update(env or {})
        uid, gid, groups = (proc_cfg["uid"], proc_cfg["gid"], proc_cfg["additional_gids"])
        if user:
            uid, gid, groups = resolve_user(user, self._etc_lookup_dirs())
        process = spawn.ProcessSpec(argv=tuple(argv), env=base_env, cwd=workdir or proc_cfg["cwd"],
                                    uid=uid, gid=gid, additional_gids=tuple(groups), tty=tty)
        ns = frozenset(spawn.NAMESPACES - ({"network"} if st["network"] == "host" else set()))
        if st.get("userns"):
            ns |= {"user"}
        cg = self.cgroups()
        proc = spawn.join(pid, process=process, stdio=stdio, namespaces=ns,
                          seccomp_filter=seccomp.filter_for(st.get("seccomp", "default"),
                                                            capabilities=process.capabilities, name=st["name"]),
                          **(cg.spawn_args() if cg is not None else {}))
        try:
            proc.release()
        except BaseException:
            proc.abort()
            proc.close()
            raise
        return proc

    def _etc_lookup_dirs(self) -> list[Path]:
        layers = self.runtime.store.layer_dirs(self.image())
        return [self.upper, *layers]

    def reset(self) -> None:
        """Throw the writable layer away: the next start sees the image as it is."""
        if self.status() == "running":
            raise errors.ContainerError(f"container {self.name} is running: stop it before a reset")
        with self._lock():
            for sub in ("upper", "work"):
                self._remove_tree(self.dir / sub)
                (self.dir / sub).mkdir(mode=0o755 if sub == "upper" else 0o700)
        log.info("reset container %s to its image", self.id[:12])

    # --- removal -----------------------------------------------------------------------

    def _remove_tree(self, path: Path, st: dict[str, Any] | None = None) -> None:
        """remove_tree, and for a rootless container what only its root may remove.

        Its writable layer can hold files of the container's other users
        (subordinate ids) in folders this user may not write: those go
        through ``rm`` run as root of the container's own mapping (the
        store's fallback, given the mapping the container was made with).
        """
        if st is None:
            try:
                st = self.state     # before remove_tree, which may remove state.json first
            except errors.ContainError:
                st = {}
        ids = idmap.IdMapping.from_json(st["userns"]) if st.get("rootless") and st.get("userns") else None
        rootless_store.remove_tree(path, ids=ids)

    def remove(self, *, force: bool = False) -> None:
        """Remove the container (``force``: kill it first if it runs)."""
        st = self.state
        status = self.status(st)
        if status == "running":
            if not force:
                raise errors.ContainerError(f"container {st['name']} is running: stop it first or use --force")
            self.kill()
            self.wait(10)
            st = self.state
        elif status != st["status"]:
            st = self.state     # status() recorded the exit
        self._undo_start(st)
        self.runtime.store.unpin(self.id)
        if st.get("userns") and not st.get("rootless"):
            self.runtime.userns_allocator().release(self.id, idmap.IdMapping.from_json(st["userns"]))
        self._remove_tree(self.dir, st)
        self.close()
        self.runtime._handles.pop(self.id, None)
        log.info("removed container %s", self.id[:12])

    def _undo_start(self, st: dict[str, Any]) -> None:
        """Remove what a start made that the state ``st`` names: a left init, cgroups, the bridge's veth.

        For :meth:`remove`, and for gc where a start died midway. An init the
        record names that still runs without being ``running`` (its starter
        died between the release and the record) is killed through a pidfd,
        checked against its start time after the open, so a reused pid is safe.
        """
        pid = st.get("pid")
        if pid and st.get("status") != "running" and _alive(pid, st.get("pid_start")):
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(pid)
                try:
                    if _alive(pid, st.get("pid_start")):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                finally:
                    os.close(fd)
        cg = self.cgroups(st)
        if cg is not None:
            cg.destroy()
        if st.get("network") == "bridge" and not st.get("rootless"):
            netmod.detach(self.runtime.network_settings, container_id=self.id)

    def info(self) -> dict[str, Any]:
        status = self.status()   # first: it may record the exit
        st = self.state
        exit_ = st.get("exit")
        return {
            "id": self.id, "name": st["name"], "image": st["image_name"], "status": status,
            "created": st["created"], "command": st["process"]["argv"], "pid": self.pid,
            "exit": exit_, "reason": ExitInfo(**exit_).describe() if exit_ else None,
            "labels": st.get("labels", {}), "limits": st["limits"], "network": st["network"],
            "address": (st.get("net") or {}).get("address") if status == "running" else None,
            "publish": st.get("publish", []), "userns": st.get("userns"),
        }


class Runtime:
    """The container half of the runtime over one store."""

    def __init__(self, store: Store | None = None, *, cgroup_root: CgroupRoot | None = None,
                 network: netmod.Settings | None = None) -> None:
        self.store = store or Store()
        self.cgroup_root = cgroup_root
        self._detected: tuple[bytes, CgroupRoot] | None = None
        self.store_tag = hashlib.sha256(os.fsencode(self.store.root.resolve())).hexdigest()[:8]
        #: the bridge network (``JUPYTER_CONTAIN_BRIDGE``/``_SUBNET``/``_HOST_NETNS`` by default); its
        #: lease table is the machine's, shared with other stores on the same bridge (made when first used)
        self.network_settings = network or netmod.Settings.from_env(owner=self.store_tag)
        # one handle per container in this process, so the one that started a
        # container (and can reap it) is the one every lookup returns
        self._handles: dict[str, Container] = {}

    @property
    def rootless(self) -> bool:
        """True when this process is not root: containers get a user namespace of its own ids."""
        return os.geteuid() != 0

    def _rootless_limits(self, limits: Limits) -> tuple[Limits, bool]:
        """``(limits, use cgroups)`` for a rootless container.

        Without cgroups delegated to this user (cgroup v1, or a v2 tree
        without ``Delegate=yes``) there are no quotas: a limit the caller
        asked for is refused; the default process limit is dropped with a
        warning, once per process.
        """
        reason = self.cgroups_here().unusable_reason()
        if reason is None:
            return limits, True
        asked = [n for n, v in (("memory", limits.memory), ("cpus", limits.cpus)) if v is not None]
        if limits.pids is not None and limits.pids != DEFAULT_PIDS_LIMIT:
            asked.append("pids")
        if asked:
            raise errors.InvalidSpec(f"cannot limit {', '.join(asked)} of a rootless container: {reason}")
        global _warned_no_cgroups
        if not _warned_no_cgroups:
            _warned_no_cgroups = True
            log.warning("rootless containers run without memory, CPU and process quotas: %s", reason)
        return replace(limits, pids=None), False

    def cgroups_here(self) -> CgroupRoot:
        """Where this process's container cgroups go (``cgroup_root``, else detected).

        Detection parses mountinfo (half a millisecond); it is redone only
        when this process's own cgroups (``/proc/self/cgroup``) changed.
        """
        if self.cgroup_root is not None:
            return self.cgroup_root
        key = Path("/proc/self/cgroup").read_bytes()
        cached = self._detected
        if cached is None or cached[0] != key:
            cached = self._detected = (key, detect_cgroups())
        return cached[1]

    def userns_unavailable_reason(self) -> str | None:
        """Why ``userns="auto"`` cannot work here (no subordinate ids), with the fix; None if it can."""
        try:
            idmap.subordinate_ranges()
        except errors.ContainError as exc:
            return str(exc)
        return None

    def userns_allocator(self) -> idmap.Allocator:
        """Subordinate id slices of this store's containers (reservations in ``<store>/userns``)."""
        return idmap.Allocator(self.store.root / "userns")

    def _handle(self, cid: str) -> Container:
        c = self._handles.get(cid)
        if c is None:
            c = self._handles[cid] = Container(self, cid)
        return c

    # --- lookup ---------------------------------------------------------------------

    def containers(self) -> list[Container]:
        out = []
        for d in sorted(self.store.containers_dir.iterdir()):
            if (d / "state.json").is_file():
                out.append(self._handle(d.name))
        return out

    def get(self, ref: str) -> Container:
        """By name, full id, or unique id prefix."""
        if (self.store.containers_dir / ref / "state.json").is_file():
            return self._handle(ref)
        by_name = [c for c in self.containers() if c.state.get("name") == ref]
        if by_name:
            return by_name[0]
        if len(ref) >= 3:
            hits = [c for c in self.containers() if c.id.startswith(ref)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise errors.ContainerNotFound(f"container id prefix {ref!r} is ambiguous")
        raise errors.ContainerNotFound(f"no such container: {ref}")

    # --- create ---------------------------------------------------------------------

    def create(self, spec: ContainerSpec, *, image: ImageRecord | None = None) -> Container:
        """Make a container (directories, config, pinned image) without starting it."""
        image = image or self.store.resolve(spec.image)
        cid = secrets.token_hex(32)
        name = spec.name or f"jc-{cid[:12]}"
        if spec.name and any(c.state.get("name") == name for c in self.containers()):
            raise errors.InvalidSpec(f"a container named {name!r} already exists")
        cfg = image.config
        argv = tuple(spec.entrypoint if spec.entrypoint is not None else cfg.entrypoint) + tuple(
            spec.command if spec.command is not None else (cfg.cmd if spec.entrypoint is None else ()))
        if not argv:
            raise errors.InvalidSpec(f"no command given and image {image.familiar} has no Cmd or Entrypoint")
        env = _env_dict(cfg.env)
        env.update(spec.env)
        env.setdefault("PATH", spawn.DEFAULT_PATH)
        hostname = spec.hostname or cid[:12]
        env.setdefault("HOSTNAME", hostname)
        lowers_needed = self.store.ensure_unpacked(image)  # before any directory exists: may fail cleanly
        uid, gid, groups = resolve_user(spec.user if spec.user is not None else cfg.user, lowers_needed)
        env.setdefault("HOME", _home_of(uid, lowers_needed))
        self.store.pin(cid, image)
        d = self.store.containers_dir / cid
        userns: idmap.IdMapping | None = None
        limits = spec.limits
        use_cgroups = True
        try:
            if self.rootless and spec.network == "bridge":
                # egress through slirp4netns: the veth pair and NAT rules of the bridge need root
                reason = slirp.unavailable_reason()
                if reason:
                    raise errors.InvalidSpec(f"no egress for a rootless container: {reason}. "
                                             "Use --network none (the default) or host")
                if spec.publish:
                    raise errors.InvalidSpec("publishing ports (-p) is not supported for rootless containers")
            if self.rootless:
                # an unprivileged caller gets nothing done without a user namespace
                userns = idmap.rootless_mapping()
                if userns.host_uid(uid) is None or any(userns.host_gid(g) is None for g in (gid, *groups)):
                    known = userns.uid_map[-1][0] + userns.uid_map[-1][2] - 1
                    raise errors.InvalidSpec(
                        f"user {uid}:{gid} does not exist in a rootless container of uid {os.geteuid()}: "
                        f"only ids 0-{known} do" + ("" if known else
                                                    " (give this user subordinate ids: usermod --add-subuids "
                                                    "--add-subgids, as root)"))
                limits, use_cgroups = self._rootless_limits(spec.limits)
            elif spec.userns == "auto":
                userns = self.userns_allocator().allocate(
                    cid, alive=lambda owner: (self.store.containers_dir / owner).exists())
                if userns.host_uid(uid) is None or any(userns.host_gid(g) is None for g in (gid, *groups)):
                    raise errors.InvalidSpec(f"user {uid}:{gid} is outside the container's user namespace "
                                             f"(ids 0-{idmap.RANGE_SIZE - 1})")
            process = {
                "argv": list(argv), "env": env, "cwd": spec.workdir or cfg.working_dir, "uid": uid, "gid": gid,
                "additional_gids": list(groups), "hostname": hostname, "tty": spec.tty,
            }
            spawn.ProcessSpec(**process)  # validate now, not at start
            state = {
                # "creating" until its first start released the payload: till then the
                # container is its creator's, and garbage once the creator is gone
                "id": cid, "name": name, "status": "creating", "created": now_rfc3339(),
                "image_name": image.name, "image_digest": image.digest,
                "process": process, "rlimits": {k: list(v) for k, v in spec.rlimits.items()},
                "binds": [{"source": str(b.source), "target": b.target, "readonly": b.readonly, "idmap": b.idmap}
                          for b in spec.binds],
                "tmpfs": [asdict(t) for t in spec.tmpfs],
                "limits": asdict(limits), "cgroups": use_cgroups, "rootless": self.rootless,
                "network": spec.network, "labels": dict(spec.labels),
                "publish": list(spec.publish),
                "readonly_rootfs": spec.readonly_rootfs,
                "seccomp": spec.seccomp,
                "owner_pid": spec.owner_pid,
                "userns": userns.to_json() if userns is not None else None,
                "owner_start": _proc_start_time(spec.owner_pid) if spec.owner_pid else None,
                "creator_pid": os.getpid(), "creator_start": _own_start_time(),
                # what a start by this process will make, recorded now (crash rule): a
                # start in the creating process then has nothing to write before it begins
                "cgroup": self._planned_cgroups(cid) if use_cgroups else None,
                "starter_pid": os.getpid(), "starter_start": _own_start_time(),
            }
            if spec.binds or spec.tmpfs:   # the plan validates them (targets, clashes) now rather than at start
                rootfs.plan(rootfs_layers=lowers_needed, upper=d / "upper", work=d / "work", target=d / "rootfs",
                            binds=spec.binds, tmpfs=spec.tmpfs, etc_files=dict.fromkeys(_ETC_FILES, ""))
            # the state first (crash rule): a folder with it is found by gc, one without it
            # only after a minute (it may be another process's create, a moment before this line)
            # with a user namespace the writable layer keeps container ids on disk
            # (idmapped): a setuid-root file made inside must stay out of host users' reach
            d.mkdir(parents=True, mode=0o700 if userns is not None else 0o777)
            atomic_write(d / "state.json", json.dumps(state, separators=(",", ":")).encode(), durable=False)
            _fault("create:state")
            for sub in ("upper", "work", "rootfs"):
                (d / sub).mkdir(mode=0o755 if sub != "work" else 0o700)
            atomic_write(d / "config.json", json.dumps(oci_config(state, image)).encode(),
                         durable=False)
            _fault("create:done")
        except BaseException:
            remove_tree(d)
            self.store.unpin(cid)
            if userns is not None and not self.rootless:
                self.userns_allocator().release(cid, userns)
            raise
        log.info("created container %s from %s", name, image.familiar)
        return self._handle(cid)

    def _planned_cgroups(self, cid: str) -> dict[str, str]:
        """The cgroup folders a start in this process will make for container ``cid``."""
        return {k: str(v) for k, v in self.cgroups_here().paths_for(f"{self.store_tag}-{cid}").items()}

    def run(self, spec: ContainerSpec, *, stdio: tuple[int, int, int] | None = None,
            remove: bool = False) -> ExitInfo:
        """create + start + wait (+ remove): the library form of ``jupyter contain run``."""
        c = self.create(spec)
        try:
            c.start(stdio=stdio)
            info = c.wait()
            assert info is not None
            return info
        finally:
            if remove:
                c.remove(force=True)

    # --- gc ----------------------------------------------------------------------------

    def gc(self, *, sweep_unknown_network: bool = True) -> list[str]:
        """Clean what dead processes left: containers whose owner died, half-made ones, stray cgroups.

        Exited containers without an owner stay (``ps -a`` shows them, ``rm``
        removes them), but their cgroups go. Stray cgroups are swept only when
        their name carries this store's tag, so a store that is not the only one
        on the machine never destroys another store's live containers.
        Network leases are freed only for this store's dead containers (the
        bridge's lease table is shared by every store that uses it);
        ``sweep_unknown_network=False`` also leaves veths and rules that no
        lease names alone (a crash between them and the lease).
        """
        removed = []
        known = set()
        for c in self.containers():
            known.add(c.id)
            try:
                st = c.state
                status = c.status(st)
                owner_gone = st.get("owner_pid") and not _alive(st["owner_pid"], st.get("owner_start"))
                if status == "dead" or owner_gone:
                    why = (f"its creator (pid {st.get('creator_pid')}) died before it ran" if status == "dead"
                           else f"its owner (pid {st['owner_pid']}) is gone")
                    c.remove(force=True)
                    removed.append(c.id)
                    log.info("gc: removed container %s (%s): %s", st["name"], c.id[:12], why)
                elif (st["status"] in ("creating", "created") and (st.get("cgroup") or st.get("pid"))
                      and not _alive(st.get("starter_pid"), st.get("starter_start"))):
                    # a start (a restart in place, or one by another process than the
                    # creator) died midway: the container stays, what the start made goes
                    c._undo_start(st)
                    c._update(pid=None, pid_start=None, cgroup=None, net=None, starter_pid=None, starter_start=None)
                    removed.append(f"start:{c.id}")
                    log.info("gc: undid the start of container %s (%s): its starter (pid %s) died midway",
                             st["name"], c.id[:12], st.get("starter_pid"))
                elif status == "exited" and not st.get("exit"):
                    c._record_exit(None)
            except errors.ContainerNotFound:
                continue
        # directories without state (a crash between mkdir and state.json)
        for d in self.store.containers_dir.iterdir():
            if d.name not in known and not (d / "state.json").exists():
                age = time.time() - d.lstat().st_mtime
                if age > 60:
                    remove_tree(d)
                    self.store.unpin(d.name)
                    removed.append(d.name)
                    log.info("gc: removed container folder %s without a state (a create died)", d.name[:12])
        live = {c.id for c in self.containers()}
        # only this store's cgroups (their names carry its tag): other stores' containers live on
        mine = {f"{self.store_tag}-{cid}" for cid in live}
        for name in find_orphans(root=self.cgroups_here(), exclude=mine):
            if not name.startswith(f"{self.store_tag}-"):
                continue
            with contextlib.suppress(errors.CgroupError):
                Cgroups.open(name, root=self.cgroups_here()).destroy()
                removed.append(f"cgroup:{name}")
                log.info("gc: removed cgroup %s of no container", name)
        # only stores that used a bridge; a rootless one never does (slirp4netns), and may not even
        # look into the machine's lease folder (root's: PermissionError)
        if not self.rootless and (self.network_settings.state_dir / "leases.json").exists():
            starting_or_running = {c.id for c in self.containers()
                                   if c.state.get("status") in ("creating", "created", "running")}
            removed += netmod.gc(self.network_settings, starting_or_running, sweep_unknown=sweep_unknown_network)
        for owner in self.store.pins():
            if owner not in live and not (self.store.containers_dir / owner).exists():
                self.store.unpin(owner)
        return removed


# --- helpers ----------------------------------------------------------------------------


def _await_pivot(proc: spawn.ContainerProcess, timeout: float = 10.0) -> None:
    """Wait until the (not yet released) child has made every mount and entered its root.

    About a millisecond after the clone (its ~50 mounts); most of it overlaps
    with the caller's own bookkeeping. A child that failed ends instead: the
    caller's release then reports its failure.
    """
    host_root = os.stat("/")
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = os.stat(f"/proc/{proc.pid}/root")
        except OSError:
            st = host_root
        if (st.st_dev, st.st_ino) != (host_root.st_dev, host_root.st_ino):
            return
        if proc.poll() is not None:
            raise errors.ContainerError("the container's first process ended while it set up its filesystem")
        if time.monotonic() > deadline:
            raise errors.ContainerError(f"the container did not set up its filesystem within {timeout:.0f} s")
        time.sleep(0.0002)


def _pin_paths(pid: int, paths: Sequence[str]) -> dict[str, int]:
    """``O_PATH`` fds of container ``paths``, resolved in the root of ``pid`` (not yet released).

    Resolved as the child resolved them to mount there (symlinks of the
    writable layer stay inside the container's root, never ``/proc`` magic
    links), before any process of the container runs: what is found is what
    the runtime mounted.
    """
    if not paths:
        return {}
    out: dict[str, int] = {}
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for p in paths:
            try:
                out[p] = openat2(root, p.lstrip("/"), os.O_PATH | os.O_DIRECTORY,
                                 RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except OSError as exc:
                raise errors.ContainerError(f"container folder {p} could not be pinned: {exc.strerror}") from None
    except BaseException:
        for fd in out.values():
            os.close(fd)
        raise
    finally:
        os.close(root)
    return out


def _read_exit_file(path: Path) -> tuple[int, int | None] | None:
    """(exit code, signal) from an init's exit file: ``code N`` -> (N, None),
    ``signal N`` -> (128+N, N); None if it is empty, absent or garbled."""
    try:
        with open(path, "rb") as f:
            first = f.read(64).split(b"\n", 1)[0].decode("ascii", "replace").split()
    except OSError:
        return None
    if len(first) == 2 and first[1].isdigit() and len(first[1]) <= 3:
        n = int(first[1])
        if first[0] == "code" and n <= 255:
            return n, None
        if first[0] == "signal" and 0 < n < 128:
            return 128 + n, n
    return None


def _cgroup_fs(cg: Cgroups) -> rootfs.CgroupFs | None:
    """What to mount at the container's /sys/fs/cgroup: its own cgroups, read-only.

    v1: each hierarchy the container was put in, with the exact controller
    set ``/proc/self/cgroup`` names (a v1 mount must ask for all of them).
    """
    if cg.version == 2:
        return rootfs.CgroupFs(2)
    used = set(cg.paths)
    hierarchies = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers = tuple(c for c in parts[1].split(",") if c)
        if controllers and not any(c.startswith("name=") for c in controllers) and used & set(controllers):
            hierarchies.append(controllers)
    return rootfs.CgroupFs(1, tuple(hierarchies)) if hierarchies else None


def _env_dict(env: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in env:
        k, sep, v = item.partition("=")
        if k and sep:
            out[k] = v
    return out


def _etc_files(st: Mapping[str, Any]) -> dict[str, str]:
    """The container's ``/etc/hostname``, ``hosts`` and ``resolv.conf``, made afresh at every start.

    Like Docker's, they follow the container's current settings (and the
    host's resolver) rather than what the image ships.
    """
    hostname = st["process"]["hostname"]
    network = st["network"]
    if network == "bridge":
        resolv = slirp.RESOLV_CONF if st.get("rootless") else netmod.resolv_conf()
    else:
        resolv = _resolv_conf(network)
    return {
        "hostname": hostname + "\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n",
        "resolv.conf": resolv,
    }


def _resolv_conf(network: Network) -> str:
    if network == "host":
        try:
            return Path("/etc/resolv.conf").read_text()
        except OSError:
            return ""
    return ""   # network "none": nothing to resolve with


def _read_image_file(dirs: Sequence[Path], rel: str) -> str | None:
    """``rel`` as the merged view shows it (topmost dir first); never follows a symlink to the host."""
    for d in dirs:
        p = d / rel
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            return None
        if stat.S_ISREG(st.st_mode):
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd) as f:
                return f.read(1 << 20)
        return None   # a whiteout, a symlink or anything else: treat as absent
    return None


def _passwd(dirs: Sequence[Path]) -> list[list[str]]:
    text = _read_image_file(dirs, "etc/passwd") or ""
    return [line.split(":") for line in text.splitlines() if line.count(":") >= 6]


def _groups(dirs: Sequence[Path]) -> list[list[str]]:
    text = _read_image_file(dirs, "etc/group") or ""
    return [line.split(":") for line in text.splitlines() if line.count(":") >= 3]


def resolve_user(user: str, dirs: Sequence[Path]) -> tuple[int, int, tuple[int, ...]]:
    """``user`` (``name|uid[:group|gid]``) -> (uid, gid, supplementary gids) from the image's files."""
    if not user:
        return 0, 0, ()
    name, _, group = user.partition(":")
    passwd = _passwd(dirs)
    if name.isdigit():
        uid = int(name)
        row = next((r for r in passwd if r[2] == name), None)
        gid = int(row[3]) if row else uid if not group else 0
        login = row[0] if row else None
    else:
        row = next((r for r in passwd if r[0] == name), None)
        if row is None:
            raise errors.InvalidSpec(f"unable to find user {name}: no matching entries in the image's /etc/passwd")
        uid, gid, login = int(row[2]), int(row[3]), name
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            grow = next((g for g in _groups(dirs) if g[0] == group), None)
            if grow is None:
                raise errors.InvalidSpec(f"unable to find group {group}: no matching entries in the image's "
                                         "/etc/group")
            gid = int(grow[2])
    extra: tuple[int, ...] = ()
    if login:
        extra = tuple(sorted({int(g[2]) for g in _groups(dirs)
                              if login in g[3].split(",") and g[2].isdigit() and int(g[2]) != gid}))
    return uid, gid, extra


def _home_of(uid: int, dirs: Sequence[Path]) -> str:
    row = next((r for r in _passwd(dirs) if r[2] == str(uid)), None)
    return row[5] if row and row[5] else ("/root" if uid == 0 else "/")


def oci_config(state: Mapping[str, Any], image: ImageRecord) -> dict[str, Any]:
    """The container as an OCI runtime-spec ``config.json`` (runc/crun can run the bundle)."""
    proc = state["process"]
    limits = state["limits"]
    resources: dict[str, Any] = {}
    if limits.get("memory"):
        resources["memory"] = {"limit": limits["memory"], "swap": limits["memory"]}
    if limits.get("cpus"):
        resources["cpu"] = {"quota": int(limits["cpus"] * 100000), "period": 100000}
    if limits.get("pids"):
        resources["pids"] = {"limit": limits["pids"]}
    caps = sorted(spawn.DEFAULT_CAPABILITIES)
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    if state["network"] != "host":
        namespaces.append({"type": "network"})
    userns = idmap.IdMapping.from_json(state["userns"]) if state.get("userns") else None
    if userns is not None:
        namespaces.append({"type": "user"})
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    for b in state["binds"]:
        mounts.append({"destination": b["target"], "type": "bind", "source": b["source"],
                       "options": ["rbind", "ro" if b["readonly"] else "rw", *sorted(rootfs.HOST_FOLDER_ATTRS)]})
    for t in state.get("tmpfs") or ():
        mounts.append({"destination": t["target"], "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "noexec", f"mode={t['mode']:o}", f"size={t['size'] // 1024}k",
                                   f"nr_inodes={t['nr_inodes']}"]})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": bool(proc.get("tty")),
            "user": {"uid": proc["uid"], "gid": proc["gid"], "additionalGids": proc["additional_gids"]},
            "args": proc["argv"],
            "env": [f"{k}={v}" for k, v in proc["env"].items()],
            "cwd": proc["cwd"],
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": bool(state.get("readonly_rootfs"))},
        "hostname": proc["hostname"],
        "mounts": mounts,
        "annotations": {"org.opencontainers.image.ref.name": image.name,
                        "org.opencontainers.image.digest": image.digest},
        "linux": {
            "namespaces": namespaces,
            "resources": resources,
            "maskedPaths": list(rootfs.MASKED_PATHS),
            "seccomp": seccomp.oci_section(state.get("seccomp", "default"), capabilities=caps),
            "readonlyPaths": list(rootfs.READONLY_PATHS),
            **(userns.oci() if userns is not None else {}),
        },
    }

