"""The Jupyter Server extension: jupyter-contain's REST API and kernel-container events.

Owns nothing but the extension point; :mod:`.app` is the ``ExtensionApp``
(configuration and life cycle), :mod:`.handlers` the routes, :mod:`.service`
the work, :mod:`.operations` long work, :mod:`.validate` what requests may say,
:mod:`.events` the events. This room sits above ``kernel/`` and ``runtime/``;
nothing below imports it. Importing it has no side effects.
"""

from __future__ import annotations

from typing import Any

from .. import __version__  # noqa: F401 - shown by `jupyter server extension list`


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import ContainApp

    return [{"module": "jupyter_contain.server", "app": ContainApp}]
