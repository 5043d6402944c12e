"""What the host lends a contained kernel: the guest module, and ipywidgets 8 for old images.

The guest module (``guest/jupyter_contain_guest``) runs inside contained kernels,
where jupyter_contain is not installed: the provisioner bind-mounts the
``guest`` folder read-only into every kernel container.

Widgets: JupyterLab 4 and Notebook 7 speak widget protocol 2, which only
ipywidgets 8 talks; an image with an older one (Debian bookworm's 6.0) or none
shows "Error displaying widget". So the host's own ipywidgets 8 and comm (the
release whose front-end this server serves) are bind-mounted read-only too,
under :data:`WIDGETS_DIR`, and the guest's boot (``jupyter_contain_guest.boot``)
puts them on the kernel's ``sys.path`` only when the image's ipywidgets cannot
render: ipywidgets ahead of the image's, comm behind it (an image's ipykernel
>= 6.18 brings its own comm, which must keep winning). Only the kernel process
sees them (no environment variable, nothing written to the image), and the
guest says so on the kernel's stderr. :func:`widgets_plan` tells
``kernelspec install`` which way an image goes.

Must not import the guest module itself (it is written for the image's Python,
not ours), nor import ipywidgets here (package metadata only: this runs on
every kernel start).
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: the IPython extension every contained kernel loads
EXTENSION = "jupyter_contain_guest"
#: where the lent ipywidgets and comm are mounted inside every kernel container; the guest's
#: boot module knows these paths too (``first``: ahead of the image, ``last``: behind it)
WIDGETS_DIR = "/.jupyter-contain-widgets"
#: the ipywidgets major version JupyterLab 4's widget manager (widget protocol 2) renders
RENDERABLE_MAJOR = 8


def guest_path() -> Path:
    """Host folder holding the ``jupyter_contain_guest`` package."""
    return Path(__file__).resolve().parent / "guest"


@dataclass(frozen=True)
class LentWidgets:
    """The host's ipywidgets and comm, as read-only binds for a kernel container."""

    ipywidgets_version: str
    comm_version: str
    #: (host path, container path): package folders and their dist-info folders
    binds: tuple[tuple[Path, str], ...]


_lent: list[LentWidgets | None] = []


def lent_widgets() -> LentWidgets | None:
    """The host's ipywidgets >= 8 and comm to lend to kernels, or None (said once in the log).

    Looked up from package metadata (no import), a few milliseconds, then
    cached; looked up again when a cached folder is gone (ipywidgets upgraded
    under a running server: a bind of a missing folder would fail the start).
    """
    if _lent and (_lent[0] is None or all(src.is_dir() for src, _ in _lent[0].binds)):
        return _lent[0]
    found = _find_lent_widgets()
    _lent[:] = [found]
    if found is None:
        log.info("this Python has no ipywidgets >= %d with comm to lend to kernels whose image cannot "
                 "render widgets (pip install 'ipywidgets>=8' beside jupyter-contain)", RENDERABLE_MAJOR)
    return found


def _find_lent_widgets() -> LentWidgets | None:
    binds: list[tuple[Path, str]] = []
    versions: dict[str, str] = {}
    for project, place in (("ipywidgets", "first"), ("comm", "last")):
        try:
            dist = importlib.metadata.distribution(project)
        except importlib.metadata.PackageNotFoundError:
            return None
        versions[project] = dist.version
        # a regular install: <site>/<project>/ beside <site>/<project>-<version>.dist-info/
        infos = {f.parts[0] for f in dist.files or () if f.parts and f.parts[0].endswith(".dist-info")}
        if len(infos) != 1:
            return None
        info = Path(str(dist.locate_file(infos.pop())))
        pkg = Path(str(dist.locate_file(project)))
        if not info.is_dir() or not (pkg / "__init__.py").is_file():
            return None   # an editable or zipped install: nothing to bind
        binds.append((pkg.resolve(), f"{WIDGETS_DIR}/{place}/{project}"))
        binds.append((info.resolve(), f"{WIDGETS_DIR}/{place}/{info.name}"))
    if _major(versions["ipywidgets"]) < RENDERABLE_MAJOR:
        return None
    return LentWidgets(ipywidgets_version=versions["ipywidgets"], comm_version=versions["comm"],
                       binds=tuple(binds))


def _major(version: str | None) -> int:
    try:
        return int(str(version).split(".", 1)[0])
    except ValueError:
        return 0


def widgets_plan(image_version: str | None, *, image: str) -> tuple[bool, str]:
    """(fine, what to say) about widgets in kernels of ``image`` whose ipywidgets is ``image_version``.

    ``image_version`` is None when the image has no ipywidgets. Not fine only
    when the image's widgets cannot render and the host has none to lend.
    """
    if image_version and _major(image_version) >= RENDERABLE_MAJOR:
        return True, f"image {image} has ipywidgets {image_version}: its widgets render in JupyterLab 4"
    had = f"ipywidgets {image_version}, which JupyterLab 4 cannot render (widget protocol 2 needs " \
          f"ipywidgets {RENDERABLE_MAJOR})" if image_version else "no ipywidgets"
    lent = lent_widgets()
    if lent is not None:
        return True, (f"image {image} has {had}: its kernels get ipywidgets {lent.ipywidgets_version} "
                      f"(and comm {lent.comm_version} if the image has none) from this host, for the kernel "
                      f"process only; the image is not changed")
    return False, (f"image {image} has {had}, and this host has no ipywidgets >= {RENDERABLE_MAJOR} to lend "
                   f"its kernels: widgets (ipywidgets, %container snapshot and resources) will not render. "
                   f"Install 'ipywidgets>={RENDERABLE_MAJOR}' beside jupyter-contain, or into the image "
                   f"(pip install 'ipywidgets>={RENDERABLE_MAJOR}' in a kernel, then %container snapshot)")
