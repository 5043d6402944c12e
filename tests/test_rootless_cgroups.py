"""Rootless containers with enforced limits: cgroup v2 with a subtree delegated to the user (#20).

Where this process may hand out a cgroup v2 subtree (root, and our cgroups' base delegates
memory, cpu and pids: the VM lane, or any v2 machine run as root), the test lays out what
systemd's ``Delegate=yes`` gives a user: ``D`` owned by the user with the controllers enabled
for its children, and the user's "server" in the leaf ``D/session``. The unprivileged driver
(``rootless_driver.py``) then gets its memory, pids and CPU limits written and enforced, and
an OOM kill counted, in cgroups it made itself beneath ``D``. Skipped on cgroup v1 (this
project's own hybrid machines): no peer enforces rootless limits there either.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import subprocess
import time

import pytest
from test_rootless import HERE, SUBID_USER, User, _home, lone_user  # noqa: F401 (a fixture)

from jupyter_contain.runtime.containers.cgroups import V2_CONTROLLERS, detect
from jupyter_contain.runtime.fsutil import remove_tree

MiB = 1 << 20


@pytest.fixture
def delegated():
    """(user, D): jc-rootless and a v2 subtree D delegated to it, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to delegate a cgroup subtree")
    root = detect(version=2)
    if root.version != 2 or not set(V2_CONTROLLERS) <= root.hierarchies[0].controllers:
        pytest.skip("no cgroup v2 tree that hands memory, cpu and pids down here")
    try:
        pw = pwd.getpwnam(SUBID_USER)
    except KeyError:
        pytest.skip(f"user {SUBID_USER} is missing: run scripts/setup")
    d = root.hierarchies[0].base / f"jc-delegated-{os.getpid()}"
    d.mkdir()
    home = None
    try:
        (d / "session").mkdir()
        for p in (d, d / "cgroup.procs", d / "cgroup.subtree_control", d / "cgroup.threads",
                  d / "session", d / "session/cgroup.procs", d / "session/cgroup.threads"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        (d / "cgroup.subtree_control").write_text(" ".join("+" + c for c in V2_CONTROLLERS))
        home = _home(pw.pw_uid, pw.pw_gid)
        yield User(pw.pw_uid, pw.pw_gid, home), d
    finally:
        if home is not None:
            remove_tree(home)
        left = [p.name for p in d.iterdir() if p.is_dir() and p.name != "session"]
        for p in (d / "session", d):
            deadline = time.monotonic() + 5
            while p.exists():
                try:
                    p.rmdir()
                except OSError as e:   # EBUSY while the kernel still unlinks the driver that left
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        assert not left, f"cgroups left in the delegated subtree: {left}"


def run_in(user: User, d, cmd: str, **req) -> dict:
    """The rootless driver, started in ``d/session`` (as a delegated user's server would be)."""
    from jupyter_contain.runtime.images import bootstrap
    req = {"image_tar": str(bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX)), "cmd": cmd, **req}
    enter = f'echo $$ > {d}/session/cgroup.procs && exec "$@"'
    res = subprocess.run(["sh", "-c", enter, "sh", *user.argv(user.path(HERE / "rootless_driver.py"),
                                                              json.dumps(req))],
                         env=user.env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_rootless_limits_are_enforced_in_a_delegated_subtree(delegated):
    user, d = delegated
    r = run_in(user, d,
               "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max; "
               "cat /sys/fs/cgroup/memory.swap.max 2>/dev/null || echo noswap; "
               "head -c 200000000 /dev/zero | tail >/dev/null; echo rc=$?; "
               "grep oom_kill /sys/fs/cgroup/memory.events; "
               # in a subshell: ash gives up at the first refused fork; then builtins only
               "(i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i + 1)); done) 2>/dev/null; "
               "read n < /sys/fs/cgroup/pids.current; echo forks=$n; "
               "while read k v; do echo pids_$k=$v; done < /sys/fs/cgroup/pids.events",
               limits={"memory": 64 * MiB, "pids": 20, "cpus": 0.5})
    assert "error" not in r, r
    lines = r["out"].splitlines()
    assert lines[:3] == [str(64 * MiB), "20", "50000 100000"], r["out"]   # written by the user itself
    assert lines[3] in ("0", "noswap"), r["out"]
    assert "rc=137" in r["out"], r["out"]                                 # the OOM killer, inside its limit
    assert any(ln.startswith("oom_kill ") and int(ln.split()[1]) >= 1 for ln in lines), r["out"]
    forks = next((int(ln.split("=")[1]) for ln in lines if ln.startswith("forks=")), None)
    assert forks is not None and forks <= 20, r["out"]                    # the pids limit held
    assert any(ln.startswith("pids_max=") and int(ln.split("=")[1]) >= 1 for ln in lines), r["out"]
    assert r["containers"] == 0


def test_rootless_without_delegation_names_what_to_configure(lone_user):
    # the user's process stays in our cgroup, which it cannot write: nothing is delegated to it
    r = lone_user.container("true", limits={"memory": 64 * MiB})
    assert r.get("error") == "InvalidSpec", r
    assert "cannot limit memory of a rootless container" in r["message"], r
    if detect().version == 2:
        assert "no part of the cgroup v2 tree above this process is delegated" in r["message"], r
        assert "Delegate=yes" in r["message"] and "cgroup.subtree_control" in r["message"], r
    else:
        assert "cgroup v1 hierarchies are the administrator's" in r["message"], r
