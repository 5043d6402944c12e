"""Tests of jupyter_contain.runtime.images.layers: layer tar -> overlay lowerdir."""

from __future__ import annotations

import base64
import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from layer_helpers import (
    MEDIA,
    MTIME,
    compress,
    dev,
    dir_,
    fifo,
    hard,
    make_tar,
    opq,
    reg,
    sha256,
    sym,
    wh,
    write_oci_layout,
)

from jupyter_contain import errors
from jupyter_contain.runtime.fsutil import remove_tree
from jupyter_contain.runtime.images import layers as L

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service=ep, not UTF-8


def unpack(tmp_path: Path, entries, name: str = "l", *, kind: str = "tar", lowers=(), parent: str = "layers",
           **kw) -> tuple[L.UnpackResult, Path]:
    data = entries if isinstance(entries, bytes) else make_tar(entries)
    dest = tmp_path / parent / name
    res = L.unpack_layer(io.BytesIO(compress(data, kind)), dest, media_type=MEDIA[kind], layer=name,
                         lower_dirs=lowers, **kw)
    return res, dest


def stack(tmp_path: Path, *layers_bottom_first) -> list[Path]:
    """Unpack layers in order; returns their dirs topmost first."""
    dirs: list[Path] = []
    for i, entries in enumerate(layers_bottom_first):
        _, d = unpack(tmp_path, entries, f"L{i}", lowers=dirs)
        dirs.insert(0, d)
    return dirs


def content(manifest: dict, path: str) -> str:
    return manifest[path][5]


def digest_of(data: bytes) -> str:
    return sha256(data).split(":")[1]


def is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(p: Path) -> bool:
    try:
        return os.getxattr(p, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


# --- formats, digests, atomicity --------------------------------------------

BASIC = [dir_("etc"), reg("etc/hostname", b"box\n"), sym("bin", "usr/bin"), dir_("usr"),
         dir_("usr/bin"), reg("usr/bin/tool", b"#!/bin/sh\n", mode=0o755), hard("usr/bin/tool2", "usr/bin/tool"),
         fifo("run.fifo")]


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
def test_roundtrip_each_compression(tmp_path, kind):
    data = make_tar(BASIC)
    res, dest = unpack(tmp_path, data, kind=kind, expected_diff_id=sha256(data))
    assert res == L.UnpackResult(diff_id=sha256(data), size=len(data), files=len(BASIC))
    m = L.tree_manifest(dest)
    assert sorted(m) == ["bin", "etc", "etc/hostname", "run.fifo", "usr", "usr/bin", "usr/bin/tool", "usr/bin/tool2"]
    assert m["etc/hostname"][0] == "file" and content(m, "etc/hostname") == digest_of(b"box\n")
    assert m["bin"][0] == "symlink" and os.readlink(dest / "bin") == "usr/bin"
    assert m["run.fifo"][:2] == ("fifo", 0o640)
    assert os.stat(dest / "usr/bin/tool").st_ino == os.stat(dest / "usr/bin/tool2").st_ino
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o755
    assert os.listdir(tmp_path / "layers") == ["l"]  # the temp dir was renamed, nothing else


def test_docker_media_type_and_multi_member_gzip(tmp_path):
    data = make_tar(BASIC)
    blob = gzip.compress(data[:3000]) + gzip.compress(data[3000:])
    dest = tmp_path / "d"
    res = L.unpack_layer(io.BytesIO(blob), dest, media_type="application/vnd.docker.image.rootfs.diff.tar.gzip",
                         layer="docker", expected_diff_id=sha256(data))
    assert res.diff_id == sha256(data)
    assert (dest / "etc/hostname").read_bytes() == b"box\n"


def test_diff_id_covers_trailing_padding(tmp_path):
    data = make_tar([reg("a", b"x")]) + b"\0" * 4096
    res, _ = unpack(tmp_path, data, kind="gzip")
    assert res.diff_id == sha256(data) and res.size == len(data)


def test_diff_id_mismatch_leaves_nothing(tmp_path):
    data = make_tar(BASIC)
    with pytest.raises(errors.DigestMismatch) as ei:
        unpack(tmp_path, data, kind="gzip", expected_diff_id=sha256(b"other"))
    assert ei.value.actual == sha256(data)
    assert os.listdir(tmp_path / "layers") == []


@pytest.mark.parametrize("media,kind", [
    ("gzip", "tar"), ("gzip", "zstd"), ("zstd", "gzip"), ("zstd", "tar"), ("tar", "gzip"), ("tar", "zstd"),
])
def test_media_type_vs_magic_mismatch(tmp_path, media, kind):
    blob = compress(make_tar(BASIC), kind)
    (tmp_path / "p").mkdir()
    with pytest.raises(errors.ManifestError, match="media type"):
        L.unpack_layer(io.BytesIO(blob), tmp_path / "p" / "x", media_type=MEDIA[media], layer="mm")
    assert os.listdir(tmp_path / "p") == []


def test_unknown_media_type(tmp_path):
    with pytest.raises(errors.ManifestError, match="unsupported layer media type"):
        L.unpack_layer(io.BytesIO(b""), tmp_path / "x", media_type="application/x-rar", layer="u")


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
@pytest.mark.parametrize("damage", ["truncate", "flip", "trailing"])
def test_corrupt_compressed_stream(tmp_path, kind, damage):
    data = make_tar([reg("a", os.urandom(50000))])
    blob = compress(data, kind)
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob = blob[:5000] + bytes(b ^ 0xFF for b in blob[5000:5100]) + blob[5100:]
    else:
        blob += b"trailing garbage"
    (tmp_path / "p").mkdir()
    # zstd frames carry no checksum by default: a flipped byte may only show in the DiffID
    with pytest.raises((errors.UnsafeLayer, errors.DigestMismatch)):
        L.unpack_layer(io.BytesIO(blob), tmp_path / "p" / "x", media_type=MEDIA[kind], layer="bad",
                       expected_diff_id=sha256(data))
    assert os.listdir(tmp_path / "p") == []


def test_dest_exists(tmp_path):
    (tmp_path / "layers" / "l").mkdir(parents=True)
    with pytest.raises(errors.StoreError, match="already exists"):
        unpack(tmp_path, BASIC)
    assert os.listdir(tmp_path / "layers") == ["l"]


def test_size_limit(tmp_path):
    with pytest.raises(errors.LayerTooLarge):
        unpack(tmp_path, [reg("big", b"x" * 100_000)], kind="zstd", max_size=50_000)
    assert os.listdir(tmp_path / "layers") == []


def test_root_entry_sets_layer_root_metadata(tmp_path):
    _, dest = unpack(tmp_path, [dir_(".", mode=0o750, uid=7, gid=8), reg("./a", b"1")])
    st = os.stat(dest)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o750, 7, 8, MTIME)
    assert (dest / "a").read_bytes() == b"1"


# --- metadata ----------------------------------------------------------------

def test_modes_owners_special_bits(tmp_path):
    _, dest = unpack(tmp_path, [
        dir_("tmp", mode=0o1777), dir_("shared", mode=0o2775, gid=50),
        reg("suid", b"x", mode=0o4755, uid=1000, gid=1000), reg("sgid", b"x", mode=0o2711, uid=0, gid=42),
        reg("secret", b"x", mode=0o600, uid=1234, gid=5678), sym("link", "suid", uid=33, gid=44),
        fifo("pipe", mode=0o620, uid=9, gid=10),
    ])
    def ms(p):
        st = os.lstat(dest / p)
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    assert ms("tmp") == (0o1777, 0, 0)
    assert ms("shared") == (0o2775, 0, 50)
    assert ms("suid") == (0o4755, 1000, 1000)  # chmod after chown kept the setuid bit
    assert ms("sgid") == (0o2711, 0, 42)
    assert ms("secret") == (0o600, 1234, 5678)
    assert ms("link")[1:] == (33, 44)
    assert ms("pipe") == (0o620, 9, 10)


def test_mtimes(tmp_path):
    _, dest = unpack(tmp_path, [
        dir_("d", mtime=1_000_000_000), reg("d/f", b"x", mtime=1_100_000_000),
        dir_("d/sub", mtime=1_200_000_000), reg("d/sub/g", b"y", mtime=1_300_000_000),
        sym("d/s", "f", mtime=1_400_000_000),
        reg("precise", b"z", pax={"mtime": "1500000000.123456789"}),
    ])
    assert os.stat(dest / "d").st_mtime_ns == 1_000_000_000 * 10**9  # set after its children
    assert os.stat(dest / "d/sub").st_mtime_ns == 1_200_000_000 * 10**9
    assert os.stat(dest / "d/f").st_mtime_ns == 1_100_000_000 * 10**9
    assert os.lstat(dest / "d/s").st_mtime_ns == 1_400_000_000 * 10**9
    assert os.stat(dest / "precise").st_mtime_ns == 1_500_000_000_123_456_789


def test_xattrs_preserved(tmp_path):
    lib = base64.b64encode(b"\x00\xffraw").decode().rstrip("=")
    _, dest = unpack(tmp_path, [
        reg("ping", b"ELF", mode=0o755, uid=0, gid=0, xattrs={"security.capability": CAP, "user.note": "é".encode()}),
        reg("other", b"o", uid=100, xattrs={"security.capability": CAP}),  # chown before setxattr keeps it
        reg("la", b"", pax={"LIBARCHIVE.xattr.user.b%3Dx": lib}),
        dir_("d", xattrs={"user.dir": b"1"}),
        sym("s", "ping", xattrs={"user.dropped": b"1"}),
        reg("sel", b"", xattrs={"security.selinux": b"system_u:object_r:bin_t:s0"}),
    ])
    assert os.getxattr(dest / "ping", "security.capability") == CAP
    assert os.getxattr(dest / "ping", "user.note") == "é".encode()
    assert os.getxattr(dest / "other", "security.capability") == CAP
    assert os.getxattr(dest / "la", "user.b=x") == b"\x00\xffraw"
    assert os.getxattr(dest / "d", "user.dir") == b"1"
    assert L.tree_manifest(dest)["ping"][6] == (("security.capability", CAP), ("user.note", "é".encode()))
    assert os.listxattr(dest / "s", follow_symlinks=False) == []
    assert "security.selinux" not in os.listxattr(dest / "sel")


def test_hardlinks(tmp_path):
    lower = stack(tmp_path, [dir_("usr"), dir_("usr/lib"), sym("lib", "usr/lib")])
    _, dest = unpack(tmp_path, [
        reg("usr/lib/a", b"data", mode=0o4755, uid=5), hard("lib/b", "lib/a"), hard("c", "usr/lib/a"),
        hard("/d", "/usr/lib/a"), sym("s", "nowhere"), hard("s2", "s"),
    ], lowers=lower)
    ino = os.stat(dest / "usr/lib/a").st_ino
    assert {os.stat(dest / p).st_ino for p in ("usr/lib/b", "c", "d")} == {ino}
    assert os.stat(dest / "c").st_nlink == 4 and stat.S_IMODE(os.stat(dest / "c").st_mode) == 0o4755
    assert os.readlink(dest / "s2") == "nowhere"


def test_replacement_within_layer(tmp_path):
    _, dest = unpack(tmp_path, [
        dir_("x"), reg("x/child", b"1"), reg("x", b"now a file"),   # dir -> file
        reg("y", b"file"), dir_("y"), reg("y/c", b"2"),              # file -> dir
        reg("z", b"first"), reg("z", b"second"),                     # duplicate: last wins
        sym("w", "x"), dir_("w"),                                     # symlink -> dir
    ])
    m = L.tree_manifest(dest)
    assert (dest / "x").read_bytes() == b"now a file" and "x/child" not in m
    assert (dest / "y/c").read_bytes() == b"2"
    assert (dest / "z").read_bytes() == b"second"
    assert m["w"][0] == "dir"


# --- whiteouts and the merged view ---------------------------------------------

def test_whiteout_file_and_implicit_parent_metadata(tmp_path):
    dirs = stack(tmp_path,
                 [dir_("a", mode=0o750, uid=3, gid=4, mtime=1_234_567_890), reg("a/x", b"x"), reg("a/y", b"y")],
                 [wh("a/x")])
    top = dirs[0]
    assert is_whiteout(top / "a/x")
    st = os.stat(top / "a")  # created implicitly: must look like the lower one
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o750, 3, 4, 1_234_567_890)
    merged = L.merged_view_manifest(dirs)
    assert sorted(merged) == ["a", "a/y"]
    assert merged["a"][:4] == ("dir", 0o750, 3, 4)


def test_whiteout_directory(tmp_path):
    dirs = stack(tmp_path, [dir_("d"), dir_("d/e"), reg("d/e/f", b"f"), reg("keep", b"k")], [wh("d")])
    assert sorted(L.merged_view_manifest(dirs)) == ["keep"]


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_directory(tmp_path, marker_first):
    upper = [opq("o"), reg("o/3", b"3")] if marker_first else [dir_("o"), reg("o/3", b"3"), opq("o")]
    dirs = stack(tmp_path, [dir_("o"), reg("o/1", b"1"), dir_("o/sub"), reg("o/sub/2", b"2")], upper)
    assert is_opaque(dirs[0] / "o")
    assert sorted(L.merged_view_manifest(dirs)) == ["o", "o/3"]


def test_file_dir_replacement_across_layers(tmp_path):
    dirs = stack(tmp_path,
                 [reg("p", b"file"), dir_("q"), reg("q/child", b"c")],
                 [dir_("p"), reg("p/c", b"in dir"), reg("q", b"now a file")])
    merged = L.merged_view_manifest(dirs)
    assert sorted(merged) == ["p", "p/c", "q"]
    assert merged["q"][0] == "file" and content(merged, "q") == digest_of(b"now a file")


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_same_layer_whiteout_never_hides_own_file(tmp_path, whiteout_first):
    upper = [wh("s"), reg("s", b"new")] if whiteout_first else [reg("s", b"new"), wh("s")]
    dirs = stack(tmp_path, [reg("s", b"old")], upper)
    assert (dirs[0] / "s").read_bytes() == b"new"
    assert content(L.merged_view_manifest(dirs), "s") == digest_of(b"new")


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_same_layer_whiteout_of_directory(tmp_path, whiteout_first):
    upper = ([wh("t"), dir_("t"), reg("t/new", b"n")] if whiteout_first
             else [dir_("t"), reg("t/new", b"n"), wh("t")])
    dirs = stack(tmp_path, [dir_("t"), reg("t/old", b"o")], upper)
    # the lower t is deleted, the layer's own t stays, so it must not merge with the old one
    assert is_opaque(dirs[0] / "t")
    assert sorted(L.merged_view_manifest(dirs)) == ["t", "t/new"]


def test_whiteout_then_child_without_dir_entry(tmp_path):
    dirs = stack(tmp_path, [dir_("d"), reg("d/old", b"o")], [wh("d"), reg("d/n", b"n")])
    assert sorted(L.merged_view_manifest(dirs)) == ["d", "d/n"]


def test_opaque_layer_root(tmp_path):
    # overlayfs ignores the opaque xattr on a lowerdir's root: whiteouts stand in for it
    dirs = stack(tmp_path, [reg("a", b"a"), dir_("b"), reg("b/x", b"x")],
                 [dir_("b"), reg("b/y", b"y"), opq(""), reg("c", b"c")])
    assert sorted(L.merged_view_manifest(dirs)) == ["b", "b/y", "c"]
    assert is_whiteout(dirs[0] / "a") and is_opaque(dirs[0] / "b")


# --- resolution through lower layers ---------------------------------------------

def test_lower_symlink_parent(tmp_path):
    lower = stack(tmp_path, [dir_("usr"), dir_("usr/lib", mode=0o751, uid=2), sym("lib", "usr/lib"),
                             sym("abs", "/usr/lib"), dir_("x"), sym("x/rel", "../usr/lib")])
    _, dest = unpack(tmp_path, [reg("lib/foo", b"1"), reg("abs/bar", b"2"), reg("x/rel/baz", b"3")], lowers=lower)
    assert sorted(L.tree_manifest(dest)) == ["usr", "usr/lib", "usr/lib/bar", "usr/lib/baz", "usr/lib/foo", "x"]
    st = os.stat(dest / "usr/lib")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o751, 2)
    merged = L.merged_view_manifest([dest, *lower])
    assert merged["lib"][0] == "symlink" and "usr/lib/foo" in merged


def test_this_layer_symlink_parent_chroot_style(tmp_path):
    _, dest = unpack(tmp_path, [sym("root", "/"), sym("up", "etc/.."), dir_("etc"),
                                reg("root/etc/a", b"a"), reg("up/b", b"b")])
    assert (dest / "etc/a").read_bytes() == b"a"
    assert (dest / "b").read_bytes() == b"b"


def test_lower_whiteout_and_opaque_respected_in_resolution(tmp_path):
    dirs = stack(tmp_path,
                 [dir_("usr"), dir_("usr/lib"), sym("lib", "usr/lib"), dir_("o"), sym("o/lnk", "../usr/lib")],
                 [wh("lib"), opq("o")])
    _, dest = unpack(tmp_path, [reg("lib/foo", b"1"), reg("o/lnk/bar", b"2")], lowers=dirs)
    m = L.tree_manifest(dest)
    assert m["lib"][0] == "dir" and "lib/foo" in m
    assert m["o/lnk"][0] == "dir" and "o/lnk/bar" in m
    assert "usr" not in m


# --- hostile input -----------------------------------------------------------------

def nul_path() -> list:
    e = reg("placeholder", b"")
    e.info.pax_headers = {"path": "a\x00b"}
    return [e]


def garbage_header() -> bytes:
    data = make_tar([reg("a", b"x"), reg("b", b"y")])
    # overwrite the second header (after a's header + one data block) with junk
    return data[:1024] + b"\x7fjunk" * 128 + data[1536:]


HOSTILE = {
    "dotdot": ([reg("../evil", b"x")], "../evil"),
    "dotdot-deep": ([dir_("a"), reg("a/../../evil", b"x")], "a/../../evil"),
    "dotdot-inside": ([dir_("a"), reg("a/../b", b"x")], "a/../b"),
    "dotdot-dir": ([dir_("..")], ".."),
    "symlink-climbs": ([sym("up", "../.."), reg("up/x", b"x")], "up/x"),
    "symlink-dotdot-root": ([sym("up", ".."), reg("up/etc/passwd", b"x")], "up/etc/passwd"),
    "symlink-loop": ([sym("a", "b"), sym("b", "a"), reg("a/x", b"x")], "a/x"),
    "parent-is-file": ([reg("f", b"x"), reg("f/x", b"x")], "f/x"),
    "hardlink-missing": ([hard("h", "nothere")], "h"),
    "hardlink-dotdot": ([hard("h", "../etc/passwd")], "h"),
    "hardlink-absolute-host": ([hard("h", "/etc/passwd")], "h"),
    "hardlink-through-symlink": ([sym("s", "../.."), hard("h", "s/etc/passwd")], "h"),
    "hardlink-to-dir": ([dir_("d"), hard("h", "d")], "h"),
    "hardlink-to-self": ([reg("h", b"x"), hard("h", "h")], "h"),
    "char-device": ([dev("dev/null")], "dev/null"),
    "block-device": ([dev("sda", block=True, major=8, minor=0)], "sda"),
    "whiteout-device": ([dev("fake-wh", major=0, minor=0)], "fake-wh"),
    "overlay-xattr": ([dir_("d", xattrs={"trusted.overlay.opaque": b"y"})], "d"),
    "overlay-xattr-redirect": ([reg("f", b"", xattrs={"trusted.overlay.redirect": b"/etc"})], "f"),
    "overlay-user-xattr": ([reg("f", b"", xattrs={"user.overlay.opaque": b"y"})], "f"),
    "odd-xattr-namespace": ([reg("f", b"", xattrs={"system.weird": b"1"})], "f"),
    "empty-name": ([reg("", b"x")], ""),
    "nul-name": (nul_path(), "a\x00b"),
    "empty-symlink": ([sym("s", "")], "s"),
    "whiteout-dotdot": ([reg(".wh...", b"")], ".wh..."),
    "whiteout-as-dir": ([reg("a/.wh.b/c", b"")], "a/.wh.b/c"),
    "unknown-type": ([dir_("v")], "v"),  # type patched below
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_entries_refused(tmp_path, case):
    entries, path = HOSTILE[case]
    if case == "unknown-type":
        entries[0].info.type = b"Z"
    (tmp_path / "p").mkdir()
    with pytest.raises(errors.UnsafeLayer) as ei:
        L.unpack_layer(io.BytesIO(make_tar(entries)), tmp_path / "p" / "x", media_type=MEDIA["tar"], layer="evil")
    assert ei.value.path == path and repr(path) in str(ei.value) and "evil" in str(ei.value)
    assert os.listdir(tmp_path / "p") == []


def test_absolute_paths_are_made_relative(tmp_path):
    _, dest = unpack(tmp_path, [dir_("/etc"), reg("/etc/passwd", b"root"), reg("./rel", b"r"), reg("//x//y/./z", b"z")])
    assert (dest / "etc/passwd").read_bytes() == b"root"
    assert (dest / "rel").read_bytes() == b"r" and (dest / "x/y/z").read_bytes() == b"z"


@pytest.mark.parametrize("case", ["climb", "hardlink-to-lower"])
def test_hostile_through_lower_layers(tmp_path, case):
    lower = stack(tmp_path, [sym("esc", "../../.."), reg("lowerfile", b"l")])
    (tmp_path / "p").mkdir()
    entries, path = ([reg("esc/x", b"x")], "esc/x") if case == "climb" else ([hard("h", "lowerfile")], "h")
    with pytest.raises(errors.UnsafeLayer) as ei:
        L.unpack_layer(io.BytesIO(make_tar(entries)), tmp_path / "p" / "x", media_type=MEDIA["tar"],
                       layer="evil", lower_dirs=lower)
    assert ei.value.path == path
    assert os.listdir(tmp_path / "p") == []


def test_garbage_header_is_not_a_silent_end(tmp_path):
    (tmp_path / "p").mkdir()
    with pytest.raises(errors.UnsafeLayer, match="invalid tar header"):
        L.unpack_layer(io.BytesIO(garbage_header()), tmp_path / "p" / "x", media_type=MEDIA["tar"], layer="g")
    assert os.listdir(tmp_path / "p") == []


def test_not_a_tar(tmp_path):
    (tmp_path / "p").mkdir()
    with pytest.raises(errors.UnsafeLayer):
        L.unpack_layer(io.BytesIO(b"hello, not a tar" * 100), tmp_path / "p" / "x", media_type=MEDIA["tar"], layer="n")
    assert os.listdir(tmp_path / "p") == []


# --- against real overlayfs and umoci ---------------------------------------------

STACK = [
    [dir_("usr"), dir_("usr/lib"), reg("usr/lib/a", b"a", mode=0o4755, xattrs={"security.capability": CAP}),
     hard("usr/lib/b", "usr/lib/a"), sym("lib", "usr/lib"), dir_("usr/share"), dir_("usr/share/doc"),
     reg("usr/share/doc/x", b"x"), dir_("bin"), reg("bin/sh", b"sh", mode=0o755), dir_("tmp", mode=0o1777),
     dir_("opt"), dir_("opt/keep"), reg("opt/keep/a", b"1"), dir_("opt/keep/sub"), reg("opt/keep/sub/b", b"2"),
     dir_("opt/gone"), reg("opt/gone/c", b"3"), dir_("var"), reg("var/f", b"f"),
     dir_("home", mode=0o755), dir_("home/u", mode=0o700, uid=1000, gid=1000), reg("home/u/.rc", b"rc", uid=1000),
     dir_("etc"), reg("etc/x", b"x"), dir_("etc/y"), reg("etc/y/old", b"old"), fifo("pipe"),
     dir_("data", xattrs={"user.k": b"v"})],
    [wh("opt/gone"), opq("opt/keep"), reg("opt/keep/new", b"new"), reg("lib/libnew.so", b"so"),
     dir_("var/f"), reg("var/f/child", b"c"), sym("bin/sh", "dash"), reg("usr/share/doc", b"now a file"),
     reg("tmp/newfile", b"t")],
    [reg("etc/x", b"x2"), wh("etc/x"), wh("etc/y"), dir_("etc/y"), reg("etc/y/new", b"new"),
     wh("lib"), dir_("lib"), reg("lib/own", b"own"), wh("pipe")],
]


def test_merged_view_matches_real_overlay_mount(tmp_path):
    dirs = stack(tmp_path, *STACK)
    expected = L.merged_view_manifest(dirs)
    assert "opt/gone" not in expected and "opt/keep/a" not in expected and "opt/keep/new" in expected
    assert content(expected, "etc/x") == digest_of(b"x2") and "etc/y/old" not in expected
    assert expected["tmp"][1] == 0o1777 and expected["lib"][0] == "dir" and "pipe" not in expected
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(map(str, dirs)), str(mnt)],
                   check=True)
    try:
        seen = L.tree_manifest(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert seen == expected


def test_root_opaque_matches_real_overlay_mount(tmp_path):
    dirs = stack(tmp_path, [reg("a", b"a"), dir_("b"), reg("b/x", b"x")], [reg("z", b"z")],
                 [opq(""), dir_("b"), reg("b/y", b"y")])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(map(str, dirs)), str(mnt)],
                   check=True)
    try:
        seen = L.tree_manifest(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert seen == L.merged_view_manifest(dirs)
    assert sorted(seen) == ["b", "b/y"]


@pytest.mark.needs_tools
@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed")
def test_merged_view_matches_umoci_unpack(tmp_path):
    tars = [make_tar(entries) for entries in STACK]
    write_oci_layout(tmp_path / "oci", "t", tars)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{tmp_path / 'oci'}:t", str(bundle)], check=True,
                   capture_output=True)
    dirs = stack(tmp_path, *STACK)
    assert L.merged_view_manifest(dirs) == L.tree_manifest(bundle / "rootfs")


def test_huge_extended_header_refused(tmp_path):
    e = reg("f", b"")
    e.info.pax_headers = {"user.filler": "x" * (2 << 20)}
    (tmp_path / "p").mkdir()
    with pytest.raises(errors.UnsafeLayer, match="extended tar header"):
        L.unpack_layer(io.BytesIO(make_tar([e])), tmp_path / "p" / "x", media_type=MEDIA["tar"], layer="h")
    assert os.listdir(tmp_path / "p") == []


def test_non_utf8_names_kept_as_bytes(tmp_path):
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    data = make_tar([reg(name, b"x"), sym("l", name)], fmt=tarfile.GNU_FORMAT)
    _, dest = unpack(tmp_path, data)
    assert sorted(os.listdir(os.fsencode(dest))) == [b"caf\xe9", b"l"]
    assert os.readlink(os.fsencode(dest / "l")) == b"caf\xe9"


@pytest.mark.needs_tools
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_files_stay_sparse(tmp_path, fmt):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB of holes
        f.seek(5_000_000)
        f.write(b"hello")
        f.seek((1 << 30) - 4)
        f.write(b"tail")
    tar = subprocess.run(["tar", "--sparse", f"--format={fmt}", "-C", str(src), "-cf", "-", "sparse"],
                         check=True, capture_output=True).stdout
    assert len(tar) < 1 << 20
    _, dest = unpack(tmp_path, tar)
    st = os.stat(dest / "sparse")
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < 1 << 20
    with open(dest / "sparse", "rb") as f:
        f.seek(4_999_999)
        assert f.read(7) == b"\0hello\0"
        f.seek((1 << 30) - 4)
        assert f.read() == b"tail"


def test_deep_implicit_path_through_lowers(tmp_path):
    lower = stack(tmp_path, [dir_("a"), reg("a/f", b"")])
    deep = "a/" + "/".join(["d"] * 1500) + "/leaf"  # deeper than Python's recursion limit
    _, dest = unpack(tmp_path, [reg(deep, b"x")], lowers=lower)
    try:
        assert (dest / deep).read_bytes() == b"x"
    finally:
        # pytest's own tmp_path cleanup recurses and would fail on this depth
        remove_tree(dest)
        assert not dest.exists()


def test_replacing_a_directory_forgets_its_tree(tmp_path):
    # after d is replaced by a file, d/x must not be resolvable as a directory of ours
    with pytest.raises(errors.UnsafeLayer, match="not a directory"):
        unpack(tmp_path, [dir_("d"), dir_("d/x"), reg("d", b"file"), reg("d/x/y", b"y")])
    _, dest = unpack(tmp_path, [dir_("d"), dir_("d/x"), reg("d/x/f", b"1"), reg("d", b"f"), dir_("d"),
                                reg("d/x/g", b"2")], "ok")
    assert sorted(L.tree_manifest(dest)) == ["d", "d/x", "d/x/g"]


def test_source_read_error_comes_back_unchanged(tmp_path):
    data = compress(make_tar([reg("a", os.urandom(200_000))]), "gzip")

    class Flaky(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 20_000:
                raise ConnectionResetError("peer went away")
            return super().read(min(n, 4096) if n and n > 0 else 4096)

    (tmp_path / "p").mkdir()
    with pytest.raises(ConnectionResetError):
        L.unpack_layer(Flaky(data), tmp_path / "p" / "x", media_type=MEDIA["gzip"], layer="net")
    assert os.listdir(tmp_path / "p") == []


def _inflate_threads() -> list:
    import threading
    return [t for t in threading.enumerate() if t.name == "unpack-inflate"]


def test_early_refusal_stops_the_inflate_thread(tmp_path):
    # the refusal comes while the inflate thread is still megabytes ahead of the extractor
    entries = [reg("../evil", b"x")] + [reg(f"f{i}", os.urandom(300_000)) for i in range(40)]
    (tmp_path / "p").mkdir()
    with pytest.raises(errors.UnsafeLayer):
        L.unpack_layer(io.BytesIO(compress(make_tar(entries), "gzip")), tmp_path / "p" / "x",
                       media_type=MEDIA["gzip"], layer="evil")
    assert _inflate_threads() == []
    assert os.listdir(tmp_path / "p") == []


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
def test_contents_across_chunk_boundaries(tmp_path, kind):
    # files larger than a chunk, and many small ones straddling chunk edges
    big = os.urandom(3 * L._CHUNK + 12345)
    smalls = [os.urandom(n) for n in (1, 511, 512, 513, 70_000)] * 40
    entries = [reg("big", big)] + [reg(f"s{i}", d) for i, d in enumerate(smalls)] + [reg("big2", big[::-1])]
    data = make_tar(entries)
    res, dest = unpack(tmp_path, data, kind=kind, expected_diff_id=sha256(data))
    assert res.size == len(data) and res.files == len(entries)
    assert (dest / "big").read_bytes() == big and (dest / "big2").read_bytes() == big[::-1]
    assert all((dest / f"s{i}").read_bytes() == d for i, d in enumerate(smalls))
    assert _inflate_threads() == []
