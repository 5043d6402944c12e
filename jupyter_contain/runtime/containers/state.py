"""A container's record on disk (``containers/<id>/state.json``), typed.

Owns :class:`ContainerState` (every field a container's ``state.json``
holds, with its type), :class:`ExitInfo` (how a container's main process
ended) and the file format: :meth:`ContainerState.to_json` writes format
:data:`STATE_VERSION`; :meth:`ContainerState.from_json` reads it and the
files written before the format had a number (the same keys, read as
version 1), and refuses a newer format with a clear error, so that an older
jupyter-contain never rewrites (and so loses fields of) a newer one's record.
A field whose loss would change what a start does (an older reader drops
what it does not know when it writes the record back) bumps the version.

Must not: read or write files, or decide anything about a container's life
(``container`` does, under the container's lock). Pure data; no I/O.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from ... import errors
from .cgroups import Limits
from .idmap import IdMapping
from .rootfs import Bind, Tmpfs
from .spawn import DEFAULT_CAPABILITIES, ProcessSpec

__all__ = ["STATE_VERSION", "ContainerState", "ExitInfo", "Network", "Status"]

#: the ``state.json`` format this module writes (and the newest it reads).
#: 1: the first. 2: ``process.capabilities`` (``--cap-add``/``--cap-drop``): a
#: version-1 reader would write the record back without them, and the
#: container's next start would get that reader's default set
STATE_VERSION = 2

Network = Literal["none", "host", "bridge"]
#: what a state file says; "dead" is never written: a "creating" container
#: whose creator is gone is reported dead (``Container.refresh_status``)
Status = Literal["creating", "created", "running", "exited", "dead"]
_WRITTEN_STATUSES = ("creating", "created", "running", "exited")


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
            def mib(n: int | None) -> str:
                return f"{n / (1 << 20):.0f} MiB" if n else "?"
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: what an ``exit`` record may hold (others, from a newer writer, are ignored)
_EXIT_FIELDS = frozenset(f.name for f in fields(ExitInfo))


@dataclass(frozen=True)
class ContainerState:
    """Everything ``state.json`` records about one container.

    Written whole, under the container's lock, by ``Container`` (a change is
    :func:`dataclasses.replace` of the record just read). Pids come with
    their start times (``*_start``, clock ticks since boot) so that a reused
    pid is never taken for the process it was.
    """

    id: str
    name: str
    status: Status
    created: str
    image_name: str
    image_digest: str
    #: what runs, as whom (``rlimits`` included)
    process: ProcessSpec
    binds: tuple[Bind, ...] = ()
    tmpfs: tuple[Tmpfs, ...] = ()
    limits: Limits = field(default_factory=Limits)
    #: False: rootless without delegated cgroups (no quotas; ``limits`` has none)
    cgroups: bool = True
    #: made by a process that was not root: a user namespace of its ids, ``userxattr``, slirp4netns
    rootless: bool = False
    network: Network = "none"
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Docker's ``-p`` forms, normalised (bridge only)
    publish: tuple[str, ...] = ()
    readonly_rootfs: bool = False
    seccomp: str = "default"
    userns: IdMapping | None = None
    #: a process that owns the container (a Jupyter server): gone -> gc removes the container
    owner_pid: int | None = None
    owner_start: int | None = None
    #: the process that made it: responsible until the first start released the payload
    creator_pid: int | None = None
    creator_start: int | None = None
    #: the process starting it now (recorded before the start makes anything)
    starter_pid: int | None = None
    starter_start: int | None = None
    #: controller (v1) or "unified" (v2) -> cgroup folder, recorded before they are made
    cgroup: Mapping[str, str] | None = None
    #: host pid of the container's init while it runs
    pid: int | None = None
    pid_start: int | None = None
    started: str | None = None
    #: the network's own record (``network.Attachment.to_json`` or slirp4netns' address and helper)
    net: Mapping[str, Any] | None = None
    exit: ExitInfo | None = None

    def __post_init__(self) -> None:
        # checked when built (a replace() too), so no reader re-checks
        if self.status not in _WRITTEN_STATUSES:
            raise errors.ContainerError(f"container {self.id}: unknown status {self.status!r}")
        if self.network not in ("none", "host", "bridge"):
            raise errors.ContainerError(f"container {self.id}: unknown network {self.network!r}")
        # frozen all the way down: the mappings are read-only views of copies
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        for name in ("cgroup", "net"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, MappingProxyType(dict(value)))

    # --- the file format -----------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The ``state.json`` form: the keys this project has always written, plus ``version``."""
        p = self.process
        return {
            "version": STATE_VERSION,
            "id": self.id, "name": self.name, "status": self.status, "created": self.created,
            "image_name": self.image_name, "image_digest": self.image_digest,
            "process": {"argv": list(p.argv), "env": dict(p.env), "cwd": p.cwd, "uid": p.uid, "gid": p.gid,
                        "additional_gids": list(p.additional_gids), "hostname": p.hostname, "tty": p.tty,
                        "capabilities": sorted(p.capabilities)},
            "rlimits": {k: list(v) for k, v in p.rlimits.items()},
            "binds": [{"source": str(b.source), "target": b.target, "readonly": b.readonly, "idmap": b.idmap}
                      for b in self.binds],
            "tmpfs": [asdict(t) for t in self.tmpfs],
            "limits": asdict(self.limits), "cgroups": self.cgroups, "rootless": self.rootless,
            "network": self.network, "labels": dict(self.labels), "publish": list(self.publish),
            "readonly_rootfs": self.readonly_rootfs, "seccomp": self.seccomp,
            "userns": self.userns.to_json() if self.userns is not None else None,
            "owner_pid": self.owner_pid, "owner_start": self.owner_start,
            "creator_pid": self.creator_pid, "creator_start": self.creator_start,
            "starter_pid": self.starter_pid, "starter_start": self.starter_start,
            "cgroup": dict(self.cgroup) if self.cgroup is not None else None,
            "pid": self.pid, "pid_start": self.pid_start, "started": self.started,
            "net": dict(self.net) if self.net is not None else None,
            "exit": self.exit.to_json() if self.exit is not None else None,
        }

    @classmethod
    def from_json(cls, data: Any, *, where: str = "state.json") -> ContainerState:
        """Read a ``state.json`` document; ``where`` names it in errors.

        Raises ``ContainerError`` for a newer format (naming both versions)
        and for a record that does not hold what this format needs.
        """
        if not isinstance(data, dict):
            raise errors.ContainerError(f"{where} is unreadable: not a JSON object")
        # files written before the format had a number hold exactly version 1's keys
        version = data.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise errors.ContainerError(f"{where} is unreadable: invalid format version {version!r}")
        if version > STATE_VERSION:
            raise errors.ContainerError(
                f"{where} has format version {version}, newer than this jupyter-contain reads "
                f"(up to {STATE_VERSION}): use the newer jupyter-contain that made it")
        try:
            proc = data["process"]
            status = data["status"]            # both checked by __post_init__
            network = data.get("network", "none")
            process = ProcessSpec(
                argv=tuple(proc["argv"]), env=proc["env"], cwd=proc["cwd"], uid=proc["uid"], gid=proc["gid"],
                additional_gids=tuple(proc.get("additional_gids", ())), hostname=proc.get("hostname"),
                tty=bool(proc.get("tty")),
                # records made before --cap-add/--cap-drop: the default set of this version
                capabilities=frozenset(str(c) for c in proc["capabilities"]) if "capabilities" in proc
                else DEFAULT_CAPABILITIES,
                rlimits={k: (int(v[0]), int(v[1])) for k, v in (data.get("rlimits") or {}).items()})
            exit_ = data.get("exit")
            return cls(
                id=str(data["id"]), name=str(data["name"]), status=status, created=str(data["created"]),
                image_name=str(data["image_name"]), image_digest=str(data["image_digest"]),
                process=process,
                binds=tuple(Bind(Path(b["source"]), b["target"], bool(b["readonly"]), idmap=bool(b.get("idmap")))
                            for b in data.get("binds") or ()),
                tmpfs=tuple(Tmpfs(**t) for t in data.get("tmpfs") or ()),
                limits=Limits(**data["limits"]) if data.get("limits") is not None else Limits(),
                cgroups=bool(data.get("cgroups", True)), rootless=bool(data.get("rootless")),
                network=network, labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
                publish=tuple(str(p) for p in data.get("publish") or ()),
                readonly_rootfs=bool(data.get("readonly_rootfs")), seccomp=str(data.get("seccomp", "default")),
                userns=IdMapping.from_json(data["userns"]) if data.get("userns") else None,
                owner_pid=data.get("owner_pid"), owner_start=data.get("owner_start"),
                creator_pid=data.get("creator_pid"), creator_start=data.get("creator_start"),
                starter_pid=data.get("starter_pid"), starter_start=data.get("starter_start"),
                cgroup={str(k): str(v) for k, v in data["cgroup"].items()} if data.get("cgroup") else None,
                pid=data.get("pid"), pid_start=data.get("pid_start"), started=data.get("started"),
                net=dict(data["net"]) if data.get("net") else None,
                exit=ExitInfo(**{k: v for k, v in exit_.items() if k in _EXIT_FIELDS}) if exit_ else None,
            )
        except errors.ContainerError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, errors.InvalidSpec) as exc:
            raise errors.ContainerError(f"{where} is unreadable: {exc}") from None
