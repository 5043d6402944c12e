"""OCI runtime bundles: an image applied into a plain ``rootfs/`` plus ``config.json``.

Owns flattening an image's unpacked layers (overlayfs form: whiteout devices
and opaque xattrs, as ``images.overlay`` defines them, in either namespace: a
rootless store marks opaque directories with ``user.overlay.opaque``) into
one ordinary directory tree, so runc or crun can run it with no overlay
involved. Must not mount anything: it copies files.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ... import errors
from ..images import overlay
from ..images.store import ImageRecord, Store, remove_tree


def _copy_xattrs(src: str, dst: str) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if overlay.is_overlay_xattr(name):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(Path(path))
    else:
        os.unlink(path)


def apply_layers(layers_bottom_first: Sequence[Path], dest: Path) -> None:
    """Apply overlay-form layer directories, lowest first, onto ``dest`` (a plain tree)."""
    dest.mkdir(parents=True, exist_ok=True)
    for layer in layers_bottom_first:
        links: dict[tuple[int, int], str] = {}
        dirs: list[tuple[str, os.stat_result]] = []
        for dirpath, dirnames, filenames in os.walk(layer):
            rel = os.path.relpath(dirpath, layer)
            out_dir = os.path.normpath(os.path.join(dest, rel))
            for name in sorted(dirnames) + sorted(filenames):
                src = os.path.join(dirpath, name)
                dst = os.path.join(out_dir, name)
                st = os.lstat(src)
                if overlay.is_whiteout(st):
                    _remove(dst)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    existing = os.lstat(dst) if os.path.lexists(dst) else None
                    opaque = overlay.is_opaque(src)
                    if existing is not None and (not stat.S_ISDIR(existing.st_mode) or opaque):
                        _remove(dst)
                        existing = None
                    if existing is None:
                        os.mkdir(dst, 0o700)
                    dirs.append((dst, st))
                    _copy_xattrs(src, dst)
                    continue
                _remove(dst)
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in links:
                    os.link(links[key], dst)
                    continue
                if stat.S_ISREG(st.st_mode):
                    with open(src, "rb") as fi, open(dst, "wb") as fo:
                        while chunk := fi.read(1 << 20):
                            fo.write(chunk)
                elif stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(src), dst)
                elif stat.S_ISFIFO(st.st_mode):
                    os.mkfifo(dst)
                else:
                    raise errors.UnsafeLayer(str(layer), os.path.join(rel, name), "unexpected file type")
                links[key] = dst
                os.lchown(dst, st.st_uid, st.st_gid)
                if not stat.S_ISLNK(st.st_mode):
                    os.chmod(dst, stat.S_IMODE(st.st_mode))
                _copy_xattrs(src, dst)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        for dst, st in reversed(dirs):  # children first, so the parents' mtimes stick
            os.lchown(dst, st.st_uid, st.st_gid)
            os.chmod(dst, stat.S_IMODE(st.st_mode))
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def write_bundle(store: Store, image: ImageRecord, dest: Path, *, command: tuple[str, ...] | None = None) -> None:
    """Write ``dest/config.json`` and ``dest/rootfs`` for ``image`` (dest must be new or empty)."""
    from .container import oci_config
    from .spawn import ProcessSpec

    if dest.exists() and any(dest.iterdir()):
        raise errors.ContainerError(f"{dest} is not empty")
    layers = store.ensure_unpacked(image)
    created = not dest.exists()
    try:
        apply_layers(list(reversed(layers)), dest / "rootfs")
        cfg = image.config
        argv = list(command) if command else list(cfg.entrypoint) + list(cfg.cmd)
        process = ProcessSpec(argv=tuple(argv or ["/bin/sh"]),
                              env=dict(e.split("=", 1) for e in cfg.env if "=" in e),
                              cwd=cfg.working_dir or "/", hostname="container")
        (dest / "config.json").write_text(json.dumps(oci_config(process, image), indent=2))
    except BaseException:
        if created:
            remove_tree(dest)
        else:
            for p in dest.iterdir():
                remove_tree(p)
        raise
