"""The runtime: images and containers, with no Jupyter knowledge.

This module names the public API the kernel, server and CLI rooms use; they
must not reach into sub-modules' private names. Importing it has no side
effects beyond importing those modules.
"""

from .containers.cgroups import Limits, Stats, parse_cpus, parse_memory
from .containers.container import NETWORK_MODES, Container, ContainerSpec, ExitInfo, Runtime, parse_bind
from .containers.rootfs import Bind
from .images.snapshot import Change, FolderSummary, diff, snapshot, summarize
from .images.store import ImageRecord, Store, default_root
from .spec import Platform, Reference

__all__ = [
    "NETWORK_MODES", "Bind", "Container", "ContainerSpec", "ExitInfo", "ImageRecord", "Limits", "Platform", "Reference",
    "Runtime", "Stats", "Store", "default_root", "parse_bind", "parse_cpus", "parse_memory",
    "Change", "FolderSummary", "diff", "snapshot", "summarize",
]
