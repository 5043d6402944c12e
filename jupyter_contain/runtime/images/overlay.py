"""The overlayfs form of a layer directory: whiteouts, opaque directories, overlay xattrs.

Owns the names and marks both sides of the format use: the OCI tar form
(``.wh.NAME`` whiteouts, the ``.wh..wh..opq`` opaque marker, AUFS's
``.wh..wh.`` bookkeeping names) and the overlayfs form on disk (a whiteout
is a character device 0:0; an opaque directory carries ``overlay.opaque=y``
in the ``trusted.`` namespace, or in ``user.`` for a rootless store whose
overlays are mounted with ``userxattr``; ``overlay.whiteout`` marks
xwhiteouts; redirect and metacopy keep data outside a layer), with the
helpers that read and write them. Every module that unpacks, walks, copies
or flattens a layer directory (``layers``, ``snapshot``, ``containers.bundle``)
asks this one, so the two xattr namespaces are never told apart in one place
and forgotten in another.

Must not: mount anything, walk trees, or decide whether the caller is
rootless (the caller passes it). File I/O on one path at a time only.
"""

from __future__ import annotations

import os
import stat

__all__ = [
    "AUFS_META_PREFIX",
    "OPAQUE_MARKER",
    "OPAQUE_XATTR",
    "OPAQUE_XATTRS",
    "UNSUPPORTED_XATTRS",
    "USER_OPAQUE_XATTR",
    "WHITEOUT_PREFIX",
    "XWHITEOUT_XATTRS",
    "is_opaque",
    "is_overlay_xattr",
    "is_whiteout",
    "make_whiteout",
    "opaque_xattr",
    "set_opaque",
]

# --- the tar form (OCI image-spec) ---------------------------------------------------------

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
#: AUFS bookkeeping names (``.wh..wh.plnk``, ``.wh..wh.aufs``); Docker skips them
AUFS_META_PREFIX = ".wh..wh."

# --- the directory form (overlayfs) --------------------------------------------------------

#: a root store's opaque mark (overlay mounted as root reads trusted.*)
OPAQUE_XATTR = "trusted.overlay.opaque"
#: a rootless store's (overlay mounted with ``userxattr``): trusted.* needs host root
USER_OPAQUE_XATTR = "user.overlay.opaque"
#: both: a reader honours either, whoever wrote the layer
OPAQUE_XATTRS = (OPAQUE_XATTR, USER_OPAQUE_XATTR)
#: an xwhiteout (a zero-size regular file marked so, where a device node cannot be made)
XWHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
#: overlayfs features that keep data or names outside the layer directory: a copy
#: of the directory alone would be wrong (xattr -> the mount option behind it)
UNSUPPORTED_XATTRS = {
    "trusted.overlay.redirect": "redirect_dir", "user.overlay.redirect": "redirect_dir",
    "trusted.overlay.metacopy": "metacopy", "user.overlay.metacopy": "metacopy",
}

_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


def is_overlay_xattr(name: str) -> bool:
    """True for overlayfs's own xattrs (either namespace): never image content, never copied."""
    return name.startswith(_OVERLAY_XATTR_PREFIXES) or name in ("trusted.overlay", "user.overlay")


def is_whiteout(st: os.stat_result) -> bool:
    """``st`` (an lstat) is an overlayfs whiteout: a character device 0:0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def make_whiteout(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
    """Make the whiteout ``path`` (a character device 0:0; overlayfs ignores its mode)."""
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)


def opaque_xattr(*, rootless: bool) -> str:
    """The opaque mark a store writes: ``user.`` rootless (``userxattr`` overlays), else ``trusted.``."""
    return USER_OPAQUE_XATTR if rootless else OPAQUE_XATTR


def is_opaque(path: str | os.PathLike[str]) -> bool:
    """``path`` (never followed) is an opaque directory, in either namespace."""
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def set_opaque(path: str | os.PathLike[str], *, rootless: bool) -> None:
    """Mark the directory ``path`` (never followed) opaque, the way this store's overlays read it."""
    os.setxattr(path, opaque_xattr(rootless=rootless), b"y", follow_symlinks=False)
