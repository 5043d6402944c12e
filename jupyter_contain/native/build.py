"""cffi build script for the native container start (API mode, out of line).

Owns: the ``ffibuilder`` that setuptools (``cffi_modules`` in setup.py) turns
into ``jupyter_contain.native._native``: the shim's C files (every ``*.c`` here
but ``jc-init.c``, which setup.py builds as its own static executable) behind
the one header ``shim.h``. Must not: import the package or do anything at
import time beyond declaring the builder (setuptools imports it).

Warnings are errors (``-Wall -Wextra -Werror``): the shim runs in a clone of a
threaded process where a silent mistake is a hung or escaped container.
``JUPYTER_CONTAIN_CFLAGS_NO_WERROR=1`` builds with the warnings shown but not
fatal, for a packager whose newer compiler warns about something new.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).resolve().parent
#: shim.h's second part (after this line) is for the C files only, never for the cdef
_C_ONLY = "/* ==== C only from here on"


def _rel(path: Path) -> str:
    # setuptools wants sources relative to the project root (its cwd)
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _cdef() -> str:
    header = (_HERE / "shim.h").read_text()
    api, found, _ = header.partition(_C_ONLY)
    if not found:
        raise RuntimeError(f"shim.h has no {_C_ONLY!r} line")
    return api


_SOURCES = sorted(p for p in _HERE.glob("*.c") if p.name != "jc-init.c")
_WARNINGS = ["-Wall", "-Wextra"] + ([] if os.environ.get("JUPYTER_CONTAIN_CFLAGS_NO_WERROR") else ["-Werror"])

ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "jupyter_contain.native._native",
    '#include <stdint.h>\n#include "shim.h"\n',
    sources=[_rel(p) for p in _SOURCES],
    include_dirs=[_rel(_HERE)],
    # what the shim's files share is hidden (JC_HIDDEN in shim.h): only the cdef's jc_* API is exported
    extra_compile_args=["-O2", *_WARNINGS, "-fno-strict-aliasing"],
)

if __name__ == "__main__":  # pragma: no cover - manual build
    ffibuilder.compile(verbose=True)
