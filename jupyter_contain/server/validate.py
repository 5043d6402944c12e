"""What a REST request may say: the allowlist of body fields per route, and each value checked.

Owns turning untrusted JSON bodies and path arguments into frozen request
records (``PullRequest``, ``CommitRequest``, ...), with the same rules as the
command line (references parse, snapshot tags are local names without a
digest, limits parse and stay under the server's maximums, server-side paths
resolve inside the allowed root). Must not do any work with what it checks
(no store, no containers, no HTTP): handlers dispatch only records that came
out of here, so a bad request changes nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ContainError, InvalidReference, InvalidSpec
from ..runtime import NETWORK_MODES, Reference, parse_cpus, parse_memory

#: body fields each route accepts; anything else is a 400 before any dispatch (STYLE.md point 8)
FIELDS: dict[str, frozenset[str]] = {
    "pull": frozenset({"reference", "platform"}),
    "push": frozenset({"target"}),
    "tag": frozenset({"target"}),
    "import": frozenset({"path", "name", "format"}),
    "save": frozenset({"path", "format"}),
    "gc": frozenset(),
    "commit": frozenset({"tag", "message", "compress", "include_runtime_state", "exclude", "include"}),
    "kernel_commit": frozenset({"tag", "message", "compress", "install_kernelspec", "display_name",
                                "include_runtime_state", "exclude", "include"}),
    "stop": frozenset({"timeout"}),
    "reset": frozenset(),
    "kernelspec": frozenset({"image", "name", "display_name", "memory", "cpus", "pids", "network", "probe",
                             "start_dialog"}),
    "kernel_start": frozenset({"name", "path", "options"}),
    "build": frozenset({"context", "file", "containerfile", "tags", "build_args", "target", "network", "no_cache",
                        "pull", "kernelspec"}),
}

MAX_BODY = 64 << 10
#: routes whose body may be larger: a build's inline Containerfile may be 64 KiB on its own
MAX_BODIES = {"build": MAX_BODY + (16 << 10)}
#: a build's inline Containerfile, tags, build args (each value) and their counts
MAX_CONTAINERFILE = 64 << 10
MAX_TAGS = 16
MAX_BUILD_ARGS = 64
MAX_BUILD_ARG = 1024
_BUILD_ARG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PULL_POLICIES = ("missing", "always", "never")
MAX_TEXT = 512
MAX_MESSAGE = 4096
_KERNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_CONTAINER_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_KERNEL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_OP_ID = re.compile(r"^[0-9a-f]{32}$")
IMPORT_FORMATS = ("auto", "rootfs", "oci", "oci-archive", "docker-archive")
SAVE_FORMATS = ("oci-archive", "docker-archive")


class BadRequest(ContainError):
    """A request body or argument is not acceptable (HTTP 400)."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """The server's ceilings for what a client may ask (None: no ceiling)."""

    max_memory: int | None = None
    max_cpus: float | None = None
    max_pids: int | None = None
    networks: tuple[str, ...] = ("none", "bridge")


def check_fields(route: str, body: Any) -> Mapping[str, Any]:
    """``body`` must be a JSON object whose keys are all allowed for ``route``."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", "invalid_body")
    unknown = sorted(str(k)[:40] for k in set(body) - FIELDS[route])
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(FIELDS[route])) or 'none'})",
                         "unknown_field")
    return body


def text(body: Mapping[str, Any], name: str, *, required: bool = False, limit: int = MAX_TEXT) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise BadRequest(f"field {name} is required", "missing_field")
        return None
    if not isinstance(v, str) or not v.strip():
        raise BadRequest(f"field {name} must be a non-empty string", "invalid_field")
    if len(v) > limit or "\x00" in v:
        raise BadRequest(f"field {name} is too long or holds a NUL", "invalid_field")
    return v


def flag(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise BadRequest(f"field {name} must be true or false", "invalid_field")
    return v


def reference(value: str, what: str = "reference") -> Reference:
    try:
        return Reference.parse(value)
    except (InvalidReference, ValueError) as exc:
        raise BadRequest(f"invalid {what} {value[:100]!r}: {exc}", "invalid_reference") from None


def image_name(value: str) -> str:
    """An image named in a path: a reference, or an id/digest prefix the store resolves."""
    if not value or len(value) > MAX_TEXT or "\x00" in value or value.startswith("-"):
        raise BadRequest(f"invalid image name {value[:100]!r}", "invalid_reference")
    return value


def snapshot_tag(value: str) -> str:
    """A commit's tag: a name with a tag, never a digest (``myenv:v1`` goes under ``localhost/``)."""
    ref = reference(value, "tag")
    if ref.digest:
        raise BadRequest(f"invalid tag {value[:100]!r}: a snapshot cannot be named by digest", "invalid_reference")
    return value


def container_ref(value: str) -> str:
    if not _CONTAINER_REF.match(value or ""):
        raise BadRequest(f"invalid container id or name {value[:100]!r}", "invalid_container")
    return value


def kernel_id(value: str) -> str:
    if not _KERNEL_ID.match(value or ""):
        raise BadRequest(f"invalid kernel id {value[:100]!r}", "invalid_kernel_id")
    return value


def operation_id(value: str) -> str:
    if not _OP_ID.match(value or ""):
        raise BadRequest(f"invalid operation id {value[:100]!r}", "invalid_operation_id")
    return value


def kernel_name(value: str) -> str:
    if not _KERNEL_NAME.match(value or ""):
        raise BadRequest(f"invalid kernel name {value[:100]!r} (lowercase letters, digits, . _ -)",
                         "invalid_kernel_name")
    return value


#: path patterns a commit may name to leave out or keep, and their length
MAX_PATTERNS = 64
MAX_PATTERN = 256


def leave_out(body: Mapping[str, Any]) -> dict[str, Any]:
    """A commit's ``include_runtime_state`` flag and ``exclude``/``include`` path-pattern lists."""
    out: dict[str, Any] = {"include_runtime_state": flag(body, "include_runtime_state", False)}
    for name in ("exclude", "include"):
        v = body.get(name, [])
        if not isinstance(v, list) or len(v) > MAX_PATTERNS or not all(
                isinstance(x, str) and x.startswith("/") and len(x) <= MAX_PATTERN and "\x00" not in x for x in v):
            raise BadRequest(f"field {name} must be a list of at most {MAX_PATTERNS} absolute path patterns "
                             f"(e.g. /root/.cache/**)", "invalid_field")
        out[name] = v
    from ..kernel import snapshots  # the patterns as the commit will read them

    try:
        snapshots.leave_out(**out).check()
    except InvalidSpec as exc:
        raise BadRequest(str(exc), "invalid_field") from None
    return out


def compression(body: Mapping[str, Any]) -> str:
    v = body.get("compress", "gzip")
    if v not in ("gzip", "zstd"):
        raise BadRequest(f"field compress must be gzip or zstd, not {str(v)[:20]!r}", "invalid_field")
    return v


def path_inside(root: Path, value: str, *, must_exist: bool) -> Path:
    """``value`` (relative to ``root`` or absolute) resolved, refusing anything outside ``root``.

    Symlinks are resolved before the check, so a link inside the root that
    points out of it is refused too; a path to write must not be a symlink.
    """
    if "\x00" in value or len(value) > 4096:
        raise BadRequest("invalid path", "invalid_path")
    base = root.resolve()
    candidate = Path(value) if os.path.isabs(value) else base / value
    if not must_exist:
        if candidate.name in ("", ".", ".."):
            raise BadRequest(f"{value}: not a file name", "invalid_path")
        if candidate.is_symlink():
            raise BadRequest(f"{value}: is a symbolic link", "invalid_path")
        resolved = candidate.parent.resolve() / candidate.name
    else:
        resolved = candidate.resolve()
    # inside the root first: whether a path outside it exists is none of the client's business
    if resolved != base and base not in resolved.parents:
        raise BadRequest(f"{value}: outside the allowed root", "path_outside_root")
    if must_exist and not resolved.exists():
        raise BadRequest(f"{value}: no such file or directory", "path_not_found")
    if not must_exist and not resolved.parent.is_dir():
        raise BadRequest(f"{value}: the folder does not exist", "path_not_found")
    return resolved


@dataclass(frozen=True)
class KernelspecRequest:
    image: str
    name: str | None
    display_name: str | None
    memory: str | None
    cpus: str | None
    pids: int | None
    network: str | None
    probe: bool
    start_dialog: bool = False


def kernelspec_request(body: Mapping[str, Any], limits: Limits) -> KernelspecRequest:
    image = image_name(text(body, "image", required=True) or "")
    name = text(body, "name")
    if name is not None:
        kernel_name(name)
    display = text(body, "display_name", limit=200)
    memory = resource(body, "memory", limits)
    cpus = resource(body, "cpus", limits)
    pids = body.get("pids")
    if pids is not None:
        if not isinstance(pids, int) or isinstance(pids, bool) or pids < 0:
            raise BadRequest("field pids must be a process count (0: no limit)", "invalid_field")
        if limits.max_pids is not None and (pids == 0 or pids > limits.max_pids):
            raise BadRequest(f"pids {pids or 'unlimited'} is above this server's maximum {limits.max_pids}",
                             "limit_exceeded")
    network = body.get("network")
    if network is not None:
        if network not in NETWORK_MODES:
            raise BadRequest(f"unknown network mode {str(network)[:20]!r} (none, bridge or host)", "invalid_field")
        if network not in limits.networks:
            raise BadRequest(f"network {network} is not allowed on this server (allowed: "
                             f"{', '.join(limits.networks)})", "limit_exceeded")
    return KernelspecRequest(image=image, name=name, display_name=display, memory=memory, cpus=cpus, pids=pids,
                             network=network, probe=flag(body, "probe", True),
                             start_dialog=flag(body, "start_dialog", False))


def resource(body: Mapping[str, Any], name: str, limits: Limits) -> str | None:
    """``memory`` or ``cpus`` as the CLI takes them, under the server's maximum."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise BadRequest(f"field {name} must be a string or a number", "invalid_field")
    s = str(v)
    try:
        parsed = parse_memory(s) if name == "memory" else parse_cpus(s)
    except InvalidSpec as exc:
        raise BadRequest(f"field {name}: {exc}", "invalid_field") from None
    ceiling = limits.max_memory if name == "memory" else limits.max_cpus
    if ceiling is not None and parsed > ceiling:
        raise BadRequest(f"{name} {s} is above this server's maximum ({ceiling})", "limit_exceeded")
    return s


@dataclass(frozen=True)
class BuildRequest:
    """A build as the REST API takes it; ``context`` and ``file`` resolved inside the allowed root."""

    context: Path
    file: Path | None
    containerfile: str | None
    tags: tuple[str, ...]
    build_args: tuple[tuple[str, str], ...]
    target: str | None
    network: str
    no_cache: bool
    pull: str
    #: None: no kernelspec; "": one named after the image; else its name
    kernelspec: str | None


def build_request(body: Mapping[str, Any], root: Path, limits: Limits) -> BuildRequest:
    """Check a build body (this walks the file system: call it off the event loop).

    ``context`` is a folder inside ``root`` (as import paths are); ``file`` a
    Containerfile relative to the context, also inside ``root`` after symlinks
    (default: the context's Containerfile or Dockerfile, checked the same way);
    ``containerfile`` the text instead (never both).
    """
    context = path_inside(root, text(body, "context", required=True, limit=4096) or "", must_exist=True)
    if not context.is_dir():
        raise BadRequest("field context must name a folder", "invalid_path")
    inline = body.get("containerfile")
    file_text = text(body, "file", limit=4096)
    if inline is not None and file_text is not None:
        raise BadRequest("give either file or containerfile, not both", "invalid_field")
    file = None
    if file_text is not None:
        if os.path.isabs(file_text):
            raise BadRequest("field file must be relative to the context", "invalid_path")
        file = path_inside(root, str(context / file_text), must_exist=True)
        if not file.is_file():
            raise BadRequest(f"{file_text}: not a regular file", "invalid_path")
    if file is None and inline is None:   # the builder's default, checked here as a named file is
        for cand in ("Containerfile", "Dockerfile"):
            if (context / cand).is_file() or (context / cand).is_symlink():
                file = path_inside(root, str(context / cand), must_exist=True)
                break
        else:
            raise BadRequest("no Containerfile or Dockerfile in the context (give file or containerfile)",
                             "path_not_found")
    if inline is not None:
        if not isinstance(inline, str) or not inline.strip():
            raise BadRequest("field containerfile must be a non-empty string", "invalid_field")
        if len(inline.encode()) > MAX_CONTAINERFILE or "\x00" in inline:
            raise BadRequest(f"field containerfile is larger than {MAX_CONTAINERFILE} bytes or holds a NUL",
                             "invalid_field")
    tags = body.get("tags", [])
    if not isinstance(tags, list) or len(tags) > MAX_TAGS or not all(isinstance(t, str) for t in tags):
        raise BadRequest(f"field tags must be a list of at most {MAX_TAGS} names (NAME[:TAG])", "invalid_field")
    for t in tags:
        snapshot_tag(t)
    args = body.get("build_args", {})
    if not isinstance(args, dict) or len(args) > MAX_BUILD_ARGS:
        raise BadRequest(f"field build_args must be an object of at most {MAX_BUILD_ARGS} names", "invalid_field")
    for k, v in args.items():
        if not _BUILD_ARG_NAME.match(k):
            raise BadRequest(f"invalid build arg name {k[:40]!r}", "invalid_field")
        if not isinstance(v, str) or len(v) > MAX_BUILD_ARG or "\x00" in v:
            raise BadRequest(f"build arg {k} must be a string of at most {MAX_BUILD_ARG} characters",
                             "invalid_field")
    target = text(body, "target", limit=128)
    if target is not None and not _STAGE_NAME.match(target):
        raise BadRequest(f"invalid target stage {target[:40]!r}", "invalid_field")
    network = body.get("network", "none")
    if network not in NETWORK_MODES:
        raise BadRequest(f"unknown network mode {str(network)[:20]!r} (none, bridge or host)", "invalid_field")
    if network != "none" and network not in limits.networks:
        raise BadRequest(f"network {network} is not allowed on this server (allowed: "
                         f"{', '.join(limits.networks)})", "limit_exceeded")
    pull = body.get("pull", "missing")
    if pull not in PULL_POLICIES:
        raise BadRequest(f"field pull must be missing, always or never, not {str(pull)[:20]!r}", "invalid_field")
    ks = body.get("kernelspec")
    if ks is True:
        ks = ""
    elif ks is False:
        ks = None
    elif ks is not None:
        if not isinstance(ks, str):
            raise BadRequest("field kernelspec must be a kernel name or true", "invalid_field")
        kernel_name(ks)
    if ks is not None and not tags:
        raise BadRequest("a kernelspec needs a tag for the kernel to start from (field tags)", "missing_field")
    return BuildRequest(context=context, file=file, containerfile=inline, tags=tuple(tags),
                        build_args=tuple(sorted(args.items())), target=target, network=network,
                        no_cache=flag(body, "no_cache", False), pull=pull, kernelspec=ks)
