"""The runtime: images and containers, with no Jupyter knowledge.

This module names the public API the kernel, server and CLI rooms use; they
must not reach into sub-modules' private names. Importing it has no side
effects and imports nothing else yet: each name loads its module on first
use (PEP 562), so ``jupyter contain pull`` never pays for the container,
network and snapshot modules (about 100 ms of every CLI start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Limits": ".containers.cgroups", "Stats": ".containers.cgroups", "parse_cpus": ".containers.cgroups",
    "parse_memory": ".containers.cgroups", "default_memory_limit": ".containers.cgroups",
    "NETWORK_MODES": ".containers", "Container": ".containers.container",
    "ContainerSpec": ".containers.container", "ExitInfo": ".containers.state",
    "ContainerState": ".containers.state",
    "Runtime": ".containers.container", "parse_bind": ".containers.container",
    "Bind": ".containers.rootfs", "Tmpfs": ".containers.rootfs",
    "Change": ".commit", "FolderSummary": ".commit", "diff": ".commit",
    "snapshot": ".commit", "summarize": ".commit",
    "DiffSummary": ".commit", "diff_summary": ".commit", "local_alternative": ".spec",
    "PathPatterns": ".images.snapshot",
    "ImageRecord": ".images.store", "Store": ".images.store", "default_root": ".images.store",
    "Platform": ".spec", "Reference": ".spec",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value   # once: later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:   # what type checkers and editors see
    from .commit import Change, DiffSummary, FolderSummary, diff, diff_summary, snapshot, summarize
    from .containers import NETWORK_MODES
    from .containers.cgroups import Limits, Stats, default_memory_limit, parse_cpus, parse_memory
    from .containers.container import Container, ContainerSpec, Runtime, parse_bind
    from .containers.rootfs import Bind, Tmpfs
    from .containers.state import ContainerState, ExitInfo
    from .images.snapshot import PathPatterns
    from .images.store import ImageRecord, Store, default_root
    from .spec import Platform, Reference, local_alternative
