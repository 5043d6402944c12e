"""User namespaces: container root is not host root (busybox image, real namespaces and mounts).

The subordinate ids come from temporary subuid/subgid files (the machine's
/etc/subuid is never touched); the maps are written by us as root.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import signal
import tarfile
import time
from pathlib import Path

import pytest

from jupyter_contain import errors, native
from jupyter_contain.runtime.containers import idmap, rootfs, spawn
from jupyter_contain.runtime.containers.container import ContainerSpec, Runtime, parse_bind

BASE = 400000          # the test's subordinate range: 4 slices of 65536
SLICES = 4
NS_GET_USERNS = 0xB701   # linux/nsfs.h: _IO(0xb7, 0x1)
DOCKER_DEFAULT_CAPS = sum(1 << native.CAPABILITIES[c] for c in spawn.DEFAULT_CAPABILITIES)


@pytest.fixture
def subids(tmp_path, monkeypatch):
    uid_file, gid_file = tmp_path / "subuid", tmp_path / "subgid"
    uid_file.write_text(f"someone:100000:65536\njupyter-contain:{BASE}:{SLICES * 65536}\n")
    gid_file.write_text(f"jupyter-contain:{BASE + 1000000}:{SLICES * 65536}\n")
    monkeypatch.setenv("JUPYTER_CONTAIN_SUBUID_FILE", str(uid_file))
    monkeypatch.setenv("JUPYTER_CONTAIN_SUBGID_FILE", str(gid_file))
    monkeypatch.delenv("JUPYTER_CONTAIN_SUBID_USER", raising=False)
    return uid_file, gid_file


def run_capture(rt: Runtime, tmp_path: Path, cmd: str, **kw) -> tuple[int, str]:
    out = tmp_path / "out"
    kw.setdefault("userns", "auto")
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        info = rt.run(ContainerSpec(image="busybox:test", command=("sh", "-c", cmd), **kw),
                      stdio=(null.fileno(), f.fileno(), f.fileno()), remove=True)
    return info.code, out.read_text()


def status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines()) if v}


# --- the mapping, pure -----------------------------------------------------------------

def test_idmapping_text_json_and_oci():
    m = idmap.IdMapping.single(400000, 500000)
    assert m.uid_map_text() == "0 400000 65536\n" and m.gid_map_text() == "0 500000 65536\n"
    assert m.host_uid(0) == 400000 and m.host_uid(65535) == 465535 and m.host_uid(65536) is None
    assert idmap.IdMapping.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert m.oci()["uidMappings"] == [{"containerID": 0, "hostID": 400000, "size": 65536}]
    with pytest.raises(errors.InvalidSpec):
        idmap.IdMapping(((1, 400000, 10),), ((0, 1, 1),))   # container root unmapped
    with pytest.raises(errors.InvalidSpec):
        idmap.IdMapping(((0, -1, 10),), ((0, 1, 1),))


def test_allocator_distinct_persistent_and_reclaimed(tmp_path, subids):
    alloc = idmap.Allocator(tmp_path / "userns")
    got = [alloc.allocate(f"c{i}") for i in range(SLICES)]
    starts = [g.uid_map[0][1] for g in got]
    assert starts == [BASE + i * 65536 for i in range(SLICES)]
    assert [g.gid_map[0][1] for g in got] == [BASE + 1000000 + i * 65536 for i in range(SLICES)]
    with pytest.raises(errors.ContainerError, match="taken"):
        alloc.allocate("one-too-many")
    alloc.release("c1", got[1])
    assert alloc.allocate("c9").uid_map[0][1] == starts[1]
    alloc.release("not-the-owner", got[2])          # someone else's reservation stays
    assert alloc.owners()["c2"] == starts[2]
    # a reservation of a dead owner is taken over, but only once it is a minute old
    assert "c3" in alloc.owners()
    with pytest.raises(errors.ContainerError):
        alloc.allocate("late", alive=lambda o: o != "c3")
    old = time.time() - 120
    os.utime(tmp_path / "userns" / str(starts[3]), (old, old))
    assert alloc.allocate("late", alive=lambda o: o != "c3").uid_map[0][1] == starts[3]


def test_subordinate_ranges_fallback_and_setup_commands(tmp_path, subids, monkeypatch):
    uid_file, gid_file = subids
    owner, uids, gids = idmap.subordinate_ranges()
    assert owner == "jupyter-contain" and uids == [idmap.SubidRange(BASE, SLICES * 65536)]
    uid_file.write_text("root:600000:65536\n")
    gid_file.write_text("root:600000:65536\n")
    assert idmap.subordinate_ranges()[0] == "root"      # root's own range is the fallback
    uid_file.write_text("")
    with pytest.raises(errors.ContainerError, match="usermod --add-subuids"):
        idmap.subordinate_ranges()
    cmds = idmap.setup_commands("jupyter-contain", count=65536 * 4,
                                existing=[idmap.SubidRange(100000, 65536), idmap.SubidRange(165536, 65536)])
    assert cmds[-1] == ["usermod", "--add-subuids", "262144-524287", "--add-subgids", "262144-524287",
                        "jupyter-contain"]


def test_spec_validation():
    with pytest.raises(errors.InvalidSpec, match="user namespace mode"):
        ContainerSpec(image="busybox:test", userns="private")  # type: ignore[arg-type]
    ops = rootfs.plan(rootfs_layers=[Path("/l")], upper=Path("/c/upper"), work=Path("/w/work"), target=Path("/c/r"))
    with pytest.raises(errors.InvalidSpec, match="share a parent"):
        spawn.SpawnConfig(mounts=tuple(ops), process=spawn.ProcessSpec(argv=("true",)), stdio=(0, 1, 2),
                          userns=idmap.IdMapping.single(BASE, BASE))
    ops = rootfs.plan(rootfs_layers=[Path("/l")], upper=Path("/c/upper"), work=Path("/c/work"), target=Path("/c/r"))
    with pytest.raises(errors.InvalidSpec, match="not mapped"):
        spawn.SpawnConfig(mounts=tuple(ops), process=spawn.ProcessSpec(argv=("true",), uid=70000),
                          stdio=(0, 1, 2), userns=idmap.IdMapping.single(BASE, BASE, 65536))
    etc = rootfs.plan(rootfs_layers=[Path("/l")], upper=Path("/c/upper"), work=Path("/c/work"), target=Path("/c/r"),
                      binds=[rootfs.Bind(Path("/src"), "/data"), rootfs.Bind(Path("/k"), "/k", idmap=True)])
    binds = {op.target: op for op in etc if isinstance(op, rootfs.BindMount)}
    assert binds["/k"].idmap and not binds["/data"].idmap   # user binds are idmapped only when asked


# --- real containers -----------------------------------------------------------------------

def test_inside_view(runtime, tmp_path, subids):
    code, out = run_capture(runtime, tmp_path,
                            "cat /proc/self/uid_map /proc/self/gid_map; echo id=$(id -u):$(id -g); "
                            "stat -c '%n %u:%g %a' /etc/passwd /tmp / /etc/hosts /bin/busybox")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["0", str(BASE), "65536"]
    assert lines[1].split() == ["0", str(BASE + 1000000), "65536"]
    assert "id=0:0" in out
    # the image's files show their image owners (no "nobody"), modes intact
    assert "/etc/passwd 0:0 644" in out and "/tmp 0:0 1777" in out and "/ 0:0 755" in out
    assert "/bin/busybox 0:0" in out
    assert "/etc/hosts 0:0" in out     # the runtime's /etc files are idmapped too


def test_host_sees_mapped_ids_and_upper_keeps_container_ids(runtime, tmp_path, subids):
    c = runtime.create(ContainerSpec(
        image="busybox:test", userns="auto",
        command=("sh", "-c", "echo data > /newfile; mkdir -p /home/u; chown 1000:1000 /home/u; "
                             "rm /etc/passwd; touch /tmp/t; exec sleep 60")))
    try:
        st = c.state
        assert st.userns is not None and st.userns.to_json() == {"uid_map": [[0, BASE, 65536]], "gid_map": [[0, BASE + 1000000, 65536]]}
        assert {"type": "user"} in json.loads((c.dir / "config.json").read_text())["linux"]["namespaces"]
        assert oct(c.dir.stat().st_mode & 0o777) == "0o700"
        pid = c.start()
        deadline = time.monotonic() + 10
        while not (c.upper / "tmp" / "t").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        # the container's processes run as the mapped host ids, not as host root
        with open(f"/proc/{pid}/status") as f:
            fields = status_fields(f.read())
        assert fields["Uid"].split() == [str(BASE)] * 4
        assert fields["Gid"].split() == [str(BASE + 1000000)] * 4
        # every other namespace of the container is owned by its user namespace
        user_ino = os.stat(f"/proc/{pid}/ns/user").st_ino
        assert user_ino != os.stat("/proc/self/ns/user").st_ino
        for ns in ("net", "uts", "ipc", "mnt", "pid", "cgroup"):
            fd = os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                owner = fcntl.ioctl(fd, NS_GET_USERNS)
                try:
                    assert os.fstat(owner).st_ino == user_ino, ns
                finally:
                    os.close(owner)
            finally:
                os.close(fd)
        # what it wrote keeps the container's ids on disk (the upper is idmapped)
        for p, owner in (("newfile", (0, 0)), ("home/u", (1000, 1000)), ("tmp/t", (0, 0))):
            s = os.lstat(c.upper / p)
            assert (s.st_uid, s.st_gid) == owner, p
        wh = os.lstat(c.upper / "etc" / "passwd")   # the deletion is a real overlay whiteout
        assert (c.upper / "etc" / "passwd").is_char_device() and wh.st_rdev == 0 and wh.st_uid == 0
        assert (c.upper / "newfile").read_text() == "data\n"
    finally:
        c.remove(force=True)
    assert str(BASE) not in idmap.Allocator(runtime.store.root / "userns").owners().values()


def test_host_root_owned_bind_is_not_writable(runtime, tmp_path, subids):
    src = tmp_path / "hostdir"
    src.mkdir(mode=0o755)
    (src / "f").write_text("host\n")
    os.chmod(src / "f", 0o644)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    code, out = run_capture(runtime, tmp_path,
                            "cat /data/f; stat -c 'owner=%u' /data/f; echo x >> /data/f; echo append=$?; "
                            "touch /data/new; echo create=$?; chmod 777 /data/f; echo chmod=$?; "
                            "touch /open/made; echo open=$?",
                            binds=(parse_bind(f"{src}:/data"), parse_bind(f"{open_dir}:/open")))
    assert code == 0, out
    assert "host" in out and "owner=65534" in out         # host root is nobody inside
    assert "append=1" in out and "create=1" in out and "chmod=1" in out
    assert (src / "f").read_text() == "host\n" and not (src / "new").exists()
    assert "open=0" in out                                 # what the host allows anyone still works
    assert os.stat(open_dir / "made").st_uid == BASE       # ... as the mapped host id


def test_capabilities_and_seccomp_hold(runtime, tmp_path, subids):
    code, out = run_capture(runtime, tmp_path,
                            "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status; "
                            "mount -t tmpfs none /mnt; echo mount=$?; unshare -U true; echo unshare=$?; "
                            "chown 1000 /etc/group; echo chown=$?; hostname other; echo hostname=$?")
    assert code == 0, out
    f = status_fields(out)
    expected = DOCKER_DEFAULT_CAPS & native.host_bounding_set()
    assert int(f["CapBnd"], 16) == expected and int(f["CapEff"], 16) == expected
    assert int(f["CapInh"], 16) == 0 and int(f["CapAmb"], 16) == 0
    assert f["NoNewPrivs"] == "1" and f["Seccomp"] == "2"
    assert "mount=0" not in out and "unshare=0" not in out and "hostname=0" not in out
    assert "chown=0" in out        # CAP_CHOWN works on the container's own files


def test_exec_into_userns_container(runtime, tmp_path, subids):
    c = runtime.create(ContainerSpec(image="busybox:test", command=("sleep", "60"), userns="auto"))
    try:
        c.start()
        r, w = os.pipe()
        try:
            proc = c.exec(["sh", "-c", "id -u; cat /proc/self/uid_map; touch /from-exec; ls -ln /from-exec"],
                          stdio=(w, w, w))
            os.close(w)
            w = -1
            assert proc.wait(10) == 0
            proc.close()
            out = b""
            while chunk := os.read(r, 4096):
                out += chunk
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        lines = out.decode().splitlines()
        assert lines[0] == "0"
        assert lines[1].split() == ["0", str(BASE), "65536"]
        assert os.lstat(c.upper / "from-exec").st_uid == 0
        proc2 = c.exec(["id", "-u"], stdio=(0, 1, 2), user="65534")   # nobody of the container
        assert proc2.wait(10) == 0
        proc2.close()
    finally:
        c.remove(force=True)


def test_two_containers_get_distinct_ranges(runtime, tmp_path, subids):
    a = runtime.create(ContainerSpec(image="busybox:test", command=("true",), userns="auto"))
    b = runtime.create(ContainerSpec(image="busybox:test", command=("true",), userns="auto"))
    h = runtime.create(ContainerSpec(image="busybox:test", command=("true",)))
    try:
        ua, ub = a.state.userns.uid_map[0][1], b.state.userns.uid_map[0][1]
        assert ua != ub and abs(ua - ub) >= 65536
        assert h.state.userns is None
        assert {"type": "user"} not in json.loads((h.dir / "config.json").read_text())["linux"]["namespaces"]
        # a restart keeps the range
        for c in (a, a):
            c.start()
            assert c.wait(10).code == 0
        assert a.state.userns.uid_map[0][1] == ua
    finally:
        for c in (a, b, h):
            c.remove(force=True)


def test_network_host_userns(runtime, tmp_path, subids):
    code, out = run_capture(runtime, tmp_path, "ls /sys/class/net | grep -c .; cat /proc/self/uid_map",
                            network="host")
    assert code == 0, out
    assert int(out.split()[0]) >= 1 and str(BASE) in out


def test_snapshot_stores_container_ids(runtime, tmp_path, subids):
    from jupyter_contain.runtime import commit as snap

    c = runtime.create(ContainerSpec(image="busybox:test", userns="auto", command=(
        "sh", "-c", "echo hi > /made-by-root; echo u > /made-by-user; chown 1000:1000 /made-by-user")))
    rec = None
    try:
        c.start()
        assert c.wait(10).code == 0
        rec = snap.snapshot(runtime, c, "userns-snap:1")
        with runtime.store.open_blob(rec.manifest.layers[-1].digest) as f:
            raw = f.read()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            members = {m.name.lstrip("./"): m for m in t.getmembers()}
        assert (members["made-by-root"].uid, members["made-by-root"].gid) == (0, 0)
        assert (members["made-by-user"].uid, members["made-by-user"].gid) == (1000, 1000)
        assert all(m.uid < 65536 for m in members.values())
    finally:
        c.remove(force=True)
        if rec is not None:
            runtime.store.untag("userns-snap:1")


def test_parent_side_failure_names_the_step(runtime, tmp_path, subids, monkeypatch):
    # a map the kernel refuses: the child is reaped, nothing is left
    bad = idmap.IdMapping(((0, BASE, 65536), (0, BASE, 1)), ((0, BASE, 65536),))
    c = runtime.create(ContainerSpec(image="busybox:test", command=("true",), userns="auto"))
    try:
        st = json.loads((c.dir / "state.json").read_text())
        st["userns"] = bad.to_json()
        (c.dir / "state.json").write_text(json.dumps(st))
        with pytest.raises(errors.SpawnError) as info:
            c.start()
        assert info.value.step == "uid-map" and info.value.errno == 22
        assert c.refresh_status() == "created"
    finally:
        c.remove(force=True)


def test_start_latency_smoke(runtime, tmp_path, subids):
    """Not a benchmark (bench/bench_userns.py is): a user namespace must not make a start slow."""
    for userns in ("host", "auto"):
        c = runtime.create(ContainerSpec(image="busybox:test", command=("true",), userns=userns))
        try:
            t0 = time.perf_counter()
            c.start()
            elapsed = time.perf_counter() - t0
            assert c.wait(10).code == 0
            assert elapsed < 1.0, (userns, elapsed)
        finally:
            c.remove(force=True)


def test_signals_reach_userns_container(runtime, subids):
    c = runtime.create(ContainerSpec(image="busybox:test", command=("sleep", "60"), userns="auto"))
    try:
        c.start()
        c.signal(signal.SIGTERM)
        info = c.wait(10)
        assert info is not None and info.code == 128 + signal.SIGTERM
    finally:
        c.remove(force=True)


def test_own_namespaces_are_owned_by_the_user_namespace(runtime, tmp_path, subids):
    # CAP_NET_BIND_SERVICE and CAP_NET_RAW count against the container's own
    # network namespace (made inside its user namespace). NET_RAW is no default any more
    # (busybox's ping wants a raw socket; test_hardening pings without it): added here
    code, out = run_capture(runtime, tmp_path,
                            "nc -l -p 80 & sleep 0.2; netstat -ltn | grep -c ':80 '; kill %1; "
                            "ping -c1 -W2 127.0.0.1 | grep -c 'bytes from'", cap_add=("NET_RAW",))
    assert code == 0, out
    assert out.split()[:2] == ["1", "1"], out


def test_terminal_and_readonly_rootfs(runtime, subids):
    from native_helpers import read_pty

    c = runtime.create(ContainerSpec(image="busybox:test", userns="auto", tty=True, readonly_rootfs=True,
                                     command=("sh", "-c", "tty; stat -c 'tty-owner=%u' $(tty); "
                                                          "touch /x 2>/dev/null; echo ro=$?")))
    try:
        c.start()
        out = read_pty(c.pty_master).decode()
        assert c.wait(10).code == 0
    finally:
        c.remove(force=True)
    assert "/dev/pts/0" in out and "tty-owner=0" in out and "ro=1" in out, out
