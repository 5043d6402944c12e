"""Small file-system helpers shared by the runtime's rooms (file I/O only, no syscalls beyond it)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def remove_tree(path: Path | str) -> None:
    """Remove a tree we own, without recursion (hostile layers can be thousands of levels deep).

    Never follows symlinks; tolerates entries vanishing underneath; for a
    non-root owner, makes read-only directories writable first.
    """
    top = os.fspath(path)
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(top)
        return
    stack = [top]
    while stack:
        d = stack[-1]
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            stack.pop()
            continue
        except PermissionError:
            os.chmod(d, 0o700)
            continue
        subdirs = []
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.path)
                continue
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass
            except PermissionError:
                os.chmod(d, 0o700)
                os.unlink(e.path)
        if subdirs:
            stack.extend(subdirs)
            continue
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except PermissionError:
            os.chmod(os.path.dirname(d), 0o700)
            os.rmdir(d)
        stack.pop()
