"""The overlay format has one home (runtime/images/overlay.py), and every reader honours both modes.

A root store marks opaque directories with ``trusted.overlay.opaque``, a
rootless one (overlays mounted with ``userxattr``) with ``user.overlay.opaque``.
Here both are made by the real unpacker, then flattened into an OCI bundle
rootfs and read back by the snapshot's lower view: the bundle of a rootless
store used to keep what an opaque directory hides, because ``bundle.py`` knew
only the ``trusted.`` name.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from layer_helpers import MEDIA, dir_, make_tar, opq, reg, wh

from jupyter_contain.runtime.containers.bundle import apply_layers
from jupyter_contain.runtime.images import overlay
from jupyter_contain.runtime.images.layers import unpack_layer
from jupyter_contain.runtime.images.snapshot import LowerView


def _unpack(tmp_path: Path, name: str, entries, *, rootless: bool, lowers=()) -> Path:
    dest = tmp_path / name
    unpack_layer(io.BytesIO(make_tar(entries)), dest, media_type=MEDIA["tar"], layer=name,
                 lower_dirs=list(lowers), rootless=rootless)
    return dest


@pytest.mark.parametrize("rootless", [False, True], ids=["root-store", "rootless-store"])
def test_bundle_honours_opaque_dirs_and_whiteouts_of_either_store(tmp_path, rootless):
    base = _unpack(tmp_path, "base", [dir_("d"), reg("d/old", b"old"), dir_("e"), reg("e/gone", b"x"),
                                      reg("keep", b"k")], rootless=rootless)
    top = _unpack(tmp_path, "top", [dir_("d"), opq("d"), reg("d/new", b"new"), wh("e/gone")],
                  rootless=rootless, lowers=[base])
    # what the unpacker wrote is the mark this store's overlays read
    mark = overlay.USER_OPAQUE_XATTR if rootless else overlay.OPAQUE_XATTR
    assert os.getxattr(top / "d", mark, follow_symlinks=False) == b"y"
    assert overlay.is_opaque(top / "d") and overlay.is_whiteout(os.lstat(top / "e" / "gone"))

    rootfs = tmp_path / "rootfs"
    apply_layers([base, top], rootfs)
    assert sorted(os.listdir(rootfs / "d")) == ["new"]       # the opaque dir hides the lower "old"
    assert os.listdir(rootfs / "e") == [] and (rootfs / "keep").read_bytes() == b"k"
    # overlayfs's own marks are format, not content: none reaches the flattened tree
    for p in (rootfs / "d", rootfs / "d" / "new"):
        assert not [n for n in os.listxattr(p, follow_symlinks=False) if overlay.is_overlay_xattr(n)], p

    # the snapshot's view of the image's lower layers reads the same stack the same way
    view = LowerView([top, base])
    assert view.lookup("d/old") is None and view.lookup("e/gone") is None
    assert view.lookup("d/new") is not None and view.lookup("keep") is not None


def test_the_format_helpers():
    assert overlay.opaque_xattr(rootless=True) == "user.overlay.opaque"
    assert overlay.opaque_xattr(rootless=False) == "trusted.overlay.opaque"
    for name in ("trusted.overlay.opaque", "user.overlay.redirect", "trusted.overlay"):
        assert overlay.is_overlay_xattr(name), name
    for name in ("user.mime_type", "security.capability", "trusted.overlayfoo", "user.overlayx"):
        assert not overlay.is_overlay_xattr(name), name
    assert set(overlay.OPAQUE_XATTRS) == {overlay.OPAQUE_XATTR, overlay.USER_OPAQUE_XATTR}
