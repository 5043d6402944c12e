"""Seccomp: Docker's default profile, compiled to a classic BPF program.

Owns the profile data (``seccomp_default.json``, in moby's
``profiles/seccomp/default.json`` schema), its resolution for one container
(capabilities, native architecture and its sub-architectures, kernel
version: the includes/excludes rules as Docker applies them), compiling it with
libseccomp (``libseccomp.so.2`` through ctypes: declared here, nothing parsed at run
time) in *this* process, the cache of
compiled programs (per process, and on disk: see below), and the profile as an
OCI runtime-spec ``linux.seccomp`` section for ``config.json``.

The program is compiled once per machine, not once per process: compiling
cost 30-50 ms here (44 ms: cffi parsing the declarations with pycparser, then
libseccomp; 20 ms since the binding is ctypes), and every ``jupyter contain run`` is a new process. A compiled
program is kept in :func:`cache_dir` (``/run/jupyter-contain-cache/seccomp``
for root, ``$XDG_RUNTIME_DIR/jupyter-contain-cache/seccomp`` otherwise), one
file per key: the resolved profile (which holds the profile's rules, the
capabilities, the architecture and the kernel version's choices, and the
host-file guard), the kernel release, the machine and this format's version.
The file names the libseccomp that compiled it (path, inode, size, mtime) and
carries the program's sha256. A cache file is host state that decides what
every container may do, so it is trusted only where no one else can write: the
folder and the file must belong to this user and be writable by no one else, the
file a regular file opened without following a symlink; a file that fails any
check (stale key, another libseccomp, a bad checksum, a foreign owner, a symlink
or a FIFO in its place) is never loaded: the program is compiled again and the
file replaced (written beside it and renamed). Containers never see this folder.

Must not load a filter into any process (the native start does that in the
child, right before execve, after no_new_privs), fork, or import ``native``:
the bytes are plain data handed to :class:`spawn.SpawnConfig`.

Like runc does for Docker, a short stub goes in front of libseccomp's
program: a syscall number above the newest one the profile names (per
architecture) fails with ENOSYS rather than EPERM, so that a libc newer than the
profile falls back to an older syscall instead of failing.

Stricter than Docker in one respect (:data:`HOST_FILE_GUARD`): a container
cannot make a setuid or setgid file, a device node, or a file capability,
anywhere. Host folders are bound in ``nosuid,nodev``, but that only holds
inside: the host reaches the same file by its own path, where a setuid-root
file or a ``security.capability`` xattr is a host privilege. A seccomp rule
cannot tell which mount a path or fd is on, so the refusal is container-wide;
inside, such files are worthless anyway (no_new_privs: neither setuid bits
nor file capabilities raise privileges at exec). The cost: a package whose
files are setuid (``sudo``, ``passwd``) does not install inside a container.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import struct
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from ... import errors

log = logging.getLogger(__name__)

__all__ = [
    "HOST_FILE_GUARD",
    "MODES",
    "PROFILE_PATH",
    "Mode",
    "check_mode",
    "guard_filter",
    "compile_profile",
    "default_filter",
    "cache_dir",
    "filter_for",
    "load_profile",
    "oci_section",
    "resolve_profile",
]

#: "default": Docker's profile and the host-file guard; "unconfined": no filter (Docker's
#: meaning); "guard": the host-file guard alone (what a kernel asking for "unconfined" gets:
#: its notebook folder is a host folder, so setuid files there stay refused)
Mode = Literal["default", "unconfined", "guard"]
MODES: tuple[str, ...] = ("default", "unconfined", "guard")

PROFILE_PATH = Path(__file__).with_name("seccomp_default.json")

# Docker's capability defaults, repeated here rather than imported from
# spawn (which imports native): this module stays importable without the
# compiled extension. Kept equal to spawn.DEFAULT_CAPABILITIES (a test checks).
# (Docker's minus CAP_FSETID, CAP_SETFCAP and CAP_NET_RAW: see runtime/process.py)
_DOCKER_DEFAULT_CAPS: frozenset[str] = frozenset({
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
})

# libseccomp constants (seccomp.h)
_ACT_KILL_PROCESS = 0x80000000
_ACT_KILL_THREAD = 0x00000000
_ACT_TRAP = 0x00030000
_ACT_ERRNO = 0x00050000
_ACT_TRACE = 0x7FF00000
_ACT_LOG = 0x7FFC0000
_ACT_ALLOW = 0x7FFF0000
_FLTATR_CTL_NNP = 3
_FLTATR_CTL_OPTIMIZE = 8     # libseccomp >= 2.5; value 2: a binary tree of syscall numbers
_NR_SCMP_ERROR = -1
_CMP_OPS = MappingProxyType({
    "SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7,
})
_ENOSYS = 38
_EPERM = 1

# libseccomp arch names (seccomp_arch_resolve_name) and Go's GOARCH, which is
# what the profile's "arches" lists name (Docker compares them with runtime.GOARCH)
_SCMP_ARCH_NAMES = MappingProxyType({
    "SCMP_ARCH_X86": "x86", "SCMP_ARCH_X86_64": "x86_64", "SCMP_ARCH_X32": "x32",
    "SCMP_ARCH_ARM": "arm", "SCMP_ARCH_AARCH64": "aarch64", "SCMP_ARCH_MIPS": "mips",
    "SCMP_ARCH_MIPS64": "mips64", "SCMP_ARCH_MIPS64N32": "mips64n32", "SCMP_ARCH_MIPSEL": "mipsel",
    "SCMP_ARCH_MIPSEL64": "mipsel64", "SCMP_ARCH_MIPSEL64N32": "mipsel64n32", "SCMP_ARCH_PPC": "ppc",
    "SCMP_ARCH_PPC64": "ppc64", "SCMP_ARCH_PPC64LE": "ppc64le", "SCMP_ARCH_S390": "s390",
    "SCMP_ARCH_S390X": "s390x", "SCMP_ARCH_RISCV64": "riscv64",
})
_GOARCH = MappingProxyType({
    "SCMP_ARCH_X86_64": "amd64", "SCMP_ARCH_X86": "386", "SCMP_ARCH_AARCH64": "arm64",
    "SCMP_ARCH_ARM": "arm", "SCMP_ARCH_PPC64LE": "ppc64le", "SCMP_ARCH_S390X": "s390x",
    "SCMP_ARCH_RISCV64": "riscv64", "SCMP_ARCH_MIPS64": "mips64", "SCMP_ARCH_MIPSEL64": "mips64le",
})
_X32_SYSCALL_BIT = 0x40000000

# --- the host-file guard ---------------------------------------------------------------

_S_ISUID, _S_ISGID = 0o4000, 0o2000
_S_IFMT, _S_IFREG, _S_IFIFO, _S_IFSOCK = 0o170000, 0o100000, 0o010000, 0o140000
_EOPNOTSUPP = 95


def _allow_when(index: int, mask: int, value: int = 0) -> dict[str, Any]:
    return {"index": index, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}


def _guard_rules() -> list[dict[str, Any]]:
    """The guard as OCI rules: conditional allows (the profile's default refuses the rest) and refusals.

    A mode argument counts only when the call creates (``O_CREAT``, or
    ``O_TMPFILE``, whose nameless file ``linkat`` can give a name later);
    otherwise it is whatever the caller's register held. The masks test low
    bits only, so junk in a register's upper half changes nothing. Flag
    values are this machine's (``os``), which its compat architectures share.
    """
    suid = _S_ISUID | _S_ISGID
    creating = os.O_CREAT | (getattr(os, "O_TMPFILE", 0) & ~os.O_DIRECTORY)
    allow = "SCMP_ACT_ALLOW"
    rules: list[dict[str, Any]] = []
    # chmod family (path, fd, dirfd+path, dirfd+path+flags) and creat: never a setuid/setgid bit
    for names, idx in ((("chmod", "fchmod", "creat"), 1), (("fchmodat", "fchmodat2"), 2)):
        rules.append({"names": list(names), "action": allow, "args": [_allow_when(idx, suid)]})
    # open(path, flags, mode) / openat(dirfd, path, flags, mode): not creating, or no such bit
    for name, flags in (("open", 1), ("openat", 2)):
        rules.append({"names": [name], "action": allow, "args": [_allow_when(flags, creating)]})
        rules.append({"names": [name], "action": allow, "args": [_allow_when(flags + 1, suid)]})
    # mknod: regular files, FIFOs and sockets only (no device node, whiteouts included), never setuid/setgid
    for name, idx in (("mknod", 1), ("mknodat", 2)):
        for kind in (0, _S_IFREG, _S_IFIFO, _S_IFSOCK):
            rules.append({"names": [name], "action": allow, "args": [_allow_when(idx, _S_IFMT | suid, kind)]})
    rules += [
        # the mode sits in a struct (open_how) seccomp cannot read: ENOSYS, and libc uses openat
        {"names": ["openat2"], "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS},
        # io_uring's own opcodes (openat, setxattr) never pass through this filter: as if
        # the kernel had no io_uring (programs fall back to plain syscalls; Docker >= 25 drops it too)
        {"names": ["io_uring_setup", "io_uring_enter", "io_uring_register"], "action": "SCMP_ACT_ERRNO",
         "errnoRet": _ENOSYS},
        # seccomp cannot read an xattr's name: every setxattr is refused as a filesystem
        # without xattrs would refuse it (cp -a, shutil.copy2 and tar skip them quietly), so
        # that no security.capability reaches a host file (written through a mount that
        # maps container root to host root, a v3 capability is valid on the host)
        {"names": ["setxattr", "lsetxattr", "fsetxattr", "setxattrat"], "action": "SCMP_ACT_ERRNO",
         "errnoRet": _EOPNOTSUPP},
    ]
    return rules


def _guard_refusals() -> list[dict[str, Any]]:
    """The guard alone, as refusals over an allow-by-default filter (mode "guard").

    The same decisions as :func:`_guard_rules`, turned around: there, allows
    over the profile's refusing default; here, a refusal for each bit that
    must not be set (seccomp compares masked equality: one rule per bit, and
    a rule's conditions on different arguments must all hold).
    """
    creating = (os.O_CREAT, getattr(os, "O_TMPFILE", 0) & ~os.O_DIRECTORY)
    eperm = {"action": "SCMP_ACT_ERRNO", "errnoRet": _EPERM}
    rules: list[dict[str, Any]] = []
    for bit in (_S_ISUID, _S_ISGID):
        for names, idx in ((("chmod", "fchmod", "creat"), 1), (("fchmodat", "fchmodat2"), 2)):
            rules.append({"names": list(names), **eperm, "args": [_allow_when(idx, bit, bit)]})
        for name, flags in (("open", 1), ("openat", 2)):
            for flag in creating:
                if flag:
                    rules.append({"names": [name], **eperm,
                                  "args": [_allow_when(flags, flag, flag), _allow_when(flags + 1, bit, bit)]})
        for name, idx in (("mknod", 1), ("mknodat", 2)):
            rules.append({"names": [name], **eperm, "args": [_allow_when(idx, bit, bit)]})
    for name, idx in (("mknod", 1), ("mknodat", 2)):
        for kind in (0o020000, 0o060000):   # S_IFCHR, S_IFBLK: no device nodes
            rules.append({"names": [name], **eperm, "args": [_allow_when(idx, _S_IFMT, kind)]})
    # the unconditional ones are the same as the guard's
    return rules + [r for r in _guard_rules() if r["action"] == "SCMP_ACT_ERRNO"]


#: what the guard governs: these names are taken out of every rule of the
#: profile and decided by the guard's rules alone
HOST_FILE_GUARD: frozenset[str] = frozenset(
    name for rule in _guard_rules() for name in rule["names"])


def _with_guard(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for rule in rules:
        names = [n for n in rule["names"] if n not in HOST_FILE_GUARD]
        if names:
            out.append({**rule, "names": names})
    return out + _guard_rules()


_lib_lock = threading.Lock()
_lib: Any = None        # the ctypes library (see _libseccomp)
_ArgCmp: Any = None     # its struct scmp_arg_cmp
_cache_lock = threading.Lock()
_cache: dict[frozenset[str], bytes] = {}
_sections: dict[frozenset[str], dict[str, Any]] = {}   # resolved profiles, per capability set
_sections_lock = threading.Lock()


def _libseccomp() -> Any:
    """libseccomp.so.2 with the signatures of the functions we call, opened once per process.

    ctypes, not cffi: cffi's ABI mode parses C declarations with pycparser at run time
    (about 25 ms of the 44 a compile took), and a compiled binding would make libseccomp's
    headers a build dependency. Loaded only to compile (a cache miss) or to check the
    architecture of an unusual process, so ctypes is imported here, not with the module.
    """
    global _lib, _ArgCmp
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                import ctypes
                from ctypes import POINTER, c_char_p, c_int, c_size_t, c_uint, c_uint32, c_uint64, c_void_p

                class ScmpVersion(ctypes.Structure):
                    _fields_ = [("major", c_uint), ("minor", c_uint), ("micro", c_uint)]

                class ScmpArgCmp(ctypes.Structure):
                    # struct scmp_arg_cmp: enum scmp_compare is an int, scmp_datum_t a uint64_t
                    _fields_ = [("arg", c_uint), ("op", c_int), ("datum_a", c_uint64), ("datum_b", c_uint64)]

                required = {
                    "seccomp_version": (POINTER(ScmpVersion), []),
                    "seccomp_init": (c_void_p, [c_uint32]),
                    "seccomp_release": (None, [c_void_p]),
                    "seccomp_arch_native": (c_uint32, []),
                    "seccomp_arch_resolve_name": (c_uint32, [c_char_p]),
                    "seccomp_arch_add": (c_int, [c_void_p, c_uint32]),
                    "seccomp_attr_set": (c_int, [c_void_p, c_int, c_uint32]),
                    "seccomp_syscall_resolve_name": (c_int, [c_char_p]),
                    "seccomp_syscall_resolve_name_arch": (c_int, [c_uint32, c_char_p]),
                    "seccomp_rule_add_array": (c_int, [c_void_p, c_uint32, c_int, c_uint, POINTER(ScmpArgCmp)]),
                    "seccomp_export_bpf": (c_int, [c_void_p, c_int]),
                }
                optional = {"seccomp_export_bpf_mem": (c_int, [c_void_p, c_void_p, POINTER(c_size_t)])}  # >= 2.6
                try:
                    lib = ctypes.CDLL("libseccomp.so.2")
                except OSError as exc:
                    raise errors.ContainerError(
                        f"cannot load libseccomp.so.2 ({exc}): install libseccomp2, "
                        "or run the container with seccomp=unconfined") from None
                for table in (required, optional):
                    for name, (restype, argtypes) in table.items():
                        try:
                            fn = getattr(lib, name)
                        except AttributeError:
                            if table is optional:
                                continue
                            raise errors.ContainerError(
                                f"libseccomp.so.2 has no {name}: libseccomp >= 2.5 is needed "
                                "(or run the container with seccomp=unconfined)") from None
                        fn.restype = restype
                        fn.argtypes = argtypes
                _ArgCmp = ScmpArgCmp
                _lib = lib
    return _lib


def libseccomp_version() -> tuple[int, int, int]:
    v = _libseccomp().seccomp_version().contents
    return (v.major, v.minor, v.micro)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise errors.InvalidSpec(f"unknown seccomp mode {mode!r} (default, unconfined or guard)")
    return mode


def load_profile(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The profile (default: the bundled Docker default) as parsed JSON."""
    p = Path(path) if path is not None else PROFILE_PATH
    try:
        return json.loads(p.read_bytes())
    except (OSError, ValueError) as exc:
        raise errors.ContainerError(f"cannot read seccomp profile {p}: {exc}") from None


def _kernel_version() -> tuple[int, int]:
    parts = os.uname().release.split("-", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _parse_kernel(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor.split(".")[0] or 0)


#: uname's machine -> the SCMP_ARCH_* name of a 64-bit (or the only) process on it; a 32-bit
#: process on a 64-bit machine (x86, x32 or arm on an x86_64 or aarch64 kernel) asks libseccomp
_MACHINE_ARCH = MappingProxyType({
    "x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64", "ppc64le": "SCMP_ARCH_PPC64LE",
    "s390x": "SCMP_ARCH_S390X", "riscv64": "SCMP_ARCH_RISCV64",
})


def _native_arch() -> str:
    """The SCMP_ARCH_* name of this process's architecture.

    From ``uname`` where that is unambiguous, so that resolving the profile (every
    container's ``config.json``) and finding a cached program never load libseccomp.
    """
    machine = os.uname().machine
    if sys.maxsize > 2**32 and machine in _MACHINE_ARCH:
        return _MACHINE_ARCH[machine]
    return _libseccomp_native_arch()


def _libseccomp_native_arch() -> str:
    """The SCMP_ARCH_* name libseccomp gives this process's architecture."""
    lib = _libseccomp()
    token = lib.seccomp_arch_native()
    for name, short in _SCMP_ARCH_NAMES.items():
        if lib.seccomp_arch_resolve_name(short.encode()) == token:
            return name
    raise errors.ContainerError(f"libseccomp reports an unknown native architecture {token:#x}")


def resolve_profile(profile: Mapping[str, Any], *, capabilities: Iterable[str],
                    arch: str | None = None, kernel: tuple[int, int] | None = None) -> dict[str, Any]:
    """The profile as it applies to one container, the way Docker resolves it.

    Returns ``{"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}``
    (the OCI runtime-spec form): the native ``arch`` with its sub-architectures
    from ``archMap``, and only the rules whose ``includes`` all hold (every
    listed capability in ``capabilities``, the native arch listed, kernel at
    least ``minKernel``) and whose ``excludes`` do not (no listed capability
    present, native arch not listed, kernel below ``minKernel``).
    """
    caps = frozenset(capabilities)
    arch = arch or _native_arch()
    goarch = _GOARCH.get(arch, _SCMP_ARCH_NAMES.get(arch, arch))
    kernel = kernel or _kernel_version()
    arches = [arch]
    for entry in profile.get("archMap") or ():
        if entry.get("architecture") == arch:
            arches += [a for a in entry.get("subArchitectures") or () if a not in arches]
    rules = []
    for rule in profile.get("syscalls") or ():
        inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
        if inc.get("arches") and goarch not in inc["arches"]:
            continue
        if inc.get("caps") and not set(inc["caps"]) <= caps:
            continue
        if inc.get("minKernel") and kernel < _parse_kernel(inc["minKernel"]):
            continue
        if exc.get("arches") and goarch in exc["arches"]:
            continue
        if exc.get("caps") and set(exc["caps"]) & caps:
            continue
        if exc.get("minKernel") and kernel >= _parse_kernel(exc["minKernel"]):
            continue
        out: dict[str, Any] = {"names": list(rule["names"]), "action": rule["action"]}
        if rule.get("errnoRet") is not None:
            out["errnoRet"] = int(rule["errnoRet"])
        if rule.get("args"):
            out["args"] = [{"index": int(a["index"]), "value": int(a["value"]),
                            "valueTwo": int(a.get("valueTwo", 0)), "op": a["op"]} for a in rule["args"]]
        rules.append(out)
    default_action = profile.get("defaultAction", "SCMP_ACT_ERRNO")
    if default_action != "SCMP_ACT_ERRNO":
        # the guard's conditional allows rely on the default refusing the rest
        raise errors.InvalidSpec(f"a seccomp profile here must refuse by default, not {default_action!r}")
    return {
        "defaultAction": default_action,
        "defaultErrnoRet": int(profile.get("defaultErrnoRet", _EPERM)),
        "architectures": arches,
        "syscalls": _with_guard(rules),
    }


def _action(name: str, errno_ret: int | None, *, default_errno: int = _EPERM) -> int:
    if name == "SCMP_ACT_ALLOW":
        return _ACT_ALLOW
    if name == "SCMP_ACT_ERRNO":
        return _ACT_ERRNO | ((default_errno if errno_ret is None else errno_ret) & 0xFFFF)
    if name == "SCMP_ACT_KILL" or name == "SCMP_ACT_KILL_THREAD":
        return _ACT_KILL_THREAD
    if name == "SCMP_ACT_KILL_PROCESS":
        return _ACT_KILL_PROCESS
    if name == "SCMP_ACT_TRAP":
        return _ACT_TRAP
    if name == "SCMP_ACT_TRACE":
        return _ACT_TRACE | ((errno_ret or 0) & 0xFFFF)
    if name == "SCMP_ACT_LOG":
        return _ACT_LOG
    raise errors.InvalidSpec(f"unsupported seccomp action {name!r}")


def compile_profile(resolved: Mapping[str, Any]) -> bytes:
    """A resolved profile (:func:`resolve_profile`) -> ``struct sock_filter[]`` bytes.

    ``resolved`` is in the OCI runtime-spec ``linux.seccomp`` form, so a
    bundle's own section compiles the same way. libseccomp builds the program;
    :func:`_enosys_stub` goes in front of it. Names libseccomp does not know are
    skipped, as runc skips them.
    """
    lib = _libseccomp()
    default_errno = int(resolved.get("defaultErrnoRet", _EPERM))
    default = _action(resolved["defaultAction"], default_errno)
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise errors.ContainerError("seccomp_init failed")
    try:
        # we set no_new_privs ourselves, in the child; this only matters for
        # seccomp_load, which we never call, but keep libseccomp out of it
        _check(lib.seccomp_attr_set(ctx, _FLTATR_CTL_NNP, 0), "seccomp_attr_set(CTL_NNP)")
        # a binary search instead of a linear list of ~350 syscalls: loading
        # costs 0.3 ms instead of 0.8 (the kernel pre-computes, per syscall
        # number of each architecture, whether the filter always allows it,
        # by running the filter), and every later syscall runs fewer checks
        if lib.seccomp_attr_set(ctx, _FLTATR_CTL_OPTIMIZE, 2) < 0:
            log.debug("seccomp: libseccomp %s cannot build a binary tree; the filter stays linear",
                      ".".join(map(str, libseccomp_version())))
        tokens: dict[str, int] = {}
        for arch in resolved["architectures"]:
            short = _SCMP_ARCH_NAMES.get(arch)
            token = lib.seccomp_arch_resolve_name(short.encode()) if short else 0
            if not token:
                log.debug("seccomp: libseccomp does not know architecture %s, skipped", arch)
                continue
            rc = lib.seccomp_arch_add(ctx, token)
            if rc not in (0, -17):  # -EEXIST: the native arch is in from seccomp_init
                _check(rc, f"seccomp_arch_add({arch})")
            tokens[arch] = token
        skipped: set[str] = set()
        used: set[str] = set()
        for rule in resolved["syscalls"]:
            action = _action(rule["action"], rule.get("errnoRet"), default_errno=default_errno)
            if action == default:
                continue   # libseccomp refuses a rule that repeats the default action
            args = rule.get("args") or ()
            cmp = (_ArgCmp * max(len(args), 1))()
            for i, a in enumerate(args):
                op = _CMP_OPS.get(a["op"])
                if op is None:
                    raise errors.InvalidSpec(f"unsupported seccomp comparison {a['op']!r}")
                cmp[i].arg = a["index"]
                cmp[i].op = op
                cmp[i].datum_a = a["value"] & 0xFFFFFFFFFFFFFFFF
                # MASKED_EQ: (arg & value) == valueTwo, as libseccomp's datum_a/datum_b
                cmp[i].datum_b = a.get("valueTwo", 0) & 0xFFFFFFFFFFFFFFFF
            for name in rule["names"]:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr == _NR_SCMP_ERROR:
                    skipped.add(name)
                    continue
                _check(lib.seccomp_rule_add_array(ctx, action, nr, len(args), cmp),
                       f"seccomp rule for {name}")
                used.add(name)
        if skipped:
            log.debug("seccomp: libseccomp %s does not know %s, skipped",
                      ".".join(map(str, libseccomp_version())), ", ".join(sorted(skipped)))
        program = _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)
    stub = _enosys_stub(lib, tokens, used)
    return stub + program


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise errors.ContainerError(f"{what} failed: {os.strerror(-rc)}")


def _export(lib: Any, ctx: Any) -> bytes:
    import ctypes

    export_mem = getattr(lib, "seccomp_export_bpf_mem", None)   # libseccomp >= 2.6
    if export_mem is not None:
        size = ctypes.c_size_t(0)
        _check(export_mem(ctx, None, ctypes.byref(size)), "seccomp_export_bpf_mem")
        buf = ctypes.create_string_buffer(size.value)
        _check(export_mem(ctx, buf, ctypes.byref(size)), "seccomp_export_bpf_mem")
        return buf.raw[:size.value]
    fd = os.memfd_create("jc-seccomp", os.MFD_CLOEXEC)
    try:
        _check(lib.seccomp_export_bpf(ctx, fd), "seccomp_export_bpf")
        length = os.fstat(fd).st_size
        return os.pread(fd, length, 0)
    finally:
        os.close(fd)


# --- the ENOSYS stub (classic BPF) ---------------------------------------------------

_LD_ABS_W = 0x20      # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15         # BPF_JMP | BPF_JEQ | BPF_K
_JGT_K = 0x25         # BPF_JMP | BPF_JGT | BPF_K
_JSET_K = 0x45        # BPF_JMP | BPF_JSET | BPF_K
_JA = 0x05            # BPF_JMP | BPF_JA
_RET_K = 0x06         # BPF_RET | BPF_K
_OFF_NR, _OFF_ARCH = 0, 4   # struct seccomp_data


def _enosys_stub(lib: Any, tokens: Mapping[str, int], used: Iterable[str]) -> bytes:
    """Instructions that answer ENOSYS for syscall numbers above the profile's newest, per arch.

    Everything else falls through to libseccomp's program, which reloads what it
    needs (it starts by loading the architecture), so the stub leaves no state
    behind that matters. x32 shares AUDIT_ARCH_X86_64 and is told apart by
    ``__X32_SYSCALL_BIT`` in the syscall number.
    """
    used = sorted(used)
    top: dict[str, int] = {}
    for arch, token in tokens.items():
        nrs = [lib.seccomp_syscall_resolve_name_arch(token, n.encode()) for n in used]
        nrs = [n for n in nrs if n >= 0]
        if nrs:
            top[arch] = max(nrs)
    x32 = top.pop("SCMP_ARCH_X32", None)
    # a symbolic program: a str is a label, a tuple (code, jt, jf, k) an
    # instruction whose jt/jf (and k for JA) may name a label
    prog: list[str | tuple[int, str | None, str | None, int | str]] = [(_LD_ABS_W, None, None, _OFF_ARCH)]
    for arch in top:
        prog.append((_JEQ_K, f"arch:{arch}", None, tokens[arch]))
    prog.append((_JA, None, None, "main"))          # another arch: libseccomp decides
    for arch, high in top.items():
        prog += [f"arch:{arch}", (_LD_ABS_W, None, None, _OFF_NR)]
        if arch == "SCMP_ARCH_X86_64":
            prog.append((_JSET_K, "x32" if x32 is not None else "main", None, _X32_SYSCALL_BIT))
        prog.append((_JGT_K, "enosys", "main", high))
    if x32 is not None and "SCMP_ARCH_X86_64" in top:
        prog += ["x32", (_JGT_K, "enosys", "main", x32)]
    prog += ["enosys", (_RET_K, None, None, _ACT_ERRNO | _ENOSYS), "main"]
    labels: dict[str, int] = {}
    insns: list[tuple[int, str | None, str | None, int | str]] = []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(insns):
        # jumps are relative to the next instruction
        def rel(label: str | None, here: int = i + 1) -> int:
            return 0 if label is None else labels[label] - here
        if code == _JA:
            assert isinstance(k, str)
            out += struct.pack("=HBBI", code, 0, 0, rel(k))
            continue
        t, f = rel(jt), rel(jf)
        if not (0 <= t <= 255 and 0 <= f <= 255):  # pragma: no cover - the stub is a dozen insns
            raise errors.ContainerError("seccomp stub jump out of range")
        assert isinstance(k, int)
        out += struct.pack("=HBBI", code, t, f, k)
    return bytes(out)


# --- the caches: per process, and compiled programs on disk ---------------------------

#: the on-disk format; bump it when the program for one key may change (the stub, compile options)
_CACHE_FORMAT = 1
_CACHE_MAGIC = b"jupyter-contain seccomp program\n"
_CACHE_ENV = "JUPYTER_CONTAIN_SECCOMP_CACHE"
_MAX_INSNS = 4096   # BPF_MAXINSNS: the kernel refuses a longer program
_MAX_HEADER = 4096


def cache_dir() -> Path | None:
    """Where compiled programs are kept (None: nowhere, compile in each process).

    ``$JUPYTER_CONTAIN_SECCOMP_CACHE`` overrides it (empty: no cache). Under
    ``/run`` (or the user's runtime folder): a reboot, which is when the kernel
    changes, starts empty. Without ``$XDG_RUNTIME_DIR`` a non-root user gets no
    cache rather than one in a folder other users share.
    """
    env = os.environ.get(_CACHE_ENV)
    if env is not None:
        return Path(env) if env else None
    if os.geteuid() == 0:
        return Path("/run/jupyter-contain-cache/seccomp")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "jupyter-contain-cache" / "seccomp" if xdg else None


def _cache_key(section: Mapping[str, Any]) -> str:
    """What a compiled program depends on, hashed: the resolved section (profile, guard,
    capabilities, architecture, kernel-version choices), the kernel, the process's ABI, the format."""
    uname = os.uname()
    material = json.dumps({"format": _CACHE_FORMAT, "section": section, "kernel": uname.release,
                           "machine": uname.machine, "bits": 64 if sys.maxsize > 2**32 else 32},
                          sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()


def _lib_identity() -> dict[str, Any] | None:
    """The libseccomp file this process loaded (path, device, inode, size, mtime), from /proc/self/maps."""
    _libseccomp()
    try:
        with open("/proc/self/maps", "rb") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and b"/libseccomp.so" in parts[5]:
                    path = os.fsdecode(parts[5].strip())
                    st = os.stat(path)
                    return {"path": path, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                            "mtime_ns": st.st_mtime_ns}
    except OSError:
        pass
    return None


def _same_lib(recorded: Any) -> bool:
    """The libseccomp a cached program names is still the file at its path (no upgrade since)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("path"), str):
        return False
    try:
        st = os.stat(recorded["path"])
    except OSError:
        return False
    return (recorded.get("dev"), recorded.get("ino"), recorded.get("size"), recorded.get("mtime_ns")) == (
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _private_dir(path: Path, *, create: bool) -> int | None:
    """An O_DIRECTORY fd of ``path`` if this user owns it and no one else may write in it, else None.

    ``create``: make it (and its parents, 0700) when missing. Opened without following a
    symlink in its last component; every later access goes through the fd.
    """
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            log.debug("seccomp cache: cannot make %s: %s", path, exc)
            return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        log.warning("seccomp cache %s is not a folder of this user only (owner %d, mode %o): not used",
                    path, st.st_uid, stat.S_IMODE(st.st_mode))
        return None
    return fd


def _read_cached(dfd: int, name: str, key: str) -> bytes | None:
    """The program in ``name`` if every check holds (see the module docstring), else None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None   # missing, or a symlink (ELOOP)
    try:
        st = os.fstat(fd)
        limit = len(_CACHE_MAGIC) + _MAX_HEADER + _MAX_INSNS * 8
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022
                or st.st_size > limit):
            log.warning("seccomp cache file %s is not a private regular file of this user: not used", name)
            return None
        data = os.pread(fd, limit + 1, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not data.startswith(_CACHE_MAGIC):
        return None
    header_line, sep, prog = data[len(_CACHE_MAGIC):].partition(b"\n")
    try:
        header = json.loads(header_line) if sep and len(header_line) <= _MAX_HEADER else None
    except ValueError:
        header = None
    if (not isinstance(header, dict) or header.get("format") != _CACHE_FORMAT or header.get("key") != key
            or header.get("size") != len(prog) or not prog or len(prog) % 8 or len(prog) // 8 > _MAX_INSNS
            or header.get("sha256") != hashlib.sha256(prog).hexdigest() or not _same_lib(header.get("lib"))):
        return None
    return prog


def _write_cached(dfd: int, name: str, key: str, prog: bytes) -> None:
    """Write the cache file beside its place and rename it there (readers see the old file or the whole new one)."""
    header = json.dumps({"format": _CACHE_FORMAT, "key": key, "size": len(prog),
                         "sha256": hashlib.sha256(prog).hexdigest(), "lib": _lib_identity()},
                        sort_keys=True, separators=(",", ":")).encode()
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    except OSError as exc:
        log.debug("seccomp cache: cannot write %s: %s", name, exc)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_CACHE_MAGIC + header + b"\n" + prog)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError as exc:
        log.debug("seccomp cache: cannot write %s: %s", name, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)


def cached_program(section: Mapping[str, Any], *, directory: Path | None) -> bytes:
    """The program for a resolved ``section``: from ``directory`` when a valid file is there,
    else compiled (and, with a usable ``directory``, written there for the next process)."""
    dfd = _private_dir(directory, create=True) if directory is not None else None
    if dfd is None:
        return _compiled(section)
    try:
        key = _cache_key(section)
        name = key + ".bpf"
        prog = _read_cached(dfd, name, key)
        if prog is not None:
            log.debug("seccomp program %s from the cache: %d instructions", name, len(prog) // 8)
            return prog
        prog = _compiled(section)
        _write_cached(dfd, name, key, prog)
        return prog
    finally:
        os.close(dfd)


def _compiled(section: Mapping[str, Any]) -> bytes:
    prog = compile_profile(section)
    if len(prog) // 8 > _MAX_INSNS:
        raise errors.ContainerError(f"seccomp program too long ({len(prog) // 8} instructions)")
    log.debug("compiled a seccomp program: %d instructions", len(prog) // 8)
    return prog


def default_filter(capabilities: Iterable[str] = _DOCKER_DEFAULT_CAPS) -> bytes:
    """Docker's default profile compiled for ``capabilities``: once per process and set.

    Thread-safe and lazy: the first call reads the cached program (or compiles
    it, tens of ms), later calls return the same ``bytes`` object.
    """
    key = frozenset(capabilities)
    prog = _cache.get(key)
    if prog is None:
        with _cache_lock:
            prog = _cache.get(key)
            if prog is None:
                prog = cached_program(_resolved(key), directory=cache_dir())
                _cache[key] = prog
    return prog


def _resolved(caps: frozenset[str]) -> dict[str, Any]:
    """Docker's profile resolved for ``caps``, once per process and set (callers must not modify it)."""
    section = _sections.get(caps)
    if section is None:
        with _sections_lock:
            section = _sections.setdefault(caps, resolve_profile(load_profile(), capabilities=caps))
    return section


_guard_lock = threading.Lock()
_guard_program: bytes | None = None


def _guard_section() -> dict[str, Any]:
    arches = _resolved(frozenset())["architectures"]
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": arches, "syscalls": _guard_refusals()}


def guard_filter() -> bytes:
    """The host-file guard alone (mode "guard"), compiled once per process (or machine: the cache)."""
    global _guard_program
    if _guard_program is None:
        with _guard_lock:
            if _guard_program is None:
                _guard_program = cached_program(_guard_section(), directory=cache_dir())
    return _guard_program


def filter_for(mode: str, *, capabilities: Iterable[str] = _DOCKER_DEFAULT_CAPS,
               name: str = "") -> bytes:
    """The BPF program for a container's seccomp ``mode`` (``b""`` = no filter)."""
    check_mode(mode)
    if mode == "guard":
        log.warning("container %s runs without Docker's seccomp profile (seccomp=unconfined for a kernel); "
                    "only the host-file guard (no setuid/setgid files, device nodes or xattrs) stays", name or "?")
        return guard_filter()
    if mode == "unconfined":
        log.warning("container %s runs without a seccomp filter (seccomp=unconfined): "
                    "every syscall its capabilities allow is open to it", name or "?")
        return b""
    return default_filter(capabilities)


def oci_section(mode: str, *, capabilities: Iterable[str] = _DOCKER_DEFAULT_CAPS) -> dict[str, Any] | None:
    """``linux.seccomp`` for an OCI ``config.json`` (None when unconfined), so runc/crun apply the same.

    Shared between calls: serialise it, do not modify it.
    """
    if check_mode(mode) == "unconfined":
        return None
    if mode == "guard":
        return _guard_section()
    # resolved once per process and set (reading and resolving the profile
    # took ~0.3 ms of every create); callers only serialise it
    return _resolved(frozenset(capabilities))
