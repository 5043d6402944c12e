"""Small builders shared by tests (tar layers, rootfs tarballs)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def make_rootfs_tar(path: Path, files: dict[str, bytes], *, gzip: bool = False) -> Path:
    """A tiny rootfs tarball with the given regular files (parents created as dirs)."""
    mode = "w:gz" if gzip else "w"
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(files[name]))
    return path
