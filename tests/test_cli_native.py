"""CLI paths that rest on the native start: exit codes of detached containers,
the container's own terminal for ``-t``, and its own cgroup at /sys/fs/cgroup.

Run as a user would: one ``python -m jupyter_contain.cli`` subprocess per call.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def cli(root: Path, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, check=False, **kw)


def cli_in_pty(root: Path, *args: str, timeout: float = 30) -> tuple[int, bytes]:
    """Run the CLI with a terminal as its stdin/stdout/stderr; returns (code, all output)."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_contain.cli", "--root", str(root), *args],
                            stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@pytest.fixture
def root(image_store):
    return image_store.root


def _row(root: Path, name: str, timeout: float = 10) -> dict:
    """The ``ps -a`` row of ``name`` once it has exited."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["name"]: r for r in json.loads(cli(root, "ps", "-a", "--json").stdout)}
        if rows[name]["status"] == "exited" or time.monotonic() > deadline:
            return rows[name]
        time.sleep(0.1)


def test_detached_exit_code_survives_its_starter(root):
    res = cli(root, "run", "-d", "--name", "three", "busybox:test", "sh", "-c", "exit 3")
    assert res.returncode == 0, res.stderr
    cid = res.stdout.strip()
    try:
        row = _row(root, "three")
        assert row["status"] == "exited"
        assert row["exit"]["code"] == 3 and row["exit"]["signal"] is None
        assert row["reason"] == "exited with code 3"
        assert (root / "containers" / cid / "exit").read_text() == "code 3\n"
        assert "exited: exited with code 3" in cli(root, "ps", "-a").stdout
    finally:
        cli(root, "rm", "-f", cid)


def test_detached_signal_and_kill_are_recorded(root):
    res = cli(root, "run", "-d", "--name", "segv", "busybox:test", "sh", "-c", "kill -SEGV $$")
    cid1 = res.stdout.strip()
    res = cli(root, "run", "-d", "--name", "sleeper", "busybox:test", "sleep", "60")
    cid2 = res.stdout.strip()
    try:
        row = _row(root, "segv")
        assert row["exit"]["code"] == 128 + 11 and row["reason"] == "killed by SIGSEGV"
        assert cli(root, "kill", "sleeper").returncode == 0
        row = _row(root, "sleeper")
        assert row["exit"]["code"] == 137 and row["reason"] == "killed by SIGKILL"
    finally:
        cli(root, "rm", "-f", cid1, cid2)


def test_run_tty_is_the_containers_own_terminal(root):
    code, out = cli_in_pty(root, "run", "--rm", "-t", "-u", "1000", "busybox:test", "sh", "-c",
                           "tty; echo via-ctty > /dev/tty; exit 4")
    assert code == 4, out
    assert b"/dev/pts/0" in out and b"via-ctty" in out


def test_exec_tty(root):
    res = cli(root, "run", "-d", "--name", "bgt", "busybox:test", "sleep", "60")
    assert res.returncode == 0, res.stderr
    cid = res.stdout.strip()
    try:
        code, out = cli_in_pty(root, "exec", "-t", "bgt", "sh", "-c", "tty; exit 6")
        assert code == 6, out
        assert b"/dev/pts/0" in out
        # without -t: no terminal inside (stdout is a pipe here)
        res = cli(root, "exec", "bgt", "sh", "-c", "tty")
        assert "not a tty" in res.stdout
    finally:
        cli(root, "rm", "-f", cid)


def test_memory_limit_readable_inside(root):
    if not Path("/sys/fs/cgroup/memory").is_dir():
        pytest.skip("no cgroup v1 memory hierarchy on this host")
    res = cli(root, "run", "--rm", "-m", "64m", "busybox:test", "sh", "-c",
              "cat /sys/fs/cgroup/memory/memory.limit_in_bytes; "
              "echo 1 > /sys/fs/cgroup/memory/memory.limit_in_bytes; echo write=$?; "
              "grep -c . /sys/fs/cgroup/pids/cgroup.procs")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    assert lines[0] == "67108864"
    assert "write=1" in lines and "Read-only file system" in res.stderr
    assert 2 <= int(lines[-1]) <= 4   # only the container's own processes
