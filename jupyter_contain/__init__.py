"""jupyter-contain: Jupyter kernels in sandboxed containers built from OCI images.

This top-level module only names the version and the IPython extension hooks
(``%load_ext jupyter_contain`` gives an ordinary kernel the host-side
``%container`` magics, imported on load); importing it has no side effects.
The rooms (see the README's "How it works", the design document of record) are
``errors <- native <- runtime <- kernel <- server, cli``; ``tests/test_rooms.py`` checks
that every import follows them.
"""

__version__ = "0.1.0"


def load_ipython_extension(ip: object) -> None:
    from .kernel.magics import load_ipython_extension as load

    load(ip)


def unload_ipython_extension(ip: object) -> None:
    from .kernel.magics import unload_ipython_extension as unload

    unload(ip)
