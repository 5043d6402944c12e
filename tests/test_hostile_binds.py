"""Hostile binds: what a container does to the host folders mounted into it (issue #23, item 1).

A static C probe (``HOSTILE_C``) runs inside real containers, on a real host
folder bound in the way a kernel's notebook folder is (idmapped) or as a
``-v`` bind, and tries every way we know to leave a host privilege behind:
setuid/setgid bits through the chmod family, ``open``/``openat``/``creat``/
``openat2``/``O_TMPFILE`` with those bits, ``mknod`` (setuid files, device
nodes), the i386 entry points, ``cp -p`` of a setuid binary, chown to host
root and to 1000, ``security.capability`` (v2, v3 naming host root), a
setgid directory, io_uring; and a chown of / a write to a setuid file the
host put there. Then the host looks at the folder with ``os.lstat`` and
``os.getxattr`` and runs every file as ``nobody`` (``runuser``): nothing may
be setuid/setgid, a device, carry a file capability, or be owned by anyone
but the folder's owner, and no file may run with euid 0. The user's own
files keep working (read, append, create; host owner = the folder's).

Root server with a user namespace (``userns=auto``), root server with the
host's ids (``userns=host``), a plain ``-v`` bind, rootless users (a lone
uid; one with subordinate ids), and a real contained kernel running the
issue's own cell.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_fixtures import *
from kernel_fixtures import KERNEL_NAME, run_cell
from test_rootless import SUBID_USER, lone_user, subid_user  # noqa: F401 (fixtures)

from jupyter_contain.runtime.containers import rootfs
from jupyter_contain.runtime.containers.container import (
    ContainerSpec,
    Runtime,
    parse_bind,
)
from jupyter_contain.runtime.fsutil import remove_tree

EPERM, ENOSYS, EINVAL, EOVERFLOW, EOPNOTSUPP = errno.EPERM, errno.ENOSYS, errno.EINVAL, errno.EOVERFLOW, errno.EOPNOTSUPP
X86_64 = os.uname().machine == "x86_64"
BASE = 5_200_000          # this module's subordinate range (temporary subuid/subgid files)
OTHER_UID = 4343          # another host user, whose file sits in the folder
NOBODY = 65534

HOSTILE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

static void report(const char *name, long rc) { printf("%s=%d\n", name, rc < 0 ? errno : 0); }

/* each file an attack makes holds this very program, so that the host can try to run it */
static void fill(int fd) {
    char buf[65536];
    ssize_t n;
    int in = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    while (in >= 0 && (n = read(in, buf, sizeof buf)) > 0)
        if (write(fd, buf, (size_t)n) != n) break;
    if (in >= 0) close(in);
}

static void make(const char *name) {
    int fd = open(name, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0755);
    if (fd >= 0) { fill(fd); close(fd); }
}

static void created(const char *name, int fd) {
    report(name, fd);
    if (fd >= 0) { fill(fd); close(fd); }
}

#if defined(__x86_64__)
static long int80(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    if (ret < 0 && ret > -4096) { errno = -ret; return -1; }
    return ret;
}
#endif

struct jc_open_how { uint64_t flags, mode, resolve; };

int main(int argc, char **argv) {
    int fd;
    if (argc == 2 && strcmp(argv[1], "euid") == 0) {
        printf("euid=%d egid=%d\n", (int)geteuid(), (int)getegid());
        return 0;
    }
    if (argc < 2 || chdir(argv[1]) < 0) return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);

    make("chmod");        report("chmod", chmod("chmod", 04755));
    make("chmod_sgid");   report("chmod_sgid", chmod("chmod_sgid", 02755));
    make("fchmod");
    fd = open("fchmod", O_WRONLY | O_CLOEXEC);
    report("fchmod", fchmod(fd, 04755)); close(fd);
    make("fchmodat");     report("fchmodat", fchmodat(AT_FDCWD, "fchmodat", 04755, 0));
    make("fchmodat2");    report("fchmodat2", syscall(452, AT_FDCWD, "fchmodat2", 06755, 0));
    created("open_creat", open("open_creat", O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 04755));
    created("openat_creat", (int)syscall(SYS_openat, AT_FDCWD, "openat_creat", O_CREAT | O_WRONLY, 06755));
    created("creat", creat("creat", 04755));
    created("tmpfile", open(".", O_TMPFILE | O_WRONLY, 04755));
    fd = open(".", O_TMPFILE | O_WRONLY, 0755);   /* a nameless file, named after the fact */
    if (fd >= 0) {
        char p[64];
        fill(fd);
        report("tmpfile_fchmod", fchmod(fd, 04755));
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        linkat(AT_FDCWD, p, AT_FDCWD, "tmpfile_linked", AT_SYMLINK_FOLLOW);
        close(fd);
    }
    {
        struct jc_open_how how = {O_CREAT | O_WRONLY, 04755, 0};
        created("openat2", (int)syscall(437, AT_FDCWD, "openat2", &how, sizeof how));
    }
    report("mknod", mknod("mknod", S_IFREG | 04755, 0));
    report("mknodat", mknodat(AT_FDCWD, "mknodat", S_IFREG | 02755, 0));
    report("mknod_chr", mknod("mknod_chr", S_IFCHR | 0666, makedev(1, 3)));
    report("mknod_blk", mknod("mknod_blk", S_IFBLK | 0666, makedev(7, 0)));
    report("mknod_fifo", mknod("mknod_fifo", S_IFIFO | 0644, 0));
    {
        char params[120];
        memset(params, 0, sizeof params);
        report("io_uring_setup", syscall(425, 4, params));
    }
#if defined(__x86_64__)
    make("i386_chmod");   report("i386_chmod", int80(15, (long)"i386_chmod", 04755, 0));
    created("i386_open", (int)int80(5, (long)"i386_open", O_CREAT | O_WRONLY, 04755));
#endif
    make("own0");         report("chown0", chown("own0", 0, 0));
    make("own1000");      report("chown1000", chown("own1000", 1000, 1000));
    make("own1000u");     report("chown1000_uid", chown("own1000u", 1000, (gid_t)-1));
    make("own1000g");     report("chown1000_gid", chown("own1000g", (uid_t)-1, 1000));
    {
        /* cap_setuid (bit 7) permitted + effective: v2, and v3 naming host root as its root */
        unsigned char v2[20] = {0}, v3[24] = {0};
        uint32_t m2 = 0x02000000 | 1, m3 = 0x03000000 | 1;
        memcpy(v2, &m2, 4); v2[4] = 0x80;
        memcpy(v3, &m3, 4); v3[4] = 0x80;
        make("cap_v2");   report("setxattr_cap_v2", setxattr("cap_v2", "security.capability", v2, sizeof v2, 0));
        make("cap_v3");   report("setxattr_cap_v3", setxattr("cap_v3", "security.capability", v3, sizeof v3, 0));
        fd = open("cap_v3", O_RDONLY | O_CLOEXEC);
        report("fsetxattr_cap", fsetxattr(fd, "security.capability", v2, sizeof v2, 0)); close(fd);
        report("lsetxattr_cap", lsetxattr("cap_v3", "security.capability", v2, sizeof v2, 0));
        report("setxattr_user", setxattr("cap_v2", "user.note", "x", 1, 0));
    }
    mkdir("sgiddir", 0777);
    report("chmod_sgiddir", chmod("sgiddir", 02777));
    report("mkdir_sgid", mkdir("mkdir_sgid", 02777));
    /* a new name for another user's file (0666): no file of a foreign owner made "ours" */
    report("link_other", link("other.txt", "other_link"));
    /* a setuid file the host put there: a chown and a write must clear its bits */
    report("chown_hostsuid", chown("hostsuid", 0, 0));
    fd = open("hostsuid2", O_WRONLY | O_APPEND | O_CLOEXEC);
    report("write_hostsuid", fd < 0 ? -1 : write(fd, "", 1)); if (fd >= 0) close(fd);
    return 0;
}
"""

#: every way of making a setuid/setgid file or a device node: refused (EPERM)
SETUID_ATTACKS = ("chmod", "chmod_sgid", "fchmod", "fchmodat", "fchmodat2", "open_creat", "openat_creat", "creat",
                  "tmpfile", "tmpfile_fchmod", "mknod", "mknodat", "mknod_chr", "mknod_blk", "chmod_sgiddir") + \
    (("i386_chmod", "i386_open") if X86_64 else ())
XATTR_ATTACKS = ("setxattr_cap_v2", "setxattr_cap_v3", "fsetxattr_cap", "lsetxattr_cap", "setxattr_user")

#: what runs inside after the probe: cp -p of a setuid file, and the user's ordinary work
SCRIPT = (
    "/probe/hostile_probe /nb; "
    "cp -p /probe/suid-src /nb/cp_p 2>/dev/null; echo cp_p=$?; "
    "echo from-the-container > /nb/new.txt; echo write_new=$?; "
    "echo read_mine=$(cat /nb/mine.txt); echo more >> /nb/mine.txt; echo append_mine=$?; "
    "mkdir /nb/sub && echo x > /nb/sub/f; echo sub=$?; "
    "echo hack >> /nb/other.txt 2>/dev/null; echo write_other=$?; "
    "stat -c 'other_owner=%u:%g' /nb/other.txt; "
    "touch /nb/shared/f 2>/dev/null; echo shared_create=$?; "
    "touch /nb/team/f && mkdir /nb/team/d; echo team_create=$?; "
    "grep ' /nb ' /proc/self/mountinfo | sed 's/^/mountinfo=/'"
)


def _fields(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def probe_dir() -> Iterator[Path]:
    """A folder anybody can read: the static probe, and ``suid-src`` (a setuid-root copy, for cp -p)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the probe")
    d = Path(tempfile.mkdtemp(prefix="jc-hostile-probe-", dir="/tmp"))
    try:
        (d / "hostile_probe.c").write_text(HOSTILE_C)
        res = subprocess.run([gcc, "-static", "-O1", "-o", str(d / "hostile_probe"), str(d / "hostile_probe.c")],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            pytest.skip(f"cannot link a static probe: {res.stderr[-500:]}")
        shutil.copy(d / "hostile_probe", d / "suid-src")
        os.chown(d / "suid-src", 0, 0)
        os.chmod(d / "suid-src", 0o4755)
        d.chmod(0o755)
        yield d
    finally:
        remove_tree(d)


@pytest.fixture
def subids(tmp_path, monkeypatch):
    (tmp_path / "subuid").write_text(f"jupyter-contain:{BASE}:{4 * 65536}\n")
    (tmp_path / "subgid").write_text(f"jupyter-contain:{BASE}:{4 * 65536}\n")
    monkeypatch.setenv("JUPYTER_CONTAIN_SUBUID_FILE", str(tmp_path / "subuid"))
    monkeypatch.setenv("JUPYTER_CONTAIN_SUBGID_FILE", str(tmp_path / "subgid"))
    monkeypatch.delenv("JUPYTER_CONTAIN_SUBID_USER", raising=False)


def make_folder(probe_dir: Path, uid: int, gid: int) -> Path:
    """A notebook folder of host user ``uid``:``gid`` under a path ``nobody`` can walk.

    It holds ``mine.txt`` (the owner's), ``other.txt`` (another user's,
    0666), ``hostsuid``/``hostsuid2`` (setuid executables the owner made),
    and two setgid folders the owner made: ``team`` (the folder's group,
    2775) and ``shared`` (another group, 2777), whose new files take that
    group (the host's own rule for a setgid folder).
    """
    top = Path(tempfile.mkdtemp(prefix="jc-hostile-", dir="/tmp"))
    top.chmod(0o755)
    nb = top / "nb"
    nb.mkdir(mode=0o755)
    (nb / "mine.txt").write_text("mine\n")
    (nb / "other.txt").write_text("other\n")
    os.chmod(nb / "other.txt", 0o666)
    os.chown(nb / "other.txt", OTHER_UID, OTHER_UID)
    for name in ("hostsuid", "hostsuid2"):
        shutil.copy(probe_dir / "hostile_probe", nb / name)
    (nb / "team").mkdir()
    (nb / "shared").mkdir()
    for p in (nb, nb / "mine.txt", nb / "hostsuid", nb / "hostsuid2", nb / "team"):
        os.chown(p, uid, gid)
    os.chown(nb / "shared", uid, OTHER_UID)
    os.chmod(nb / "team", 0o2775)
    os.chmod(nb / "shared", 0o2777)
    made = {}
    for name in ("hostsuid", "hostsuid2"):
        os.chmod(nb / name, 0o4755)      # after the chown, which would clear it
        made[name] = _identity(os.lstat(nb / name))
    (top / "made.json").write_text(json.dumps(made))   # a record of what the host made
    return nb


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def run_in(rt: Runtime, folder: Path, probe_dir: Path, *, userns: str, idmap: bool = True) -> dict[str, str]:
    out = folder.parent / "out"
    binds = (rootfs.Bind(folder, "/nb", idmap=True) if idmap else parse_bind(f"{folder}:/nb"),
             parse_bind(f"{probe_dir}:/probe:ro"))
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        info = rt.run(ContainerSpec(image="busybox:test", command=("sh", "-c", SCRIPT), userns=userns,  # type: ignore[arg-type]
                                    binds=binds), stdio=(null.fileno(), f.fileno(), f.fileno()), remove=True)
    text = out.read_text()
    out.unlink()
    assert info.code == 0, text
    return _fields(text)


def host_view(folder: Path) -> dict[str, os.stat_result]:
    return {str(p.relative_to(folder)): os.lstat(p) for p in [folder, *folder.rglob("*")]}


def assert_no_privilege_left(folder: Path, *, owners: set[tuple[int, int]], untouched: tuple[str, ...] = ()) -> None:
    """What the host finds: no setuid/setgid, device, file capability or foreign owner; nothing runs as root.

    ``untouched``: the host's own setuid files, which the container could
    not change: exactly as the host made them. The host's setgid folders
    (and a folder made in one, which inherits the bit: the host's rule) are
    the only setgid entries, and folders.
    """
    made = json.loads((folder.parent / "made.json").read_text())
    for name, st in host_view(folder).items():
        if name in untouched:
            assert _identity(st) == made[name], name
            continue
        if stat.S_ISDIR(st.st_mode) and name in ("team", "shared", "team/d"):
            assert st.st_mode & 0o7777 in (0o2775, 0o2777, 0o2755), (name, oct(st.st_mode))
        else:
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), (name, oct(st.st_mode))
        assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), name
        if name == "shared" or name.startswith("shared/"):
            assert st.st_gid == OTHER_UID and (st.st_uid, 0) in {(u, 0) for u, _ in owners}, name
        elif name not in ("other.txt", "other_link"):   # a plain bind: the host lets anyone link a 0666 file
            assert (st.st_uid, st.st_gid) in owners, (name, st.st_uid, st.st_gid)
        for attr in ("security.capability", "user.note"):
            with pytest.raises(OSError) as info:
                os.getxattr(folder / name, attr, follow_symlinks=False)
            assert info.value.errno == errno.ENODATA, (name, attr)
        if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IXOTH and st.st_size:
            res = subprocess.run(["runuser", "-u", "nobody", "--", str(folder / name), "euid"],
                                 capture_output=True, text=True, timeout=30, check=False)
            # the probe's copies say whom they run as; anything else (the kernel test's `id`,
            # checked there) must at least not claim root
            assert "euid=0" not in res.stdout and (res.returncode or f"euid={NOBODY} " in res.stdout), \
                (name, res.stdout, res.stderr)


def assert_refused(f: dict[str, str], *, host_files: bool = True) -> None:
    assert {k: int(f[k]) for k in SETUID_ATTACKS} == dict.fromkeys(SETUID_ATTACKS, EPERM)
    assert {k: int(f[k]) for k in XATTR_ATTACKS} == dict.fromkeys(XATTR_ATTACKS, EOPNOTSUPP)
    assert int(f["openat2"]) == ENOSYS and int(f["io_uring_setup"]) == ENOSYS
    assert f["cp_p"] != "0"                           # cp -p says it could not keep the mode
    assert int(f["mknod_fifo"]) == 0 and int(f["mkdir_sgid"]) == 0   # what is harmless still works
    if host_files:   # the folder owner's setuid files are container root's: a chown or write clears the bits
        assert int(f["chown_hostsuid"]) == 0 and int(f["write_hostsuid"]) == 0


def assert_user_files_work(folder: Path, f: dict[str, str], owner: tuple[int, int]) -> None:
    assert f["write_new"] == "0" and f["read_mine"] == "mine" and f["append_mine"] == "0" and f["sub"] == "0"
    assert (folder / "new.txt").read_text() == "from-the-container\n"
    assert (folder / "mine.txt").read_text() == "mine\nmore\n"
    assert (folder / "sub" / "f").read_text() == "x\n"
    for name in ("new.txt", "mine.txt", "sub", "sub/f", "chmod", "open_creat" if (folder / "open_creat").exists()
                 else "chmod"):
        st = os.lstat(folder / name)
        assert (st.st_uid, st.st_gid) == owner, name
    # not nosuid or nodev, not much of a guard
    opts = f["mountinfo"].split()[5].split(",")
    assert "nosuid" in opts and "nodev" in opts, f["mountinfo"]


# --- a root server ---------------------------------------------------------------------------


@pytest.mark.parametrize("owner", [(0, 0), (4242, 4244)], ids=["root-folder", "user-folder"])
@pytest.mark.parametrize("userns", ["auto", "host"])
def test_root_server_idmapped_folder(runtime, probe_dir, subids, userns, owner):
    folder = make_folder(probe_dir, *owner)
    try:
        f = run_in(runtime, folder, probe_dir, userns=userns)
        assert_refused(f)
        # the mount maps container root to the folder's owner and nothing else
        assert int(f["chown0"]) == 0
        for key in ("chown1000", "chown1000_uid", "chown1000_gid"):
            assert int(f[key]) == EOVERFLOW, (key, f[key])
        # another user's file: the overflow id inside, and not writable (nor linkable) even though it is 0666
        assert f["other_owner"] == f"{NOBODY}:{NOBODY}" and f["write_other"] != "0"
        assert int(f["link_other"]) == EOVERFLOW and not (folder / "other_link").exists()
        assert (folder / "other.txt").read_text() == "other\n"
        assert "idmapped" in f["mountinfo"].split()[5].split(",")
        # a setgid folder of another group: that group is unmapped here, so nothing is made in it;
        # one of the folder's own group works as on the host (new folders inherit the bit)
        assert f["shared_create"] != "0" and not (folder / "shared" / "f").exists()
        assert f["team_create"] == "0" and os.lstat(folder / "team" / "f").st_gid == owner[1]
        assert os.lstat(folder / "team" / "d").st_mode & stat.S_ISGID
        assert_user_files_work(folder, f, owner)
        assert_no_privilege_left(folder, owners={owner})
    finally:
        remove_tree(folder.parent)


def test_plain_bind_in_a_user_namespace(runtime, probe_dir, subids):
    """``-v`` (not idmapped): the container's own host ids only, through what the host lets anyone do."""
    folder = make_folder(probe_dir, 0, 0)
    try:
        folder.chmod(0o777)
        f = run_in(runtime, folder, probe_dir, userns="auto", idmap=False)
        assert_refused(f, host_files=False)
        # host root's setuid files are nobody's inside: not container root's to chown or write
        assert int(f["chown_hostsuid"]) == EPERM and int(f["write_hostsuid"]) == errno.EACCES
        opts = f["mountinfo"].split()[5].split(",")
        assert "nosuid" in opts and "nodev" in opts and "idmapped" not in opts
        made = os.lstat(folder / "new.txt")
        assert (made.st_uid, made.st_gid) == (BASE, BASE)   # container root's own host id
        # the host's setgid folder open to anyone: its group, as for any host user
        assert f["shared_create"] == "0" and os.lstat(folder / "shared" / "f").st_gid == OTHER_UID
        assert f["team_create"] != "0"                       # host root's 2775 folder: not writable
        assert f["append_mine"] != "0" and (folder / "mine.txt").read_text() == "mine\n"
        assert_no_privilege_left(folder, owners={(0, 0), (BASE, BASE), (BASE + 1000, BASE + 1000),
                                                 (BASE + 1000, BASE), (BASE, BASE + 1000)},
                                 untouched=("hostsuid", "hostsuid2"))
    finally:
        remove_tree(folder.parent)


# --- a rootless server ---------------------------------------------------------------------


@pytest.mark.parametrize("who", ["lone_user", "subid_user"])
def test_rootless_server_folder(request, probe_dir, who):
    """A user's own folder, bound into the user's rootless container: the same refusals.

    No idmapped mount here (that takes CAP_SYS_ADMIN over the folder's
    filesystem): container root is the user itself. A lone uid has no other
    id to hand a file to; a user with subordinate ids can chown to them
    (ids delegated to that user alone, as with rootless Podman), never to
    host root or another user.
    """
    user = request.getfixturevalue(who)
    folder = make_folder(probe_dir, user.uid, user.gid)
    try:
        r = user.container(SCRIPT, binds=[f"{folder}:/nb", f"{probe_dir}:/probe:ro"])
        assert r.get("code") == 0, r
        f = _fields(r["out"])
        assert_refused(f)
        opts = f["mountinfo"].split()[5].split(",")
        assert "nosuid" in opts and "nodev" in opts
        assert int(f["chown0"]) == 0
        owners = {(user.uid, user.gid)}
        if who == "lone_user":
            assert {int(f[k]) for k in ("chown1000", "chown1000_uid", "chown1000_gid")} == {EINVAL}
        else:
            with open("/etc/subuid") as su, open("/etc/subgid") as sg:
                uid0 = next(int(ln.split(":")[1]) for ln in su if ln.startswith(f"{SUBID_USER}:"))
                gid0 = next(int(ln.split(":")[1]) for ln in sg if ln.startswith(f"{SUBID_USER}:"))
            assert int(f["chown1000"]) == 0
            st = os.lstat(folder / "own1000")
            assert (st.st_uid, st.st_gid) == (uid0 + 999, gid0 + 999)     # container 1000 = subordinate id 1000
            owners |= {(uid0 + 999, gid0 + 999), (uid0 + 999, user.gid), (user.uid, gid0 + 999)}
        assert f["other_owner"] == f"{NOBODY}:{NOBODY}"
        assert f["shared_create"] == "0" and os.lstat(folder / "shared" / "f").st_gid == OTHER_UID
        assert f["team_create"] == "0" and os.lstat(folder / "team" / "f").st_gid == user.gid
        assert_user_files_work(folder, f, (user.uid, user.gid))
        assert_no_privilege_left(folder, owners=owners)
    finally:
        remove_tree(folder.parent)


# --- a real contained kernel: the issue's own cell ---------------------------------------------

KERNEL_CELL = """
import errno, os, shutil
def attempt(fn):
    try:
        fn()
        return 0
    except OSError as exc:
        return exc.errno
shutil.copy("/usr/bin/id", "suid-id")
cap = (0x02000001).to_bytes(4, "little") + bytes([0x80]) + bytes(15)
print({
    "chown0": attempt(lambda: os.chown("suid-id", 0, 0)),
    "chmod": attempt(lambda: os.chmod("suid-id", 0o4755)),
    "chown1000": attempt(lambda: os.chown("suid-id", 1000, 1000)),
    "setcap": attempt(lambda: os.setxattr("suid-id", "security.capability", cap)),
    "open": attempt(lambda: os.close(os.open("made", os.O_CREAT | os.O_WRONLY, 0o6755))),
})
open("notes.txt", "w").write("kept")
print(open("mine.txt").read().strip(), os.stat("other.txt").st_uid)
"""


@pytest.mark.parametrize("owner", [(0, 0), (4242, 4244)], ids=["root-folder", "user-folder"])
def test_kernel_notebook_folder(ksm, kernel_env, kernel_runtime, probe_dir, owner):
    """The default kernelspec (userns auto where the machine has subordinate ids), cwd = the notebook folder."""
    from jupyter_client.manager import KernelManager

    folder = make_folder(probe_dir, *owner)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    try:
        km.start_kernel(cwd=str(folder))
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            r = run_cell(kc, KERNEL_CELL)
        finally:
            kc.stop_channels()
        km.shutdown_kernel(now=True)
        assert r["error"] is None, r
        first, second = r["stdout"].splitlines()[:2]
        assert ast.literal_eval(first) == {"chown0": 0, "chmod": EPERM, "chown1000": EOVERFLOW,
                                           "setcap": EOPNOTSUPP, "open": EPERM}
        assert second == f"mine {NOBODY}"
        st = os.lstat(folder / "suid-id")
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID) and (st.st_uid, st.st_gid) == owner
        res = subprocess.run(["runuser", "-u", "nobody", "--", str(folder / "suid-id")],
                             capture_output=True, text=True, timeout=30, check=False)
        assert res.stdout.startswith(f"uid={NOBODY}(nobody)") and "euid" not in res.stdout, res
        notes = folder / "notes.txt"
        assert notes.read_text() == "kept" and (notes.stat().st_uid, notes.stat().st_gid) == owner
        assert not (folder / "made").exists()
        assert_no_privilege_left(folder, owners={owner}, untouched=("hostsuid", "hostsuid2"))
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        remove_tree(folder.parent)
