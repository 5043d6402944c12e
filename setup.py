"""Build glue for the parts pyproject.toml cannot declare: the cffi extension
and ``jupyter_contain/native/jc-init``, the static executable that is PID 1 of
every container (see jupyter_contain/native/jc-init.c).

jc-init is built by the ``build_ext`` step (which runs for ``pip install .``
and, in place, for ``pip install -e .``): statically linked, because it runs
after pivot_root where no host dynamic loader is reachable. Without a static
libc the build warns and the runtime falls back to an in-process init.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

_PKG = "jupyter_contain.native"
_INIT = "jc-init"


class BuildExtWithInit(build_ext):
    """``build_ext`` that also compiles the jc-init executable."""

    def _init_paths(self) -> tuple[str, str, str]:
        build_py = self.get_finalized_command("build_py")
        src_dir = build_py.get_package_dir(_PKG)
        regular = os.path.join(self.build_lib, *_PKG.split("."), _INIT)
        return os.path.join(src_dir, "jc-init.c"), regular, os.path.join(src_dir, _INIT)

    def run(self) -> None:
        super().run()
        source, regular, inplace = self._init_paths()
        self.mkpath(os.path.dirname(regular))
        cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
        # write beside and rename: a running container's init keeps executing
        # the old file (writing into it would fail with ETXTBSY)
        tmp = regular + ".tmp"
        cmd = [*cc, "-static", "-Os", "-s", "-Wall", "-Wextra", "-fno-strict-aliasing",
               "-I", os.path.dirname(source), "-o", tmp, source]
        self.announce("building jc-init: " + " ".join(cmd), level=2)
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            self.warn(f"could not build a static jc-init ({exc}); containers will use the in-process "
                      "init, which keeps a copy of the server's memory (install a static libc, e.g. "
                      "libc6-dev or glibc-static)")
            return
        os.chmod(tmp, 0o755)
        os.replace(tmp, regular)
        if self.inplace:
            shutil.copy2(regular, inplace + ".tmp")
            os.replace(inplace + ".tmp", inplace)

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), self._init_paths()[1]]


#: installed under sys.prefix by `pip install .` and `pip install -e .` alike: the file
#: that enables the Jupyter Server extension (jupyter_contain.server) in every server
DATA_FILES = [
    ("etc/jupyter/jupyter_server_config.d", ["jupyter-config/jupyter_server_config.d/jupyter_contain.json"]),
]


def _labextension_data_files() -> list[tuple[str, list[str]]]:
    """The prebuilt JupyterLab extension, where JupyterLab looks for it.

    scripts/setup builds labextension/ into jupyter_contain/labextension/ (Node
    is needed only there: a wheel built from that tree installs with no Node).
    Not built: nothing, with a warning (the server extension works without it).
    """
    src = os.path.join("jupyter_contain", "labextension")
    if not os.path.isfile(os.path.join(src, "package.json")):
        warnings.warn("jupyter_contain/labextension is not built (scripts/setup builds it); "
                      "installing without the JupyterLab extension", stacklevel=1)
        return []
    out = []
    for dirpath, _dirs, names in sorted(os.walk(src)):
        rel = os.path.relpath(dirpath, src)
        dest = os.path.normpath(os.path.join("share", "jupyter", "labextensions", "jupyter-contain", rel))
        out.append((dest, sorted(os.path.join(dirpath, n) for n in names)))
    return out


DATA_FILES += _labextension_data_files()

setup(cmdclass={"build_ext": BuildExtWithInit},
      cffi_modules=["jupyter_contain/native/build.py:ffibuilder"],
      data_files=DATA_FILES)
