"""cffi build script for the native container start (API mode, out of line).

Owns: the ``ffibuilder`` that setuptools (``cffi_modules`` in setup.py) turns
into ``jupyter_contain.native._native``. Must not: import the package or do
anything at import time beyond declaring the builder (setuptools imports it).
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).resolve().parent


def _rel(path: Path) -> str:
    # setuptools wants sources relative to the project root (its cwd)
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


ffibuilder = FFI()
# shim.h is written to be cdef-clean: plain declarations and integer #defines
ffibuilder.cdef((_HERE / "shim.h").read_text())
ffibuilder.set_source(
    "jupyter_contain.native._native",
    '#include <stdint.h>\n#include "shim.h"\n',
    sources=[_rel(_HERE / "shim.c")],
    include_dirs=[_rel(_HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing"],
)

if __name__ == "__main__":  # pragma: no cover - manual build
    ffibuilder.compile(verbose=True)
