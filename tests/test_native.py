"""Real container starts through the native shim, in a busybox rootfs.

Every test runs under a leak check: the test process's mounts, children and
fds must be unchanged afterwards.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from pathlib import Path

import pytest

from jupyter_contain import errors, native
from jupyter_contain.runtime.containers import rootfs, spawn

sys.path.insert(0, str(Path(__file__).parent))
from native_helpers import (  # noqa: E402
    Box,
    build_busybox_rootfs,
    child_pids,
    mountinfo,
    open_fds,
    read_pty,
    smaps_rollup,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# Docker's well-known default effective set (14 capabilities)
DOCKER_DEFAULT_CAPS = 0x00000000A80425FB & ~(1 << 4 | 1 << 13 | 1 << 31)   # Docker's, less CAP_FSETID, CAP_NET_RAW, CAP_SETFCAP


@pytest.fixture(scope="module")
def lower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture(autouse=True)
def no_leaks(tmp_path_factory: pytest.TempPathFactory):
    mounts, children, fds = mountinfo(), child_pids(), open_fds()
    yield
    assert child_pids() == children, "child processes left behind"
    assert open_fds() == fds, "fds leaked in the test process"
    # the mount namespace is shared with whatever else runs on this machine:
    # only mounts that name our temp tree (rootfs, layers, binds) count
    ours = str(tmp_path_factory.getbasetemp())
    added = set(mountinfo().splitlines()) - set(mounts.splitlines())
    assert [m for m in added if ours in m] == [], "mounts leaked into the test process's namespace"
    assert not [m for m in mountinfo().splitlines() if " overlay " in m and ours in m]


@pytest.fixture
def box(lower: Path, tmp_path: Path) -> Box:
    return Box(lower=lower, base=tmp_path).make()


def _read_until(fd: int, marker: bytes, timeout: float = 10) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        r, _, _ = select.select([fd], [], [], max(left, 0))
        if not r:
            raise AssertionError(f"no {marker!r} within {timeout}s, got {buf!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"EOF before {marker!r}, got {buf!r}")
        buf += chunk
    return buf


class Piped:
    """A container whose stdout/stderr go to a pipe we read."""

    def __init__(self, box: Box, argv: list[str], **kw) -> None:
        self.r, w = os.pipe()
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.proc = spawn.start(box.config(argv, stdio=(null, w, w), **kw))
        except BaseException:
            os.close(self.r)
            raise
        finally:
            os.close(w)
            os.close(null)

    def read_until(self, marker: bytes) -> bytes:
        return _read_until(self.r, marker)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.close()
        os.close(self.r)


# --- the basics --------------------------------------------------------------

def test_true_and_exit_codes(box: Box) -> None:
    assert box.run(["true"]) == (0, "")
    assert box.run(["false"])[0] == 1
    assert box.run(["sh", "-c", "exit 42"])[0] == 42


def test_signal_death_is_128_plus_signal(box: Box) -> None:
    assert box.run(["sh", "-c", "kill -KILL $$"])[0] == 128 + signal.SIGKILL
    assert box.run(["sh", "-c", "kill -SEGV $$"])[0] == 128 + signal.SIGSEGV


def test_pid1_and_pid_isolation(box: Box) -> None:
    rc, out = box.run(["ls", "/proc"])
    assert rc == 0
    pids = {name for name in out.split() if name.isdigit()}
    # init is 1, the payload (ls itself) is 2: no host process is visible
    assert pids == {"1", "2"}
    rc, out = box.run(["sh", "-c", "echo $$; cat /proc/1/status | grep -E '^(Pid|PPid):'"])
    assert out.split()[0] == "2"
    assert re.search(r"^PPid:\s+0$", out, re.M)


def test_hostname_is_private(box: Box) -> None:
    rc, out = box.run(["hostname"], hostname="jc-test-box")
    assert (rc, out.strip()) == (0, "jc-test-box")
    assert os.uname().nodename != "jc-test-box"
    rc, out = box.run(["cat", "/etc/hostname", "/etc/hosts"])
    assert "box" in out and "127.0.0.1 localhost" in out


def test_overlay_writes_land_in_upper(box: Box) -> None:
    rc, out = box.run(["sh", "-c", "echo new > /newfile && echo changed > /etc/motd && cat /etc/motd"])
    assert (rc, out) == (0, "changed\n")
    assert (box.upper / "newfile").read_text() == "new\n"
    assert (box.upper / "etc" / "motd").read_text() == "changed\n"
    assert (box.lower / "etc" / "motd").read_text() == "from the lower layer\n"
    assert not (box.lower / "newfile").exists()
    # the merged dir on the host stays an empty directory: the overlay only
    # ever existed in the container's mount namespace
    assert list(box.merged.iterdir()) == []


def test_no_host_paths_beyond_declared_binds(box: Box, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello").write_text("hi\n")
    marker = tmp_path / "host-only-marker"
    marker.write_text("secret")
    rc, out = box.run(
        ["sh", "-c", f"ls -A /; echo ---; cat /mnt/shared/hello; test -e {marker} && echo LEAK; "
                     "echo ---; cat /proc/self/mountinfo"],
        binds=[rootfs.Bind(shared, "/mnt/shared")],
    )
    assert rc == 0, out
    top, hello, info = out.split("---\n")
    assert set(top.split()) == {"bin", "dev", "etc", "mnt", "proc", "sys", "tmp"}
    assert hello == "hi\n"
    assert "LEAK" not in out
    targets = {line.split()[4] for line in info.splitlines()}
    allowed_roots = ("/proc", "/sys", "/dev")
    extra = {t for t in targets if t != "/" and not t.startswith(allowed_roots)}
    assert extra == {"/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/mnt/shared"}


def test_readonly_bind(box: Box, tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    rc, out = box.run(
        ["sh", "-c", "echo x > /ro/f; echo rc=$?; echo y > /rw/f; echo rc=$?"],
        binds=[rootfs.Bind(ro, "/ro", readonly=True), rootfs.Bind(rw, "/rw")],
    )
    assert "Read-only file system" in out
    assert "rc=1\nrc=0\n" in out.replace("sh: can't create /ro/f: Read-only file system\n", "")
    assert not (ro / "f").exists()
    assert (rw / "f").read_text() == "y\n"


def test_readonly_rootfs(box: Box) -> None:
    rc, out = box.run(["sh", "-c", "touch /x; echo rc=$?; touch /dev/shm/x && echo shm-ok"], readonly_rootfs=True)
    assert "Read-only file system" in out and "rc=1" in out and "shm-ok" in out
    assert not (box.upper / "x").exists()


def _status(out: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+):\s+(.*)$", out, re.M))


def test_capabilities_and_no_new_privs_root(box: Box) -> None:
    rc, out = box.run(["cat", "/proc/self/status"])
    st = _status(out)
    expected = DOCKER_DEFAULT_CAPS & native.host_bounding_set()
    assert int(st["CapBnd"], 16) == expected
    assert int(st["CapEff"], 16) == expected
    assert int(st["CapPrm"], 16) == expected
    assert int(st["CapInh"], 16) == 0
    assert int(st["CapAmb"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    # CAP_SYS_ADMIN is gone: mounting fails even as root
    rc, out = box.run(["mount", "-t", "tmpfs", "x", "/tmp"])
    assert rc != 0


def test_non_root_user_gets_only_a_bounding_set(box: Box) -> None:
    rc, out = box.run(["sh", "-c", "id; cat /proc/self/status"], uid=1000, gid=1000, additional_gids=(5, 7))
    assert rc == 0, out
    assert "uid=1000(user) gid=1000(user)" in out
    assert re.search(r"groups=.*\b5\b.*\b7\b", out.splitlines()[0])
    st = _status(out)
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
    assert int(st["CapBnd"], 16) == DOCKER_DEFAULT_CAPS & native.host_bounding_set()


def test_masked_and_readonly_paths(box: Box) -> None:
    script = (
        "wc -c < /proc/keys; ls -A /sys/firmware | wc -l; "
        "echo x > /sys/firmware/f; echo fw=$?; "
        "echo 1 > /proc/sys/vm/drop_caches; echo sys=$?; "
        "echo h > /proc/sysrq-trigger; echo sysrq=$?; cat /proc/self/mountinfo"
    )
    rc, out = box.run(["sh", "-c", script])
    lines = out.splitlines()
    assert lines[0].strip() == "0"  # /proc/keys is /dev/null
    assert lines[1].strip() == "0"  # /sys/firmware is an empty tmpfs
    assert "fw=1" in out and "sys=1" in out and "sysrq=1" in out
    info = {line.split()[4]: line.split()[5] for line in out.splitlines() if line[:1].isdigit() and " - " in line}
    for path in ("/proc/sys", "/proc/sysrq-trigger", "/proc/bus", "/proc/fs", "/proc/irq"):
        if Path(path).exists():
            assert info[path].startswith("ro"), (path, info.get(path))
    for path in ("/proc/keys", "/proc/timer_list", "/sys/firmware"):
        if Path(path).exists():
            assert path in info
    # paths that do not exist on this kernel are skipped, not created
    assert "/proc/kcore" in info or not Path("/proc/kcore").exists()


def test_minimal_dev(box: Box) -> None:
    rc, out = box.run(["sh", "-c", "ls -A /dev; head -c 4 /dev/zero | wc -c; echo x > /dev/null && echo null-ok; "
                                   "readlink /dev/ptmx; readlink /dev/fd"])
    assert rc == 0, out
    names = set(out.split("\n4\n")[0].split())
    assert names == {"fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
                     "stdout", "tty", "urandom", "zero"}
    assert "null-ok" in out and "pts/ptmx" in out and "/proc/self/fd" in out


def test_network_none_has_loopback_up(box: Box) -> None:
    rc, out = box.run(["sh", "-c", "ls /sys/class/net; cat /sys/class/net/lo/flags"])
    assert rc == 0, out
    names, flags = out.split()[:-1], out.split()[-1]
    assert names == ["lo"]
    assert int(flags, 16) & 0x1  # IFF_UP


def test_network_host_shares_interfaces(box: Box) -> None:
    rc, out = box.run(["ls", "/sys/class/net"], network="host")
    assert set(out.split()) == set(os.listdir("/sys/class/net"))


def test_rlimits_and_cwd(box: Box) -> None:
    rc, out = box.run(["sh", "-c", "ulimit -n; ulimit -Hn; pwd"], rlimits={"nofile": (256, 512)}, cwd="/etc")
    assert out.split() == ["256", "512", "/etc"]


def test_fds_above_2_are_closed(box: Box) -> None:
    leaked = os.open("/dev/null", os.O_RDONLY)  # inheritable on purpose
    os.set_inheritable(leaked, True)
    try:
        rc, out = box.run(["sh", "-c", "ls /proc/$$/fd; echo ---; ls /proc/1/fd"])
    finally:
        os.close(leaked)
    mine, init = out.split("---\n")
    assert sorted(mine.split()) == ["0", "1", "2"]
    assert sorted(init.split()) == ["0", "1", "2"]


def test_init_forwards_sigterm(box: Box) -> None:
    c = Piped(box, ["sh", "-c", "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done"])
    try:
        c.read_until(b"ready")
        c.proc.terminate()  # to the init, as seen from the host
        assert c.proc.wait(10) == 3
        assert b"got-term" in c.read_until(b"got-term")
    finally:
        c.close()


def test_init_forwards_default_sigterm(box: Box) -> None:
    c = Piped(box, ["sh", "-c", "echo ready; exec sleep 100"])
    try:
        c.read_until(b"ready")
        time.sleep(0.05)
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(10) == 128 + signal.SIGTERM
    finally:
        c.close()


def test_init_reaps_zombies(box: Box) -> None:
    # the subshell exits at once: its sleep is orphaned, reparented to init,
    # and must be reaped by init when it ends
    script = "(sleep 0.2 &); sleep 1; cat /proc/[0-9]*/stat"
    rc, out = box.run(["sh", "-c", script])
    assert rc == 0
    states = [line.split(") ")[1].split()[0] for line in out.splitlines() if ") " in line]
    assert states and "Z" not in states


# --- failures ----------------------------------------------------------------

def test_missing_bind_source_names_step_and_path(box: Box, tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(errors.SpawnError) as info:
        box.run(["true"], binds=[rootfs.Bind(missing, "/data")])
    assert info.value.step == "bind-mount"
    assert info.value.errno == errno.ENOENT
    assert info.value.path == str(missing)
    assert "bind-mount" in str(info.value) and str(missing) in str(info.value)


def test_bad_cwd_fails_at_chdir(box: Box) -> None:
    with pytest.raises(errors.SpawnError, match="step chdir '/nowhere'"):
        box.run(["true"], cwd="/nowhere")


def test_command_not_found(box: Box) -> None:
    with pytest.raises(errors.CommandNotFound) as info:
        box.run(["no-such-command"])
    assert info.value.exit_code == 127
    assert "no-such-command" in str(info.value)
    with pytest.raises(errors.CommandNotFound):
        box.run(["/bin/no-such-command"])


def test_command_not_executable(box: Box) -> None:
    with pytest.raises(errors.CommandNotExecutable) as info:
        box.run(["/bin/notexec"])
    assert info.value.exit_code == 126
    with pytest.raises(errors.CommandNotExecutable):
        box.run(["notexec"])  # found on PATH, not executable


def test_abort_before_release(box: Box) -> None:
    proc = spawn.spawn(box.config(["true"], stdio=(0, 1, 2)))
    assert proc.poll() is None  # waiting for release
    proc.abort()
    assert proc.returncode is not None
    proc.close()


def _own_v1_dir(controller: str) -> Path:
    line = next((ln for ln in Path("/proc/self/cgroup").read_text().splitlines()
                 if controller in ln.split(":")[1].split(",")), None)
    if line is None:
        pytest.skip(f"no cgroup v1 {controller} hierarchy")
    mine = Path("/sys/fs/cgroup") / controller / line.split(":", 2)[2].lstrip("/")
    if not mine.is_dir():
        pytest.skip(f"no cgroup v1 {controller} hierarchy")
    return mine


def _run_cat_cgroup(box: Box, **kw) -> tuple[spawn.ContainerProcess, Path]:
    out = box.base / "out.txt"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        return spawn.spawn(box.config(["cat", "/proc/self/cgroup"], stdio=(fd, fd, fd), **kw)), out
    finally:
        os.close(fd)


def test_two_phase_cgroup_hook(box: Box) -> None:
    """cgroup_by_caller (cgroup v2's way): between spawn and release the caller
    moves the child into a cgroup; the container's cgroup namespace is made
    after that, so it sees '/'."""
    cg = _own_v1_dir("memory") / f"jc-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        proc, out = _run_cat_cgroup(box, cgroup_by_caller=True)
        try:
            # the child exists in its own namespaces but has not run anything yet
            assert os.readlink(f"/proc/{proc.pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
            (cg / "cgroup.procs").write_text(str(proc.pid))
            proc.release()
            assert proc.wait(10) == 0
        finally:
            proc.close()
    finally:
        cg.rmdir()
    mem = next(ln for ln in out.read_text().splitlines() if ":memory:" in ln)
    assert mem.endswith(":memory:/")


def test_child_enters_its_v1_cgroups_itself(box: Box) -> None:
    """cgroup_tasks: the child moves itself into each hierarchy before it
    does anything else; its cgroup namespace then shows those cgroups as '/'."""
    name = f"jc-test-{uuid.uuid4().hex[:8]}"
    cgs = [_own_v1_dir(c) / name for c in ("memory", "pids")]
    for d in cgs:
        d.mkdir()
    try:
        proc, out = _run_cat_cgroup(box, cgroup_tasks=[d / "tasks" for d in cgs])
        try:
            # in them before the release: nothing of the container has run yet
            deadline = time.monotonic() + 10
            while not all(str(proc.pid) in (d / "cgroup.procs").read_text().split() for d in cgs):
                assert time.monotonic() < deadline, [(d / "cgroup.procs").read_text() for d in cgs]
                time.sleep(0.001)
            proc.release()
            assert proc.wait(10) == 0
        finally:
            proc.close()
    finally:
        for d in cgs:
            d.rmdir()
    lines = out.read_text().splitlines()
    for c in ("memory", "pids"):
        assert next(ln for ln in lines if f":{c}:" in ln).endswith(f":{c}:/"), lines
    # a hierarchy it was not given: the cgroup namespace's root is where it was
    assert next(ln for ln in lines if ":freezer:" in ln).endswith(":freezer:/"), lines


def _own_unified_dir() -> Path:
    line = next((ln for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::")), None)
    mounts = [ln.split() for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
    mount = next((m[4] for m in mounts if m[m.index("-") + 1] == "cgroup2"), None)
    if line is None or mount is None:
        pytest.skip("no cgroup2 hierarchy")
    return Path(mount) / line.split(":", 2)[2].lstrip("/")


def test_child_is_cloned_into_its_v2_cgroup(box: Box) -> None:
    """cgroup_dir: clone3 puts the child straight into the v2 cgroup (on a
    hybrid host, the controller-less unified hierarchy serves)."""
    cg = _own_unified_dir() / f"jc-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        proc, out = _run_cat_cgroup(box, cgroup_dir=cg)
        try:
            # in it from birth, before anything of the container ran
            assert str(proc.pid) in (cg / "cgroup.procs").read_text().split()
            proc.release()
            assert proc.wait(10) == 0
        finally:
            proc.close()
    finally:
        cg.rmdir()
    # its cgroup namespace was made in that cgroup: it is the root there
    assert "0::/" in out.read_text().splitlines(), out.read_text()


def test_a_cgroup_dir_the_kernel_refuses_fails_the_clone(box: Box) -> None:
    missing = box.base / "no-such-cgroup"
    with pytest.raises(errors.SpawnError) as info:
        spawn.spawn(box.config(["true"], stdio=(0, 1, 2), cgroup_dir=missing))
    assert info.value.step == "cgroup-attach" and info.value.errno == errno.ENOENT
    # a directory that is not a cgroup2 one: clone3 refuses, nothing is left
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(errors.SpawnError) as info:
        spawn.spawn(box.config(["true"], stdio=(0, 1, 2), cgroup_dir=box.base))
    assert info.value.step == "clone-into-cgroup" and str(box.base) in str(info.value)
    assert set(os.listdir("/proc/self/fd")) == before
    with pytest.raises(errors.InvalidSpec):
        box.config(["true"], stdio=(0, 1, 2), cgroup_dir=box.base, cgroup_tasks=[box.base / "tasks"])


def test_cgroup_tasks_that_cannot_be_opened_fail_before_the_clone(box: Box) -> None:
    missing = box.base / "no-such-cgroup" / "tasks"
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(errors.SpawnError) as info:
        spawn.spawn(box.config(["true"], stdio=(0, 1, 2), cgroup_tasks=[missing]))
    assert info.value.step == "cgroup-attach" and info.value.errno == errno.ENOENT
    assert str(missing) in str(info.value)
    assert set(os.listdir("/proc/self/fd")) == before
    with pytest.raises(errors.InvalidSpec):
        box.config(["true"], stdio=(0, 1, 2), cgroup_tasks=[missing], cgroup_by_caller=True)


def test_cgroup_the_child_cannot_enter_is_reported(box: Box) -> None:
    # a fresh cpuset cgroup has no cpus: the kernel refuses tasks (ENOSPC)
    d = _own_v1_dir("cpuset") / f"jc-test-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        if (d / "cpuset.cpus").read_text().strip():
            pytest.skip("this kernel gives a new cpuset cgroup cpus")
        proc = spawn.spawn(box.config(["true"], stdio=(0, 1, 2), cgroup_tasks=[d / "tasks"]))
        try:
            with pytest.raises(errors.SpawnError) as info:
                proc.release()
        finally:
            proc.close()
        assert info.value.step == "cgroup-attach" and info.value.errno == errno.ENOSPC
        assert str(d / "tasks") in str(info.value)
        assert proc.returncode is not None
    finally:
        d.rmdir()


# --- exec into a running container -------------------------------------------

def test_join_running_container(box: Box) -> None:
    c = Piped(box, ["sh", "-c", "echo ready; exec sleep 100"], hostname="joined-box", cwd="/etc")
    try:
        c.read_until(b"ready")
        r, w = os.pipe()
        try:
            j = spawn.join(c.proc.pid, process=spawn.ProcessSpec(
                argv=("sh", "-c", "hostname; pwd; ls /proc | grep -c '^[0-9]'; ls -A /; exit 7"),
                env={"PATH": "/bin"}, cwd="/bin"), stdio=(w, w, w))
            os.close(w)
            w = -1
            j.release()
            assert j.wait(10) == 7
            j.close()
            out = b""
            while chunk := os.read(r, 4096):
                out += chunk
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        lines = out.decode().split()
        assert lines[0] == "joined-box"
        assert lines[1] == "/bin"
        # init, sleep, the joined sh and its ls/grep: no host processes
        assert int(lines[2]) <= 5
        assert "proc" in lines and "home" not in lines
    finally:
        c.close()


def test_join_missing_command(box: Box) -> None:
    c = Piped(box, ["sh", "-c", "echo ready; exec sleep 100"])
    try:
        c.read_until(b"ready")
        j = spawn.join(c.proc.pid, process=spawn.ProcessSpec(argv=("nope",), env={"PATH": "/bin"}),
                       stdio=(0, 1, 2))
        with pytest.raises(errors.CommandNotFound):
            j.release()
        j.close()
    finally:
        c.close()


# --- threads -------------------------------------------------------------------

def test_spawn_from_a_threaded_process(box: Box, lower: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    lock = threading.Lock()

    def churn() -> None:
        # allocate and take locks all the time, so that a fork of Python at
        # the wrong moment would deadlock or crash the child
        while not stop.is_set():
            with lock:
                _ = [str(i) * 10 for i in range(200)]

    workers = [threading.Thread(target=churn, daemon=True) for _ in range(4)]
    for t in workers:
        t.start()
    results: list[object] = []

    def starter(n: int) -> None:
        b = Box(lower=lower, base=tmp_path / f"t{n}").make()
        for _ in range(5):
            results.append(b.run(["sh", "-c", "echo ok"], timeout=20))

    try:
        starters = [threading.Thread(target=starter, args=(n,)) for n in range(3)]
        for t in starters:
            t.start()
        for _ in range(5):
            results.append(box.run(["sh", "-c", "echo ok"]))
        for t in starters:
            t.join(60)
    finally:
        stop.set()
        for t in workers:
            t.join()
    assert results == [(0, "ok\n")] * 20


# --- the extension is optional at import time ----------------------------------

def test_missing_extension_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setitem(sys.modules, "jupyter_contain.native._native", None)
    assert native.available() is False
    with pytest.raises(errors.ContainerError, match="not built"):
        native.ffi()


# --- the overlay with many layers, the seccomp slot ----------------------------

def test_many_long_lowerdirs(box: Box, tmp_path: Path) -> None:
    """More lowerdir bytes than fit in one page of mount data (lowerdir+)."""
    layers = []
    for i in range(40):
        d = tmp_path / "layers" / ("x" * 100) / f"layer-{i:03d}-{'y' * 60}"
        d.mkdir(parents=True)
        (d / f"from-layer-{i}").write_text(str(i))
        layers.append(d)
    (layers[0] / "shadow").write_text("top")
    (layers[5] / "shadow").write_text("lower")
    assert len(":".join(map(str, layers))) > 4096
    ops = rootfs.plan(rootfs_layers=[*layers, box.lower], upper=box.upper, work=box.work, target=box.merged)
    fd = os.open(box.base / "out.txt", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        proc = spawn.start(spawn.SpawnConfig(
            mounts=ops, process=spawn.ProcessSpec(argv=("sh", "-c", "ls / | grep -c from-layer; cat /shadow"),
                                                  env={"PATH": "/bin"}),
            stdio=(fd, fd, fd)))
        assert proc.wait(10) == 0
        proc.close()
    finally:
        os.close(fd)
    assert (box.base / "out.txt").read_text().split() == ["40", "top"]


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def test_seccomp_slot_is_loaded_last(box: Box) -> None:
    # x86_64: mkdir (83) and mkdirat (258) fail with EXDEV, everything else runs
    ld, jeq, ret = 0x20, 0x15, 0x06
    prog = b"".join([
        _bpf(ld, 0, 0, 4),                    # arch
        _bpf(jeq, 1, 0, 0xC000003E),          # AUDIT_ARCH_X86_64
        _bpf(ret, 0, 0, 0x7FFF0000),          # other arch: allow (test only)
        _bpf(ld, 0, 0, 0),                    # syscall nr
        _bpf(jeq, 2, 0, 83),
        _bpf(jeq, 1, 0, 258),
        _bpf(ret, 0, 0, 0x7FFF0000),          # SECCOMP_RET_ALLOW
        _bpf(ret, 0, 0, 0x00050000 | errno.EXDEV),  # SECCOMP_RET_ERRNO
    ])
    if os.uname().machine != "x86_64":
        pytest.skip("filter written for x86_64")
    cfg = box.config(["sh", "-c", "mkdir /tmp/d; echo rc=$?; grep Seccomp: /proc/self/status"], stdio=(0, 1, 2))
    out = box.base / "out.txt"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        cfg = dataclasses.replace(cfg, stdio=(fd, fd, fd), seccomp_filter=prog)
        proc = spawn.start(cfg)
        assert proc.wait(10) == 0
        proc.close()
    finally:
        os.close(fd)
    text = out.read_text()
    assert "Invalid cross-device link" in text and "rc=1" in text
    assert re.search(r"Seccomp:\s+2", text)


def test_init_does_not_reveal_the_host_process(box: Box) -> None:
    """init is a copy of this Python process: its command line must be blanked
    and its memory/environment unreadable from inside the container."""
    rc, out = box.run(["sh", "-c", "cat /proc/1/cmdline; echo; cat /proc/1/comm; "
                                   "cat /proc/1/environ; echo environ=$?; cat /proc/1/mem; echo mem=$?; "
                                   "readlink /proc/1/exe; echo exe=$?"])
    first = out.splitlines()[0]
    assert first.strip("\0") == "jc-init"
    assert "python" not in out.lower() and "pytest" not in out
    # the payload runs only once jc-init made itself non-dumpable: no peek
    # at its environment, memory or (host) executable, even right away
    assert "environ=1" in out and "mem=1" in out and "exe=1" in out



# --- jc-init: PID 1 is a small separate executable ------------------------------

needs_jc_init = pytest.mark.skipif(native.init_executable() is None, reason="jc-init was not built")


@needs_jc_init
def test_init_memory_does_not_follow_the_callers_heap(box: Box) -> None:
    """PID 1 no longer shares (copy-on-write) the caller's address space: the
    caller dirtying 200 MB after the start costs the container nothing."""
    size = 200 << 20
    heap = bytearray(b"\x01") * size  # allocated and touched before the start
    c = Piped(box, ["sh", "-c", "echo ready; exec sleep 100"])
    try:
        c.read_until(b"ready")
        j = spawn.join(c.proc.pid, process=spawn.ProcessSpec(argv=("sleep", "100"), env={"PATH": "/bin"}),
                       stdio=(0, 1, 2))
        try:
            j.release()
            heap[::4096] = b"\x02" * len(range(0, size, 4096))  # every page, after the start
            for pid in (c.proc.pid, j.pid):
                assert os.readlink(f"/proc/{pid}/exe") == str(native.init_executable())
                mem = smaps_rollup(pid)
                assert mem["Private_Dirty"] < 1024, mem
                assert mem["Pss"] < 1024, mem
        finally:
            j.kill()
            j.wait()
            j.close()
    finally:
        del heap
        c.close()


@needs_jc_init
def test_payload_starts_only_after_init_exec(box: Box) -> None:
    # before its exec, init is a copy of this process (argv blanked to
    # "jc-init" plus many NULs, megabytes resident); after, exactly "jc-init"
    for _ in range(10):
        rc, out = box.run(["sh", "-c", "cat /proc/1/cmdline; echo; grep VmRSS /proc/1/status"])
        assert rc == 0, out
        cmdline, rss = out.split("\n", 1)
        assert cmdline == "jc-init\0"
        assert int(rss.split()[1]) < 4096, rss


_SLOW_INIT = r"""
#include <fcntl.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>
int main(void)
{
    struct timespec ts = {0, 300000000};
    nanosleep(&ts, 0);
    close(open("/tmp/init-was-ready", O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    close(3);
    int st;
    if (wait(&st) < 0)
        _exit(99);
    _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
}
"""


def test_payload_waits_for_init(box: Box, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow stand-in init: the payload must not run before it let it go."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "slow-init.c"
    src.write_text(_SLOW_INIT)
    exe = tmp_path / "slow-init"
    if subprocess.run([cc, "-static", "-O2", "-o", str(exe), str(src)], capture_output=True, check=False).returncode:
        pytest.skip("cannot link statically")
    monkeypatch.setattr(native, "init_executable", lambda: exe)
    rc, out = box.run(["cat", "/tmp/init-was-ready"])
    assert (rc, out) == (0, ""), out


def test_signal_right_after_release_is_forwarded(box: Box) -> None:
    for _ in range(5):
        c = Piped(box, ["sleep", "100"])
        try:
            c.proc.send_signal(signal.SIGTERM)
            assert c.proc.wait(10) == 128 + signal.SIGTERM
        finally:
            c.close()


def _run_with_exit_fd(box: Box, argv: list[str]) -> tuple[int, str]:
    path = box.base / "exit"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        proc = spawn.start(box.config(argv, stdio=(null, null, null), exit_fd=fd))
    finally:
        os.close(fd)
        os.close(null)
    try:
        rc = proc.wait(10)
    finally:
        proc.close()
    assert rc is not None
    return rc, path.read_text()


@pytest.mark.parametrize("init", ["jc-init", "fallback"])
def test_init_writes_the_exit_status(box: Box, init: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if init == "fallback":
        monkeypatch.setattr(native, "init_executable", lambda: None)
    elif native.init_executable() is None:
        pytest.skip("jc-init was not built")
    assert _run_with_exit_fd(box, ["sh", "-c", "exit 3"]) == (3, "code 3\n")
    assert _run_with_exit_fd(box, ["sh", "-c", "kill -KILL $$"]) == (137, "signal 9\n")
    rc, out = box.run(["cat", "/proc/1/cmdline"])
    assert rc == 0
    assert (out == "jc-init\0") == (init == "jc-init")


def test_init_exec_failure_names_the_step(box: Box, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "jc-init"
    fake.write_text("not an executable\n")
    fake.chmod(0o644)
    monkeypatch.setattr(native, "init_executable", lambda: fake)
    with pytest.raises(errors.SpawnError) as info:
        box.run(["true"])
    assert info.value.step == "exec-init"
    assert info.value.errno == errno.EACCES
    assert info.value.path == str(fake)


# --- a terminal inside the container ------------------------------------------------

def _winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_terminal_is_the_containers_own_pty(box: Box) -> None:
    script = "read x; tty; stty size; echo via-ctty > /dev/tty && echo ctty-ok; stat -c 'owner=%u' $(tty)"
    proc = spawn.start(box.config(["sh", "-c", script], stdio=(0, 1, 2), tty=True, uid=1000, gid=1000))
    try:
        master = proc.pty_master
        assert master is not None
        assert os.isatty(master) and os.get_inheritable(master) is False
        _winsize(master, 30, 100)
        os.write(master, b"go\n")
        out = read_pty(master).decode()
        assert proc.wait(10) == 0, out
    finally:
        proc.close()
    assert proc.pty_master is None  # closed with the process
    lines = [ln.strip() for ln in out.splitlines()]
    assert "/dev/pts/0" in lines
    assert "30 100" in lines
    assert "via-ctty" in lines and "ctty-ok" in lines
    assert "owner=1000" in lines


def test_no_terminal_no_master(box: Box) -> None:
    c = Piped(box, ["sh", "-c", "tty; echo done"])
    try:
        assert c.proc.pty_master is None
        assert b"not a tty" in c.read_until(b"done")
    finally:
        c.close()


def test_join_with_a_terminal(box: Box) -> None:
    c = Piped(box, ["sh", "-c", "echo ready; exec sleep 100"])
    try:
        c.read_until(b"ready")
        j = spawn.join(c.proc.pid, process=spawn.ProcessSpec(
            argv=("sh", "-c", "tty; echo $$ > /dev/tty; exit 5"), env={"PATH": "/bin"}, tty=True),
            stdio=(0, 1, 2))
        try:
            j.release()
            assert j.pty_master is not None
            out = read_pty(j.pty_master).decode()
            assert j.wait(10) == 5, out
        finally:
            j.close()
        assert "/dev/pts/0" in out.split()
    finally:
        c.close()


# --- the container's own cgroup at /sys/fs/cgroup -------------------------------------

def test_own_cgroup_v1_mounted_read_only(box: Box) -> None:
    line = next((ln for ln in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in ln), "0::/")
    if line.split(":")[1] != "memory":   # also cgroup v2 only (the VM lane)
        pytest.skip("no separate cgroup v1 memory hierarchy")
    mine = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/")
    if not mine.is_dir():
        pytest.skip("no cgroup v1 memory hierarchy")
    cg = mine / f"jc-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    out = box.base / "out.txt"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    script = ("cat /sys/fs/cgroup/memory/memory.limit_in_bytes; "
              "echo 1 > /sys/fs/cgroup/memory/memory.limit_in_bytes; echo write=$?; "
              "mkdir /sys/fs/cgroup/x; echo mkdir=$?; ls /sys/fs/cgroup; "
              "grep -c . /sys/fs/cgroup/memory/cgroup.procs")
    try:
        (cg / "memory.limit_in_bytes").write_text(str(64 << 20))
        proc = spawn.spawn(box.config(["sh", "-c", script], stdio=(fd, fd, fd), cgroup_tasks=[cg / "tasks"],
                                      cgroupfs=rootfs.CgroupFs(1, (("memory",),))))
        try:
            proc.release()
            assert proc.wait(10) == 0
        finally:
            proc.close()
    finally:
        os.close(fd)
        cg.rmdir()
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0] == str(64 << 20), text
    assert "write=1" in lines and "mkdir=1" in lines, text
    assert "Read-only file system" in text
    assert lines[-2] == "memory"          # nothing but the one hierarchy
    assert int(lines[-1]) >= 2            # init, sh, grep: the root is the container's cgroup


def test_cgroup2_mounted_read_only(box: Box) -> None:
    if "cgroup2" not in Path("/proc/filesystems").read_text():
        pytest.skip("no cgroup2")
    rc, out = box.run(["sh", "-c", "test -f /sys/fs/cgroup/cgroup.procs && echo has-procs; "
                                   "echo 1 > /sys/fs/cgroup/cgroup.procs; echo write=$?; "
                                   "grep ' /sys/fs/cgroup ' /proc/self/mountinfo"],
                      cgroupfs=rootfs.CgroupFs(2))
    assert rc == 0 and "has-procs" in out and "write=1" in out, out
    mount = out.strip().splitlines()[-1].split()
    assert mount[5].startswith("ro") and "cgroup2" in mount
