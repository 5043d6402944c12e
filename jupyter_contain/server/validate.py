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
}

MAX_BODY = 64 << 10
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
