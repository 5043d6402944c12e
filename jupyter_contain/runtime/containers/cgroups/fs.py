"""The only code that touches cgroupfs: :class:`CgroupFS`, injected into every backend.

Owns the file operations a cgroup tree takes (write without ``O_CREAT``, mkdir,
rmdir, small reads and the parsing of flat-keyed files). Tests hand the
backends a subclass that gives a directory in a temp folder cgroup v2's
semantics, instead of patching this module. Must not know about containers.
"""

from __future__ import annotations

import os
from pathlib import Path

from jupyter_contain.errors import CgroupError
from jupyter_contain.runtime.fsutil import read_small


class CgroupFS:
    """Real cgroupfs access; subclass to give a temp tree a kernel's rules."""

    def write(self, path: Path, value: str) -> None:
        # No O_CREAT: a control file that does not exist means a missing controller.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> str:
        return read_small(path).decode("ascii")

    def exists(self, path: Path) -> bool:
        return os.path.exists(path)

    def is_dir(self, path: Path) -> bool:
        return os.path.isdir(path)

    def writable(self, path: Path) -> bool:
        return os.access(path, os.W_OK)

    def subdirs(self, path: Path) -> list[str]:
        with os.scandir(path) as it:
            return [e.name for e in it if e.is_dir(follow_symlinks=False)]

    # -- parsed reads --

    def read_int(self, path: Path) -> int | None:
        """An integer control file; None if missing, "max" or unreadable."""
        try:
            text = self.read(path).strip()
        except OSError:
            return None
        if text == "max" or not text:
            return None
        try:
            return int(text.split()[0])
        except ValueError:
            return None

    def read_keyed(self, path: Path) -> dict[str, int]:
        """A flat-keyed file ("key value" lines): memory.events, cpu.stat, oom_control."""
        out: dict[str, int] = {}
        try:
            text = self.read(path)
        except OSError:
            return out
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2:
                try:
                    out[parts[0]] = int(parts[1])
                except ValueError:
                    pass
        return out

    def read_words(self, path: Path) -> set[str]:
        """A space-separated list (cgroup.controllers, cgroup.subtree_control); empty if unreadable."""
        try:
            return set(self.read(path).split())
        except OSError:
            return set()


#: what every caller gets unless it injects another
REAL_FS = CgroupFS()


def fail(action: str, path: Path, e: OSError) -> CgroupError:
    """A CgroupError naming what we tried and where."""
    return CgroupError(f"cannot {action} {path}: {e.strerror or e}")
