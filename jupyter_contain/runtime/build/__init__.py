"""Building images from a Containerfile (Dockerfile): parser, context, layer cache, builder.

Build sits above both halves of the runtime (images and containers): it runs
containers to make images, so neither half imports it. The names here are the
build's public API for the kernel, server and CLI rooms (``build``,
``BuildOptions``, ``BuildResult``, ``Reporter``; ``parse`` for tools that only
read a Containerfile). Importing this package loads nothing else: each name
loads its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "BuildOptions": ".builder", "BuildResult": ".builder", "Reporter": ".builder", "build": ".builder",
    "parse": ".parser", "Containerfile": ".parser", "Instruction": ".parser",
}

__all__ = ["BuildOptions", "BuildResult", "Containerfile", "Instruction", "Reporter", "build", "parse"]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .builder import BuildOptions, BuildResult, Reporter, build
    from .parser import Containerfile, Instruction, parse
