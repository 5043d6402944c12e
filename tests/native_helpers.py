"""Helpers for the native-spawn tests: a busybox rootfs, running a container
with captured output, and a leak check of the test process.

Owns nothing in the package; only tests import it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_contain.runtime.containers import rootfs, spawn

BUSYBOX = Path("/bin/busybox")


def build_busybox_rootfs(root: Path) -> Path:
    """A lowerdir with Debian's static busybox and a symlink per applet."""
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "tmp").mkdir(mode=0o1777)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True).stdout.split()
    for applet in applets:
        if applet not in ("busybox", "[", "[["):
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "motd").write_text("from the lower layer\n")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    notexec = root / "bin" / "notexec"
    notexec.write_text("#!/bin/sh\necho never\n")
    notexec.chmod(0o644)
    return root


@dataclass
class Box:
    """One container's directories beside a shared lower layer."""

    lower: Path
    base: Path

    @property
    def upper(self) -> Path:
        return self.base / "upper"

    @property
    def work(self) -> Path:
        return self.base / "work"

    @property
    def merged(self) -> Path:
        return self.base / "merged"

    @property
    def state(self) -> Path:
        return self.base / "state"

    def make(self) -> Box:
        for d in (self.upper, self.work, self.merged, self.state):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def config(
        self,
        argv: Sequence[str],
        *,
        stdio: tuple[int, int, int],
        binds: Sequence[rootfs.Bind] = (),
        readonly_rootfs: bool = False,
        network: str = "none",
        cgroupfs: rootfs.CgroupFs | None = None,
        exit_fd: int | None = None,
        cgroup_tasks: Sequence[Path] = (),
        cgroup_dir: Path | None = None,
        cgroup_by_caller: bool = False,
        **process: Any,
    ) -> spawn.SpawnConfig:
        ops = rootfs.plan(
            rootfs_layers=[self.lower],
            upper=self.upper,
            work=self.work,
            target=self.merged,
            binds=binds,
            etc_files={"hostname": "box\n", "hosts": "127.0.0.1 localhost\n", "resolv.conf": ""},
            readonly_rootfs=readonly_rootfs,
            cgroupfs=cgroupfs,
        )
        process.setdefault("env", {"PATH": "/bin", "HOME": "/"})
        return spawn.SpawnConfig(
            mounts=ops, process=spawn.ProcessSpec(argv=tuple(argv), **process), stdio=stdio,
            network=network, exit_fd=exit_fd,  # type: ignore[arg-type]
            cgroup_tasks=tuple(cgroup_tasks), cgroup_dir=cgroup_dir, cgroup_by_caller=cgroup_by_caller,
        )

    def run(self, argv: Sequence[str], *, timeout: float = 20, **kw: Any) -> tuple[int, str]:
        """Run to the end; returns (exit code, stdout+stderr)."""
        out = self.base / "out.txt"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            proc = spawn.start(self.config(argv, stdio=(null, fd, fd), **kw))
        finally:
            os.close(fd)
            os.close(null)
        try:
            rc = proc.wait(timeout)
            if rc is None:
                proc.kill()
                proc.wait()
                raise AssertionError(f"{argv} did not finish within {timeout}s")
        finally:
            proc.close()
        return rc, out.read_text()


def child_pids() -> set[int]:
    """Direct children of every thread of this process."""
    pids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            pass
    return pids


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def mountinfo() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in kB (Rss, Pss, Private_Dirty, ...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def read_pty(master: int, timeout: float = 10) -> bytes:
    """Everything from a pty master until the slave side is closed (EIO)."""
    import select
    import time

    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], max(deadline - time.monotonic(), 0))
        if not r:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every slave fd is closed
            break
        if not chunk:
            break
        out += chunk
    return out
