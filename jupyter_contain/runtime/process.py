"""A process as the native shim runs it: what runs, as whom, with which capabilities.

Owns :class:`ProcessSpec` (argv, environment, working directory, ids,
rlimits, capabilities, no_new_privs, terminal), the capability sets
(:data:`DEFAULT_CAPABILITIES` for a container's payload,
:data:`TOOL_CAPABILITIES` for the runtime's own tools), the rule for a
container path (:func:`container_path`), and filling the process part of the
shim's ``struct jc_config`` (:class:`Arena`, :func:`fill_process`).

Sits below both halves of the runtime: ``containers.spawn`` builds whole
container configs on it, ``userns.run_in_userns`` (used by the image half
too) runs a tool with it. Must not: plan mounts, create namespaces or
cgroups, or import ``runtime.images`` / ``runtime.containers``. No I/O, no
import-time side effects.
"""

from __future__ import annotations

import os
import posixpath
import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from jupyter_contain import errors, native

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_PATH",
    "TOOL_CAPABILITIES",
    "Arena",
    "ProcessSpec",
    "capability_set",
    "container_path",
    "fill_process",
]

#: Docker's default capability set (moby oci/caps/defaults.go) without
#: CAP_FSETID and CAP_SETFCAP, whose only use is keeping or making setuid bits
#: and file capabilities, worthless under no_new_privs and a host privilege
#: in a host folder: without CAP_FSETID (of the initial namespace: with the
#: host's ids) the kernel clears setuid/setgid on every write to such a file,
#: as it does for a user namespace's root; without CAP_SETFCAP no
#: security.capability is ever written, seccomp filter or not. Without CAP_NET_RAW too, as
#: Podman: raw and packet sockets (spoofing, sniffing, a frequent kernel attack surface);
#: ping still works through ``net.ipv4.ping_group_range``, which a start sets in the
#: container's network namespace, and ``--cap-add NET_RAW`` gives it back
DEFAULT_CAPABILITIES: frozenset[str] = frozenset({
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
})
#: Docker's default set as it is, for the runtime's own tools (never a container's
#: payload): restoring an image's owners keeps its setgid folders and files
TOOL_CAPABILITIES: frozenset[str] = DEFAULT_CAPABILITIES | {"CAP_FSETID", "CAP_SETFCAP"}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _cap_name(name: str) -> str:
    key = str(name).strip().upper()
    key = key if key.startswith("CAP_") else "CAP_" + key
    if key != "CAP_ALL" and key not in native.CAPABILITIES:
        raise errors.InvalidSpec(f"unknown capability {name!r} (e.g. NET_RAW, SYS_PTRACE, ALL)")
    return key


def capability_set(*, add: Iterable[str] = (), drop: Iterable[str] = (),
                   base: frozenset[str] = DEFAULT_CAPABILITIES) -> frozenset[str]:
    """``base`` changed as Docker's ``--cap-add``/``--cap-drop`` do: names with or without
    ``CAP_``, any case; ``ALL`` in ``drop`` starts from nothing, ``ALL`` in ``add`` from
    every capability (the shim still intersects with the host's bounding set)."""
    adds, drops = {_cap_name(n) for n in add}, {_cap_name(n) for n in drop}
    caps = set(base)
    if "CAP_ALL" in drops:
        caps = set()
    if "CAP_ALL" in adds:
        caps = set(native.CAPABILITIES)
    caps = (caps - drops) | (adds - {"CAP_ALL"})
    return frozenset(caps - {"CAP_ALL"})

_RLIM_INFINITY = 2**64 - 1


def _rlimit_resource(name: str) -> int:
    key = name.upper()
    if not key.startswith("RLIMIT_"):
        key = "RLIMIT_" + key
    value = getattr(resource, key, None)
    if not isinstance(value, int):
        raise errors.InvalidSpec(f"unknown rlimit {name!r}")
    return value



def container_path(path: str, *, what: str = "path") -> str:
    """Validate and normalise an absolute container path (no ``..``, no empty)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise errors.InvalidSpec(f"{what} {path!r} must be an absolute container path")
    if "\0" in path:
        raise errors.InvalidSpec(f"{what} {path!r} contains a NUL byte")
    if any(part == ".." for part in path.split("/")):
        raise errors.InvalidSpec(f"{what} {path!r} must not contain '..'")
    norm = posixpath.normpath(path)
    # normpath keeps a leading '//' (POSIX allows it to be special): we do not
    return "/" + norm.lstrip("/")


@dataclass(frozen=True)
class ProcessSpec:
    """The process a container runs (or an exec runs inside one)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()
    #: name ("nofile", "RLIMIT_NOFILE") -> (soft, hard); -1 / RLIM_INFINITY = unlimited
    rlimits: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    hostname: str | None = None
    #: capability names to keep (intersected with the host's bounding set)
    capabilities: frozenset[str] = DEFAULT_CAPABILITIES
    no_new_privs: bool = True
    #: a pseudo-terminal of the container's own devpts: its slave becomes the
    #: payload's stdin/stdout/stderr and controlling tty (``stdio`` is then
    #: ignored), its master comes back as :attr:`ContainerProcess.pty_master`
    tty: bool = False

    def __post_init__(self) -> None:
        argv = tuple(self.argv)
        if not argv or not argv[0]:
            raise errors.InvalidSpec("a process needs a command (argv[0])")
        object.__setattr__(self, "argv", argv)
        env = dict(self.env)
        for k in env:
            if not k or "=" in k or "\0" in k:
                raise errors.InvalidSpec(f"invalid environment variable name {k!r}")
        object.__setattr__(self, "env", MappingProxyType(env))
        object.__setattr__(self, "cwd", container_path(self.cwd, what="working directory"))
        object.__setattr__(self, "additional_gids", tuple(int(g) for g in self.additional_gids))
        for ident in (self.uid, self.gid, *self.additional_gids):
            if not 0 <= int(ident) < 2**32 - 1:
                raise errors.InvalidSpec(f"invalid uid/gid {ident!r}")
        rl = dict(self.rlimits)
        for name, (soft, hard) in rl.items():
            _rlimit_resource(name)
            if soft != -1 and hard != -1 and soft > hard:
                raise errors.InvalidSpec(f"rlimit {name}: soft {soft} above hard {hard}")
        object.__setattr__(self, "rlimits", MappingProxyType(rl))
        caps = frozenset(self.capabilities)
        unknown = caps - set(native.CAPABILITIES)
        if unknown:
            raise errors.InvalidSpec(f"unknown capabilities {sorted(unknown)}")
        object.__setattr__(self, "capabilities", caps)
        if self.hostname is not None and not (0 < len(self.hostname) <= 64):
            raise errors.InvalidSpec(f"invalid hostname {self.hostname!r}")


_Str = str   # for annotations inside Arena, whose method ``str`` hides the builtin there


class Arena:
    """Keeps every cffi allocation a config points to alive while it is used."""

    def __init__(self) -> None:
        self.ffi = native.ffi()
        self.keep: list[Any] = []

    def new(self, ctype: str, init: Any = None) -> Any:
        obj = self.ffi.new(ctype, init)
        self.keep.append(obj)
        return obj

    def str(self, value: _Str | os.PathLike[_Str] | None) -> Any:
        if value is None:
            return self.ffi.NULL
        data = os.fsencode(value)
        if b"\0" in data:
            raise errors.InvalidSpec(f"string {value!r} contains a NUL byte")
        return self.new("char[]", data)

    def strv(self, values: Iterable[_Str | os.PathLike[_Str] | None], *, terminate: bool = True) -> Any:
        items = [self.str(v) for v in values]
        if terminate:
            items.append(self.ffi.NULL)
        return self.new("char *[]", items) if items else self.ffi.NULL

    def options(self, opts: Iterable[tuple[_Str, _Str | None]]) -> tuple[Any, int]:
        flat: list[_Str | None] = []
        for key, value in opts:
            flat += [key, value]
        return self.strv(flat, terminate=False), len(flat) // 2


def _cap_mask(names: Iterable[str]) -> int:
    mask = 0
    for name in names:
        mask |= 1 << native.CAPABILITIES[name]
    return mask & native.host_bounding_set()


def fill_process(arena: Arena, cfg: Any, proc: ProcessSpec, stdio: tuple[int, int, int],
                  seccomp_filter: bytes) -> None:
    ffi = arena.ffi
    cfg.argv = arena.strv(proc.argv)
    cfg.envp = arena.strv(f"{k}={v}" for k, v in proc.env.items())
    cfg.search_path = arena.str(proc.env.get("PATH", DEFAULT_PATH))
    cfg.cwd = arena.str(proc.cwd)
    cfg.uid = proc.uid
    cfg.gid = proc.gid
    if proc.additional_gids:
        cfg.groups = arena.new("uint32_t[]", list(proc.additional_gids))
    cfg.n_groups = len(proc.additional_gids)
    if proc.rlimits:
        rl = arena.new("struct jc_rlimit[]", len(proc.rlimits))
        for i, (name, (soft, hard)) in enumerate(sorted(proc.rlimits.items())):
            rl[i].resource = _rlimit_resource(name)
            rl[i].soft = _RLIM_INFINITY if soft < 0 else soft
            rl[i].hard = _RLIM_INFINITY if hard < 0 else hard
        cfg.rlimits = rl
    cfg.n_rlimits = len(proc.rlimits)
    cfg.cap_keep = _cap_mask(proc.capabilities)
    cfg.cap_last = native.cap_last()
    cfg.no_new_privs = int(proc.no_new_privs)
    cfg.stdio = list(stdio)
    cfg.terminal = int(proc.tty)
    cfg.join_pidfd = -1
    cfg.exit_fd = -1
    cfg.hold_fd = -1
    init = native.init_executable()
    cfg.init_path = arena.str(init) if init is not None else ffi.NULL
    if seccomp_filter:
        buf = arena.new("char[]", seccomp_filter)
        cfg.seccomp_filter = ffi.cast("void *", buf)
        cfg.seccomp_len = len(seccomp_filter) // 8


