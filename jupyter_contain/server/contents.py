"""A guard on the Jupyter Server's file contents manager: no path through a symlink out of its root.

The notebook folder is shared with contained kernels, so what a kernel writes
there is hostile input to the server. Jupyter Server's file contents manager
follows symlinks, and its atomic save writes *through* a symlink as the last
component: a kernel that plants ``notes.ipynb -> /etc/passwd`` (or a folder
``data -> /root``) would make the server show host files to the browser and
write the user's next save into them, as the server's user (root, for a
root server).

Owns :func:`guard`, applied once by the extension at start to a file-backed
contents manager: every API path is resolved (``realpath``) and must stay
inside the manager's root; a symlink that stays inside keeps working. Must not
change anything else of the contents manager's behaviour.

What it does not close: a kernel that swaps a checked file for a symlink in
the microseconds between this check and the server's own ``open`` (the
contents manager opens by path; only an fd-based contents manager closes that,
and it is noted as future work in the README).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Any

from tornado.web import HTTPError

log = logging.getLogger(__name__)

__all__ = ["Refused", "guard"]

_MARK = "_jupyter_contain_guarded"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Refused(PermissionError, HTTPError):
    """A 403 for the API that a directory listing skips quietly (it passes over EACCES entries)."""

    def __init__(self, path: str) -> None:
        message = f"{path} leads outside the server's root through a symlink"
        HTTPError.__init__(self, 403, message)
        self.errno = errno.EACCES
        self.strerror = message

    def __str__(self) -> str:
        return HTTPError.__str__(self)


def guard(contents_manager: Any) -> bool:
    """Refuse API paths that resolve outside the manager's root; True if it was applied.

    Only file-backed managers (those with ``_get_os_path`` and ``root_dir``)
    are guarded; any other is left alone (it keeps no notebook folder a
    kernel writes).
    """
    get = getattr(contents_manager, "_get_os_path", None)
    root_dir = getattr(contents_manager, "root_dir", None)
    if get is None or root_dir is None:
        return False
    if getattr(contents_manager, _MARK, False):
        return True
    @functools.wraps(get)
    def checked(path: str) -> str:
        os_path = get(path)
        root = os.path.realpath(contents_manager.root_dir)
        real = os.path.realpath(os_path)
        if not _inside(real, root):
            log.warning("jupyter-contain: refused %r: it leads out of %s through a symlink", path, root)
            raise Refused(path)
        return os_path

    contents_manager._get_os_path = checked
    setattr(contents_manager, _MARK, True)
    return True
