"""Building images from a Containerfile (Dockerfile): parser, context, layer cache, builder.

Build sits above both halves of the runtime (images and containers): it runs
containers to make images, so neither half imports it. Importing this package
loads nothing but this docstring; ``build`` and the parser load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "BuildOptions": ".builder", "BuildResult": ".builder", "build": ".builder",
    "parse": ".parser", "Containerfile": ".parser", "Instruction": ".parser",
}

__all__ = ["BuildOptions", "BuildResult", "Containerfile", "Instruction", "build", "parse"]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .builder import BuildOptions, BuildResult, build
    from .parser import Containerfile, Instruction, parse
