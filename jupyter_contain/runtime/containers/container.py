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
of the caller's ids (``userns.rootless_mapping``), a ``userxattr`` overlay,
no cgroups where none are delegated (a limit asked for is refused), and
``slirp4netns`` for the bridge mode; what only the container's root may
remove goes through ``userns.run_in_userns``. Whether this process is
rootless is decided once, by the store (``Store.rootless``).
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ... import errors
from ..fsutil import (
    RESOLVE_IN_ROOT,
    RESOLVE_NO_MAGICLINKS,
    atomic_write,
    file_lock,
    openat2,
    read_small,
    remove_tree,
)
from ..images import rootless as rootless_store
from ..images.store import ImageRecord, Store, now_rfc3339
from ..userns import IdMapping, rootless_mapping
from . import idmap, rootfs, seccomp, slirp, spawn
from . import network as netmod
from .cgroups import DEFAULT_PIDS_LIMIT, CgroupRoot, Cgroups, Limits, Stats, default_memory_limit, find_orphans
from .cgroups import detect as detect_cgroups
from .state import ContainerState, ExitInfo, Network, Status

log = logging.getLogger(__name__)

#: the "rootless without quotas" warning is given once per process
_warned_no_cgroups = False


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
    #: Docker's ``--cap-add``/``--cap-drop`` over the default set (``process.capability_set``)
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        seccomp.check_mode(self.seccomp)
        spawn.capability_set(add=self.cap_add, drop=self.cap_drop)   # names checked now
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

    def __init__(self, runtime: Runtime, cid: str) -> None:
        self.runtime = runtime
        self.id = cid
        self.dir = runtime.store.containers_dir / cid
        self._proc: spawn.ContainerProcess | None = None   # set in the process that started it
        self._pinned: dict[str, int] = {}   # folders pinned at start (O_PATH fds)

    # --- state ----------------------------------------------------------------------

    @property
    def state(self) -> ContainerState:
        """The record on disk, read afresh (another process may have changed it)."""
        try:
            data = json.loads(read_small(self.dir / "state.json"))
        except FileNotFoundError:
            raise errors.ContainerNotFound(f"no such container: {self.id}") from None
        except ValueError as exc:
            raise errors.ContainerError(f"container {self.id}: state.json is unreadable: {exc}") from None
        return ContainerState.from_json(data, where=f"container {self.id}: state.json")

    def _update(self, **changes: Any) -> ContainerState:
        """Change fields of the record (read afresh under the lock) and write it whole."""
        with self._lock():
            st = replace(self.state, **changes)
            self._write_state(st)
            return st

    def _write_state(self, st: ContainerState) -> None:
        """Write the record whole (the caller holds the lock)."""
        _write_state_file(self.dir, st)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with file_lock(self.dir / "lock"):
            yield

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def pid(self) -> int | None:
        """Host pid of the container's init while it runs."""
        st = self.state
        return st.pid if _alive(st.pid, st.pid_start) else None

    def refresh_status(self, st: ContainerState | None = None) -> Status:
        """The container's status now, recording an end nobody recorded yet.

        Not a plain getter: a ``running`` container whose init is gone is
        reaped (in the process that started it) and its exit written to the
        state. A ``creating`` container reads as ``dead`` once its creator is
        gone (gc removes it), else ``created``. ``st``: the state just read,
        if the caller has it (saves reading it again).
        """
        st = st if st is not None else self.state
        if st.status == "running" and not _alive(st.pid, st.pid_start):
            if self._proc is not None:      # we are its parent: reap and record properly
                self.wait()
                return self.state.status
            self._record_exit(None, st)     # its init left the status in the exit file
            return "exited"
        if st.status == "creating":
            return "dead" if not _alive(st.creator_pid, st.creator_start) else "created"
        return st.status

    @property
    def cgroup_name(self) -> str:
        """``<store tag>-<id>``: tells this store's cgroups from other stores' on one machine."""
        return f"{self.runtime.store_tag}-{self.id}"

    def exit_info(self) -> ExitInfo | None:
        return self.state.exit

    def cgroups(self, st: ContainerState | None = None) -> Cgroups | None:
        paths = (st if st is not None else self.state).cgroup
        if not paths:
            return None
        try:
            return Cgroups.open(self.cgroup_name, paths={k: Path(v) for k, v in paths.items()})
        except errors.CgroupError:
            return None

    def image(self, st: ContainerState | None = None) -> ImageRecord:
        """The image the container was made from (pinned, so present even if untagged since)."""
        st = st if st is not None else self.state
        return self.runtime.store.record(st.image_name, st.image_digest)

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

        Each step registers its undo on ``undo`` as soon as it has made
        something; a failure at any step unwinds every undo, newest first,
        ending with the state as it was before the start.
        """
        st, before, cg_root = self._record_starter()
        with contextlib.ExitStack() as fds, contextlib.ExitStack() as undo:
            undo.callback(self._update, status=before, pid=None, pid_start=None, cgroup=None, net=None,
                          starter_pid=None, starter_start=None)
            _fault("start:recorded")
            image = self.image(st)
            lowers = self.runtime.store.ensure_unpacked(image)
            plan_args = self._plan_args(st, lowers)
            if stdio is None:
                null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                fds.callback(os.close, null)
                out = os.open(self.dir / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                fds.callback(os.close, out)
                stdio = (null, out, out)
            seccomp_filter = seccomp.filter_for(st.seccomp, capabilities=st.process.capabilities, name=st.name)
            # truncated now: what is in it afterwards is this run's end
            exit_fd = os.open(self.dir / "exit", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            fds.callback(os.close, exit_fd)
            slirp_r: int | None = None
            hold: _Fd | None = None
            if st.rootless and st.network == "bridge":
                # the container's init holds the write end: slirp4netns ends with it
                slirp_r, hold_w = os.pipe2(os.O_CLOEXEC)
                fds.callback(os.close, slirp_r)
                hold = fds.enter_context(contextlib.closing(_Fd(hold_w)))
            cg = Cgroups.create(self.cgroup_name, st.limits, root=cg_root) if cg_root is not None else None
            if cg is not None:
                undo.callback(cg.destroy)
            _fault("start:cgroup")
            # the plan includes the container's own cgroups at /sys/fs/cgroup: known only now
            cfg = spawn.SpawnConfig(
                mounts=tuple(rootfs.plan(**plan_args, cgroupfs=_cgroup_fs(cg) if cg else None)),
                process=st.process, stdio=stdio, exit_fd=exit_fd, userns=st.userns, rootless=st.rootless,
                seccomp_filter=seccomp_filter, hold_fd=hold.fd if hold is not None else None,
                # the child enters them itself (v1) or is cloned into it (v2)
                **(cg.spawn_args() if cg is not None else {}),
                # bridge: an own namespace like "none"; eth0 (tap0 rootless) comes before release
                network="host" if st.network == "host" else "none")
            proc = spawn.spawn(cfg)
            undo.callback(proc.close)
            undo.callback(proc.abort)
            pinned: dict[str, int] = {}
            try:
                if hold is not None:
                    hold.close()   # the child has its own copy
                _fault("start:spawned")
                # read while the child waits: once released, it may end (a zombie has none)
                pid_start = _proc_start_time(proc.pid)
                if cg is None:
                    # nothing else finds a released init then: its pid before the release
                    self._update(pid=proc.pid, pid_start=pid_start)
                net = self._attach_network(st, proc, slirp_r, undo)
                if st.network != "host" and not st.rootless:
                    # ping without CAP_NET_RAW (a rootless parent may not enter the namespace)
                    netmod.allow_ping(proc.pid)
                _fault("start:network")
                if pin:
                    # the child mounts while we record it: pin once it has pivoted into its root
                    _await_pivot(proc)
                    pinned = _pin_paths(proc.pid, pin)
                    undo.callback(_close_all, pinned)
                    if prepare is not None:
                        prepare(pinned)
                    _fault("start:pinned")
                proc.release()
                _fault("start:released")
                # "running" only now: a starter killed before this line leaves a container
                # that is garbage (its unreleased init ended with the starter; a released one
                # dies with its cgroup or through its recorded pid)
                self._update(status="running", pid=proc.pid, pid_start=pid_start, started=now_rfc3339(),
                             cgroup={k: str(v) for k, v in cg.paths.items()} if cg else None, net=net)
                _fault("start:running")
            except errors.ContainError as exc:
                # the child's own failure (a mount, say) explains a later step's
                early = proc.early_failure()
                if early is not None:
                    raise early from exc
                raise
            undo.pop_all()   # started: nothing to undo
        self._proc = proc
        self._pinned = pinned
        log.info("started container %s (pid %d)", st.name, proc.pid)
        return proc.pid

    def _record_starter(self) -> tuple[ContainerState, Status, CgroupRoot | None]:
        """The start's first step: check the container may start and record its starter and cgroups.

        Returns (the state, the status to go back to if the start fails, where
        its cgroups go or None). Recorded before they exist (crash rule): a
        process killed after the mkdir leaves only folders the record names,
        for rm -f and gc.
        """
        st = self.state
        status = self.refresh_status(st)
        if status not in ("created", "exited"):
            raise errors.ContainerError(f"container {st.name} is {status}: it cannot be started")
        # what the state says again if this start fails: a fresh container
        # stays its creator's ("creating"), a restart in place is "created"
        before: Status = "creating" if st.status == "creating" else "created"
        # rootless without delegated cgroups: none (create() checked no limit was asked for)
        cg_root = self.runtime.cgroups_here() if st.cgroups else None
        planned = self.runtime._planned_cgroups(self.id) if cg_root else None
        starter_pid, starter_start = os.getpid(), _own_start_time()
        if status == "exited":
            # a restart in place: same writable layer, fresh process and cgroup
            self.close()
            st = self._update(status="created", exit=None, pid=None, pid_start=None, cgroup=planned,
                              starter_pid=starter_pid, starter_start=starter_start)
        elif st.cgroup != planned or (st.starter_pid, st.starter_start) != (starter_pid, starter_start):
            # else create() in this process recorded it
            st = self._update(cgroup=planned, starter_pid=starter_pid, starter_start=starter_start)
        return st, before, cg_root

    def _plan_args(self, st: ContainerState, lowers: Sequence[Path]) -> dict[str, Any]:
        """``rootfs.plan``'s arguments for this container (all but its cgroup mount)."""
        plan_args: dict[str, Any] = {
            "rootfs_layers": lowers, "upper": self.upper, "work": self.dir / "work",
            "target": self.dir / "rootfs", "binds": list(st.binds), "tmpfs": list(st.tmpfs),
            "etc_files": _etc_files(st), "readonly_rootfs": st.readonly_rootfs,
        }
        if st.rootless:
            plan_args["overlay_options"] = (("userxattr", None),)   # trusted.* xattrs need host root
        if st.userns is not None and st.userns.host_gid(5) is None:
            plan_args["tty_gid"] = None
        if st.userns is not None and st.network == "host":
            plan_args["bind_sysfs"] = True   # sysfs needs a network namespace of the user namespace's
        return plan_args

    def _attach_network(self, st: ContainerState, proc: spawn.ContainerProcess, slirp_r: int | None,
                        undo: contextlib.ExitStack) -> dict[str, Any] | None:
        """The bridge mode's egress for the spawned, unreleased init: its ``net`` record (None: no bridge)."""
        if slirp_r is not None:
            helper = slirp.start(proc.pid, exit_fd=slirp_r, userns_fd=proc.ns_fds["user"],
                                 netns_fd=proc.ns_fds["net"], log_path=self.dir / "slirp.log")
            for fd in proc.ns_fds.values():   # slirp4netns has joined them
                os.close(fd)
            proc.ns_fds.clear()
            # no undo: slirp4netns ends with the init (the held pipe)
            return {"address": slirp.ADDRESS, "gateway": slirp.GATEWAY, "helper": "slirp4netns",
                    "helper_pid": helper.pid}
        if st.network != "bridge":
            return None
        # registered first: an attach that fails halfway leaves a lease, a veth or rules
        undo.callback(self._detach_bridge)
        return netmod.attach(self.runtime.network_settings, container_id=self.id, pid=proc.pid,
                             publish=[netmod.parse_publish(p) for p in st.publish]).to_json()

    def _detach_bridge(self) -> None:
        with contextlib.suppress(errors.ContainError):
            netmod.detach(self.runtime.network_settings, container_id=self.id)

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
        if st.exit is not None:
            return st.exit
        if st.status in ("created", "creating"):
            raise errors.ContainerError(f"container {st.name} was not started")
        if self._proc is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while _alive(st.pid, st.pid_start):
                if deadline is not None and time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
            code = None
        # not our child: read the state again, another process may have recorded the end meanwhile
        return self._record_exit(code, st if self._proc is not None else None)

    def _record_exit(self, code: int | None, st: ContainerState | None = None) -> ExitInfo:
        """Record how the main process ended.

        ``code``: the init's exit code as its parent saw it (128+N: killed by
        signal N); None when this process is not its parent. ``st``: the
        state as just read by the caller.
        """
        st = st if st is not None else self.state
        if st.exit is not None:       # another process was first
            return st.exit
        # the init's own word first: it tells the payload's exit code from its
        # death by a signal, which its own exit code (128+N either way) cannot
        reported = _read_exit_file(self.dir / "exit")
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
        cg = self.cgroups(st)
        oom = limit = peak = pids_limit = None
        refused = 0
        if cg is not None:
            try:
                oom, limit, peak = cg.memory_outcome()
                # the kernel counts an OOM kill (memory.events, memory.oom_control) only after it
                # sent the SIGKILL, so a victim reaped at once can be here first: a SIGKILLed
                # container at its memory limit gets a moment for the count to land
                for _ in range(25):
                    if oom or sig != signal.SIGKILL or not limit or not peak or peak < limit * 0.9:
                        break
                    time.sleep(0.02)
                    oom, limit, peak = cg.memory_outcome()
                pids_limit, refused = cg.pids_outcome()
            except errors.CgroupError:
                pass
        info = ExitInfo(code=code, signal=sig, oom_killed=bool(oom) and sig == signal.SIGKILL,
                        memory_limit=limit, memory_peak=peak, finished=now_rfc3339(),
                        pids_limit=pids_limit, pids_refused=refused)
        if cg is not None:
            # kills whatever the payload left behind, then removes the folders
            # (another process recording the same exit may be at it too)
            with contextlib.suppress(errors.CgroupError):
                cg.destroy()
        self._update(status="exited", exit=info, cgroup=None, pid=None)
        if st.network == "bridge" and not st.rootless:
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
            return None if self.refresh_status() == "running" else (self.exit_info() or ExitInfo(255)).code
        return self._proc.poll()

    def process_host_ids(self, st: ContainerState | None = None) -> tuple[int, int]:
        """The host uid and gid the main process runs as (through the user namespace, if any)."""
        st = st or self.state
        uid, gid = st.process.uid, st.process.gid
        if st.userns is not None:
            m = st.userns
            hu, hg = m.host_uid(uid), m.host_gid(gid)
            if hu is None or hg is None:
                raise errors.ContainerError(f"container {st.name}: user {uid}:{gid} is not mapped")
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
        if pid is None or self.refresh_status() != "running":
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
        if self.refresh_status() != "running":
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
            if self.refresh_status() == "running" and not self.state.cgroups:
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
            raise errors.ContainerError(f"container {st.name} is not running")
        base_env = dict(st.process.env)
        base_env.update(env or {})
        uid, gid, groups = st.process.uid, st.process.gid, st.process.additional_gids
        if user:
            uid, gid, groups = resolve_user(user, self._etc_lookup_dirs())
        process = spawn.ProcessSpec(argv=tuple(argv), env=base_env, cwd=workdir or st.process.cwd,
                                    uid=uid, gid=gid, additional_gids=tuple(groups), tty=tty,
                                    capabilities=st.process.capabilities)
        ns = frozenset(spawn.NAMESPACES - ({"network"} if st.network == "host" else set()))
        if st.userns is not None:
            ns |= {"user"}
        cg = self.cgroups()
        proc = spawn.join(pid, process=process, stdio=stdio, namespaces=ns,
                          seccomp_filter=seccomp.filter_for(st.seccomp, capabilities=process.capabilities,
                                                            name=st.name),
                          **(cg.spawn_args() if cg is not None else {}))
        try:
            proc.release()
        except BaseException:
            proc.abort()
            proc.close()
            raise
        return proc

    def attach_bind(self, bind: rootfs.Bind) -> None:
        """Bind host folder ``bind`` into the running container now, and at every later start.

        For a kernel handed out of a warm pool: its notebook folder is known
        only at hand-out. The same mount a start would make (``nosuid,nodev``,
        one-id idmapped for ``bind.idmap``), attached in the container's own
        mount namespace (``spawn.attach_bind``); recorded in the state only
        once attached, so a restart in place makes it again.
        """
        st = self.state
        pid = self.pid
        if pid is None or self.refresh_status(st) != "running":
            raise errors.ContainerError(f"container {st.name} is not running")
        if st.rootless:
            raise errors.ContainerError(f"container {st.name}: a folder cannot be bound into a running "
                                        "rootless container")
        target = rootfs.container_path(bind.target, what="bind target")
        if any(rootfs.container_path(b.target) == target for b in st.binds):
            raise errors.InvalidSpec(f"container {st.name}: {target} is bound already")
        op = rootfs.BindMount(Path(bind.source), target, readonly=bind.readonly, recursive=bind.recursive,
                              idmap=bind.idmap, attrs=rootfs.HOST_FOLDER_ATTRS)
        spawn.attach_bind(pid, op, userns=st.userns)
        with self._lock():
            st = self.state
            self._write_state(replace(st, binds=(*st.binds, replace(bind, source=op.source, target=target))))

    def amend(self, *, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
              cwd: str | None = None, labels: Mapping[str, str] | None = None) -> None:
        """Change what the container's next start runs (argv, env, cwd) and its labels.

        The running process is not touched. For a kernel handed out of a warm
        pool: its restarts run the kernel as a cold start would have, not the
        pool's waiting boot, and ``ps`` names the kernel it serves.
        """
        with self._lock():
            st = self.state
            changes: dict[str, Any] = {}
            if argv is not None:
                changes["argv"] = tuple(argv)
            if env is not None:
                changes["env"] = dict(env)
            if cwd is not None:
                changes["cwd"] = cwd
            process = replace(st.process, **changes)   # validated (ProcessSpec) before it is recorded
            self._write_state(replace(st, process=process,
                                      labels={**st.labels, **(labels or {})}))

    def _etc_lookup_dirs(self) -> list[Path]:
        layers = self.runtime.store.layer_dirs(self.image())
        return [self.upper, *layers]

    def reset(self) -> None:
        """Throw the writable layer away: the next start sees the image as it is."""
        if self.refresh_status() == "running":
            raise errors.ContainerError(f"container {self.name} is running: stop it before a reset")
        with self._lock():
            for sub in ("upper", "work"):
                self._remove_tree(self.dir / sub)
                (self.dir / sub).mkdir(mode=0o755 if sub == "upper" else 0o700)
        log.info("reset container %s to its image", self.id[:12])

    # --- removal -----------------------------------------------------------------------

    def _remove_tree(self, path: Path, st: ContainerState | None = None) -> None:
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
                st = None
        ids = st.userns if st is not None and st.rootless else None
        rootless_store.remove_tree(path, ids=ids, rootless=self.runtime.rootless)

    def remove(self, *, force: bool = False) -> None:
        """Remove the container (``force``: kill it first if it runs)."""
        st = self.state
        status = self.refresh_status(st)
        if status == "running":
            if not force:
                raise errors.ContainerError(f"container {st.name} is running: stop it first or use --force")
            self.kill()
            self.wait(10)
            st = self.state
        elif status != st.status:
            st = self.state     # refresh_status() recorded the exit
        self._undo_start(st)
        self.runtime.store.unpin(self.id)
        if st.userns is not None and not st.rootless:
            self.runtime.userns_allocator().release(self.id, st.userns)
        self._remove_tree(self.dir, st)
        self.close()
        self.runtime._handles.pop(self.id, None)
        log.info("removed container %s", self.id[:12])

    def _undo_start(self, st: ContainerState) -> None:
        """Remove what a start made that the state ``st`` names: a left init, cgroups, the bridge's veth.

        For :meth:`remove`, and for gc where a start died midway. An init the
        record names that still runs without being ``running`` (its starter
        died between the release and the record) is killed through a pidfd,
        checked against its start time after the open, so a reused pid is safe.
        """
        pid = st.pid
        if pid and st.status != "running" and _alive(pid, st.pid_start):
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(pid)
                try:
                    if _alive(pid, st.pid_start):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                finally:
                    os.close(fd)
        cg = self.cgroups(st)
        if cg is not None:
            cg.destroy()
        if st.network == "bridge" and not st.rootless:
            netmod.detach(self.runtime.network_settings, container_id=self.id)

    def info(self) -> dict[str, Any]:
        status = self.refresh_status()   # first: it may record the exit
        st = self.state
        return {
            "id": self.id, "name": st.name, "image": st.image_name, "status": status,
            "created": st.created, "command": list(st.process.argv),
            "pid": st.pid if _alive(st.pid, st.pid_start) else None,
            "exit": st.exit.to_json() if st.exit is not None else None,
            "reason": st.exit.describe() if st.exit is not None else None,
            "labels": dict(st.labels), "limits": asdict(st.limits), "network": st.network,
            "address": (st.net or {}).get("address") if status == "running" else None,
            "publish": list(st.publish), "userns": st.userns.to_json() if st.userns is not None else None,
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
        """True when this process is not root: containers get a user namespace of its own ids.

        The store's answer (``Store.rootless``, decided once when it was made).
        """
        return self.store.rootless

    def _rootless_limits(self, limits: Limits) -> tuple[Limits, bool]:
        """``(limits, use cgroups)`` for a rootless container.

        Without cgroups delegated to this user (cgroup v1, or a v2 tree
        without ``Delegate=yes``) there are no quotas: a limit the caller
        asked for is refused; the default process and memory limits (kernels') are
        dropped with a warning, once per process. With a delegated subtree that lacks
        a controller, a default limit needing it is dropped the same way (an asked one
        is refused by ``Cgroups.create``, naming what to delegate).
        """
        root = self.cgroups_here()
        reason = root.unusable_reason()
        defaults = {"pids": limits.pids == DEFAULT_PIDS_LIMIT,
                    "memory": limits.memory is not None and limits.memory == default_memory_limit()}
        if reason is None:
            drop = {c: None for c in root.missing(limits) if defaults.get(c)}
            if drop:
                log.warning("rootless containers run without the default %s limit: this user's cgroup "
                            "subtree does not delegate that controller", " and ".join(drop))
                limits = replace(limits, **drop)
            return limits, True
        asked = [n for n, v in (("memory", limits.memory), ("cpus", limits.cpus)) if v is not None
                 and not defaults.get(n)]
        if limits.pids is not None and not defaults["pids"]:
            asked.append("pids")
        if asked:
            raise errors.InvalidSpec(f"cannot limit {', '.join(asked)} of a rootless container: {reason}")
        global _warned_no_cgroups
        if not _warned_no_cgroups:
            _warned_no_cgroups = True
            log.warning("rootless containers run without memory, CPU and process quotas: %s", reason)
        return replace(limits, pids=None, memory=None), False

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
        by_name = [c for c in self.containers() if _named(c, ref)]
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
        """Make a container (directories, config, pinned image) without starting it.

        Each step registers its undo as it acquires something (the image pin,
        a user namespace slice, the container's folder); a failure unwinds
        them all, newest first, and leaves nothing behind.
        """
        image = image or self.store.resolve(spec.image)
        cid = secrets.token_hex(32)
        name = spec.name or f"jc-{cid[:12]}"
        if spec.name and any(_named(c, name) for c in self.containers()):
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
        d = self.store.containers_dir / cid
        with contextlib.ExitStack() as undo:
            self.store.pin(cid, image)
            undo.callback(self.store.unpin, cid)
            userns, limits, use_cgroups = self._create_userns(spec, cid, uid, gid, groups, undo)
            # validated now, not at start
            process = spawn.ProcessSpec(argv=argv, env=env, cwd=spec.workdir or cfg.working_dir, uid=uid, gid=gid,
                                        additional_gids=tuple(groups), hostname=hostname, tty=spec.tty,
                                        rlimits=spec.rlimits,
                                        capabilities=spawn.capability_set(add=spec.cap_add, drop=spec.cap_drop))
            state = ContainerState(
                # "creating" until its first start released the payload: till then the
                # container is its creator's, and garbage once the creator is gone
                id=cid, name=name, status="creating", created=now_rfc3339(),
                image_name=image.name, image_digest=image.digest, process=process,
                binds=tuple(spec.binds), tmpfs=tuple(spec.tmpfs), limits=limits, cgroups=use_cgroups,
                rootless=self.rootless, network=spec.network, labels=dict(spec.labels), publish=spec.publish,
                readonly_rootfs=spec.readonly_rootfs, seccomp=spec.seccomp, userns=userns,
                owner_pid=spec.owner_pid,
                owner_start=_proc_start_time(spec.owner_pid) if spec.owner_pid else None,
                creator_pid=os.getpid(), creator_start=_own_start_time(),
                # what a start by this process will make, recorded now (crash rule): a
                # start in the creating process then has nothing to write before it begins
                cgroup=self._planned_cgroups(cid) if use_cgroups else None,
                starter_pid=os.getpid(), starter_start=_own_start_time(),
            )
            if spec.binds or spec.tmpfs:   # the plan validates them (targets, clashes) now rather than at start
                rootfs.plan(rootfs_layers=lowers_needed, upper=d / "upper", work=d / "work", target=d / "rootfs",
                            binds=spec.binds, tmpfs=spec.tmpfs, etc_files=dict.fromkeys(_ETC_FILES, ""))
            # the state first (crash rule): a folder with it is found by gc, one without it
            # only after a minute (it may be another process's create, a moment before this line)
            # with a user namespace the writable layer keeps container ids on disk
            # (idmapped): a setuid-root file made inside must stay out of host users' reach
            d.mkdir(parents=True, mode=0o700 if userns is not None else 0o777)
            undo.callback(remove_tree, d)
            _write_state_file(d, state)
            _fault("create:state")
            for sub in ("upper", "work", "rootfs"):
                (d / sub).mkdir(mode=0o755 if sub != "work" else 0o700)
            atomic_write(d / "config.json", json.dumps(container_oci_config(state, image)).encode(), durable=False)
            _fault("create:done")
            undo.pop_all()   # made: nothing to undo
        log.info("created container %s from %s", name, image.familiar)
        return self._handle(cid)

    def _create_userns(self, spec: ContainerSpec, cid: str, uid: int, gid: int, groups: Sequence[int],
                       undo: contextlib.ExitStack) -> tuple[IdMapping | None, Limits, bool]:
        """A new container's user namespace, limits and whether it gets cgroups (a create's step).

        Rootless: this user's mapping, and no cgroups where none are
        delegated. ``userns="auto"`` (root): a slice of subordinate ids,
        released by ``undo`` if the create fails later.
        """
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
            userns = rootless_mapping()
            if userns.host_uid(uid) is None or any(userns.host_gid(g) is None for g in (gid, *groups)):
                known = userns.uid_map[-1][0] + userns.uid_map[-1][2] - 1
                raise errors.InvalidSpec(
                    f"user {uid}:{gid} does not exist in a rootless container of uid {os.geteuid()}: "
                    f"only ids 0-{known} do" + ("" if known else
                                                " (give this user subordinate ids: usermod --add-subuids "
                                                "--add-subgids, as root)"))
            limits, use_cgroups = self._rootless_limits(spec.limits)
            return userns, limits, use_cgroups
        if spec.userns == "auto":
            allocator = self.userns_allocator()
            userns = allocator.allocate(cid, alive=lambda owner: (self.store.containers_dir / owner).exists())
            undo.callback(allocator.release, cid, userns)
            if userns.host_uid(uid) is None or any(userns.host_gid(g) is None for g in (gid, *groups)):
                raise errors.InvalidSpec(f"user {uid}:{gid} is outside the container's user namespace "
                                         f"(ids 0-{idmap.RANGE_SIZE - 1})")
            return userns, spec.limits, True
        return None, spec.limits, True

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
            except errors.ContainerNotFound:
                continue
            except errors.ContainerError as exc:
                # a record this version cannot read (a newer format): never removed on a guess
                log.warning("gc: left container %s alone: %s", c.id[:12], exc)
                continue
            try:
                status = c.refresh_status(st)
                owner_gone = st.owner_pid and not _alive(st.owner_pid, st.owner_start)
                if status == "dead" or owner_gone:
                    why = (f"its creator (pid {st.creator_pid}) died before it ran" if status == "dead"
                           else f"its owner (pid {st.owner_pid}) is gone")
                    c.remove(force=True)
                    removed.append(c.id)
                    log.info("gc: removed container %s (%s): %s", st.name, c.id[:12], why)
                elif (st.status in ("creating", "created") and (st.cgroup or st.pid)
                      and not _alive(st.starter_pid, st.starter_start)):
                    # a start (a restart in place, or one by another process than the
                    # creator) died midway: the container stays, what the start made goes
                    c._undo_start(st)
                    c._update(pid=None, pid_start=None, cgroup=None, net=None, starter_pid=None, starter_start=None)
                    removed.append(f"start:{c.id}")
                    log.info("gc: undid the start of container %s (%s): its starter (pid %s) died midway",
                             st.name, c.id[:12], st.starter_pid)
                elif status == "exited" and st.exit is None:
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
            starting_or_running = {c.id for c in self.containers() if _starting_or_running(c)}
            removed += netmod.gc(self.network_settings, starting_or_running, sweep_unknown=sweep_unknown_network)
        for owner in self.store.pins():
            if owner not in live and not (self.store.containers_dir / owner).exists():
                self.store.unpin(owner)
        return removed


# --- helpers ----------------------------------------------------------------------------


class _Fd:
    """An fd closed once, either early by its user or at the end of a start (``contextlib.closing``)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def _write_state_file(d: Path, st: ContainerState) -> None:
    atomic_write(d / "state.json", json.dumps(st.to_json(), separators=(",", ":")).encode(), durable=False)


def _starting_or_running(c: Container) -> bool:
    """For the bridge's gc: a container whose lease must stay (an unreadable record: kept too)."""
    try:
        return c.state.status in ("creating", "created", "running")
    except errors.ContainerNotFound:
        return False
    except errors.ContainerError:
        return True


def _named(c: Container, name: str) -> bool:
    try:
        return c.state.name == name
    except errors.ContainError:
        return False


def _close_all(fds: Mapping[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)


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


def _etc_files(st: ContainerState) -> dict[str, str]:
    """The container's ``/etc/hostname``, ``hosts`` and ``resolv.conf``, made afresh at every start.

    Like Docker's, they follow the container's current settings (and the
    host's resolver) rather than what the image ships.
    """
    hostname = st.process.hostname or st.id[:12]
    network = st.network
    if network == "bridge":
        resolv = slirp.RESOLV_CONF if st.rootless else netmod.resolv_conf()
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


def container_oci_config(state: ContainerState, image: ImageRecord) -> dict[str, Any]:
    """A container's OCI runtime-spec ``config.json`` (runc/crun can run its bundle)."""
    return oci_config(state.process, image, limits=state.limits, network=state.network, binds=state.binds,
                      tmpfs=state.tmpfs, readonly_rootfs=state.readonly_rootfs, seccomp_mode=state.seccomp,
                      userns=state.userns)


def oci_config(process: spawn.ProcessSpec, image: ImageRecord, *, limits: Limits | None = None,
               network: Network = "none", binds: Sequence[rootfs.Bind] = (), tmpfs: Sequence[rootfs.Tmpfs] = (),
               readonly_rootfs: bool = False, seccomp_mode: str = "default",
               userns: IdMapping | None = None) -> dict[str, Any]:
    """An OCI runtime-spec ``config.json`` for ``process`` in ``image``'s root (runc/crun can run the bundle)."""
    limits = limits if limits is not None else Limits(pids=None)
    resources: dict[str, Any] = {}
    if limits.memory:
        resources["memory"] = {"limit": limits.memory, "swap": limits.memory}
    if limits.cpus:
        resources["cpu"] = {"quota": int(limits.cpus * 100000), "period": 100000}
    if limits.pids:
        resources["pids"] = {"limit": limits.pids}
    caps = sorted(process.capabilities)
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    if network != "host":
        namespaces.append({"type": "network"})
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
    for b in binds:
        mounts.append({"destination": b.target, "type": "bind", "source": str(b.source),
                       "options": ["rbind", "ro" if b.readonly else "rw", *sorted(rootfs.HOST_FOLDER_ATTRS)]})
    for t in tmpfs:
        mounts.append({"destination": t.target, "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "noexec", f"mode={t.mode:o}", f"size={t.size // 1024}k",
                                   f"nr_inodes={t.nr_inodes}"]})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": process.tty,
            "user": {"uid": process.uid, "gid": process.gid, "additionalGids": list(process.additional_gids)},
            "args": list(process.argv),
            "env": [f"{k}={v}" for k, v in process.env.items()],
            "cwd": process.cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": readonly_rootfs},
        "hostname": process.hostname,
        "mounts": mounts,
        "annotations": {"org.opencontainers.image.ref.name": image.name,
                        "org.opencontainers.image.digest": image.digest},
        "linux": {
            "namespaces": namespaces,
            "resources": resources,
            "maskedPaths": list(rootfs.MASKED_PATHS),
            "seccomp": seccomp.oci_section(seccomp_mode, capabilities=caps),
            "readonlyPaths": list(rootfs.READONLY_PATHS),
            **(userns.oci() if userns is not None else {}),
        },
    }
