"""The kernel's first steps in the container, before ipykernel starts: which ipywidgets it uses.

Runs in the image's Python (3.7+, standard library only), from the kernel's
``-c`` boot line, before anything else is imported. Owns one decision: when
the host lent ipywidgets 8 (read-only at ``/.jupyter-contain-widgets``, see
``jupyter_contain/kernel/guest_files.py``) and the image's own ipywidgets cannot
render in JupyterLab 4 (none, or older than 8), put the lent one first on this
process's ``sys.path`` and the lent comm last (behind an image's own comm,
which its ipykernel may rely on). Nothing else changes: no environment
variable (so a ``pip`` or a subprocess sees the image as it is), no file.
Says what it chose on stderr (the server's log, not the notebook). Must not
import ipywidgets, IPython or ipykernel (it only looks at package metadata).
"""

import os
import sys

WIDGETS_DIR = "/.jupyter-contain-widgets"
RENDERABLE_MAJOR = 8
#: ipywidgets 8.1 needs Python 3.7 and, through comm, 3.8; its shim covers ipykernel 5 and 6
_MIN_PYTHON = (3, 8)
_MIN_IPYKERNEL = 5


def installed_version(project):
    """The version of ``project`` this Python would import (None: not importable), without importing it.

    Reads the ``*.dist-info``/``*.egg-info`` folder beside the package (pip's
    and Debian's layouts). "?" when the package is there without metadata.
    """
    try:
        from importlib.util import find_spec

        spec = find_spec(project)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or ())
    if not locations and spec.origin:
        locations = [spec.origin]
    prefix = project.replace("-", "_").lower() + "-"
    for loc in locations:
        site = os.path.dirname(os.path.abspath(loc))
        try:
            names = os.listdir(site)
        except OSError:
            continue
        for name in sorted(names):
            low = name.lower()
            if low.startswith(prefix) and (low.endswith(".dist-info") or low.endswith(".egg-info")):
                return name[len(prefix):].rsplit(".", 1)[0].split("-py", 1)[0]
    return "?"


def _major(version):
    try:
        return int(str(version).split(".", 1)[0])
    except ValueError:
        return 0


def _lent_version(place, project):
    d = os.path.join(WIDGETS_DIR, place)
    try:
        for name in os.listdir(d):
            if name.startswith(project + "-") and name.endswith(".dist-info"):
                return name[len(project) + 1:-len(".dist-info")]
    except OSError:
        pass
    return None


def choose_widgets(say=None):
    """Lend the host's ipywidgets to this process where the image's cannot render; returns what was chosen.

    One of "image" (the image's ipywidgets renders), "lent" (the host's is used),
    "none" (nothing lent, and why is said).
    """
    say = say or (lambda text: sys.stderr.write("jupyter-contain: %s\n" % text))
    mine = installed_version("ipywidgets")
    if mine and mine != "?" and _major(mine) >= RENDERABLE_MAJOR:
        return "image"
    lent = _lent_version("first", "ipywidgets")
    had = ("the image's ipywidgets %s cannot render in JupyterLab 4 (widget protocol 2 needs ipywidgets %d)"
           % (mine, RENDERABLE_MAJOR)) if mine else "the image has no ipywidgets"
    if lent is None:
        say("%s, and the host lent none: widgets will not render" % had)
        return "none"
    if sys.version_info < _MIN_PYTHON:
        say("%s; the host's ipywidgets %s needs Python %d.%d: widgets will not render"
            % (had, lent, _MIN_PYTHON[0], _MIN_PYTHON[1]))
        return "none"
    kernel = installed_version("ipykernel")
    if kernel is None or (kernel != "?" and _major(kernel) < _MIN_IPYKERNEL):
        say("%s; the host's ipywidgets %s needs ipykernel >= %d (the image has %s): widgets will not render"
            % (had, lent, _MIN_IPYKERNEL, kernel or "none"))
        return "none"
    sys.path.insert(0, os.path.join(WIDGETS_DIR, "first"))
    extra = ""
    if installed_version("comm") is None:
        sys.path.append(os.path.join(WIDGETS_DIR, "last"))
        extra = " and comm %s" % (_lent_version("last", "comm") or "?")
    say("%s: this kernel uses ipywidgets %s%s lent by the host (the image is unchanged)" % (had, lent, extra))
    return "lent"
