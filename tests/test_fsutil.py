"""fsutil: atomic writes, non-recursive removal, and the lock children cannot inherit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from jupyter_contain.runtime.fsutil import atomic_write, file_lock, remove_tree


def test_atomic_write_replaces_whole(tmp_path: Path):
    p = tmp_path / "f"
    atomic_write(p, b"one", mode=0o600)
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two" and oct(p.stat().st_mode & 0o777) == "0o644"
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


def test_remove_tree_deep_and_readonly(tmp_path: Path):
    top = tmp_path / "t"
    d = top
    d.mkdir()
    for _ in range(1200):      # deeper than Python's recursion limit (mkdir(parents=True) recurses)
        d = d / "d"
        d.mkdir()
    (d / "f").write_text("x")
    os.chmod(top, 0o555)
    os.symlink("/etc", top / "d" / "link")   # never followed
    remove_tree(top)
    assert not top.exists() and Path("/etc/passwd").exists()


def test_exclusive_lock_orders_threads(tmp_path: Path):
    lock = tmp_path / "l"
    inside = []
    overlap = []

    def worker(i: int) -> None:
        for _ in range(20):
            with file_lock(lock):
                inside.append(i)
                if len(inside) > 1:
                    overlap.append(tuple(inside))
                time.sleep(0.0005)
                inside.remove(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == []


def test_lock_excludes_other_processes_and_shared_readers_coexist(tmp_path: Path):
    lock = tmp_path / "l"
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
             "kind = fcntl.LOCK_EX if sys.argv[2] == 'ex' else fcntl.LOCK_SH\n"
             "try:\n fcntl.lockf(fd, kind | fcntl.LOCK_NB); print('free')\n"
             "except OSError:\n print('held')")

    def other(kind: str) -> str:
        return subprocess.run([sys.executable, "-c", probe, str(lock), kind], capture_output=True,
                              text=True, timeout=30).stdout.strip()

    with file_lock(lock, shared=True):
        with file_lock(lock, shared=True):      # a second reader in this process
            assert other("ex") == "held"
            assert other("sh") == "free"
        assert other("ex") == "held"            # the first reader still holds it
    assert other("ex") == "free"
    with file_lock(lock):
        assert other("sh") == "held"
    assert other("sh") == "free"


def test_child_does_not_inherit_lock(tmp_path: Path):
    lock = tmp_path / "l"
    # a child started while the lock is held (like a container clone) must not keep it
    with file_lock(lock):
        child = subprocess.Popen(["sleep", "30"], close_fds=False)
    try:
        probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
                 "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')")
        out = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "free"
    finally:
        child.kill()
        child.wait()
