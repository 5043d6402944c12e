"""The ``jupyter contain`` command line, run as a user would (a subprocess per call)."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def cli(root: Path, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.fixture
def root(image_store):
    return image_store.root


def test_help_on_every_verb(root):
    res = cli(root, "--help")
    assert res.returncode == 0
    verbs = ["images", "inspect", "tag", "rmi", "gc", "df", "import", "save", "run", "exec", "ps", "stop",
             "kill", "rm", "stats", "logs", "bundle"]
    for verb in verbs:
        assert verb in res.stdout
        r = cli(root, verb, "--help")
        assert r.returncode == 0 and "usage: jupyter contain " + verb in r.stdout, verb


def test_run_exit_codes(root):
    res = cli(root, "run", "--rm", "busybox:test", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert res.returncode == 7 and res.stdout == "out\n" and res.stderr == "err\n"
    res = cli(root, "run", "--rm", "busybox:test", "/no/such")
    assert res.returncode == 127 and "command not found" in res.stderr
    assert "Traceback" not in res.stderr
    res = cli(root, "run", "--rm", "busybox:test", "/etc/passwd")
    assert res.returncode == 126 and "cannot be executed" in res.stderr
    res = cli(root, "run", "--rm", "nope:1", "true")
    assert res.returncode == 125 and "no such image: nope:1" in res.stderr
    res = cli(root, "run", "--rm", "-m", "lots", "busybox:test", "true")
    assert res.returncode == 125 and "lots" in res.stderr
    res = cli(root, "run", "--rm", "-v", "/does/not/exist:/x", "busybox:test", "true")
    assert res.returncode == 125 and "does not exist" in res.stderr
    res = cli(root, "ps", "-a", "--json")
    assert json.loads(res.stdout) == []   # failed runs left nothing behind


def test_run_stdin(root):
    res = cli(root, "run", "--rm", "-i", "busybox:test", "tr", "a-z", "A-Z", input="hello\n")
    assert res.stdout == "HELLO\n"


def test_run_tty(root):
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_contain.cli", "--root", str(root), "run", "--rm",
                             "-t", "busybox:test", "sh", "-c", "tty; stty size"],
                            stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(30) == 0
    os.close(master)
    assert b"/dev/pts/0" in out


def test_detached_logs_stop_rm(root):
    res = cli(root, "run", "-d", "--name", "bg", "busybox:test", "sh", "-c", "echo started; sleep 60")
    assert res.returncode == 0, res.stderr
    cid = res.stdout.strip()
    try:
        deadline = time.monotonic() + 10
        while "started" not in cli(root, "logs", "bg").stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cli(root, "logs", "bg").stdout == "started\n"
        rows = json.loads(cli(root, "ps", "--json").stdout)
        assert [r["name"] for r in rows] == ["bg"]
        stats = json.loads(cli(root, "stats", "--json", "bg").stdout)
        assert stats[0]["pids_current"] >= 2
        assert cli(root, "exec", "bg", "cat", "/etc/hostname").stdout == cid[:12] + "\n"
        assert cli(root, "rm", "bg").returncode == 125   # running: refuse without -f
        assert cli(root, "stop", "-t", "1", "bg").returncode == 0
        rows = json.loads(cli(root, "ps", "-a", "--json").stdout)
        assert rows[0]["status"] == "exited"
    finally:
        cli(root, "rm", "-f", cid)
    assert json.loads(cli(root, "ps", "-a", "--json").stdout) == []


def test_killed_cli_then_gc_leaves_clean_machine(root):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for delay in (0.05, 0.15, 0.3, 0.6):
        proc = subprocess.Popen([sys.executable, "-m", "jupyter_contain.cli", "--root", str(root), "run",
                                 "-m", "64m", "busybox:test", "sleep", "60"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(0.2)
    res = cli(root, "gc")
    assert res.returncode == 0, res.stderr
    assert json.loads(cli(root, "ps", "-a", "--json").stdout) == []
    assert list((root / "containers").iterdir()) == [] or all(
        time.time() - p.stat().st_mtime < 60 for p in (root / "containers").iterdir())
