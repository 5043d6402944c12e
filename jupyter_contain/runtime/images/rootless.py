"""What a store needs only when its user is not root: image owners, and trees only they may remove.

A rootless unpack cannot chown: every file it writes is the user's, which
is root inside the user's containers. When the user has subordinate ids
(``userns.rootless_mapping`` maps container ids 1..65536 onto them), the
files an image gives to other users (``/home/jovyan``, ``/var/mail``) get
those owners back in a second step, run as root of that user namespace
(:func:`restore_owners`). A store then holds folders the user itself may
not write, so :func:`remove_tree` falls back to ``rm`` run as that root.

Owns: the list of such entries an unpack hands over, the small stdlib-only
program that applies it (walking with ``O_NOFOLLOW``, so no symlink a layer
planted can redirect a chown), and the fallback removal. Must not: run
anything for root (who needs none of this), or import ``runtime.containers``
(the user namespace tools are ``runtime.userns``, below both halves).
Whether the caller is rootless is decided once by its store
(``Store.rootless``) and passed in.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ... import errors
from .. import userns
from ..fsutil import remove_tree as _remove_tree
from ..userns import IdMapping

log = logging.getLogger(__name__)

__all__ = ["Owner", "remove_tree", "restore_owners"]

#: (path relative to the layer root, container uid, container gid, mode, is a symlink)
Owner = tuple[str, int, int, int, bool]

# Applies the owners list: argv[1] the root, argv[2] the list (NUL-separated fields).
_RESTORE = r"""
import os, sys
root, listing = sys.argv[1], sys.argv[2]
fields = open(listing, "rb").read().split(b"\0")[:-1]
top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
for i in range(0, len(fields), 5):
    rel, uid, gid, mode, link = fields[i:i + 5]
    parts = rel.split(b"/")
    fd = os.dup(top)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.chown(parts[-1], int(uid), int(gid), dir_fd=fd, follow_symlinks=False)
        if link == b"0":
            # chown clears setuid/setgid: the mode goes back on after it
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            if (st.st_mode & 0o170000) != 0o120000:
                os.chmod(parts[-1], int(mode), dir_fd=fd)
    finally:
        os.close(fd)
"""


def restore_owners(root: Path, entries: Sequence[Owner], *, what: str, ids: IdMapping | None = None) -> int:
    """Give ``entries`` of the tree at ``root`` their image owners (container ids); returns how many.

    For a rootless caller (only a rootless unpack records such entries).
    ``ids``: the caller's mapping (default: :func:`userns.rootless_mapping`).
    Without subordinate ids only root exists in the user's containers: the
    entries stay the user's (root's inside) and this says so once per call.
    Ids beyond the mapping stay the user's too.
    """
    if not entries:
        return 0
    ids = ids if ids is not None else userns.rootless_mapping()
    usable = [e for e in entries if ids.host_uid(e[1]) is not None and ids.host_gid(e[2]) is not None]
    if len(usable) < len(entries):
        log.info("%s: %d entries belong to ids this user has no subordinate ids for: they stay root's "
                 "inside (usermod --add-subuids/--add-subgids gives them their owners)", what,
                 len(entries) - len(usable))
    if not usable:
        return 0
    with tempfile.NamedTemporaryFile(prefix=".owners-", dir=root.parent) as listing:
        for rel, uid, gid, mode, link in usable:
            listing.write(b"%s\0%d\0%d\0%d\0%s\0" % (os.fsencode(rel), uid, gid, mode, b"1" if link else b"0"))
        listing.flush()
        code, err = userns.run_in_userns(ids, [sys.executable, "-I", "-S", "-c", _RESTORE, str(root),
                                               listing.name], rootless=True)
    if code != 0:
        raise errors.StoreError(f"{what}: restoring the owners of {len(usable)} entries inside the user "
                                f"namespace failed: {err.strip() or f'exit {code}'}")
    return len(usable)


def remove_tree(path: str | os.PathLike[str], *, ids: IdMapping | None = None, rootless: bool | None = None) -> None:
    """fsutil.remove_tree, falling back (rootless) to ``rm`` as root of the user's namespace.

    ``ids``: the mapping whose root may remove the tree (a container's own,
    as recorded); default: this user's (:func:`userns.rootless_mapping`).
    ``rootless``: the caller's (its store's) answer; None asks
    :func:`userns.rootless` (for callers that hold no store).
    """
    try:
        _remove_tree(os.fspath(path))
    except PermissionError:
        if not (userns.rootless() if rootless is None else rootless):
            raise
        ids = ids if ids is not None else userns.rootless_mapping()
        if len(ids.uid_map) == 1:
            raise   # only the user's own ids: a real permission problem, not ours to force
        code, err = userns.run_in_userns(ids, ["rm", "-rf", "--one-file-system", "--", os.fspath(path)],
                                         rootless=True)
        if code != 0 or os.path.lexists(path):
            raise errors.StoreError(f"cannot remove {os.fspath(path)} as root of this user's namespace: "
                                    f"{err.strip() or f'rm exited {code}'}") from None
