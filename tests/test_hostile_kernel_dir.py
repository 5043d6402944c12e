"""A hostile kernel against the places it shares with the host: its folder, its sockets, its connection file.

Each attack runs from inside a real contained kernel (the default kernelspec:
user namespace where subordinate ids exist), then the host is checked: canary
files keep their bytes, owner and mode, a host socket the kernel points at is
never connected to, nothing the kernel writes reaches the host's disk, and the
kernel itself still restarts and answers. The layout under attack is
:mod:`jupyter_contain.kernel.folder`'s.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager
from kernel_fixtures import *  # noqa: F403
from kernel_fixtures import KERNEL_NAME, run_cell

from jupyter_contain.kernel import folder as kfolder

pytestmark = pytest.mark.slow

READY = 120


class Canary:
    """A host file whose bytes, owner and mode must not change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_bytes(b"canary " + os.urandom(16).hex().encode())
        os.chmod(path, 0o600)
        self.before = self.look()

    def look(self) -> tuple[str, int, int, int]:
        st = os.lstat(self.path)
        return hashlib.sha256(self.path.read_bytes()).hexdigest(), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    def unchanged(self) -> bool:
        return self.look() == self.before


class Listener:
    """A host unix socket that counts the connections it gets (it must get none)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def kernel(ksm, kernel_env, kernel_runtime):
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(READY)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _ok(kc, code: str) -> str:
    r = run_cell(kc, code)
    assert r["reply"]["content"]["status"] == "ok", r
    return r["stdout"]


def _restart_and_reconnect(km, kc) -> None:
    km.restart_kernel(now=True)
    kc.wait_for_ready(READY)
    assert _ok(kc, "print(6 * 7)").strip() == "42"


def test_connection_file_and_sockets_planted_as_symlinks_never_reach_the_host(kernel, tmp_path):
    km, kc = kernel
    canary = Canary(tmp_path / "host-secret")
    listener = Listener(tmp_path / "host.sock")
    try:
        kdir = _ok(kc, "import os; print(os.environ['JUPYTER_CONTAIN_KERNEL_DIR'])").strip()
        # the attack of issue 23: point the connection file at a host file, every socket at a host socket
        out = _ok(kc, f"""
import os, glob
s = {kdir!r} + '/s'
os.unlink(s + '/connection.json'); os.symlink({str(canary.path)!r}, s + '/connection.json')
done = []
for p in sorted(glob.glob(s + '/k-*')):
    os.unlink(p); os.symlink({str(listener.path)!r}, p); done.append(os.path.basename(p))
print(' '.join(done))
""")
        assert out.split() == ["k-1", "k-2", "k-3", "k-4", "k-5"]
        # a new client connects now (as the server does for every new browser tab), and the restart
        # rewrites the connection file: neither may touch the host
        kc2 = km.client()
        kc2.start_channels()
        time.sleep(1.0)
        kc2.stop_channels()
        _restart_and_reconnect(km, kc)
        assert listener.connections == 0
        assert canary.unchanged()
        # the new start has a fresh socket folder: the symlinks are gone
        assert "symlinks: 0" in _ok(kc, f"import os, glob; print('symlinks:', sum(os.path.islink(p) "
                                        f"for p in glob.glob({kdir!r} + '/s/*')))")
    finally:
        listener.close()


def test_the_kernel_cannot_write_what_the_host_writes_for_it(kernel, tmp_path):
    km, kc = kernel
    kdir = _ok(kc, "import os; print(os.environ['JUPYTER_CONTAIN_KERNEL_DIR'])").strip()
    out = _ok(kc, f"""
import os, errno
res = []
for name, act in [('previous-death', lambda p: os.symlink('/etc/passwd', p)),
                  ('previous-death', lambda p: os.mkfifo(p)),
                  ('host.sock', os.unlink),
                  ('evil', lambda p: open(p, 'w').write('x'))]:
    try:
        act({kdir!r} + '/' + name); res.append(name + ':done')
    except OSError as e:
        res.append(name + ':' + errno.errorcode[e.errno])
print(' '.join(res))
""")
    assert out.split() == ["previous-death:EROFS", "previous-death:EROFS", "host.sock:EROFS", "evil:EROFS"]
    # the kernel dies by itself: the host writes the reason for the next start, into its own folder
    kc.execute("import os; os._exit(3)")
    deadline = time.monotonic() + 60
    while km.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    km.restart_kernel(now=True)
    kc.wait_for_ready(READY)
    r = run_cell(kc, "print('after')")
    assert "exited with code 3" in r["stdout"] + r["stderr"], r
    f = kfolder.KernelFolder(kfolder.kernel_runtime_dir() / km.kernel_id)
    st = os.lstat(f.channel_dir / kfolder.PREVIOUS_DEATH_FILE)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def test_what_the_kernel_writes_into_its_folder_is_bounded_and_never_on_the_host(kernel):
    km, kc = kernel
    before = shutil.disk_usage("/").free
    kdir = _ok(kc, "import os; print(os.environ['JUPYTER_CONTAIN_KERNEL_DIR'])").strip()
    out = _ok(kc, f"""
import os, errno
s = {kdir!r} + '/s'
try:
    with open(s + '/big', 'wb') as f:
        for _ in range(1024):
            f.write(b'x' * (1 << 20))
    print('wrote 1 GiB')
except OSError as e:
    print('big:', errno.errorcode[e.errno])
os.unlink(s + '/big')
n = 0
try:
    for n in range(200000):
        open(f'{{s}}/f{{n}}', 'w').close()
except OSError as e:
    print('files:', errno.errorcode[e.errno], n)
""")
    assert "big: ENOSPC" in out, out
    assert "files: ENOSPC" in out and int(out.split()[-1]) < 200, out
    # nothing of it on the host: its folder holds only what the host made
    base = kfolder.kernel_runtime_dir() / km.kernel_id
    found = sorted(str(p.relative_to(base)) for p in base.rglob("*"))
    assert found == ["ch", "ch/host.sock", "ch/s", "h", "h/k-1", "h/k-2", "h/k-3", "h/k-4", "h/k-5"], found
    assert before - shutil.disk_usage("/").free < 64 << 20
    # and a restart with a full tmpfs is as quick as any (a new tmpfs: nothing to clean)
    t0 = time.monotonic()
    _restart_and_reconnect(km, kc)
    assert time.monotonic() - t0 < READY


def test_pins_refuse_what_is_not_a_socket(tmp_path):
    """SocketPins alone: a symlink, a FIFO, a folder or a file named like a socket is never pinned."""
    links, socks = tmp_path / "h", tmp_path / "s"
    links.mkdir()
    socks.mkdir()
    target = tmp_path / "target.sock"
    real = socket.socket(socket.AF_UNIX)
    real.bind(str(target))
    os.symlink(target, socks / "k-1")
    os.mkfifo(socks / "k-2")
    (socks / "k-3").mkdir()
    (socks / "k-4").write_text("x")
    good = socket.socket(socket.AF_UNIX)
    good.bind(str(socks / "k-5"))
    good.listen(1)
    pins = kfolder.SocketPins(links, [1, 2, 3, 4, 5])
    fd = os.open(socks, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        assert not pins.pin(fd)
        for port in (1, 2, 3, 4):
            with socket.socket(socket.AF_UNIX) as c, pytest.raises(ConnectionRefusedError):
                c.connect(str(links / f"k-{port}"))
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(links / "k-5"))   # the real one, through the pinned fd
        # the kernel swaps its socket for a symlink after the pin: the pin still holds the socket inode
        os.rename(socks / "k-5", tmp_path / "moved.sock")
        os.symlink(target, socks / "k-5")
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(links / "k-5"))
        real.listen(1)
        real.settimeout(0.2)
        with pytest.raises(TimeoutError):
            real.accept()
    finally:
        os.close(fd)
        pins.close()
        real.close()
        good.close()
    assert not list(links.iterdir())


@pytest.mark.parametrize("config", [{"python": ["/no/such/python"]},
                                    {"image": "localhost/missing:1", "pull_policy": "never"}],
                         ids=["exec-fails", "image-missing"])
def test_a_failed_start_leaves_no_folder_channel_pins_or_container(ksm, kernel_env, kernel_runtime, config):
    from kernel_fixtures import make_spec

    name = make_spec(kernel_env, f"t-fail-{len(config)}-{config.get('pull_policy', 'x')}", **config)
    before = set(os.listdir(kfolder.kernel_runtime_dir())) if kfolder.kernel_runtime_dir().exists() else set()
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    with pytest.raises(Exception) as e:
        km.start_kernel()
    assert "not found" in str(e.value) or "not in the store" in str(e.value), e.value
    # the kernel's folder, its channel socket and its pinned fds are gone (the autouse check counts
    # fds and threads' sockets); kernel_runtime fails the test if a container stayed
    after = set(os.listdir(kfolder.kernel_runtime_dir())) if kfolder.kernel_runtime_dir().exists() else set()
    assert after - before == set(), after - before
    km.cleanup_resources()
