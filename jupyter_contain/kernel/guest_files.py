"""Where the guest module lives on the host, and the name it is loaded by.

The guest module (``guest/jupyter_contain_guest``) runs inside contained kernels,
where jupyter_contain is not installed: the provisioner bind-mounts the
``guest`` folder read-only into every kernel container. Must not import the
guest module itself (it is written for the image's Python, not ours).
"""

from __future__ import annotations

from pathlib import Path

#: the IPython extension every contained kernel loads
EXTENSION = "jupyter_contain_guest"


def guest_path() -> Path:
    """Host folder holding the ``jupyter_contain_guest`` package."""
    return Path(__file__).resolve().parent / "guest"
