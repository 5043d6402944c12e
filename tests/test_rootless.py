"""Rootless: containers started by a user that is not root, from its own store.

Each test runs ``rootless_driver.py`` (or a kernel) as an unprivileged user
through ``setpriv``, with a home folder of its own under ``/tmp``:

- uid 47011, which has no passwd entry and no subordinate ids: container
  root is that uid alone, its maps written directly (setgroups denied);
- ``jc-rootless`` (made by ``scripts/setup`` with 65536 subordinate ids):
  the maps go through the setuid ``newuidmap``/``newgidmap``, so ``nobody``
  and other image users exist inside.

The cgroups here are v1 and the administrator's: these containers run
without quotas, and asking for one is refused. The escape probes are the
ones the root and user-namespace tests run.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from probes import PROBE_C

from jupyter_contain.runtime.fsutil import remove_tree

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LONE_UID = 47011
SUBID_USER = "jc-rootless"
EPERM = 1
DOCKER_CAPS = 0x00000000a80425fb   # Docker's default bounding set


def _reachable(path: Path) -> bool:
    """Can anybody (not only root) execute ``path``: o+x on it and every folder above?"""
    p = path.resolve()
    for part in [p, *p.parents]:
        if not part.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _user_python() -> str:
    """An interpreter the unprivileged user can run, of this one's version (our extension's ABI)."""
    if _reachable(Path(sys.executable)):
        return sys.executable
    system = Path("/usr/bin/python3")
    if system.exists() and _reachable(system):
        version = subprocess.run([str(system), "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        if version == str(sys.version_info[:2]):
            return str(system)
    pytest.skip(f"no Python {sys.version_info[:2]} an unprivileged user can run ({sys.executable} is under a "
                "private folder)")


def _code_roots() -> list[Path]:
    """This checkout, and every site-packages folder of ours that lies outside it."""
    import site
    roots = [REPO]
    for sp in map(Path, site.getsitepackages()):
        if not sp.resolve().is_relative_to(REPO.resolve()):
            roots.append(sp)
    return roots


@dataclass
class User:
    """An unprivileged user, and how its processes reach our code.

    The checkout may lie under a folder only root may enter (a clone in
    root's home): each of the user's processes gets a mount namespace of its
    own (``unshare --mount``, made as root, so nothing reaches the host's)
    with the checkout and our site-packages bound under its home.
    """

    uid: int
    gid: int
    home: Path

    def _binds(self) -> list[tuple[Path, Path]]:
        out = []
        for i, src in enumerate(_code_roots()):
            dst = self.home / ".code" / str(i)
            dst.mkdir(parents=True, exist_ok=True)
            out.append((src.resolve(), dst))
        return out

    def path(self, p: Path) -> str:
        """Where the user's processes see our file ``p``."""
        p = p.resolve()
        for src, dst in self._binds():
            if p.is_relative_to(src):
                return str(dst / p.relative_to(src))
        return str(p)

    def env(self) -> dict[str, str]:
        import site
        pythonpath = [self.path(REPO), self.path(HERE)] + [self.path(Path(sp)) for sp in site.getsitepackages()]
        return {"HOME": str(self.home), "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                "PYTHONPATH": os.pathsep.join(pythonpath), "XDG_RUNTIME_DIR": str(self.home / "run"),
                "LANG": "C.UTF-8"}

    def argv(self, *args: str) -> list[str]:
        import shlex
        script = "".join(f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}; "
                         for src, dst in self._binds()) + 'exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "sh",
                "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", _user_python(), *args]

    def container(self, cmd: str, *, environ: dict[str, str] | None = None, **req) -> dict:
        """Run ``sh -c cmd`` in a rootless busybox container as this user (see rootless_driver)."""
        from jupyter_contain.runtime.images import bootstrap
        req = {"image_tar": str(bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX)), "cmd": cmd, **req}
        res = subprocess.run(self.argv(self.path(HERE / "rootless_driver.py"), json.dumps(req)),
                             env={**self.env(), **(environ or {})},
                             capture_output=True, text=True, timeout=180, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])


def _home(uid: int, gid: int) -> Path:
    home = Path(tempfile.mkdtemp(prefix="jc-rootless-", dir="/tmp"))
    (home / "run").mkdir(mode=0o700)
    for p in (home, home / "run"):
        os.chown(p, uid, gid)
    return home


@pytest.fixture
def lone_user():
    """A uid of its own, nothing else: container root is that one id."""
    home = _home(LONE_UID, LONE_UID)
    try:
        yield User(LONE_UID, LONE_UID, home)
    finally:
        remove_tree(home)


@pytest.fixture
def subid_user():
    """``jc-rootless``, with subordinate ids (scripts/setup makes it)."""
    try:
        pw = pwd.getpwnam(SUBID_USER)
    except KeyError:
        pytest.skip(f"user {SUBID_USER} is missing: run scripts/setup")
    home = _home(pw.pw_uid, pw.pw_gid)
    try:
        yield User(pw.pw_uid, pw.pw_gid, home)
    finally:
        remove_tree(home)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    """A folder anybody can read holding ``probe`` (static), for a bind mount."""
    d = Path(tempfile.mkdtemp(prefix="jc-probe-", dir="/tmp"))
    try:
        (d / "probe.c").write_text(PROBE_C)
        res = subprocess.run(["gcc", "-static", "-O1", "-o", str(d / "probe"), str(d / "probe.c")],
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr[-1000:]
        d.chmod(0o755)
        yield d
    finally:
        remove_tree(d)


def _fields(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# --- the lone uid ------------------------------------------------------------------------


def test_root_inside_is_the_user_outside(lone_user):
    shared = lone_user.home / "shared"
    shared.mkdir()
    os.chown(shared, LONE_UID, LONE_UID)
    r = lone_user.container("id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map; stat -c '%u:%g' /bin/busybox; "
                            "echo made > /data/made; touch /root/new", binds=[f"{shared}:/data"])
    assert r["code"] == 0, r
    lines = r["out"].split("\n")
    assert lines[0:2] == ["0", "0"]
    assert lines[2].split() == ["0", str(LONE_UID), "1"] and lines[3].split() == ["0", str(LONE_UID), "1"]
    assert lines[4] == "0:0"                       # the image's root-owned files: root's inside
    made = shared / "made"
    assert made.read_text() == "made\n" and (made.stat().st_uid, made.stat().st_gid) == (LONE_UID, LONE_UID)
    assert ["root/new", LONE_UID, LONE_UID] in r["upper"]   # the writable layer holds the user's files
    assert r["containers"] == 0


def test_quotas_are_refused_without_delegated_cgroups(lone_user):
    r = lone_user.container("true", limits={"memory": 64 << 20})
    assert r["error"] == "InvalidSpec", r
    assert "cannot limit memory of a rootless container" in r["message"] and "not writable" in r["message"]
    assert r["containers"] == 0                     # nothing was made
    # the default process limit is dropped (with a warning), not refused
    r = lone_user.container("cat /proc/self/status | grep -c Pid")
    assert r["code"] == 0, r


def test_only_root_exists_without_subordinate_ids(lone_user):
    r = lone_user.container("true", user="nobody")
    assert r["error"] == "InvalidSpec" and "does not exist in a rootless container" in r["message"], r
    assert "usermod --add-subuids" in r["message"]


def test_escape_probes_as_a_rootless_user(lone_user, probe):
    script = (
        "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\\t' "
        "| sed 's/:/=/'; "
        "echo x > /proc/sys/kernel/hostname 2>/dev/null; echo sysctl=$?; "
        "echo h > /proc/sysrq-trigger 2>/dev/null; echo sysrq=$?; "
        # masked: nothing comes out (an open of the /dev/null over it may succeed: 6.1 lets it)
        "head -c1 /proc/kcore 2>/dev/null | grep -q .; echo kcore=$?; "
        "mknod /tmp/blk b 8 0 2>/dev/null; echo mknod=$?; "
        "mount -t tmpfs none /mnt 2>/dev/null; echo mount=$?; "
        "echo pids=$(cd /proc && ls -d [0-9]* | tr '\\n' ,); echo init=$(cat /proc/1/comm); "
        "echo hosthome=$(ls /tmp/jc-rootless-* 2>/dev/null | wc -l); "
        "echo fds=$(ls /proc/self/fd | tr '\\n' ,); "
        "/probe/probe"
    )
    r = lone_user.container(script, binds=[f"{probe}:/probe:ro"])
    assert r["code"] == 0, r
    f = _fields(r["out"])
    assert int(f["CapBnd"], 16) & ~DOCKER_CAPS == 0
    assert int(f["CapInh"], 16) == 0 and int(f["CapAmb"], 16) == 0
    assert f["NoNewPrivs"] == "1" and f["Seccomp"] == "2"
    for key in ("sysctl", "sysrq", "kcore", "mknod", "mount"):
        assert f[key] != "0", (key, r["out"])
    pids = [int(p) for p in f["pids"].strip(",").split(",")]
    assert f["init"] == "jc-init" and len(pids) <= 6 and max(pids) < 50, f   # the shell's own: no host process
    assert f["hosthome"] == "0"        # the host's /tmp is not the container's
    assert set(f["fds"].strip(",").split(",")) <= {"0", "1", "2", "3"}   # 3: ls's own directory
    denied = ["keyctl", "add_key", "bpf", "perf_event_open", "kexec_load", "reboot", "init_module",
              "open_by_handle_at", "mount", "umount2", "setns", "unshare_user", "clone_newuser"]
    assert {k: int(f[k]) for k in denied} == {k: EPERM for k in denied}
    assert f["getpid"] == "0" and f["clone_fork"] == "0"


def test_network_none_has_loopback_only(lone_user):
    r = lone_user.container("cat /proc/net/route | wc -l; ip -o link 2>/dev/null | wc -l || true; "
                            "wget -q -T 1 -O- http://10.0.2.2/ 2>&1 >/dev/null; echo wget=$?")
    assert r["code"] == 0, r
    lines = r["out"].split("\n")
    assert lines[0] == "1"             # the header only: no route anywhere
    assert _fields(r["out"])["wget"] != "0"


# --- a user with subordinate ids -----------------------------------------------------------


def test_subordinate_ids_through_newuidmap(subid_user):
    pw = pwd.getpwuid(subid_user.uid)
    r = subid_user.container("cat /proc/self/uid_map; echo made > /tmp/rootfile; "
                             "su -s /bin/sh nobody -c 'id -u; echo n > /tmp/nobodyfile' 2>&1", user="0")
    assert r["code"] == 0, r
    maps = [line.split() for line in r["out"].split("\n")[:2]]
    assert maps[0] == ["0", str(pw.pw_uid), "1"]
    assert maps[1][0] == "1" and int(maps[1][2]) == 65536 and int(maps[1][1]) >= 65536
    assert "65534" in r["out"]
    owners = {p: (u, g) for p, u, g in r["upper"]}
    assert owners["tmp/rootfile"][0] == pw.pw_uid
    # nobody (65534 inside) is a subordinate id outside: not the user, not anybody real
    assert owners["tmp/nobodyfile"][0] == int(maps[1][1]) + 65534 - 1


# --- a contained kernel, started by the user ----------------------------------------------


def test_rootless_kernel_runs_code(subid_user):
    """The whole path as a non-root Jupyter user: import, kernelspec (with its probe), start, execute."""
    from jupyter_contain.runtime.images import bootstrap
    req = {"image_tar": str(bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL)),
           "config": dict(bootstrap.DEBIAN_KERNEL.config),
           "code": "import os, sys\nprint('uid', os.getuid())\nprint(open('/proc/self/uid_map').read().split())\n"
                   "open('/root/note.txt', 'w').write('kept')\nprint('python', sys.version_info[:2])"}
    res = subprocess.run(subid_user.argv(subid_user.path(HERE / "rootless_kernel_driver.py"), json.dumps(req)),
                         env=subid_user.env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["error"] is None, out
    assert "uid 0" in out["stdout"]
    assert f"'0', '{subid_user.uid}', '1'" in out["stdout"]      # root inside is the user outside
    assert "python (3, 11)" in out["stdout"]
    assert out["left"] == 0


def test_rootless_kernel_cannot_point_the_server_at_host_files_or_sockets(subid_user, tmp_path):
    """The kernel-folder attacks of issue 23 from a rootless server's kernel (see test_hostile_kernel_dir)."""
    import socket
    import threading

    from jupyter_contain.runtime.images import bootstrap
    home = Path(subid_user.env()["HOME"])
    canary = home / "canary.txt"
    canary.write_text("the user's own file\n")
    os.chown(canary, subid_user.uid, subid_user.gid)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    lpath = home / "listener.sock"
    listener.bind(str(lpath))
    os.chown(lpath, subid_user.uid, subid_user.gid)
    listener.listen(16)
    listener.settimeout(0.1)
    hits: list[int] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            hits.append(1)
            conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    attack = (f"import os, glob\ns = os.environ['JUPYTER_CONTAIN_KERNEL_DIR'] + '/s'\n"
              f"os.unlink(s + '/connection.json'); os.symlink({str(canary)!r}, s + '/connection.json')\n"
              f"for p in glob.glob(s + '/k-*'):\n    os.unlink(p); os.symlink({str(lpath)!r}, p)\n"
              f"print('planted', len(glob.glob(s + '/k-*')))\n")
    req = {"image_tar": str(bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL)),
           "config": dict(bootstrap.DEBIAN_KERNEL.config), "code": attack, "after_restart": "print('alive', 6 * 7)"}
    try:
        res = subprocess.run(subid_user.argv(subid_user.path(HERE / "rootless_kernel_driver.py"), json.dumps(req)),
                             env=subid_user.env(), capture_output=True, text=True, timeout=300, check=False)
    finally:
        stop.set()
        t.join()
        listener.close()
        lpath.unlink(missing_ok=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["error"] is None, out
    assert "planted 5" in out["stdout"] and "alive 42" in out["stdout"], out
    assert hits == [] and canary.read_text() == "the user's own file\n"
    assert out["left"] == 0


def test_network_modes_rootless(lone_user):
    r = lone_user.container("cat /proc/net/route | wc -l; ls /sys/class/net | wc -l", network="host")
    assert r["code"] == 0, r
    assert int(r["out"].split()[1]) > 1            # the host's interfaces, seen through the host's sysfs
    if os.access("/dev/net/tun", os.W_OK) and stat.S_IMODE(os.stat("/dev/net/tun").st_mode) & 0o006 == 0o006:
        return   # distributions' 0666: test_rootless_egress_through_slirp4netns covers it
    r = lone_user.container("true", network="bridge")
    assert r["error"] == "InvalidSpec" and "no egress for a rootless container" in r["message"], r
    assert "/dev/net/tun" in r["message"] and r["containers"] == 0


@pytest.mark.parametrize("unpack", [False, True], ids=["lazy-unpack", "copied-while-frozen"])
def test_rootless_snapshot_stores_container_ids_and_runs(subid_user, unpack):
    r = subid_user.container("set -e; echo r > /root/mine; mkdir -p /srv/app; echo n > /srv/app/n; chown -R 65534:65534 /srv/app; "
                             "rm /bin/vi", snapshot="cat /root/mine /srv/app/n; stat -c '%u %g' /srv/app/n; "
                                                     "ls /bin/vi 2>/dev/null; echo vi=$?",
                             snapshot_unpack=unpack)
    assert r["code"] == 0, r
    layer = {name.rstrip("/"): (uid, gid) for name, uid, gid in r["layer"]}
    assert "srv/app/n" in layer, r
    # the tar holds what the container saw: root 0 and nobody 65534, not the host's ids
    assert layer["root/mine"] == (0, 0) and layer["srv/app/n"] == (65534, 65534)
    assert "bin/.wh.vi" in layer
    assert r["then_code"] == 0, r
    # and a container of the snapshot sees nobody's file as nobody's again (restored
    # inside the user's namespace after the unpack); the whiteout holds
    assert r["then_out"].split() == ["r", "n", "65534", "65534", "vi=1"]


def _image_with_owners(busybox: Path, dest: Path) -> Path:
    """busybox plus what a docker-stacks image has: a home and files of uid 1000, a setgid dir, a symlink."""
    import io
    import tarfile
    out = dest / "owners.tar"
    with tarfile.open(busybox) as src, tarfile.open(out, "w") as tar:
        for m in src:
            tar.addfile(m, src.extractfile(m) if m.isfile() else None)

        def add(name, kind=tarfile.DIRTYPE, *, uid=0, gid=0, mode=0o755, data=b"", link=""):
            m = tarfile.TarInfo(name)
            m.type, m.uid, m.gid, m.mode, m.size, m.linkname = kind, uid, gid, mode, len(data), link
            tar.addfile(m, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("home/jovyan", uid=1000, gid=100, mode=0o755)
        add("home/jovyan/notes.txt", tarfile.REGTYPE, uid=1000, gid=100, mode=0o640, data=b"mine\n")
        add("home/jovyan/link", tarfile.SYMTYPE, uid=1000, gid=100, link="notes.txt")
        add("srv/shared", uid=0, gid=100, mode=0o2775)
        add("srv/far", uid=200000, gid=200000, mode=0o700)     # beyond any 65536-id mapping
    out.chmod(0o644)
    return out


def test_image_owners_kept_with_subordinate_ids(subid_user):
    from jupyter_contain.runtime.images import bootstrap
    tar = _image_with_owners(bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX), subid_user.home)
    r = subid_user.container("stat -c '%n %u:%g %a' /home/jovyan /home/jovyan/notes.txt /srv/shared /srv/far; "
                             "stat -c '%n %u:%g' /home/jovyan/link; cat /home/jovyan/link; "
                             "su -s /bin/sh nobody -c 'cat /home/jovyan/notes.txt 2>/dev/null; echo nobody=$?'",
                             image_tar=str(tar), tag="owners:1", gc=True)
    assert r["code"] == 0, r
    lines = r["out"].splitlines()
    assert lines[0] == "/home/jovyan 1000:100 755"
    assert lines[1] == "/home/jovyan/notes.txt 1000:100 640"
    assert lines[2] == "/srv/shared 0:100 2775"            # the setgid bit survives the chown
    assert lines[3] == "/srv/far 0:0 700"                  # no id for it: the user's, root inside
    assert lines[4] == "/home/jovyan/link 1000:100" and lines[5] == "mine"
    assert "nobody=1" in r["out"]                           # 0640 of uid 1000 keeps nobody out
    # the store's gc removed the layer folders, other users' files and all
    assert r["layers_left"] == []


def test_image_owners_collapse_to_root_without_subordinate_ids(lone_user):
    from jupyter_contain.runtime.images import bootstrap
    tar = _image_with_owners(bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX), lone_user.home)
    r = lone_user.container("stat -c '%n %u:%g %a' /home/jovyan /home/jovyan/notes.txt",
                            image_tar=str(tar), tag="owners:1", gc=True)
    assert r["code"] == 0, r
    assert r["out"].splitlines() == ["/home/jovyan 0:0 755", "/home/jovyan/notes.txt 0:0 640"]
    assert r["layers_left"] == []


@pytest.fixture
def tun_for_users():
    """/dev/net/tun usable by every user, as distributions ship it (this machine has it 0600)."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("this kernel has no /dev/net/tun: no user-mode network can run here")
    st = os.stat("/dev/net/tun")
    os.chmod("/dev/net/tun", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/net/tun", stat.S_IMODE(st.st_mode))


@pytest.fixture
def loopback_server():
    """An HTTP server on the host's loopback (a rootless container reaches it as 10.0.2.2 when allowed)."""
    import http.server
    import threading

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello-from-the-host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        t.join()


def test_rootless_egress_through_slirp4netns(subid_user, tun_for_users, loopback_server):
    port = loopback_server
    cmd = (f"cat /etc/resolv.conf; ip -o -4 addr show tap0 2>/dev/null | wc -l; "
           f"timeout 5 wget -O- http://10.0.2.2:{port}/ 2>/dev/null; echo wget=$?")
    # by default the host's loopback is out of reach (slirp4netns --disable-host-loopback)
    r = subid_user.container(cmd, network="bridge")
    assert r["code"] == 0, r
    assert "nameserver 10.0.2.3" in r["out"] and "hello-from-the-host" not in r["out"]
    assert _fields(r["out"])["wget"] != "0"
    assert r["helper_gone"] is True
    # allowed: the same request reaches the test's server through slirp4netns's NAT
    r = subid_user.container(cmd, network="bridge", environ={"JUPYTER_CONTAIN_SLIRP_HOST_LOOPBACK": "1"})
    assert r["code"] == 0, r
    assert "hello-from-the-host" in r["out"] and _fields(r["out"])["wget"] == "0", r
    assert r["helper_gone"] is True and r["containers"] == 0


def test_owner_restore_never_follows_a_planted_symlink(subid_user):
    """A layer that makes a/f (uid 1000), then replaces a with a symlink to the user's own folder:
    restoring owners must not chown the user's files through it."""
    import io
    import tarfile
    victim = subid_user.home / "victim"
    victim.mkdir()
    (victim / "f").write_text("mine")
    for p in (victim, victim / "f"):
        os.chown(p, subid_user.uid, subid_user.gid)
    tar_path = subid_user.home / "planted.tar"
    from jupyter_contain.runtime.images import bootstrap
    with tarfile.open(bootstrap.cached_rootfs_tar(bootstrap.BUSYBOX)) as src, tarfile.open(tar_path, "w") as tar:
        for m in src:
            tar.addfile(m, src.extractfile(m) if m.isfile() else None)

        def add(name, kind, data=b"", **kw):
            m = tarfile.TarInfo(name)
            m.type = kind
            for k, v in kw.items():
                setattr(m, k, v)
            m.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(m, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("a", tarfile.DIRTYPE, mode=0o755, uid=1000, gid=1000)
        add("a/f", tarfile.REGTYPE, mode=0o644, uid=1000, gid=1000, data=b"x")
        add("a", tarfile.SYMTYPE, linkname=str(victim), uid=1000, gid=1000)
    tar_path.chmod(0o644)
    r = subid_user.container("readlink /a; stat -c '%u' /bin/busybox", image_tar=str(tar_path), tag="planted:1")
    assert r["code"] == 0, r
    assert r["out"].split()[0] == str(victim)
    # the user's own folder and file kept their owner: nothing went through the symlink
    assert (victim.stat().st_uid, (victim / "f").stat().st_uid) == (subid_user.uid, subid_user.uid)


def test_restore_program_refuses_a_symlinked_parent(tmp_path):
    """The owners program itself, given a path through a symlink, stops rather than follow it."""
    from jupyter_contain.runtime.images import rootless
    root, victim = tmp_path / "layer", tmp_path / "victim"
    root.mkdir()
    victim.mkdir()
    (victim / "f").write_text("host file")
    (root / "a").symlink_to(victim)
    listing = tmp_path / "owners"
    listing.write_bytes(b"a/f\x001000\x001000\x00420\x000\x00")
    res = subprocess.run([sys.executable, "-I", "-S", "-c", rootless._RESTORE, str(root), str(listing)],
                         capture_output=True, text=True, check=False)
    assert res.returncode != 0 and ("Not a directory" in res.stderr or "Too many levels" in res.stderr), res.stderr
    assert (victim / "f").stat().st_uid == 0
