"""The pure mount plan: order, contents and validation, without mounting."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from jupyter_contain import errors
from jupyter_contain.runtime.containers import rootfs
from jupyter_contain.runtime.containers.rootfs import (
    Bind,
    BindMount,
    FsMount,
    MaskPath,
    OverlayMount,
    ReadonlyPath,
    RemountReadonly,
    Symlink,
)

L1, L2 = Path("/store/layers/aaa"), Path("/store/layers/bbb")
UPPER, WORK, TARGET = Path("/c/upper"), Path("/c/work"), Path("/c/rootfs")


def _plan(**kw):
    args = dict(rootfs_layers=[L1, L2], upper=UPPER, work=WORK, target=TARGET)
    args.update(kw)
    return rootfs.plan(**args)


def _targets(ops, kind):
    return [getattr(op, "target", None) or getattr(op, "path", None) for op in ops if isinstance(op, kind)]


def test_overlay_first_with_layers_topmost_first() -> None:
    ops = _plan()
    assert ops[0] == OverlayMount(lowerdirs=(L1, L2), upperdir=UPPER, workdir=WORK, target=TARGET)
    assert sum(isinstance(op, OverlayMount) for op in ops) == 1


def test_ops_are_frozen_and_hashable() -> None:
    ops = _plan(binds=[Bind(Path("/data"), "/data")])
    with pytest.raises(FrozenInstanceError):
        ops[0].target = Path("/elsewhere")  # type: ignore[misc]
    assert len(set(ops)) == len(ops)


def test_plan_is_pure_and_deterministic(tmp_path: Path) -> None:
    # nothing needs to exist: planning never touches the disk
    ops1 = _plan(binds=[Bind(tmp_path / "missing", "/m")])
    ops2 = _plan(binds=[Bind(tmp_path / "missing", "/m")])
    assert ops1 == ops2
    assert list(tmp_path.iterdir()) == []


def test_proc_dev_sys_order() -> None:
    ops = _plan()
    kinds = [(type(op).__name__, getattr(op, "target", getattr(op, "path", None))) for op in ops]
    idx = {k: i for i, k in enumerate(kinds)}
    assert idx[("FsMount", "/proc")] < idx[("FsMount", "/dev")] < idx[("BindMount", "/dev/null")]
    assert idx[("FsMount", "/dev")] < idx[("FsMount", "/dev/pts")] < idx[("Symlink", "/dev/ptmx")]
    # masks need /proc and /sys mounted first; read-only paths come after masks
    first_mask = min(i for i, op in enumerate(ops) if isinstance(op, MaskPath))
    assert idx[("FsMount", "/sys")] < first_mask
    assert max(i for i, op in enumerate(ops) if isinstance(op, MaskPath)) < min(
        i for i, op in enumerate(ops) if isinstance(op, ReadonlyPath))


def test_minimal_dev() -> None:
    ops = _plan()
    dev = next(op for op in ops if isinstance(op, FsMount) and op.target == "/dev")
    assert dev.fstype == "tmpfs" and ("mode", "755") in dev.options and "nosuid" in dev.attrs
    devices = {op.target: op.source for op in ops if isinstance(op, BindMount) and op.target.startswith("/dev/")}
    assert devices == {f"/dev/{n}": Path(f"/dev/{n}") for n in ("null", "zero", "full", "random", "urandom", "tty")}
    pts = next(op for op in ops if isinstance(op, FsMount) and op.target == "/dev/pts")
    assert pts.fstype == "devpts"
    assert ("newinstance", None) in pts.options and ("ptmxmode", "0666") in pts.options
    links = {op.path: op.content for op in ops if isinstance(op, Symlink)}
    assert links == {
        "/dev/ptmx": "pts/ptmx",
        "/dev/fd": "/proc/self/fd",
        "/dev/stdin": "/proc/self/fd/0",
        "/dev/stdout": "/proc/self/fd/1",
        "/dev/stderr": "/proc/self/fd/2",
    }
    fs = {op.target: op.fstype for op in ops if isinstance(op, FsMount)}
    assert fs["/dev/shm"] == "tmpfs" and fs["/dev/mqueue"] == "mqueue"
    sys_ = next(op for op in ops if isinstance(op, FsMount) and op.target == "/sys")
    assert sys_.fstype == "sysfs" and "ro" in sys_.attrs


def test_masked_and_readonly_paths_follow_docker() -> None:
    ops = _plan()
    masked = _targets(ops, MaskPath)
    for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/sys/firmware",
              "/proc/scsi", "/proc/acpi", "/proc/latency_stats"):
        assert p in masked
    assert _targets(ops, ReadonlyPath) == ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def test_etc_files_are_made_from_their_content() -> None:
    ops = _plan(etc_files={"resolv.conf": "nameserver 10.0.2.3\n", "hosts": "127.0.0.1 localhost\n",
                           "hostname": "box\n"})
    files = {op.target: op for op in ops if isinstance(op, rootfs.FileMount)}
    assert set(files) == {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}
    assert files["/etc/resolv.conf"].content == "nameserver 10.0.2.3\n"
    # nothing of the host is bound there
    assert not [op for op in ops if isinstance(op, BindMount) and op.target.startswith("/etc/")]
    with pytest.raises(errors.InvalidSpec, match="NUL"):
        _plan(etc_files={"hosts": "a\0b"})


@pytest.mark.parametrize("name", ["", "../passwd", "a/b", ".", ".."])
def test_etc_file_names_are_plain(name: str) -> None:
    with pytest.raises(errors.InvalidSpec):
        _plan(etc_files={name: "x\n"})


def test_user_binds_parents_first_and_readonly() -> None:
    ops = _plan(binds=[
        Bind(Path("/h/deep"), "/data/sub/deep"),
        Bind(Path("/h/data"), "/data/", readonly=True),
        Bind(Path("/h/other"), "/other", recursive=False),
    ])
    user = [op for op in ops if isinstance(op, BindMount) and not op.target.startswith(("/dev/", "/etc/"))]
    assert [op.target for op in user] == ["/data", "/other", "/data/sub/deep"]
    data = user[0]
    assert data.readonly and rootfs.attrs_of(data) == {"ro", "nosuid", "nodev"}
    assert not user[1].recursive
    # every host folder is nosuid,nodev; the runtime's own device binds cannot be nodev
    assert all({"nosuid", "nodev"} <= rootfs.attrs_of(op) for op in user)
    devs = [op for op in ops if isinstance(op, BindMount) and op.target.startswith("/dev/")]
    assert devs and not any("nodev" in rootfs.attrs_of(op) for op in devs)
    # user binds come after the runtime's own mounts and before the masks
    i_user = ops.index(user[0])
    assert all(not isinstance(op, MaskPath) for op in ops[:i_user])
    assert any(isinstance(op, FsMount) and op.target == "/sys" for op in ops[:i_user])


@pytest.mark.parametrize("target", ["relative", "/a/../etc", "/", "/proc", "/proc/sys", "/sys/x", "/x\0y"])
def test_bad_bind_targets(target: str) -> None:
    with pytest.raises(errors.InvalidSpec):
        _plan(binds=[Bind(Path("/h"), target)])


def test_bind_target_normalised() -> None:
    ops = _plan(binds=[Bind(Path("/h"), "//data/./x/")])
    assert any(isinstance(op, BindMount) and op.target == "/data/x" for op in ops)


def test_duplicate_targets_rejected() -> None:
    with pytest.raises(errors.InvalidSpec, match="two mounts"):
        _plan(binds=[Bind(Path("/a"), "/d"), Bind(Path("/b"), "/d/")])
    with pytest.raises(errors.InvalidSpec, match="two mounts"):
        _plan(etc_files={"hosts": ""}, binds=[Bind(Path("/b"), "/etc/hosts")])


def test_relative_host_paths_rejected() -> None:
    with pytest.raises(errors.InvalidSpec):
        _plan(binds=[Bind(Path("rel"), "/d")])
    with pytest.raises(errors.InvalidSpec):
        _plan(rootfs_layers=[Path("rel")])
    with pytest.raises(errors.InvalidSpec):
        _plan(upper=Path("upper"))


@pytest.mark.parametrize("bad", ["/store/a:b", "/store/a,b", "/store/a\\b"])
def test_overlay_reserved_characters_rejected(bad: str) -> None:
    with pytest.raises(errors.InvalidSpec):
        _plan(rootfs_layers=[Path(bad)])


def test_needs_a_layer() -> None:
    with pytest.raises(errors.InvalidSpec):
        _plan(rootfs_layers=[])


def test_readonly_rootfs_is_the_last_op() -> None:
    assert not any(isinstance(op, RemountReadonly) for op in _plan())
    ops = _plan(readonly_rootfs=True)
    assert ops[-1] == RemountReadonly("/")


def test_many_layers_are_kept_separately() -> None:
    # 200 layers with long paths: far beyond the one-page mount data limit;
    # the plan keeps them as a list (the executor passes them one by one)
    layers = [Path("/var/lib/jupyter-contain/store/layers/sha256") / (f"{i:064x}") for i in range(200)]
    ops = _plan(rootfs_layers=layers)
    assert ops[0].lowerdirs == tuple(layers)
    assert len(":".join(map(str, layers))) > 4096


# --- the container's own cgroup at /sys/fs/cgroup ----------------------------------

_CG_ATTRS = frozenset({"ro", "nosuid", "nodev", "noexec"})


def _cgroup_ops(ops):
    """The cgroup mounts: last of all (they need the cgroup namespace, made after the rest)."""
    sysfs = next(i for i, op in enumerate(ops) if getattr(op, "target", None) == "/sys")
    start = next(i for i, op in enumerate(ops)
                 if str(getattr(op, "target", getattr(op, "path", ""))).startswith("/sys/fs/cgroup"))
    assert start > sysfs
    assert all(str(getattr(op, "target", getattr(op, "path", ""))).startswith("/sys/fs/cgroup") for op in ops[start:])
    return ops[start:]


def test_no_cgroup_mounts_unless_asked() -> None:
    assert not [op for op in _plan() if "/sys/fs/cgroup" in str(getattr(op, "target", getattr(op, "path", "")))]


def test_cgroup_v2_is_one_read_only_mount_after_sysfs() -> None:
    ops = _plan(cgroupfs=rootfs.CgroupFs(2))
    assert _cgroup_ops(ops) == [FsMount("cgroup2", "/sys/fs/cgroup", source="cgroup", attrs=_CG_ATTRS)]


def test_cgroup_v1_tmpfs_hierarchies_symlinks_then_read_only() -> None:
    ops = _plan(cgroupfs=rootfs.CgroupFs(1, (("memory",), ("cpu", "cpuacct"), ("pids",))))
    assert _cgroup_ops(ops) == [
        FsMount("tmpfs", "/sys/fs/cgroup", source="tmpfs", options=(("mode", "755"),),
                attrs=frozenset({"nosuid", "nodev", "noexec"})),
        FsMount("cgroup", "/sys/fs/cgroup/memory", source="cgroup", options=(("memory", None),), attrs=_CG_ATTRS),
        FsMount("cgroup", "/sys/fs/cgroup/cpu,cpuacct", source="cgroup",
                options=(("cpu", None), ("cpuacct", None)), attrs=_CG_ATTRS),
        Symlink("/sys/fs/cgroup/cpu", "cpu,cpuacct"),
        Symlink("/sys/fs/cgroup/cpuacct", "cpu,cpuacct"),
        FsMount("cgroup", "/sys/fs/cgroup/pids", source="cgroup", options=(("pids", None),), attrs=_CG_ATTRS),
        RemountReadonly("/sys/fs/cgroup"),
    ]


@pytest.mark.parametrize("version,hierarchies", [
    (3, ()),
    (2, (("memory",),)),
    (1, ((),)),
    (1, (("memory",), ("memory", "cpu"))),
    (1, (("../x",),)),
    (1, (("mem,ory",),)),
])
def test_bad_cgroupfs_rejected(version, hierarchies) -> None:
    with pytest.raises(errors.InvalidSpec):
        rootfs.CgroupFs(version, hierarchies)


@pytest.mark.parametrize("namespaces", ["with-cgroupns", "without"])
@pytest.mark.parametrize("by_caller", [True, False])
def test_child_mounts_everything_before_the_cgroup_mounts_early(namespaces, by_caller) -> None:
    # cgroup_by_caller: the native child makes mounts[:n_early_mounts]
    # while the parent attaches its cgroup; the cgroup mounts need the cgroup
    # namespace made after that. A child that enters its cgroups itself (v1)
    # makes every mount before the release.
    from jupyter_contain.runtime.containers import spawn
    ops = tuple(_plan(cgroupfs=rootfs.CgroupFs(1, (("memory",), ("pids",)))))
    ns = spawn.NAMESPACES if namespaces == "with-cgroupns" else spawn.NAMESPACES - {"cgroup"}
    cfg, arena = spawn.build_config(spawn.SpawnConfig(mounts=ops, process=spawn.ProcessSpec(argv=("true",)),
                                                      stdio=(0, 1, 2), namespaces=ns, cgroup_by_caller=by_caller))
    first_cgroup = next(i for i, op in enumerate(ops) if getattr(op, "target", "") == "/sys/fs/cgroup")
    assert cfg.n_mounts == len(ops)
    assert cfg.cgroup_by_caller == by_caller
    assert cfg.n_early_mounts == (first_cgroup if namespaces == "with-cgroupns" and by_caller else len(ops))
    del arena


def test_tmpfs_is_planned_bounded_after_the_bind_it_sits_on():
    ops = _plan(binds=[Bind(Path("/srv/k"), "/run/k", readonly=True)],
                tmpfs=[rootfs.Tmpfs("/run/k/s", size=64 * 1024, nr_inodes=128, mode=0o1777)])
    names = [getattr(op, "target", None) for op in ops]
    assert names.index("/run/k") < names.index("/run/k/s")
    [t] = [op for op in ops if isinstance(op, FsMount) and op.target == "/run/k/s"]
    assert t.fstype == "tmpfs"
    assert dict(t.options) == {"mode": "1777", "size": "64k", "nr_inodes": "128"}
    assert t.attrs == frozenset({"nosuid", "nodev", "noexec"})


@pytest.mark.parametrize("kw", [{"size": 100}, {"nr_inodes": 0}, {"mode": 0o17777}])
def test_tmpfs_out_of_range_is_refused_when_built(kw):
    with pytest.raises(errors.InvalidSpec):
        rootfs.Tmpfs("/t", **kw)


def test_tmpfs_targets_are_checked_like_binds():
    with pytest.raises(errors.InvalidSpec, match="reserved"):
        _plan(tmpfs=[rootfs.Tmpfs("/proc/x")])
    with pytest.raises(errors.InvalidSpec, match="two mounts"):
        _plan(binds=[Bind(Path("/srv/k"), "/t")], tmpfs=[rootfs.Tmpfs("/t")])
