"""Stand-ins for stock images without a usable ipykernel (issue #18), built offline like the base images.

- busybox: no Python, no libc (``bootstrap.BUSYBOX``, from Debian's busybox-static)
- ``MINBASE``: Debian minbase without python3, as stock ``debian``/``ubuntu`` images are
- ``PYTHON_ONLY``: Debian minbase with python3 but no ipykernel and no pip, as a plain
  ``python3`` package (or a distribution's minimal Python image) is
- ``OLD_GLIBC``: Debian bullseye minbase (glibc 2.31, older than the kernel layer's 2.36)

Made with ``mmdebstrap`` from the host's apt mirror and cached once per machine by
``bootstrap.cached_rootfs_tar`` (``scripts/build-test-images minbase python3 bullseye`` builds them ahead).
"""

from __future__ import annotations

from jupyter_contain.runtime.images import bootstrap

_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

MINBASE = bootstrap.RootfsRecipe(name="debian", suite="bookworm", packages=(),
                                 config={"Env": _ENV, "Cmd": ["bash"], "WorkingDir": "/"})
PYTHON_ONLY = bootstrap.RootfsRecipe(name="debian", suite="bookworm", packages=("python3",),
                                     config={"Env": _ENV, "Cmd": ["python3"], "WorkingDir": "/"})

OLD_GLIBC = bootstrap.RootfsRecipe(name="debian", suite="bullseye", packages=(),
                                   config={"Env": _ENV, "Cmd": ["bash"], "WorkingDir": "/"})

#: name -> (recipe, image name in a test store)
STANDINS = {
    "busybox": (bootstrap.BUSYBOX, "localhost/busybox:standin"),
    "minbase": (MINBASE, "localhost/minbase:standin"),
    "python3": (PYTHON_ONLY, "localhost/python3only:standin"),
    "bullseye": (OLD_GLIBC, "localhost/bullseye:standin"),
}
