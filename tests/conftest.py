"""Shared fixtures: a leak check around every test, stores, and the locally built test images.

The leak check is autouse: after each test, the test process must have the same
mounts, open file descriptors and child processes as before, and no cgroup
folder named ``jupyter-contain*`` may remain beneath the cgroups of this process.
Session-scoped fixtures are set up before it takes its first look, so what they
hold open across tests does not count.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from jupyter_contain.runtime.images.store import Store

#: mount points under these prefixes (colon-separated) are not checked: for a
#: developer running a benchmark beside the suite (CI leaves it unset)
_IGNORED_MOUNTS = tuple(p for p in os.environ.get("JC_LEAK_CHECK_IGNORE_MOUNTS", "").split(":") if p)


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4] for line in f}
    return {p for p in points if not p.startswith(_IGNORED_MOUNTS)} if _IGNORED_MOUNTS else points


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.add(int(pid))
    return out


def _contain_cgroups() -> set[str]:
    found = set()
    for line in open("/proc/self/cgroup"):
        _, controllers, path = line.rstrip("\n").split(":", 2)
        name = controllers.split(",")[0].removeprefix("name=") if controllers else "unified"
        # v2: containers go beneath the nearest ancestor that delegates the controllers
        # (cgroups.placement), so look in every ancestor of our own cgroup too
        rels = [Path(path.lstrip("/"))]
        if not controllers:
            rels += list(rels[0].parents)
        bases = (Path("/sys/fs/cgroup") / controllers, Path("/sys/fs/cgroup") / name)
        for d in (base / rel for base in bases for rel in rels):
            if d.is_dir():
                for p in d.glob("jupyter-contain*"):
                    found.add(str(p))
                    for dirpath, dirnames, _ in os.walk(p):  # tolerates folders vanishing meanwhile
                        found.update(os.path.join(dirpath, n) for n in dirnames)
    return found


@pytest.fixture(autouse=True)
def leak_check(request):
    if request.node.get_closest_marker("no_leak_check"):
        yield
        return
    mounts, fds, children, cgroups = _mounts(), _fds(), _children(), _contain_cgroups()
    yield
    deadline = time.monotonic() + 5
    while True:  # processes and lazy unmounts may need a moment to go
        leaked = {
            "mounts": _mounts() - mounts,
            "fds": {fd for fd in _fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")},
            "children": _children() - children,
            "cgroups": _contain_cgroups() - cgroups,
        }
        leaked = {k: v for k, v in leaked.items() if v}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if leaked:
        details = {k: sorted(v)[:10] for k, v in leaked.items()}
        if "fds" in details:
            details["fds"] = [f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}" for fd in details["fds"]
                              if os.path.exists(f"/proc/self/fd/{fd}")]
        pytest.fail(f"test leaked: {details}")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture(scope="session")
def busybox_tar() -> Path:
    """A busybox root filesystem tarball built from Debian's busybox-static (cached per machine)."""
    from jupyter_contain.runtime.images import bootstrap

    return bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX)


@pytest.fixture(scope="session")
def image_store(tmp_path_factory, busybox_tar) -> Store:
    """A store shared by the session, holding ``localhost/busybox:test``."""
    from jupyter_contain.runtime.images import archive

    s = Store(tmp_path_factory.mktemp("image-store"))
    archive.import_rootfs(s, busybox_tar, "busybox:test", cmd=["/bin/sh"])
    return s


@pytest.fixture
def runtime(image_store):
    """A container runtime over the session store; every container a test leaves is removed."""
    from jupyter_contain.runtime.containers.container import Runtime

    rt = Runtime(image_store)
    before = {c.id for c in rt.containers()}
    yield rt
    for c in rt.containers():
        if c.id not in before:
            c.remove(force=True)
