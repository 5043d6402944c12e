"""Tests of runtime/containers/cgroups.py.

v1: for real on this machine (hybrid: v1 controllers + a controller-less
unified mount). v2: the core files (procs, freeze, kill, events) for real on
the unified mount when it exists, and the controller files against a v2-shaped
tree in a temp dir with a small fake kernel (mkdir populates control files,
subtree_control obeys the "no internal processes" rule, ...).

Every test uses its own parent folder name (``jupyter-contain-test-<pid>``)
so that other work running on the machine is never touched; conftest's leak
check asserts no ``jupyter-contain*`` folder, mount, fd or child process is
left behind (on v2 also in the ancestors where placement may put them).
The fake kernel is injected as the backends' ``CgroupFS``: nothing here
patches the module's private functions.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest

from jupyter_contain.errors import CgroupError, InvalidSpec
from jupyter_contain.runtime.containers import cgroups as cg
from jupyter_contain.runtime.containers.cgroups import (
    DEFAULT_PIDS_LIMIT,
    CgroupFS,
    CgroupRoot,
    Cgroups,
    Limits,
    detect,
    find_orphans,
    parse_cpus,
    parse_memory,
)

CGROUP_FS = Path("/sys/fs/cgroup")
PREFIX = f"jupyter-contain-test-{os.getpid()}"
MiB = 1 << 20


@pytest.fixture
def spawn():
    """Start a child that waits on stdin until released (so it can be attached first)."""
    procs: list[subprocess.Popen] = []

    def start(script: str, *, python: bool = False) -> subprocess.Popen:
        if python:
            argv = [sys.executable, "-c", "import sys; sys.stdin.read(1)\n" + script]
        else:
            argv = ["/bin/sh", "-c", "read x; " + script]
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(p)
        return p

    yield start
    leaked = []
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            leaked.append(p.pid)
            p.kill()
            p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()
    assert not leaked, f"processes left running: {leaked}"


def release(p: subprocess.Popen) -> None:
    p.stdin.write(b"\n")
    p.stdin.flush()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


# --- parsing -------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("512m", 512 * MiB), ("1g", 1 << 30), ("1.5GiB", 3 << 29), ("1048576", 1048576),
    ("100k", 100 << 10), ("2 MB", 2 * MiB), ("64MiB", 64 * MiB), ("7b", 7),
    ("9007199254740993", 9007199254740993),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "m", "-1", "0", "0.1b", "1x", "1e9", "ten", "1.2.3g", "nan"])
def test_parse_memory_rejects(text):
    with pytest.raises(InvalidSpec):
        parse_memory(text)


def test_parse_cpus():
    assert parse_cpus("1.5") == 1.5
    assert parse_cpus("2") == 2.0
    assert Limits(cpus=1.5).cpu_quota_us == 150000
    for bad in ["0", "-1", "abc", "", "inf", "nan", "0.001"]:
        with pytest.raises(InvalidSpec):
            parse_cpus(bad)


def test_limits_validate():
    assert Limits().pids == DEFAULT_PIDS_LIMIT == 512
    for kw in [{"memory": 0}, {"memory": -5}, {"memory": 1.5}, {"pids": 0}, {"cpus": 0.0},
               {"cpus": float("nan")}, {"pids": True}]:
        with pytest.raises(InvalidSpec):
            Limits(**kw)


# --- detection from given inputs ----------------------------------------------------

def _write_inputs(tmp_path: Path, mountinfo: str, proc_cgroup: str) -> dict:
    (tmp_path / "mountinfo").write_text(mountinfo)
    (tmp_path / "cgroup").write_text(proc_cgroup)
    return {"mountinfo": tmp_path / "mountinfo", "proc_self_cgroup": tmp_path / "cgroup"}


def test_detect_hybrid_prefers_v1_and_skips_unused(tmp_path):
    fs = tmp_path / "fs"
    for d in ["cpu,cpuacct", "memory/process_api/abc", "pids", "freezer", "devices", "systemd", "unified"]:
        (fs / d).mkdir(parents=True)
    (fs / "unified" / "cgroup.controllers").write_text("")
    mi = "\n".join([
        f"31 23 0:28 / {fs} rw,relatime - tmpfs tmpfs rw,mode=755",
        f"32 31 0:29 / {fs}/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct",
        f"35 31 0:32 / {fs}/memory rw,relatime - cgroup cgroup rw,memory",
        f"36 31 0:33 / {fs}/devices rw,relatime - cgroup cgroup rw,devices",
        f"37 31 0:34 / {fs}/freezer rw,relatime - cgroup cgroup rw,freezer",
        f"39 31 0:36 / {fs}/pids rw,relatime - cgroup cgroup rw,pids",
        f"40 31 0:37 / {fs}/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd",
        f"41 31 0:38 / {fs}/unified rw,relatime - cgroup2 cgroup2 rw",
    ])
    pc = "9:name=systemd:/\n8:pids:/\n6:freezer:/\n5:devices:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/\n"
    root = detect(**_write_inputs(tmp_path, mi, pc))
    assert root.version == 1
    assert root.parents() == {
        "cpu": fs / "cpu,cpuacct/jupyter-contain",
        "cpuacct": fs / "cpu,cpuacct/jupyter-contain",
        "memory": fs / "memory/process_api/abc/jupyter-contain",
        "pids": fs / "pids/jupyter-contain",
        "freezer": fs / "freezer/jupyter-contain",
    }
    # the controller-less unified mount is there, but never used for controllers
    assert all(h.mountpoint != fs / "unified" for h in root.hierarchies)
    v2 = detect(**_write_inputs(tmp_path, mi, pc), version=2)
    assert v2.version == 2 and v2.hierarchies[0].controllers == frozenset()


def test_detect_v2_with_bind_mount_root_and_escapes(tmp_path):
    fs = tmp_path / "my cgroup"
    own = fs / "session"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mp = str(fs).replace(" ", "\\040")
    # a container's view: the mount shows /user.slice/u@1000 as its root
    mi = (f"40 30 0:30 /user.slice/u@1000 {mp} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
          f"41 30 0:31 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n")
    root = detect(**_write_inputs(tmp_path, mi, "1:name=systemd:/\n0::/user.slice/u@1000/session\n"))
    assert root.version == 2
    assert root.hierarchies[0].own == own
    # nothing above hands controllers down: our own cgroup is the base (and create says what is missing)
    assert root.hierarchies[0].base == own and root.hierarchies[0].controllers == frozenset()
    assert root.parents() == {"unified": own / "jupyter-contain"}


def test_detect_nothing_usable(tmp_path):
    mi = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
    root = detect(**_write_inputs(tmp_path, mi, "0::/\n"))
    assert root.version is None and "no cgroup" in root.reason
    with pytest.raises(CgroupError, match="no delegated cgroups"):
        Cgroups.create("c1", Limits(), root=root)
    missing = detect(mountinfo=tmp_path / "nope", proc_self_cgroup=tmp_path / "nope")
    assert missing.version is None and "cannot read" in missing.reason


def test_detect_this_machine():
    root = detect()
    if CGROUP_FS.joinpath("memory").is_dir():
        assert root.version == 1
        own_mem = next(ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text().splitlines()
                   if ln.split(":")[1] == "memory")
        assert root.parents()["memory"] == CGROUP_FS / "memory" / own_mem.lstrip("/") / "jupyter-contain"
    assert root.usable


# --- v1, for real -------------------------------------------------------------------

@pytest.fixture
def v1root() -> CgroupRoot:
    root = detect(version=1, parent_name=PREFIX)
    if root.version != 1:
        pytest.skip("no cgroup v1 hierarchies on this machine")
    return root


@pytest.fixture
def make(request):
    """Create cgroups and destroy them at teardown, whatever the test did."""
    made: list[Cgroups] = []

    def create(name: str, limits: Limits, root: CgroupRoot) -> Cgroups:
        c = Cgroups.create(name, limits, root=root)
        made.append(c)
        return c

    yield create
    for c in made:
        c.destroy()


def test_v1_create_writes_limits(v1root, make):
    c = make("lim", Limits(memory=64 * MiB, cpus=1.5, pids=42), v1root)
    assert set(c.paths) == {"memory", "cpu", "cpuacct", "pids", "freezer"}
    for ctrl, d in c.paths.items():
        assert d.is_dir() and d.name == "lim" and d.parent.name == PREFIX
        assert d.parent.parent == next(h.own for h in v1root.hierarchies if ctrl in h.controllers)
    mem = c.paths["memory"]
    assert int((mem / "memory.limit_in_bytes").read_text()) == 64 * MiB
    if (mem / "memory.memsw.limit_in_bytes").exists():
        assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 64 * MiB
    assert (c.paths["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "150000"
    assert (c.paths["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert (c.paths["pids"] / "pids.max").read_text().strip() == "42"
    s = c.stats()
    assert (s.memory_limit, s.pids_limit, s.pids_current, s.oom_kills) == (64 * MiB, 42, 0, 0)
    assert c.pids() == [] and not c.oom_killed()
    assert find_orphans(root=v1root) == ["lim"]
    assert find_orphans(root=v1root, exclude=["lim"]) == []


def test_v1_no_limits_means_unlimited(v1root, make):
    c = make("nolim", Limits(pids=None), v1root)
    s = c.stats()
    assert s.memory_limit is None and s.pids_limit is None
    assert (c.paths["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "-1"


def test_v1_attach_stats_and_kill_all(v1root, make, spawn):
    c = make("procs", Limits(), v1root)
    p = spawn("sleep 30 & sleep 30 & echo ok; wait")
    c.attach(p.pid)
    for ctrl, d in c.paths.items():
        assert str(p.pid) in (d / "cgroup.procs").read_text().split(), ctrl
    release(p)
    assert p.stdout.readline() == b"ok\n"
    assert len(c.pids()) == 3 and p.pid in c.pids()
    s = c.stats()
    assert s.pids_current == 3 and s.memory_current > 0 and s.cpu_usage_ns > 0
    c.kill_all()
    assert c.pids() == []
    assert p.wait(timeout=5) == -signal.SIGKILL
    # pids.current counts the orphaned sleepers until the machine's init reaps them
    deadline = time.monotonic() + 5
    while c.stats().pids_current and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.stats().pids_current == 0


def test_v1_oom_kill_detected(v1root, make, spawn):
    c = make("oom", Limits(memory=64 * MiB), v1root)
    p = spawn("a = bytearray(200 << 20)\nprint('survived')", python=True)
    c.attach(p.pid)
    release(p)
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert p.stdout.read() == b""
    assert c.oom_killed()
    s = c.stats()
    assert s.oom_kills >= 1 and s.memory_limit == 64 * MiB
    assert 32 * MiB < s.memory_peak <= 64 * MiB
    assert c.memory_outcome() == (True, 64 * MiB, s.memory_peak)   # what an exit record takes


def test_v1_no_oom_under_limit(v1root, make, spawn):
    c = make("fits", Limits(memory=64 * MiB), v1root)
    p = spawn("a = bytearray(16 << 20)\nprint('ok')", python=True)
    c.attach(p.pid)
    release(p)
    assert p.wait(timeout=30) == 0
    assert not c.oom_killed()
    assert c.stats().memory_peak >= 16 * MiB
    oom, limit, peak = c.memory_outcome()
    assert not oom and limit == 64 * MiB and peak is not None and peak >= 16 * MiB


def test_v1_pids_limit_stops_fork_bomb(v1root, make, spawn):
    c = make("bomb", Limits(pids=20), v1root)
    # the sleepers must not hold our pipes open, or communicate() would wait for them
    p = spawn("for i in $(seq 200); do sleep 30 </dev/null >/dev/null 2>&1 & done; echo done")
    c.attach(p.pid)
    release(p)
    _out, err = p.communicate(timeout=30)
    assert b"fork" in err.lower(), err
    n = c.stats().pids_current
    assert 0 < n <= 20 and len(c.pids()) == n
    subprocess.run(["/bin/true"], check=True)  # the host can still fork
    c.kill_all()
    assert c.pids() == []


def test_v1_paths_for_names_the_folders_before_create_makes_them(v1root, make):
    planned = v1root.paths_for("planned")
    assert not any(d.exists() for d in planned.values())     # known before anything exists
    c = make("planned", Limits(pids=8), v1root)
    assert c.paths == planned
    with pytest.raises(InvalidSpec):
        v1root.paths_for("../escape")


def test_v1_pids_outcome_counts_refused_forks(v1root, make, spawn):
    c = make("refuse", Limits(pids=3), v1root)
    assert c.pids_outcome() == (3, 0)
    p = spawn("sleep 30 </dev/null >/dev/null 2>&1 & sleep 30 </dev/null >/dev/null 2>&1 & "
              "sleep 30 </dev/null >/dev/null 2>&1 & echo done")
    c.attach(p.pid)
    release(p)
    p.communicate(timeout=30)
    limit, refused = c.pids_outcome()
    assert limit == 3 and refused >= 1
    c.kill_all()


def test_v1_cpu_quota_holds(v1root, make, spawn):
    c = make("cpu", Limits(cpus=0.5), v1root)
    p = spawn("while :; do :; done")
    c.attach(p.pid)
    release(p)
    time.sleep(0.3)  # past the start
    u0, t0 = c.stats().cpu_usage_ns, time.monotonic()
    time.sleep(2.0)
    u1, t1 = c.stats().cpu_usage_ns, time.monotonic()
    ratio = (u1 - u0) / 1e9 / (t1 - t0)
    throttled = cg.REAL_FS.read_keyed(c.paths["cpu"] / "cpu.stat").get("nr_throttled", 0)
    c.kill_all()
    # The quota is a ceiling: within 20% above it, and it was the quota that held the spinner
    # back (throttled), not only other load on this shared machine.
    assert ratio <= 0.6, f"cpu share {ratio:.3f} with cpus=0.5"
    assert throttled > 0 and ratio > 0.1, (ratio, throttled)


def test_v1_freeze_thaw(v1root, make, spawn):
    c = make("frz", Limits(), v1root)
    p = spawn("while :; do :; done")
    c.attach(p.pid)
    release(p)
    time.sleep(0.1)
    c.freeze()
    assert (c.paths["freezer"] / "freezer.state").read_text().strip() == "FROZEN"
    a = cpu_ticks(p.pid)
    time.sleep(0.3)
    assert cpu_ticks(p.pid) == a, "a frozen process made progress"
    c.thaw()
    assert (c.paths["freezer"] / "freezer.state").read_text().strip() == "THAWED"
    time.sleep(0.3)
    assert cpu_ticks(p.pid) > a
    # kill_all works on a frozen container too
    c.freeze()
    c.kill_all()
    assert c.pids() == [] and p.wait(timeout=5) == -signal.SIGKILL
    assert (c.paths["freezer"] / "freezer.state").read_text().strip() == "THAWED"


def test_v1_destroy_removes_everything_and_is_idempotent(v1root, spawn):
    a = Cgroups.create("one", Limits(memory=32 * MiB), root=v1root)
    b = Cgroups.create("two", Limits(), root=v1root)
    p = spawn("sleep 30")
    a.attach(p.pid)
    release(p)
    a.destroy()
    assert p.wait(timeout=5) == -signal.SIGKILL
    assert not any(d.exists() for d in a.paths.values())
    # the shared parent stays while "two" uses it
    assert all(d.parent.is_dir() for d in b.paths.values())
    a.destroy()
    b.destroy()
    assert not any(d.parent.exists() for d in b.paths.values())
    b.destroy()
    assert find_orphans(root=v1root) == []


def test_v1_open_from_record_and_by_name(v1root, make, spawn):
    c = make("reopen", Limits(pids=77), v1root)
    by_name = Cgroups.open("reopen", root=v1root)
    assert by_name.paths == c.paths and by_name.version == 1
    record = {k: str(v) for k, v in c.paths.items()}
    again = Cgroups.open("reopen", paths=record)
    assert again.paths == c.paths and again.stats().pids_limit == 77
    p = spawn("sleep 30")
    c.attach(p.pid)
    release(p)
    again.destroy()
    assert p.wait(timeout=5) == -signal.SIGKILL
    assert not any(d.exists() for d in c.paths.values())
    with pytest.raises(CgroupError, match="no cgroup"):
        Cgroups.open("reopen", root=v1root)
    with pytest.raises(CgroupError, match="does not belong"):
        Cgroups.open("other", paths=record)
    with pytest.raises(CgroupError, match="does not belong"):  # a cgroup we did not create
        Cgroups.open("reopen", paths={"memory": "/sys/fs/cgroup/memory/reopen"})


def test_v1_errors(v1root, make):
    make("dup", Limits(), v1root)
    with pytest.raises(CgroupError, match="already exists"):
        Cgroups.create("dup", Limits(), root=v1root)
    for bad in ["", ".", "..", "a/b", "../x", "-x", "x" * 200, "cgroup procs"]:
        with pytest.raises(InvalidSpec):
            Cgroups.create(bad, Limits(), root=v1root)
    # a failed attach says which process and where
    with pytest.raises(CgroupError, match="move process"):
        Cgroups.open("dup", root=v1root).attach(2 ** 22 + 7)


def test_v1_default_parent_name(make, spawn):
    root = detect(version=1)
    if root.version != 1:
        pytest.skip("no cgroup v1 hierarchies on this machine")
    c = make(f"default-{os.getpid()}", Limits(), root)
    assert all(d.parent.name == "jupyter-contain" for d in c.paths.values())


def test_rootless_gets_clear_error():
    """An unprivileged user (no delegated cgroup) gets a CgroupError, not a crash."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, try, report, _exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                Cgroups.create("rootless", Limits(), root=detect(parent_name=PREFIX))
                msg = "created"
            except CgroupError as e:
                msg = "CgroupError: " + str(e)
            except BaseException as e:  # noqa: BLE001 - report anything to the parent
                msg = f"{type(e).__name__}: {e}"
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    assert msg.startswith("CgroupError: no delegated cgroups"), msg
    assert "not writable by uid 65534" in msg


# --- v2 core files, for real on the unified mount ---------------------------------------------

@pytest.fixture
def v2root() -> CgroupRoot:
    root = detect(version=2, parent_name=PREFIX)
    if root.version != 2:
        pytest.skip("no cgroup v2 mount")
    if not os.access(root.hierarchies[0].own, os.W_OK):
        pytest.skip("our v2 cgroup is not writable")
    return root


def test_v2_real_core_files(v2root, make, spawn):
    base = v2root.hierarchies[0].base      # our own cgroup, or the ancestor that delegates
    if "pids" not in v2root.hierarchies[0].controllers:
        # e.g. this machine's controller-less unified mount: the error says what to delegate
        with pytest.raises(CgroupError, match=r"pids.*subtree_control"):
            Cgroups.create("v2real", Limits(), root=v2root)
        assert not (base / PREFIX).exists()
    c = make("v2real", Limits(pids=None), v2root)
    d = c.paths["unified"]
    assert d == base / PREFIX / "v2real" and set(c.paths) == {"unified"}
    p = spawn("while :; do :; done")
    c.attach(p.pid)
    assert c.pids() == [p.pid]
    release(p)
    time.sleep(0.1)
    c.freeze()
    assert "frozen 1" in (d / "cgroup.events").read_text()
    a = cpu_ticks(p.pid)
    time.sleep(0.3)
    assert cpu_ticks(p.pid) == a
    c.thaw()
    assert "frozen 0" in (d / "cgroup.events").read_text()
    time.sleep(0.2)
    assert cpu_ticks(p.pid) > a
    assert c.stats().cpu_usage_ns > 0
    c.kill_all()
    assert c.pids() == [] and p.wait(timeout=5) == -signal.SIGKILL
    assert "populated 0" in (d / "cgroup.events").read_text()


# --- v2 controllers, against a fake tree -----------------------------------------------------

class FakeV2Kernel(CgroupFS):
    """Just enough cgroup2 semantics for a tree in a temp dir, injected as the backends' file I/O."""

    CORE: ClassVar[dict[str, str]] = {"cgroup.procs": "", "cgroup.subtree_control": "", "cgroup.freeze": "0", "cgroup.kill": "",
            "cgroup.events": "populated 0\nfrozen 0\n", "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"}
    PER_CONTROLLER: ClassVar[dict[str, dict[str, str]]] = {
        "memory": {"memory.max": "max\n", "memory.current": "0\n", "memory.peak": "0\n", "memory.swap.max": "max\n",
                   "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"},
        "cpu": {"cpu.max": "max 100000\n"},
        "pids": {"pids.max": "max\n", "pids.current": "0\n"},
    }

    def __init__(self, mount: Path, *, swap_accounting: bool = True) -> None:
        self.mount = mount
        self.swap = swap_accounting
        self.writes: list[tuple[str, str]] = []
        self.unwritable: set[Path] = set()   # what a non-root user may not write

    def writable(self, path: Path) -> bool:
        return path not in self.unwritable and super().writable(path)

    def populate(self, d: Path, controllers: str) -> None:
        for f, v in self.CORE.items():
            (d / f).write_text(v)
        (d / "cgroup.controllers").write_text(controllers)
        for ctrl in controllers.split():
            for f, v in self.PER_CONTROLLER.get(ctrl, {}).items():
                if f != "memory.swap.max" or self.swap:
                    (d / f).write_text(v)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        self.populate(path, (path.parent / "cgroup.subtree_control").read_text())

    def rmdir(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "no such cgroup", str(path))
        if any(e.is_dir() for e in path.iterdir()) or (path / "cgroup.procs").read_text().split():
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        for e in path.iterdir():
            e.unlink()
        os.rmdir(path)

    def write(self, path: Path, value: str) -> None:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        self.writes.append((str(path.relative_to(self.mount)), value))
        d, name = path.parent, path.name
        if name == "cgroup.subtree_control":
            have = set(path.read_text().split())
            avail = set((d / "cgroup.controllers").read_text().split())
            for tok in value.split():
                if tok[1:] not in avail:
                    raise OSError(errno.ENOENT, "No such file or directory", str(path))
                if (d / "cgroup.procs").read_text().split():
                    raise OSError(errno.EBUSY, "Device or resource busy", str(path))
                (have.add if tok[0] == "+" else have.discard)(tok[1:])
            path.write_text(" ".join(sorted(have)))
        elif name == "cgroup.procs":
            if (d / "cgroup.subtree_control").read_text().split():
                raise OSError(errno.EBUSY, "Device or resource busy", str(path))
            path.write_text(path.read_text() + value + "\n")
            (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
        elif name == "cgroup.freeze":
            path.write_text(value)
            (d / "cgroup.events").write_text(
                f"populated {int(bool((d / 'cgroup.procs').read_text().split()))}\nfrozen {value}\n")
        elif name == "cgroup.kill":
            (d / "cgroup.procs").write_text("")
            (d / "cgroup.events").write_text("populated 0\nfrozen 0\n")
        else:
            path.write_text(value)


@pytest.fixture
def fake_v2(tmp_path, monkeypatch):
    mount = tmp_path / "fs"
    own = mount / "user.slice" / "app.scope"
    own.mkdir(parents=True)
    kernel = FakeV2Kernel(mount)
    kernel.populate(own, "cpuset cpu io memory pids")
    (own / "cgroup.subtree_control").write_text("cpu memory pids")
    (tmp_path / "mountinfo").write_text(
        f"25 20 0:23 / /sys/fs/bpf rw - bpf bpf rw\n"
        f"30 22 0:26 / {mount} rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n")
    (tmp_path / "proc-self-cgroup").write_text("0::/user.slice/app.scope\n")
    root = detect(mountinfo=tmp_path / "mountinfo", proc_self_cgroup=tmp_path / "proc-self-cgroup", fs=kernel)
    assert root.version == 2 and root.hierarchies[0].own == own == root.hierarchies[0].base
    return kernel, root, own


def test_v2_fake_create_writes_where_expected(fake_v2):
    kernel, root, own = fake_v2
    c = Cgroups.create("k1", Limits(memory=parse_memory("512m"), cpus=1.5, pids=100), root=root)
    d = own / "jupyter-contain" / "k1"
    assert c.paths == {"unified": d}
    assert kernel.writes == [
        ("user.slice/app.scope/jupyter-contain/cgroup.subtree_control", "+memory +cpu +pids"),
        ("user.slice/app.scope/jupyter-contain/k1/memory.max", str(512 * MiB)),
        ("user.slice/app.scope/jupyter-contain/k1/memory.swap.max", "0"),
        ("user.slice/app.scope/jupyter-contain/k1/cpu.max", "150000 100000"),
        ("user.slice/app.scope/jupyter-contain/k1/pids.max", "100"),
    ]
    assert (d / "cgroup.controllers").read_text().split() == ["cpu", "memory", "pids"]
    s = c.stats()
    assert (s.memory_limit, s.pids_limit, s.memory_current, s.oom_kills, s.cpu_usage_ns) == (512 * MiB, 100, 0, 0, 0)
    # a second container reuses the parent and its subtree_control as is
    kernel.writes.clear()
    c2 = Cgroups.create("k2", Limits(pids=None), root=root)
    assert kernel.writes == []
    assert find_orphans(root=root) == ["k1", "k2"]
    c.destroy()
    assert (own / "jupyter-contain").is_dir() and not d.exists()
    c2.destroy()
    assert not (own / "jupyter-contain").exists()
    assert find_orphans(root=root) == []


def test_v2_fake_paths_for_and_pids_outcome(fake_v2):
    _kernel, root, own = fake_v2
    assert root.paths_for("k9") == {"unified": own / "jupyter-contain" / "k9"}
    c = Cgroups.create("k9", Limits(pids=5), root=root)
    assert c.paths == root.paths_for("k9")
    (c.paths["unified"] / "pids.events").write_text("max 4\n")
    assert c.pids_outcome() == (5, 4)
    c.destroy()


def test_v2_fake_lifecycle(fake_v2):
    kernel, root, own = fake_v2
    c = Cgroups.create("life", Limits(memory=64 * MiB), root=root)
    d = c.paths["unified"]
    c.attach(4242)
    assert (d / "cgroup.procs").read_text().split() == ["4242"]
    assert (own / "cgroup.procs").read_text() == ""  # nothing written to our own cgroup
    assert c.pids() == [4242]
    # what the kernel shows after an OOM kill and some use
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\noom_group_kill 0\n")
    (d / "memory.peak").write_text(f"{64 * MiB}\n")
    (d / "memory.current").write_text("4096\n")
    (d / "cpu.stat").write_text("usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n")
    (d / "pids.current").write_text("3\n")
    assert c.oom_killed()
    assert c.stats() == cg.Stats(memory_current=4096, memory_peak=64 * MiB, memory_limit=64 * MiB,
                                 cpu_usage_ns=2_500_000, pids_current=3, pids_limit=512, oom_kills=1)
    assert c.memory_outcome() == (True, 64 * MiB, 64 * MiB)
    assert c.spawn_args() == {"cgroup_dir": d}   # a new process is cloned into it
    c.freeze()
    assert (d / "cgroup.freeze").read_text() == "1" and "frozen 1" in (d / "cgroup.events").read_text()
    c.thaw()
    assert (d / "cgroup.freeze").read_text() == "0"
    kernel.writes.clear()
    c.destroy()
    assert kernel.writes == [("user.slice/app.scope/jupyter-contain/life/cgroup.kill", "1")]
    assert not (own / "jupyter-contain").exists()
    c.destroy()  # idempotent


def test_v2_fake_without_swap_accounting(tmp_path, monkeypatch, fake_v2):
    kernel, root, _own = fake_v2
    kernel.swap = False
    c = Cgroups.create("noswap", Limits(memory=64 * MiB), root=root)
    assert not (c.paths["unified"] / "memory.swap.max").exists()
    assert (c.paths["unified"] / "memory.max").read_text() == str(64 * MiB)
    c.destroy()


def test_v2_fake_not_delegated(fake_v2):
    kernel, root, own = fake_v2
    (own / "cgroup.subtree_control").write_text("memory")
    (own / "cgroup.procs").write_text("1\n")
    with pytest.raises(CgroupError) as e:
        Cgroups.create("nodeleg", Limits(memory=64 * MiB, cpus=1.0), root=root)
    msg = str(e.value)
    assert "cpu, pids" in msg and "cgroup.subtree_control" in msg and "Delegate=yes" in msg
    assert not (own / "jupyter-contain").exists()
    assert kernel.writes == []
    # what is delegated is enough when only that is limited
    c = Cgroups.create("memonly", Limits(memory=64 * MiB, pids=None), root=root)
    assert (c.paths["unified"] / "cgroup.controllers").read_text().split() == ["memory"]
    c.destroy()


def test_v2_fake_failure_midway_leaves_nothing(fake_v2, monkeypatch):
    kernel, root, own = fake_v2
    real_write = kernel.write

    def failing(path, value):
        if path.name == "pids.max":
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        real_write(path, value)

    monkeypatch.setattr(kernel, "write", failing)   # the injected fake, not the module
    with pytest.raises(CgroupError, match="Invalid argument"):
        Cgroups.create("half", Limits(memory=64 * MiB), root=root)
    assert not (own / "jupyter-contain").exists()


def test_v2_fake_open_from_record(fake_v2):
    kernel, root, _own = fake_v2
    c = Cgroups.create("rec", Limits(), root=root)
    again = Cgroups.open("rec", paths={"unified": str(c.paths["unified"])}, fs=kernel)
    assert again.version == 2 and again.stats().pids_limit == 512
    again.destroy()
    assert not c.paths["unified"].exists()


# --- v2 placement: where a server in a leaf cgroup puts its containers ------------------------

@pytest.fixture
def systemd_tree(tmp_path):
    """A v2 tree laid out as systemd does: the server in a leaf, its slice delegating."""
    mount = tmp_path / "fs"
    kernel = FakeV2Kernel(mount)
    mount.mkdir()
    kernel.populate(mount, "cpuset cpu io memory pids")
    (mount / "cgroup.subtree_control").write_text("cpu io memory pids")
    for d in ("system.slice", "system.slice/jupyter.service"):
        kernel.mkdir(mount / d)
    (mount / "system.slice" / "cgroup.subtree_control").write_text("cpu memory pids")
    (mount / "system.slice/jupyter.service/cgroup.procs").write_text("1234\n")
    (tmp_path / "mountinfo").write_text(f"30 22 0:26 / {mount} rw - cgroup2 cgroup2 rw,nsdelegate\n")
    (tmp_path / "proc-self-cgroup").write_text("0::/system.slice/jupyter.service\n")

    def find() -> CgroupRoot:
        return detect(mountinfo=tmp_path / "mountinfo", proc_self_cgroup=tmp_path / "proc-self-cgroup", fs=kernel)
    return kernel, mount, find


def test_v2_a_server_in_a_leaf_puts_containers_beside_it_in_the_delegating_slice(systemd_tree):
    kernel, mount, find = systemd_tree
    root = find()
    h = root.hierarchies[0]
    assert h.own == mount / "system.slice/jupyter.service"
    assert h.base == mount / "system.slice" and h.controllers == {"cpu", "memory", "pids"}
    c = Cgroups.create("k1", Limits(memory=64 * MiB, cpus=1.0, pids=10), root=root)
    assert c.paths == {"unified": mount / "system.slice/jupyter-contain/k1"} == root.paths_for("k1")
    assert (mount / "system.slice/jupyter-contain/k1/cgroup.controllers").read_text().split() == ["cpu", "memory",
                                                                                              "pids"]
    # nothing written to a cgroup we did not make: not the slice, not the server's own leaf
    assert all(w.startswith("system.slice/jupyter-contain/") for w, _ in kernel.writes), kernel.writes
    c.destroy()
    assert not (mount / "system.slice/jupyter-contain").exists()


def test_v2_placement_climbs_to_what_delegates_everything_and_no_further_than_it_may_write(systemd_tree):
    kernel, mount, find = systemd_tree
    (mount / "system.slice/cgroup.subtree_control").write_text("memory pids")   # no cpu there
    assert find().hierarchies[0].base == mount          # root may write the top: cpu is there
    kernel.unwritable.add(mount)                         # a user may not: the slice, with what it has
    root = find()
    assert root.hierarchies[0].base == mount / "system.slice"
    assert root.missing(Limits(memory=MiB, cpus=1.0)) == ["cpu"]
    with pytest.raises(CgroupError) as e:
        Cgroups.create("k2", Limits(cpus=1.0), root=root)
    msg = str(e.value)
    assert "cpu are not delegated" in msg and "Delegate=yes" in msg and "cgroup.subtree_control" in msg
    assert not (mount / "system.slice/jupyter-contain").exists()
    c = Cgroups.create("k3", Limits(memory=MiB, pids=5), root=root)   # what is delegated is enforced
    assert (c.paths["unified"] / "memory.max").read_text() == str(MiB)
    c.destroy()


def test_v2_no_delegation_at_all_says_exactly_what_to_configure(systemd_tree):
    kernel, mount, find = systemd_tree
    kernel.unwritable.update({mount / "system.slice", mount / "system.slice/jupyter.service", mount})
    root = find()
    why = root.unusable_reason()
    assert why is not None and "not writable by uid" in why and "no part of the cgroup v2 tree" in why
    assert "Delegate=yes" in why and "chown USER D D/cgroup.procs D/cgroup.subtree_control" in why
    with pytest.raises(CgroupError, match="Delegate=yes"):
        Cgroups.create("k4", Limits(), root=root)
    assert kernel.writes == []


def test_cgroups_open_dispatches_on_the_record(systemd_tree):
    kernel, mount, find = systemd_tree
    c = Cgroups.create("k5", Limits(), root=find())
    again = Cgroups.open("k5", paths={"unified": str(c.paths["unified"])}, fs=kernel)
    assert isinstance(again, cg.CgroupsV2) and again.version == 2
    assert isinstance(Cgroups.backend(1)("x", {}), cg.CgroupsV1)
    again.destroy()
    assert not c.paths["unified"].exists()


# --- kernels' default memory limit (issue #20) ------------------------------------------------

def test_default_memory_limit_is_half_the_machine_at_most_8_gib():
    from jupyter_contain.runtime.containers.cgroups import DEFAULT_MEMORY_CAP, default_memory_limit
    assert default_memory_limit("MemTotal:        4000000 kB\n") == (4000000 * 1024 // 2) >> 20 << 20
    assert default_memory_limit("MemTotal:       24000000 kB\n") == DEFAULT_MEMORY_CAP == 8 << 30
    assert default_memory_limit("nothing here\n") == DEFAULT_MEMORY_CAP
    total = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                     if ln.startswith("MemTotal:")).split()[1]) * 1024
    assert default_memory_limit() == min(8 << 30, total // 2) >> 20 << 20


def test_kernels_get_the_default_unless_the_kernelspec_or_server_says_otherwise():
    from jupyter_contain.kernel.containers import KernelOptions
    from jupyter_contain.kernel.start_options import StartLimits, StartOptions
    from jupyter_contain.runtime.containers.cgroups import default_memory_limit
    assert KernelOptions.from_config({}, where="k").limits().memory == default_memory_limit()
    assert KernelOptions.from_config({"memory": ""}, where="k").memory == default_memory_limit()
    assert KernelOptions.from_config({"memory": "none"}, where="k").limits().memory is None
    assert KernelOptions.from_config({"memory": "512m"}, where="k").memory == 512 * MiB
    with pytest.raises(InvalidSpec, match="option memory"):
        KernelOptions.from_config({"memory": "lots"}, where="k")
    # the start dialog's "none" stays "no limit", not the default
    chosen = StartOptions.parse({"memory": "none"}, limits=StartLimits())
    assert KernelOptions.from_config(chosen.apply({"memory": "1g"}), where="k").memory is None


# --- v2 controllers, for real (the VM lane; any v2 machine run as root) ------------------------

class RecordingFS(CgroupFS):
    """The real cgroupfs, noting every write (to show which mechanism was used)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []

    def write(self, path: Path, value: str) -> None:
        self.writes.append((path.name, value))
        super().write(path, value)


@pytest.fixture
def v2real() -> CgroupRoot:
    root = detect(version=2, parent_name=PREFIX, fs=RecordingFS())
    if root.version != 2 or not {"memory", "cpu", "pids"} <= root.hierarchies[0].controllers:
        pytest.skip("no cgroup v2 tree delegating memory, cpu and pids here (the VM lane has one)")
    return root


def test_v2_real_memory_limit_oom_kills_and_is_reported(v2real, make, spawn):
    c = make("oom", Limits(memory=64 * MiB), v2real)
    assert (c.paths["unified"] / "memory.max").read_text().strip() == str(64 * MiB)
    p = spawn("a = bytearray(200 << 20)\nprint('survived')", python=True)
    c.attach(p.pid)
    release(p)
    assert p.wait(timeout=60) == -signal.SIGKILL and p.stdout.read() == b""
    oom, limit, peak = c.memory_outcome()
    assert oom and limit == 64 * MiB and peak is not None and 32 * MiB < peak <= 64 * MiB
    assert c.stats().oom_kills >= 1


def test_v2_real_cpu_quota_within_20_percent(v2real, make, spawn):
    c = make("cpu", Limits(cpus=0.5), v2real)
    assert (c.paths["unified"] / "cpu.max").read_text().split() == ["50000", "100000"]
    p = spawn("while :; do :; done")
    c.attach(p.pid)
    release(p)
    time.sleep(0.3)
    u0, t0 = c.stats().cpu_usage_ns, time.monotonic()
    time.sleep(2.0)
    u1, t1 = c.stats().cpu_usage_ns, time.monotonic()
    throttled = cg.REAL_FS.read_keyed(c.paths["unified"] / "cpu.stat").get("nr_throttled", 0)
    c.kill_all()
    ratio = (u1 - u0) / 1e9 / (t1 - t0)
    assert ratio <= 0.6 and throttled > 0 and ratio > 0.1, (ratio, throttled)


def test_v2_real_pids_limit_and_kill_all_through_cgroup_kill(v2real, make, spawn):
    c = make("bomb", Limits(pids=20), v2real)
    p = spawn("for i in $(seq 200); do sleep 30 </dev/null >/dev/null 2>&1 & done; echo done; sleep 30")
    c.attach(p.pid)
    release(p)
    deadline = time.monotonic() + 30
    while c.pids_outcome()[1] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    limit, refused = c.pids_outcome()
    assert limit == 20 and refused >= 1 and 0 < len(c.pids()) <= 20
    v2real.fs.writes.clear()
    c.kill_all()
    # the shell itself may have given up already (exit 2: "can't fork"); its sleepers are what is left
    assert c.pids() == [] and p.wait(timeout=5) in (-signal.SIGKILL, 2)
    assert ("cgroup.kill", "1") in v2real.fs.writes          # one write, no fork race


def test_v2_real_freeze_stops_everything_and_thaws(v2real, make, spawn):
    c = make("frz", Limits(pids=None), v2real)
    p = spawn("while :; do :; done & while :; do :; done")
    c.attach(p.pid)
    release(p)
    time.sleep(0.2)
    c.freeze()
    ticks = {pid: cpu_ticks(pid) for pid in c.pids()}
    assert len(ticks) == 2
    time.sleep(0.3)
    assert {pid: cpu_ticks(pid) for pid in c.pids()} == ticks, "a frozen process made progress"
    c.thaw()
    time.sleep(0.3)
    assert all(cpu_ticks(pid) > t for pid, t in ticks.items())
    c.kill_all()
    assert p.wait(timeout=5) == -signal.SIGKILL


def test_v2_real_container_is_born_in_its_cgroup(v2real, image_store):
    """A container's init is cloned into its cgroup (CLONE_INTO_CGROUP): nobody writes cgroup.procs."""
    from jupyter_contain.runtime.containers.container import ContainerSpec, Runtime
    rt = Runtime(image_store, cgroup_root=v2real)
    c = rt.create(ContainerSpec(image="busybox:test", command=("sleep", "30"), limits=Limits(memory=32 * MiB)))
    try:
        v2real.fs.writes.clear()
        c.start()
        d = Path(c.state.cgroup["unified"])
        assert d.parent.name == PREFIX and d.parent.parent == v2real.hierarchies[0].base
        mount = v2real.hierarchies[0].mountpoint
        assert Path(f"/proc/{c.pid}/cgroup").read_text().strip() == f"0::/{d.relative_to(mount)}"
        assert not [w for w in v2real.fs.writes if w[0] == "cgroup.procs"], v2real.fs.writes
        assert c.stats()["memory_limit"] == 32 * MiB
    finally:
        c.remove(force=True)
    assert not d.exists()
