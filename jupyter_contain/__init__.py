"""jupyter-contain: Jupyter kernels in sandboxed containers built from OCI images.

This top-level module only names the version; importing it has no side effects.
The rooms (see DESIGN.md) are ``errors <- native <- runtime <- kernel <- server, cli``.
"""

__version__ = "0.1.0"
