"""Snapshots of real busybox containers: the layer tar, the new image, diff, freezing, peers, CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from jupyter_contain import errors
from jupyter_contain.kernel import snapshots as kernel_snapshots
from jupyter_contain.runtime import commit
from jupyter_contain.runtime.containers.container import (
    ContainerSpec,
    Runtime,
    parse_bind,
)
from jupyter_contain.runtime.images import archive
from jupyter_contain.runtime.images import snapshot as snap
from jupyter_contain.runtime.images.layers import (
    merged_view_manifest,
    tree_manifest,
    unpack_layer,
)
from jupyter_contain.runtime.images.store import Store

REPO = Path(__file__).resolve().parent.parent

#: security.capability v2: cap_net_bind_service (10) permitted + effective
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def run_in(rt: Runtime, script: str, **kw):
    """Create a busybox container, run ``script`` to its end; returns the (exited) container."""
    c = rt.create(ContainerSpec(image="busybox:test", command=("sh", "-c", script), **kw))
    c.start()
    info = c.wait(30)
    assert info is not None and info.code == 0, (info, (c.dir / "log").read_text())
    return c


def layer_members(store: Store, rec) -> list[tarfile.TarInfo]:
    data = layer_bytes(store, rec.manifest.layers[-1])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
        return t.getmembers()


def layer_bytes(store: Store, desc) -> bytes:
    with store.open_blob(desc.digest) as f:
        raw = f.read()
    if desc.media_type.endswith("+zstd"):
        import zstandard
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return gzip.decompress(raw)


def without(view: dict, prefixes) -> dict:
    return {k: v for k, v in view.items() if not any(k == p or k.startswith(p + "/") for p in prefixes)}


def expected_view(store: Store, c, stubs) -> dict:
    """The live container's merged view, with the runtime stubs showing what the image has there."""
    lowers = store.layer_dirs(c.image())
    live = merged_view_manifest([c.upper, *lowers])
    image = merged_view_manifest(lowers)
    out = without(live, stubs)
    out.update({k: v for k, v in image.items() if k not in without(image, stubs)})
    return out


def snapshot_view(store: Store, rec) -> dict:
    return merged_view_manifest(store.ensure_unpacked(rec))


EDITS = (
    "rm /etc/passwd; "                                   # delete a lower file
    "rm -rf /usr/share; "                                # delete a lower directory
    "rm -rf /var && mkdir /var && echo new > /var/n; "  # delete and recreate: opaque
    "rm /etc/group && mkdir /etc/group && echo g > /etc/group/x; "  # file -> directory
    "rm -rf /home && echo h > /home; "                   # directory -> file
    "chmod 700 /sbin; chmod 600 /etc/hostname; "         # metadata only (hostname is a stub: stays out)
    "mkdir -p /opt/app && echo data > /opt/app/f && ln /opt/app/f /opt/app/hard; "
    "ln -s ../app/f /opt/app/sym; mkfifo /opt/app/fifo; "
    "echo x > /opt/app/suid && chmod 755 /opt/app/suid; echo o > /opt/app/old; "
    "head -c 300000 /dev/urandom > /opt/app/big; "
    f"mkdir -p /opt/{'d' * 60} && echo long > /opt/{'d' * 60}/{'f' * 70}; "
    "echo u > /opt/app/caf\u00e9; "
    "mkdir -p /run/jupyter-contain/k1 && echo s > /run/jupyter-contain/k1/sock; "
    "mkdir -p /.jupyter-contain && echo g > /.jupyter-contain/guest.py; "
    "echo w > /data/x/written"
)
STUBS = ("etc/hosts", "etc/hostname", "etc/resolv.conf", "run", ".jupyter-contain", "data")


@pytest.fixture
def edited(runtime, tmp_path):
    """A stopped container with every kind of change, plus an xattr set from the host side."""
    share = tmp_path / "share"
    share.mkdir()
    c = run_in(runtime, EDITS, binds=(parse_bind(f"{share}:/data/x"),))
    # setuid from the host side: containers cannot make setuid files any more (issue #23 item 1), but
    # a layer may hold them (an image's own), and a snapshot must keep the mode
    os.chmod(c.upper / "opt/app/suid", 0o4755)
    os.setxattr(c.upper / "opt/app/suid", "security.capability", CAP_NET_BIND)
    os.setxattr(c.upper / "opt/app/f", "user.note", b"\xff\x00binary")
    os.utime(c.upper / "opt/app/old", (1600000000, 1600000000))
    assert (share / "written").read_text() == "w\n"   # the bind is the host's, not the layer's
    return c


def test_layer_entries(runtime, edited):
    store = runtime.store
    rec = commit.snapshot(runtime, edited, "snap-entries:1", message="all kinds")
    members = layer_members(store, rec)
    names = [m.name for m in members]
    by_name = {m.name: m for m in members}
    # deletions are whiteouts; a recreated directory is opaque, its marker right after its entry
    assert "etc/.wh.passwd" in names and "usr/.wh.share" in names
    assert names.index("var/.wh..wh..opq") == names.index("var") + 1
    assert names.index("etc/group/.wh..wh..opq") == names.index("etc/group") + 1
    assert by_name["etc/group"].isdir() and by_name["home"].isfile()
    assert by_name["sbin"].isdir() and by_name["sbin"].mode == 0o700
    # whiteouts are never hardlinks, even though overlayfs gives them all one inode
    assert all(m.isfile() and m.size == 0 for m in members if "/.wh." in "/" + m.name)
    # a hardlink between real files stays one
    hard = [m for m in (by_name["opt/app/f"], by_name["opt/app/hard"]) if m.islnk()]
    assert len(hard) == 1 and hard[0].linkname in ("opt/app/f", "opt/app/hard")
    assert by_name["opt/app/sym"].issym() and by_name["opt/app/sym"].linkname == "../app/f"
    assert by_name["opt/app/fifo"].isfifo()
    suid = by_name["opt/app/suid"]
    assert suid.mode == 0o4755
    assert suid.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == CAP_NET_BIND
    assert by_name["opt/app/old"].mtime == 1600000000
    assert any(n.startswith("opt/ddd") and len(n) > 100 for n in names)
    assert "opt/app/caf\u00e9" in names
    # runtime stubs never enter the layer
    for n in names:
        assert not n.startswith(("run", ".jupyter-contain", "data", "dev", "proc", "sys")), n
        assert n not in ("etc/hosts", "etc/hostname", "etc/resolv.conf"), n
    # no atime/ctime, no user or group names, deterministic whiteout headers
    for m in members:
        assert not {"atime", "ctime"} & set(m.pax_headers), m.name
        assert m.uname == "" and m.gname == ""
    # the image: base layers + ours, provenance, history
    base = edited.image()
    assert rec.name == "localhost/snap-entries:1"
    assert rec.manifest.layers[:-1] == base.manifest.layers
    assert rec.config.diff_ids[:-1] == base.config.diff_ids
    assert rec.manifest.layers[-1].media_type == "application/vnd.oci.image.layer.v1.tar+gzip"
    labels = rec.config.labels
    assert labels["org.opencontainers.image.base.name"] == base.name
    assert labels["org.opencontainers.image.base.digest"] == base.digest
    assert labels["io.jupyter-contain.source-container"] == edited.id
    assert "org.opencontainers.image.created" in labels and "io.jupyter-contain.kernel-id" not in labels
    hist = rec.config.raw["history"][-1]
    assert hist["created_by"] == "jupyter-contain snapshot" and hist["comment"] == "all kinds"
    assert rec.config.cmd == base.config.cmd


def test_rootfs_equals_merged_view(runtime, edited, tmp_path):
    store = runtime.store
    rec = commit.snapshot(runtime, edited, "snap-view:1", unpack=True)
    want = expected_view(store, edited, STUBS)
    got = snapshot_view(store, rec)
    assert got == want
    assert got["opt/app/suid"][6] == (("security.capability", CAP_NET_BIND),)
    assert "etc/passwd" not in got and "usr/share" not in got and got["home"][0] == "file"
    # the layer was put in place unpacked, and is what unpacking its blob gives
    diff_id = rec.config.diff_ids[-1]
    assert store.unpacked(diff_id)
    desc = rec.manifest.layers[-1]
    with store.open_blob(desc.digest) as f:
        unpack_layer(f, tmp_path / "re", media_type=desc.media_type, layer=desc.digest,
                     expected_diff_id=diff_id, lower_dirs=store.layer_dirs(edited.image()))
    assert tree_manifest(tmp_path / "re") == tree_manifest(store.layer_dir(diff_id))
    shutil.rmtree(tmp_path / "re")


def test_diff_preview(runtime, edited):
    changes = commit.diff(edited)
    kinds = {c.path: c.kind for c in changes}
    assert kinds["/etc/passwd"] == "D" and kinds["/usr/share"] == "D"
    assert kinds["/var"] == "C" and kinds["/var/n"] == "A" and kinds["/var/tmp"] == "D"   # opaque: hidden = deleted
    assert kinds["/etc/group"] == "C" and kinds["/etc/group/x"] == "A" and kinds["/home"] == "C"
    assert kinds["/sbin"] == "C" and kinds["/opt/app/big"] == "A"
    assert not any(p.startswith(("/run", "/.jupyter-contain", "/data")) or p in ("/etc/hosts", "/etc/hostname",
                   "/etc/resolv.conf") for p in kinds)
    assert [c.path for c in changes] == sorted(c.path for c in changes)
    big = next(c for c in changes if c.path == "/opt/app/big")
    assert big.size == 300000
    summary = {f.folder: f for f in commit.summarize(changes)}
    opt = [c for c in changes if c.path.startswith("/opt")]
    assert summary["/opt"].count == len(opt) and summary["/opt"].bytes == sum(c.size for c in opt)
    assert summary["/etc"].count == 4   # /etc, /etc/passwd, /etc/group, /etc/group/x


def test_diff_summary_is_the_diff_bounded(runtime, edited):
    full = commit.diff(edited)
    for limit in (0, 1, 5, len(full) + 10):
        s = commit.diff_summary(edited, limit=limit)
        assert s.total == len(full) and s.bytes == sum(c.size for c in full)
        assert list(s.changes) == full[:limit] and s.truncated == (limit < len(full))
        assert list(s.folders) == commit.summarize(full)


def _renameat2_exchange():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def exchange(dirfd: int, a: bytes, b: bytes) -> None:
        if libc.renameat2(dirfd, a, dirfd, b, 2) != 0:   # RENAME_EXCHANGE
            raise OSError(ctypes.get_errno(), "renameat2")
    return exchange


def test_diff_and_snapshot_never_follow_a_swapped_symlink(runtime, tmp_path):
    """A directory and a symlink to a host folder swapped in a loop (as a running container can do).

    The walk opens every directory beneath a held fd without following
    symlinks: whichever the host meets, it never lists the host folder.
    """
    import threading

    secret = tmp_path / "host-secret"
    secret.mkdir()
    for i in range(50):
        (secret / f"SECRET-{i}").write_bytes(b"s" * (1000 + i))
    c = runtime.create(ContainerSpec(image="busybox:test", command=("true",)))
    (c.upper / "w/d").mkdir(parents=True)
    for i in range(50):
        (c.upper / f"w/d/mine-{i}").write_text("m")
    os.symlink(str(secret), c.upper / "w/l")
    os.symlink("../../../../../../../../../../" + str(secret).lstrip("/"), c.upper / "w/rel")
    exchange = _renameat2_exchange()
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        fd = os.open(c.upper / "w", os.O_RDONLY | os.O_DIRECTORY)
        try:
            while not stop.is_set():
                exchange(fd, b"d", b"l")
                exchange(fd, b"d", b"rel")
                swaps[0] += 2
        finally:
            os.close(fd)

    t = threading.Thread(target=swapper)
    t.start()
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 1.5
        rounds = 0
        while time.monotonic() < deadline:
            for ch in commit.diff(c):
                seen.add(ch.path)
            seen.update(ch.path for ch in commit.diff_summary(c, limit=1000).changes)
            rounds += 1
    finally:
        stop.set()
        t.join()
    assert rounds >= 3 and swaps[0] > 100
    assert not [p for p in seen if "SECRET" in p], sorted(seen)[:20]
    assert any("mine-" in p for p in seen)   # the real directory was walked, wherever it was
    # the snapshot's walk (the container is not running: nothing moves) archives the symlinks as symlinks
    rec = commit.snapshot(runtime, c, "snap-swap:1")
    names = {m.name: m for m in layer_members(runtime.store, rec)}
    assert not any("SECRET" in n for n in names)
    links = [m for m in names.values() if m.issym()]
    assert {m.linkname for m in links} >= {str(secret)}


def test_walk_of_a_deep_layer(runtime):
    """Deeper than Python's recursion limit and than the fds the walk may hold: walked all the same."""
    c = runtime.create(ContainerSpec(image="busybox:test", command=("true",)))
    depth = 1500
    fd = os.open(c.upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):   # relative steps: the whole path is longer than PATH_MAX
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("deep")
        fd = -1
    finally:
        if fd >= 0:
            os.close(fd)
    fds_before = len(os.listdir("/proc/self/fd"))
    s = commit.diff_summary(c, limit=3)
    assert s.total == depth + 1 and [ch.path for ch in s.changes] == ["/d", "/d/d", "/d/d/d"]
    assert len(os.listdir("/proc/self/fd")) == fds_before
    # removal of a deep upper is the runtime's business: it must still work
    c.remove(force=True)
    assert not c.dir.exists()


def test_skipped_entries_are_logged_once_per_walk(runtime, caplog):
    """A layer full of sockets (a kernel can make them freely) is not a log line per socket."""
    import logging

    c = runtime.create(ContainerSpec(image="busybox:test", command=("true",)))
    (c.upper / "s").mkdir()
    for i in range(2000):
        os.mknod(c.upper / f"s/sock{i:04}", stat.S_IFSOCK | 0o600)
    (c.upper / "s/.wh.looks-like-a-whiteout").write_text("x")
    (c.upper / "s/kept").write_text("k")
    caplog.set_level(logging.WARNING, logger=snap.__name__)
    assert [ch.path for ch in commit.diff(c)] == ["/s", "/s/kept"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert any(m.startswith("snapshot: skipping 2000 entries (/s/sock0000, /s/sock0001, /s/sock0002, ...)")
               for m in lines), lines
    c.remove(force=True)


def test_same_content_same_diff_id(runtime, edited):
    a = commit.snapshot(runtime, edited, "snap-twice:a")
    b = commit.snapshot(runtime, edited, "snap-twice:b")
    assert a.config.diff_ids[-1] == b.config.diff_ids[-1]
    assert a.manifest.layers[-1] == b.manifest.layers[-1]   # deterministic gzip too
    z = commit.snapshot(runtime, edited, "snap-twice:z", compress="zstd")
    assert z.config.diff_ids[-1] == a.config.diff_ids[-1]
    assert z.manifest.layers[-1].media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    data = layer_bytes(runtime.store, z.manifest.layers[-1])
    assert "sha256:" + hashlib.sha256(data).hexdigest() == z.config.diff_ids[-1]
    assert not [p for p in runtime.store.layers_dir.iterdir() if p.name.startswith(".")]


def test_container_from_snapshot_sees_changes(runtime, edited, tmp_path):
    rec = commit.snapshot(runtime, edited, "snap-run:1", unpack=True)
    layer = runtime.store.layer_dir(rec.config.diff_ids[-1])
    before = layer.stat().st_mtime_ns
    out = tmp_path / "out"
    script = ("cat /var/n /etc/group/x /home /opt/app/f; ls /etc/passwd /usr/share /var/tmp 2>&1; "
              "ls -l /opt/app/suid; test -e /run && echo run-exists; test -e /data && echo data-exists; "
              "cat /etc/hostname")
    with open(out, "wb") as f:
        info = runtime.run(ContainerSpec(image="localhost/snap-run:1", command=("sh", "-c", script), hostname="h2"),
                           stdio=(0, f.fileno(), f.fileno()), remove=True)
    text = out.read_text()
    assert info.code == 0, text
    assert text.startswith("new\ng\nh\ndata\n")
    assert text.count("No such file or directory") == 3
    assert "-rwsr-xr-x" in text and "run-exists" not in text and "data-exists" not in text
    assert text.rstrip().endswith("h2")
    assert layer.stat().st_mtime_ns == before   # started from the layer put in place, not re-extracted


def test_snapshot_of_running_container_is_consistent(runtime):
    # a writer appends to /a then /z, in lockstep; /m, big, sits between them in the tar's order,
    # so an unfrozen copy would give /z many more lines than /a
    script = ("head -c 40000000 /dev/zero > /m; touch /ready; "
              "while :; do echo x >> /a; echo x >> /z; done")
    c = runtime.create(ContainerSpec(image="busybox:test", command=("sh", "-c", script)))
    c.start()
    try:
        deadline = time.monotonic() + 20
        while not (c.upper / "ready").exists() or not (c.upper / "z").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        stages = []
        rec = commit.snapshot(runtime, c, "snap-live:1", progress=lambda s, d, t: stages.append(s))
        assert stages and stages[0] == "archive" and stages[-1] == "commit"
        members = {m.name: m for m in layer_members(runtime.store, rec)}
        a, z = members["a"].size // 2, members["z"].size // 2
        assert a > 0 and a - z in (0, 1), (a, z)
        # thawed: it keeps writing
        size = (c.upper / "a").stat().st_size
        deadline = time.monotonic() + 10
        while (c.upper / "a").stat().st_size == size:
            assert time.monotonic() < deadline, "container still frozen after the snapshot"
            time.sleep(0.05)
        assert c.cgroups() is not None
    finally:
        c.kill()
        c.wait(10)


def test_errors_leave_nothing(runtime, edited, monkeypatch):
    store = runtime.store
    with pytest.raises(errors.InvalidReference):
        commit.snapshot(runtime, edited, "Bad Name!")
    with pytest.raises(errors.InvalidReference):
        commit.snapshot(runtime, edited, "x@sha256:" + "0" * 64)
    with pytest.raises(errors.ContainerNotFound):
        commit.snapshot(runtime, "no-such-container", "x:1")
    with pytest.raises(errors.InvalidSpec):
        commit.snapshot(runtime, edited, "x:1", compress="lzma")   # type: ignore[arg-type]
    blobs = set(os.listdir(store.blobs_dir))
    layers = set(os.listdir(store.layers_dir))
    tmp = set(os.listdir(store.tmp_dir))
    index = (store.root / "index.json").read_bytes()

    real = snap._write_tar

    def failing(root, items, write, **kw):
        real(root, items, write, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snap, "_write_tar", failing)
    with pytest.raises(OSError, match="No space"):
        commit.snapshot(runtime, edited, "snap-fail:1")
    assert set(os.listdir(store.blobs_dir)) == blobs
    assert set(os.listdir(store.layers_dir)) == layers
    assert set(os.listdir(store.tmp_dir)) == tmp
    assert (store.root / "index.json").read_bytes() == index
    with pytest.raises(errors.ImageNotFound):
        store.resolve("snap-fail:1")


def _freezer_state(c) -> str:
    cg = c.cgroups()
    if cg.version == 2:
        return "FROZEN" if "frozen 1" in (cg.paths["unified"] / "cgroup.events").read_text() else "THAWED"
    return (cg.paths["freezer"] / "freezer.state").read_text().strip()


def test_failure_while_frozen_thaws(runtime, monkeypatch):
    c = runtime.create(ContainerSpec(image="busybox:test", command=("sh", "-c", "while :; do echo x >> /a; done")))
    c.start()
    try:
        def boom(*a, **kw):
            assert _freezer_state(c) == "FROZEN"   # we are inside the freeze
            raise OSError(5, "I/O error")

        monkeypatch.setattr(snap, "copy_items", boom)
        with pytest.raises(OSError, match="I/O error"):
            commit.snapshot(runtime, c, "snap-thaw:1", unpack=True)
        assert _freezer_state(c) == "THAWED"
        assert not [p for p in runtime.store.layers_dir.iterdir() if p.name.startswith(".")]
    finally:
        c.kill()
        c.wait(10)


def test_kernel_label_and_unchanged_container(runtime):
    c = runtime.create(ContainerSpec(image="busybox:test", command=("true",),
                                     labels={"jupyter-contain.kernel-id": "k-123"}))
    c.start()
    c.wait(10)
    assert commit.diff(c) == []
    rec = kernel_snapshots.snapshot(runtime, c, "snap-empty:1")   # the kernel room adds the label
    assert rec.config.labels["io.jupyter-contain.kernel-id"] == "k-123"
    assert layer_members(runtime.store, rec) == []
    assert snapshot_view(runtime.store, rec) == merged_view_manifest(runtime.store.layer_dirs(c.image()))


def test_tar_writer_round_trip(tmp_path):
    """tar(unpack(tar(dir))) == tar(dir): the writer is deterministic and unpack_layer reads it back."""
    root = tmp_path / "layer"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"x" * 5000)
    os.link(root / "d" / "f", root / "d" / "g")
    (root / ("n" * 150)).write_text("long")
    os.chown(root / "d" / "f", 70000, 3000000)   # ids past the ustar field: PAX
    os.mknod(root / "d" / "gone", stat.S_IFCHR, os.makedev(0, 0))
    os.setxattr(root / "d" / "sub", "trusted.overlay.opaque", b"y")
    os.symlink("/" + "t" * 200, root / "lnk")
    os.utime(root / "d" / "f", (0, -100))   # before 1970
    chunks: list[bytes] = []
    snap.write_layer_tar(root, chunks.append)
    data = b"".join(chunks)
    unpack_layer(io.BytesIO(data), tmp_path / "back", media_type="application/vnd.oci.image.layer.v1.tar",
                 layer="t")
    again: list[bytes] = []
    snap.write_layer_tar(tmp_path / "back", again.append)
    assert b"".join(again) == data
    assert tree_manifest(tmp_path / "back") == tree_manifest(root)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        m = {x.name: x for x in t}
    assert m["d/f"].uid == 70000 and m["d/f"].gid == 3000000 and m["d/f"].mtime == -100
    assert m["d/g"].islnk() and m["d/.wh.gone"].isfile() and "d/sub/.wh..wh..opq" in m
    assert m["lnk"].linkname == "/" + "t" * 200


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 17])
def test_parallel_gzip_is_gzip_and_deterministic(size):
    data = os.urandom(size // 2) + b"a" * (size - size // 2)
    outs = []
    for workers in (1, 2, 3):
        buf = io.BytesIO()
        g = snap._ParallelGzip(buf.write, workers=workers)
        for i in range(0, len(data), 77777):
            g.write(data[i:i + 77777])
        g.close()
        outs.append(buf.getvalue())
    assert outs[0] == outs[1] == outs[2]
    assert gzip.decompress(outs[0]) == data
    assert outs[0][4:8] == b"\0\0\0\0"   # mtime 0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed")
    return path


@pytest.mark.needs_tools
def test_peers_read_the_snapshot(runtime, edited, tmp_path):
    store = runtime.store
    rec = commit.snapshot(runtime, edited, "snap-peers:1", message="for peers")
    ref = f"oci:{store.root}:{rec.name}"
    res = subprocess.run([_tool("skopeo"), "inspect", ref], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert len(doc["Layers"]) == len(rec.manifest.layers)
    assert doc["Labels"]["io.jupyter-contain.source-container"] == edited.id
    bundle = tmp_path / "bundle"
    res = subprocess.run([_tool("umoci"), "unpack", "--image", f"{store.root}:{rec.name}", str(bundle)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    try:
        got = tree_manifest(bundle / "rootfs")
        want = expected_view(store, edited, STUBS)
        assert {k: v[:6] for k, v in got.items()} == {k: v[:6] for k, v in want.items()}
        assert got["opt/app/suid"][6] == (("security.capability", CAP_NET_BIND),)
    finally:
        shutil.rmtree(bundle)
    # docker-archive written by `save` is read by skopeo
    out = tmp_path / "snap.tar"
    archive.save_docker_archive(store, rec, out)
    res = subprocess.run([_tool("skopeo"), "inspect", f"docker-archive:{out}"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["Layers"]) == len(rec.manifest.layers)


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


def test_cli_diff_and_commit(runtime):
    c = run_in(runtime, "echo hi > /new; rm /etc/passwd; mkdir /tmp/d")
    root = runtime.store.root
    res = _cli(root, "diff", c.name)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["C /etc", "D /etc/passwd", "A /new", "C /tmp", "A /tmp/d"]
    assert "5 changes: 2 added, 2 changed, 1 deleted" in res.stderr
    doc = json.loads(_cli(root, "diff", "--json", c.id[:12]).stdout)
    assert {"kind": "A", "path": "/new", "size": 3} in doc["changes"]
    assert {"folder": "/new", "count": 1, "bytes": 3} in doc["summary"]
    res = _cli(root, "commit", c.name, "cli-snap:1", "-m", "from the cli", "--compress", "zstd")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("localhost/cli-snap:1 sha256:")
    rec = runtime.store.resolve("cli-snap:1")
    assert rec.config.raw["history"][-1]["comment"] == "from the cli"
    res = _cli(root, "commit", c.name, "Bad Tag")
    assert res.returncode == 125 and "invalid" in res.stderr and "Traceback" not in res.stderr
    res = _cli(root, "diff", "nope")
    assert res.returncode == 125 and "no such container" in res.stderr


def test_cli_diff_shows_names_with_terminal_escapes_escaped(runtime):
    # a container names files as it likes: an escape sequence or a newline must not reach the terminal raw
    c = run_in(runtime, "touch \"$(printf '/x\\033]0;pwned\\007')\" \"$(printf '/y\\nD forged')\"")
    res = _cli(runtime.store.root, "diff", c.name)
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout + res.stderr and "\x07" not in res.stdout
    assert res.stdout.splitlines() == ["A /x\\x1b]0;pwned\\x07", "A /y\\nD forged"]


RUN_PEER = Path("/work/shared/tools/run-peer")
PODMAN_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "none"
"""


@pytest.mark.needs_tools
@pytest.mark.slow
def test_podman_loads_and_runs_the_snapshot(runtime, edited, tmp_path):
    _tool("podman")
    if not RUN_PEER.exists():
        pytest.skip("run-peer is not available")
    rec = commit.snapshot(runtime, edited, "snap-podman:1")
    out = tmp_path / "snap.oci.tar"
    archive.save_oci_archive(runtime.store, rec, out)
    (tmp_path / "containers.conf").write_text(PODMAN_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(tmp_path / "containers.conf")}
    runroot = Path(tempfile.mkdtemp(prefix="jcpr-"))   # podman wants a runroot path under 50 characters
    podman = [str(RUN_PEER), "podman", "--root", str(tmp_path / "proot"), "--runroot", str(runroot),
              "--storage-driver", "overlay"]
    try:
        res = subprocess.run(podman + ["load", "-q", "-i", str(out)], capture_output=True, text=True, env=env,
                             timeout=120, check=False)
        assert res.returncode == 0, res.stderr
        image = res.stdout.strip().split()[-1]
        res = subprocess.run(podman + ["run", "--rm", image, "sh", "-c",
                                       ("cat /var/n /etc/group/x /opt/app/f; ls /etc/passwd /var/tmp 2>&1; "
                                        "ls -ld /sbin; test -e /.jupyter-contain || echo no-guest")],
                             capture_output=True, text=True, env=env, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("new\ng\ndata\n"), res.stdout
        assert res.stdout.count("No such file or directory") == 2 and "drwx------" in res.stdout
        assert "no-guest" in res.stdout   # (podman makes /run itself)
    finally:
        subprocess.run(podman + ["system", "reset", "-f"], capture_output=True, env=env, timeout=120, check=False)
        shutil.rmtree(runroot, ignore_errors=True)


def test_snapshot_layer_unpacks_on_first_use(runtime, edited, tmp_path):
    rec = commit.snapshot(runtime, edited, "snap-lazy:1")
    diff_id = rec.config.diff_ids[-1]
    base_ids = rec.config.diff_ids[:-1]
    assert all(runtime.store.unpacked(d) for d in base_ids)   # the base is never extracted again
    assert not runtime.store.unpacked(diff_id)                   # the new layer waits for its first user
    out = tmp_path / "out"
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        info = runtime.run(ContainerSpec(image=rec.name, command=("cat", "/var/n")),
                           stdio=(null.fileno(), f.fileno(), f.fileno()), remove=True)
    assert info.code == 0 and out.read_text() == "new\n"
    assert runtime.store.unpacked(diff_id)
