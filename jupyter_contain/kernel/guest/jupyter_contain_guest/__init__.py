"""jupyter-contain's guest side: loaded as an IPython extension inside contained kernels.

Runs in the image's Python, where jupyter_contain is not installed: standard
library and IPython only, and it must work on old Pythons (3.7+). Owns what the
user sees from the sandbox itself: why the previous kernel died. Must not
assume any host path or talk to anything but the per-kernel channel.
"""

import os
import sys

_shown = False


def _announce_previous_death(*_args, **_kwargs):
    """Say, as the first output of the restarted kernel, why the previous one died."""
    global _shown
    if _shown:
        return
    _shown = True
    reason = os.environ.get("JUPYTER_CONTAIN_PREVIOUS_DEATH")
    if reason:
        sys.stderr.write("jupyter-contain: %s\n" % reason)
        sys.stderr.flush()


def load_ipython_extension(ip):
    if os.environ.get("JUPYTER_CONTAIN_PREVIOUS_DEATH"):
        ip.events.register("pre_run_cell", _announce_previous_death)


def unload_ipython_extension(ip):
    try:
        ip.events.unregister("pre_run_cell", _announce_previous_death)
    except ValueError:
        pass
