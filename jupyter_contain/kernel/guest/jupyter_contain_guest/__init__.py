"""jupyter-contain's guest side: loaded as an IPython extension inside contained kernels.

Runs in the image's Python, where jupyter_contain is not installed: standard
library and IPython only, and it must work on old Pythons (3.7+). Owns what the
user sees from the sandbox itself: why the previous kernel died. Must not
assume any host path or talk to anything but the per-kernel folder
(``$JUPYTER_CONTAIN_KERNEL_DIR``, bind-mounted at the same path).
"""

import os
import sys

_reason = None


def _read_reason():
    """Why the previous kernel died: the host writes it in the kernel folder before each start."""
    kdir = os.environ.get("JUPYTER_CONTAIN_KERNEL_DIR")
    if kdir:
        try:
            with open(os.path.join(kdir, "previous-death")) as f:
                text = f.read().strip()
            if text:
                return text
        except (OSError, ValueError):
            pass
    return os.environ.get("JUPYTER_CONTAIN_PREVIOUS_DEATH") or None


def _announce_previous_death(*_args, **_kwargs):
    """Say, as the first output of the restarted kernel, why the previous one died."""
    global _reason
    reason, _reason = _reason, None
    if reason:
        sys.stderr.write("jupyter-contain: %s\n" % reason)
        sys.stderr.flush()


def snapshot_widget(tag=None):
    """The snapshot form (ipywidgets): diff summary, tag, message, compression, progress, install."""
    from .widgets import snapshot_widget as make

    return make(tag=tag)


def resources_widget(interval=1.0, start=True):
    """Live memory, CPU and processes of this kernel's container against its limits (ipywidgets)."""
    from .widgets import resources_widget as make

    return make(interval=interval, start=start)


def request(op, **fields):
    """One request over the host channel (``stats``, ``diff``, ``snapshot``, ...); returns the answer."""
    from .channel import request as send

    return send(op, **fields)


def load_ipython_extension(ip):
    global _reason
    # read now (the host rewrites the file before the next start), show at the first cell
    _reason = _read_reason()
    if _reason:
        ip.events.register("pre_run_cell", _announce_previous_death)
    try:
        from .magics import register
        register(ip)
    except Exception as exc:   # the death reason above must still work if the magics cannot load
        sys.stderr.write("jupyter-contain: the %%container magics are unavailable: %s\n" % exc)
    try:
        from .widgets import register_control_target
        register_control_target(ip)
    except Exception as exc:   # widgets restored after a page reload are a nicety, not a start blocker
        sys.stderr.write("jupyter-contain: widget restore unavailable: %s\n" % exc)


def unload_ipython_extension(ip):
    try:
        ip.events.unregister("pre_run_cell", _announce_previous_death)
    except ValueError:
        pass
