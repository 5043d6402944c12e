"""Container lifecycle with real namespaces, overlay mounts and cgroups (busybox image)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jupyter_contain import errors
from jupyter_contain.runtime.containers.cgroups import Limits
from jupyter_contain.runtime.containers.container import ContainerSpec, Runtime, parse_bind
from jupyter_contain.runtime.containers.state import STATE_VERSION, ContainerState


def run_capture(rt: Runtime, tmp_path: Path, cmd: str, **kw) -> tuple[int, str]:
    out = tmp_path / "out"
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        info = rt.run(ContainerSpec(image="busybox:test", command=("sh", "-c", cmd), **kw),
                      stdio=(null.fileno(), f.fileno(), f.fileno()), remove=True)
    return info.code, out.read_text()


def test_isolation(runtime, tmp_path):
    code, out = run_capture(runtime, tmp_path, "echo pid=$$; hostname; echo procs=$(ls /proc | grep -c '^[0-9]'); "
                                               "cat /proc/self/status | grep -E 'NoNewPrivs|CapAmb|CapInh'; "
                                               "echo links=$(ip -o link | grep -c '^[0-9]')", hostname="box")
    assert code == 0
    lines = out.split()
    assert "pid=2" in out  # PID 1 is the init, the payload is its child
    assert "box" in lines
    # init, sh and the pipeline (ls, grep): no host process, and counted from inside
    procs = next(int(w.split("=")[1]) for w in lines if w.startswith("procs="))
    assert 2 <= procs <= 5, out
    # network "none": its own namespace with only the loopback
    assert "links=1" in lines, out
    assert "NoNewPrivs:\t1" in out and "CapAmb:\t0000000000000000" in out and "CapInh:\t0000000000000000" in out


def test_only_container_processes_visible(runtime, tmp_path):
    code, out = run_capture(runtime, tmp_path, "ls /proc | grep '^[0-9]' | sort -n | tr '\\n' ' '")
    assert code == 0
    pids = [int(p) for p in out.split()]
    # init (1), sh (2), and the pipeline's ls, grep, sort, tr: no host process
    assert pids[:2] == [1, 2] and len(pids) <= 6 and max(pids) < 10, pids


def test_exit_codes_and_signals(runtime, tmp_path):
    assert run_capture(runtime, tmp_path, "exit 3")[0] == 3
    code, _ = run_capture(runtime, tmp_path, "kill -TERM $$; sleep 5")
    assert code == 128 + signal.SIGTERM


def test_writable_layer_and_upper(runtime, tmp_path):
    c = runtime.create(ContainerSpec(image="busybox:test", command=("sh", "-c", "echo data > /newfile; rm /etc/passwd")))
    c.start()
    info = c.wait(10)
    assert info is not None and info.code == 0
    assert (c.upper / "newfile").read_text() == "data\n"
    assert (c.upper / "etc" / "passwd").is_char_device()  # the deletion is a whiteout in the upper layer
    lowers = runtime.store.layer_dirs(c.image())
    assert (lowers[0] / "etc" / "passwd").is_file()  # the image is untouched
    # host-side runtime stubs never land in the writable layer as regular content: what the
    # payload did is there, and of /etc/hostname, hosts, resolv.conf (on a tmpfs of the
    # container's own) at most an empty mount point where the image had none
    made = {str(p.relative_to(c.upper)): p for p in c.upper.rglob("*")}
    stubs = {k for k in made if k in ("etc/hosts", "etc/hostname", "etc/resolv.conf")}
    assert set(made) - stubs == {"etc", "etc/passwd", "newfile"}, sorted(made)
    assert all(made[k].is_file() and made[k].stat().st_size == 0 for k in stubs), stubs
    c.remove()
    assert not c.dir.exists()


def test_binds_and_readonly(runtime, tmp_path):
    src = tmp_path / "share"
    src.mkdir()
    (src / "in").write_text("host")
    code, out = run_capture(runtime, tmp_path, "cat /data/in; echo x > /data/out; echo rc=$?; "
                                               "echo y > /ro/z 2>/dev/null; echo ro=$?",
                            binds=(parse_bind(f"{src}:/data"), parse_bind(f"{src}:/ro:ro")))
    assert "host" in out and "rc=0" in out and "ro=1" in out
    assert (src / "out").read_text() == "x\n"
    with pytest.raises(errors.InvalidSpec, match="does not exist"):
        parse_bind("/nonexistent/path:/x")
    with pytest.raises(errors.InvalidSpec, match="mode"):
        parse_bind(f"{src}:/x:rx")


def test_bind_source_gone_at_start_names_the_mount(runtime, tmp_path):
    # the child makes its mounts while the parent records the container: a
    # bind that fails there must surface as that failure, not as a failed
    # step of the parent's
    src = tmp_path / "gone"
    src.mkdir()
    c = runtime.create(ContainerSpec(image="busybox:test", command=("true",), binds=(parse_bind(f"{src}:/data"),)))
    src.rmdir()
    try:
        for _ in range(5):   # the child may lose the race with the attach, or not: both ways
            with pytest.raises(errors.SpawnError) as exc:
                c.start()
            assert exc.value.step == "bind-mount" and exc.value.path == str(src), exc.value
            assert c.refresh_status() == "created" and c.cgroups() is None
    finally:
        c.remove()


def test_etc_files_are_the_containers_own(runtime, tmp_path):
    """/etc/hostname, hosts and resolv.conf: root-owned 0644 files on a small tmpfs
    of the container's own, made afresh at each start; nothing of them on the host."""
    c = runtime.create(ContainerSpec(image="busybox:test", hostname="etcbox", command=(
        "sh", "-c", "stat -c '%n %u %a' /etc/hostname /etc/hosts /etc/resolv.conf; cat /etc/hostname; "
                    "grep -c etcbox /etc/hosts; echo changed >> /etc/hosts && echo appended; "
                    "head -c 2000000 /dev/zero > /etc/hosts; echo big=$?")))
    try:
        out = tmp_path / "out"
        for _ in range(2):   # the second start begins from fresh files again
            with open(out, "wb") as f, open(os.devnull, "rb") as null:
                c.start(stdio=(null.fileno(), f.fileno(), f.fileno()))
                assert c.wait(20).code == 0
            lines = out.read_text().splitlines()
            assert lines[:3] == ["/etc/hostname 0 644", "/etc/hosts 0 644", "/etc/resolv.conf 0 644"], lines
            assert lines[3:6] == ["etcbox", "1", "appended"], lines
            assert lines[6] != "big=0", lines   # the tmpfs is small: no filling memory through it
        assert sorted(p.name for p in c.dir.iterdir() if p.is_dir()) == ["rootfs", "upper", "work"]
    finally:
        c.remove()


def test_env_workdir_user(runtime, tmp_path):
    code, out = run_capture(runtime, tmp_path, "echo $FOO; pwd; id -u; id -g", env={"FOO": "bar"},
                            workdir="/tmp", user="nobody")
    assert out.split() == ["bar", "/tmp", "65534", "65534"]
    with pytest.raises(errors.InvalidSpec, match="unable to find user ghost"):
        runtime.create(ContainerSpec(image="busybox:test", user="ghost"))


def test_command_not_found_leaves_nothing(runtime):
    before = {c.id for c in runtime.containers()}
    c = runtime.create(ContainerSpec(image="busybox:test", command=("/no/such/cmd",)))
    with pytest.raises(errors.CommandNotFound) as exc:
        c.start()
    assert exc.value.exit_code == 127
    c.remove()
    assert {c.id for c in runtime.containers()} == before


def test_missing_image():
    rt = Runtime(__import__("jupyter_contain.runtime.images.store", fromlist=["Store"]).Store(
        Path(os.environ.get("TMPDIR", "/tmp")) / f"empty-store-{os.getpid()}"))
    try:
        with pytest.raises(errors.ImageNotFound):
            rt.create(ContainerSpec(image="nope:1"))
    finally:
        import shutil
        shutil.rmtree(rt.store.root)


def test_oom_is_reported(runtime, tmp_path):
    c = runtime.create(ContainerSpec(image="busybox:test", limits=Limits(memory=32 << 20),
                                     command=("sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo $x | wc -c")))
    c.start()
    info = c.wait(60)
    assert info is not None
    assert info.oom_killed, info
    assert info.memory_limit == 32 << 20
    assert "out of memory (limit 32 MiB" in info.describe()
    assert c.info()["reason"].startswith("killed: out of memory")


def test_pids_limit_stops_fork_bomb(runtime, tmp_path):
    c = runtime.create(ContainerSpec(image="busybox:test", limits=Limits(pids=20), command=(
        "sh", "-c", "for i in $(seq 100); do sleep 30 & done; sleep 30")))
    c.start()
    log = c.dir / "log"
    deadline = time.monotonic() + 20
    while b"can't fork" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b"can't fork" in log.read_bytes()
    stats = c.stats()
    assert stats["pids_current"] <= 20 and stats["pids_limit"] == 20
    subprocess.run(["true"], check=True)  # the host can still fork
    info = c.stop(timeout=1)
    assert info is not None


def test_stop_kill_and_exec(runtime, tmp_path):
    c = runtime.create(ContainerSpec(image="busybox:test", command=("sh", "-c", "trap '' TERM; sleep 100")))
    c.start()
    assert c.refresh_status() == "running"
    out = tmp_path / "exec.out"
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        proc = c.exec(["sh", "-c", "echo in; cat /proc/1/cmdline >/dev/null; ps | wc -l; hostname"],
                      stdio=(null.fileno(), f.fileno(), f.fileno()))
        assert proc.wait(10) == 0
        proc.close()
    assert out.read_text().startswith("in\n")
    # an exec'd process enters the container's cgroups (seen from its cgroup
    # namespace: their root); one left in ours would show as "/.."-something
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        proc = c.exec(["cat", "/proc/self/cgroup"], stdio=(null.fileno(), f.fileno(), f.fileno()))
        assert proc.wait(10) == 0
        proc.close()
    lines = out.read_text().splitlines()
    if lines == ["0::/"]:   # cgroup v2 only: the one line, at its namespace's root
        assert set(c.state.cgroup or {}) == {"unified"}
    else:
        for ctrl in ("memory", "pids", "freezer"):
            assert any(ln.endswith(f":{ctrl}:/") for ln in lines), lines
    stats = c.stats()
    assert stats["pids_current"] >= 2
    t0 = time.monotonic()
    info = c.stop(timeout=0.5)   # TERM is ignored: SIGKILL follows
    assert info is not None and info.code == 128 + signal.SIGKILL
    assert time.monotonic() - t0 < 5
    assert c.refresh_status() == "exited"


def test_state_seen_by_another_process(runtime, tmp_path):
    c = runtime.create(ContainerSpec(image="busybox:test", command=("sleep", "30"), name="visible"))
    c.start()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    res = subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(runtime.store.root),
                          "ps", "--json"], capture_output=True, text=True, env=env, timeout=60)
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows if r["id"] == c.id] == ["visible"]
    assert rows[0]["status"] == "running"
    c.stop(timeout=1)


def test_start_from_threaded_process(runtime, tmp_path):
    stop = threading.Event()
    threads = [threading.Thread(target=lambda: [time.sleep(0.001) for _ in iter(stop.is_set, True)])
               for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            assert run_capture(runtime, tmp_path, "true")[0] == 0
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_gc_cleans_dead_owner(runtime, tmp_path):
    owner = subprocess.Popen(["sleep", "60"])
    c = runtime.create(ContainerSpec(image="busybox:test", command=("sleep", "60"), owner_pid=owner.pid))
    c.start()
    owner.kill()
    owner.wait()
    removed = runtime.gc()
    assert c.id in removed
    assert not c.dir.exists()


def test_gc_sweeps_only_this_stores_cgroups(runtime, tmp_path):
    from jupyter_contain.runtime.containers.cgroups import Cgroups
    from jupyter_contain.runtime.images.store import Store

    c = runtime.create(ContainerSpec(image="busybox:test", command=("sleep", "30")))
    c.start()
    stray = Cgroups.create(f"{runtime.store_tag}-{'f' * 64}", Limits())   # ours, no container: debris
    other = Runtime(Store(tmp_path / "other-store"))
    assert other.store_tag != runtime.store_tag
    try:
        other.gc()
        assert c.refresh_status() == "running" and c.cgroups() is not None   # another store's gc leaves it alone
        removed = runtime.gc()
        assert f"cgroup:{runtime.store_tag}-{'f' * 64}" in removed
        assert c.refresh_status() == "running"
    finally:
        stray.destroy()
        c.stop(timeout=1)


# --- the state file ---------------------------------------------------------------------------


def test_state_file_is_typed_versioned_and_reads_files_from_before_versions(runtime):
    c = runtime.create(ContainerSpec(image="busybox:test", command=("sh", "-c", "exit 7"), labels={"k": "v"},
                                     env={"A": "1"}, rlimits={"nofile": (64, 128)}))
    try:
        raw = json.loads((c.dir / "state.json").read_text())
        assert raw["version"] == STATE_VERSION and raw["status"] == "creating"
        st = c.state
        assert isinstance(st, ContainerState) and st.labels == {"k": "v"} and st.process.env["A"] == "1"
        assert st.process.rlimits == {"nofile": (64, 128)} and st.exit is None
        assert st.to_json() == raw                                   # nothing lost either way
        legacy = {k: v for k, v in raw.items() if k != "version"}    # written before the field
        assert ContainerState.from_json(legacy) == st
        c.start()
        info = c.wait(10)
        assert info is not None and info.code == 7 and c.state.exit == info and c.state.status == "exited"
        with pytest.raises(errors.ContainerError, match="state.json is unreadable: 'process'"):
            ContainerState.from_json({k: v for k, v in raw.items() if k != "process"}, where="state.json")
    finally:
        c.remove()


def test_newer_state_format_is_refused_and_gc_leaves_it_alone(runtime, caplog):
    c = runtime.create(ContainerSpec(image="busybox:test", command=("true",)))
    path = c.dir / "state.json"
    original = path.read_bytes()
    try:
        newer = {**json.loads(original), "version": STATE_VERSION + 1}
        path.write_text(json.dumps(newer))
        with pytest.raises(errors.ContainerError, match=f"format version {STATE_VERSION + 1}, newer"):
            c.state  # noqa: B018 - the read is what is tested
        with pytest.raises(errors.ContainerError, match="newer"):
            c.start()
        with caplog.at_level("WARNING", logger="jupyter_contain.runtime.containers.container"):
            removed = runtime.gc()
        assert c.id not in removed and c.dir.exists()
        assert f"gc: left container {c.id[:12]} alone" in caplog.text
        # ps says so and lists the rest
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        res = subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(runtime.store.root),
                              "ps", "-a", "--json"], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        assert c.id not in {r["id"] for r in json.loads(res.stdout)}
        assert f"format version {STATE_VERSION + 1}, newer" in res.stderr
        assert json.loads(path.read_text()) == newer               # never rewritten by an older reader
    finally:
        path.write_bytes(original)
        c.remove()


def test_a_failing_undo_still_unwinds_the_rest_of_a_start(runtime, monkeypatch):
    """Rollback in one place: the cgroup's removal failing (after it removed the folders) does
    not skip the undos registered before it: the process is gone and the state is as before."""
    from jupyter_contain.runtime.containers import cgroups as cgmod
    from jupyter_contain.runtime.containers.container import FAULT_ENV

    c = runtime.create(ContainerSpec(image="busybox:test", command=("sleep", "30")))
    real_destroy = cgmod.Cgroups.destroy
    folders: list[Path] = []

    def destroy_then_fail(self):
        folders.extend(self.paths.values())
        real_destroy(self)
        raise errors.CgroupError("injected: destroy failed")

    monkeypatch.setattr(cgmod.Cgroups, "destroy", destroy_then_fail)
    monkeypatch.setenv(FAULT_ENV, "start:network")
    monkeypatch.setenv(FAULT_ENV + "_ACTION", "raise")
    try:
        with pytest.raises(errors.CgroupError, match="injected") as exc:
            c.start()
        assert "fault injected at start:network" in str(exc.value.__context__)   # the cause is kept
        st = c.state
        assert (st.status, st.pid, st.cgroup, st.starter_pid, st.net) == ("creating", None, None, None, None)
        assert folders and not any(p.exists() for p in folders)
    finally:
        monkeypatch.undo()
        c.remove()


def test_a_failed_create_leaves_nothing(runtime, monkeypatch):
    from jupyter_contain.runtime.containers.container import FAULT_ENV

    if runtime.userns_unavailable_reason():
        pytest.skip(runtime.userns_unavailable_reason())
    allocator = runtime.userns_allocator()
    before = ({p.name for p in runtime.store.containers_dir.iterdir()}, set(runtime.store.pins()),
              set(allocator.owners()))
    for step in ("create:state", "create:done"):
        monkeypatch.setenv(FAULT_ENV, step)
        monkeypatch.setenv(FAULT_ENV + "_ACTION", "raise")
        with pytest.raises(errors.ContainerError, match=f"fault injected at {step}"):
            runtime.create(ContainerSpec(image="busybox:test", command=("true",), userns="auto"))
        after = ({p.name for p in runtime.store.containers_dir.iterdir()}, set(runtime.store.pins()),
                 set(allocator.owners()))
        assert after == before, step   # no folder, no image pin, no user namespace slice


def test_state_is_checked_when_built_and_frozen_all_the_way(runtime):
    import dataclasses

    c = runtime.create(ContainerSpec(image="busybox:test", command=("true",), labels={"k": "v"}))
    try:
        st = c.state
        with pytest.raises(errors.ContainerError, match="unknown status 'paused'"):
            dataclasses.replace(st, status="paused")
        with pytest.raises(TypeError):
            st.labels["k"] = "changed"           # type: ignore[index]
        with pytest.raises(errors.ContainerError, match="unknown network"):
            ContainerState.from_json({**json.loads((c.dir / "state.json").read_text()), "network": "overlay"})
        assert c.state.labels == {"k": "v"}
    finally:
        c.remove()
