"""A hostile kernel against its host channel (issue #23): every attack refused, the host unchanged.

Two halves. The protocol cases run against a :class:`HostChannel` this test
serves itself (on an event loop of its own thread, whose lag is measured):
nesting bombs, idle and trickling clients, the connection limit, oversized
and garbage lines, a client that never reads, a swap of the socket file for a
symlink, and all of those at once while the loop's lag is measured. The
kernel cases run each attack from inside a real contained kernel (the
session kernel image of ``kernel_fixtures``): the directory/symlink swap race
against ``diff``, snapshots tagged like other images, kernelspecs taken over
or impersonated, ``%%container`` and ``images`` reaching other images. Each
asserts the host is unchanged (store names, what short names resolve to,
kernelspecs, files outside) and that the kernel got a clear refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pytest

from jupyter_contain import errors
from jupyter_contain.kernel import channel
from jupyter_contain.kernel.channel import HostChannel, KernelContext
from jupyter_contain.runtime import ContainerSpec

# --- helpers -------------------------------------------------------------------------------------


def connect(path: Path, *, timeout: float = 30) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def read_answer(s: socket.socket) -> tuple[list[dict], bool]:
    """Lines until a final answer; and whether the host then closed the connection."""
    out, buf = [], b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out, True
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            out.append(json.loads(line))
            if "ok" in out[-1]:
                return out, False


def ask(path: Path, payload: bytes, *, timeout: float = 30) -> dict:
    with connect(path, timeout=timeout) as s:
        s.sendall(payload)
        lines, _ = read_answer(s)
    assert lines, "no answer"
    return lines[-1]


def closed_by_host(s: socket.socket) -> bool:
    """Read until EOF (True) or the socket's timeout (False)."""
    try:
        while s.recv(65536):
            pass
        return True
    except TimeoutError:
        return False


class LagProbe:
    """How late an event loop runs a 10 ms sleep: the server's responsiveness, measured from inside."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lags: list[float] = []
        self._stop = False
        self._fut = asyncio.run_coroutine_threadsafe(self._run(), loop)

    async def _run(self) -> None:
        while not self._stop:
            t0 = self.loop.time()
            await asyncio.sleep(0.01)
            self.lags.append(self.loop.time() - t0 - 0.01)

    def finish(self) -> tuple[float, float, float]:
        """(median, 99th percentile, max) lag in seconds."""
        self._stop = True
        self._fut.result(10)
        return lag_figures(self.lags)


def lag_figures(lags: list[float]) -> tuple[float, float, float]:
    assert len(lags) > 100
    lags = sorted(lags)
    return statistics.median(lags), lags[int(len(lags) * 0.99)], lags[-1]


def assert_responsive(p99: float, worst: float) -> None:
    # A diff on the loop would stall it for the walk of the whole layer (the 10,000 and 20,000 file
    # layers here: 100-300 ms, at every diff) and show in the 99th percentile. A single late wake-up
    # is this machine's (2 shared cores, other agents' test runs): the worst is bounded loosely.
    assert p99 < 0.1 and worst < 1.0, (p99, worst)


def fill(upper: Path, n: int, *, name_len: int = 20) -> None:
    """``n`` new files in a writable layer (hard links of one: a walk meets each name all the same)."""
    first = upper / "first"
    first.write_bytes(b"x")
    for i in range(n):
        d = upper / "data" / f"d{i // 1000:03}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        os.link(first, d / (f"{i:06}-" + "x" * name_len))


# --- a channel served by the test ----------------------------------------------------------------


@pytest.fixture
def served(runtime):
    """A HostChannel for a (created, not started) busybox container, on its own loop, with short timeouts."""
    folder = Path(tempfile.mkdtemp(prefix="jc-hc-", dir="/tmp"))   # short: unix socket paths are limited
    c = runtime.create(ContainerSpec(image="busybox:test", command=("true",),
                                     labels={"jupyter-contain.kernel-id": "k-hostile"}))
    ctx = KernelContext(kernel_id="k-hostile", runtime=runtime, container=lambda: c)
    ch = HostChannel(ctx, channel.socket_path(folder))
    ch.idle_timeout = 1.0
    ch.write_timeout = 1.0
    ch.start_thread()
    try:
        yield ch
    finally:
        ch.close()
        shutil.rmtree(folder, ignore_errors=True)
        c.remove(force=True)


def _tasks(ch: HostChannel) -> int:
    return len(ch._tasks)


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_deep_nesting_is_a_clean_refusal(served, caplog):
    caplog.set_level(logging.DEBUG)
    for payload in (b"[" * 60000, b'{"op": "stats", "x": ' + b"[" * 30000, b'{"a":' * 12000,
                    b'{"op": "diff", "limit": [[[[[1]]]]]}'):
        r = ask(served.path, payload + b"\n")
        assert r == {"ok": False, "error": f"malformed request: nested deeper than {channel.MAX_DEPTH} levels"}, r
    # brackets inside strings are text, not nesting: refused for the image, not the shape
    r = ask(served.path, json.dumps({"op": "run_cell", "code": "[" * 5000, "image": "nope:1"}).encode() + b"\n")
    assert "nested" not in r["error"] and "not one this kernel may use" in r["error"], r
    # a snapshot message is shown on the host: no terminal escapes in it
    r = ask(served.path, json.dumps({"op": "snapshot", "tag": "x:1", "message": "hi\x1b]0;owned\x07"}).encode() + b"\n")
    assert "control characters" in r["error"], r
    assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert ask(served.path, b'{"op": "ps"}\n')["ok"]


def test_oversized_and_garbage_lines(served):
    with connect(served.path) as s:
        s.sendall(b'{"op": "ps", "x": "' + b"a" * (channel.MAX_LINE + 10) + b'"}\n')
        lines, _ = read_answer(s)
        assert lines[-1]["ok"] is False and "too long" in lines[-1]["error"]
        assert closed_by_host(s)
    for junk in (b"\xff\xfe\x00\n", b"\n", b"null\n", b'"op"\n', b"1e999999\n", b'{"op": "ps", "op": 5}\n'):
        r = ask(served.path, junk)
        assert r["ok"] is False and ("malformed" in r["error"] or "unknown request" in r["error"]), (junk, r)
    assert ask(served.path, b'{"op": "ps"}\n')["ok"]


def test_idle_and_trickling_clients_are_dropped(served):
    # silent: dropped after the idle timeout, with a reason
    with connect(served.path, timeout=10) as s:
        t0 = time.monotonic()
        lines, closed = read_answer(s)
        took = time.monotonic() - t0
        assert lines[-1]["ok"] is False and "no complete request in 1 s" in lines[-1]["error"]
        assert 0.8 < took < 5 and closed_by_host(s)
    # a request that never gets its newline: the same, however slowly it trickles
    with connect(served.path, timeout=10) as s:
        s.sendall(b'{"op": "ps"')
        t0 = time.monotonic()
        stop = threading.Event()

        def trickle() -> None:
            with contextlib.suppress(OSError):
                while not stop.wait(0.1):
                    s.send(b" ")
        t = threading.Thread(target=trickle)
        t.start()
        try:
            lines, _ = read_answer(s)
        finally:
            stop.set()
            t.join()
        assert "no complete request" in lines[-1]["error"] and time.monotonic() - t0 < 5
    assert wait_for(lambda: _tasks(served) == 0, 5)


def test_idle_connections_block_neither_others_nor_this_kernel_for_long(served, runtime):
    idle = [connect(served.path, timeout=10) for _ in range(channel.MAX_CONNECTIONS)]
    other = None
    folder = Path(tempfile.mkdtemp(prefix="jc-hc2-", dir="/tmp"))
    try:
        assert wait_for(lambda: _tasks(served) == channel.MAX_CONNECTIONS, 5)
        # one more: refused at once, clearly
        with connect(served.path, timeout=5) as s:   # answered before it asks anything
            lines, _ = read_answer(s)
            assert closed_by_host(s)
        assert lines == [{"ok": False, "error": f"too many connections (at most {channel.MAX_CONNECTIONS})"}]
        # another kernel's channel in the same server answers meanwhile
        c = served.ctx.container()
        other = HostChannel(KernelContext(kernel_id="k-other", runtime=runtime, container=lambda: c),
                            channel.socket_path(folder))
        other.start_thread()
        assert ask(other.path, b'{"op": "ps"}\n', timeout=5)["ok"]
        # the idle ones are dropped after the timeout, and this kernel is served again
        for s in idle:
            lines, _ = read_answer(s)
            assert "no complete request" in lines[-1]["error"]
        assert ask(served.path, b'{"op": "ps"}\n', timeout=5)["ok"]
    finally:
        for s in idle:
            s.close()
        if other is not None:
            other.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_client_that_never_reads_is_dropped(served):
    fill(served.ctx.container().upper, 3000, name_len=100)
    req = json.dumps({"op": "diff", "limit": 1000}).encode() + b"\n"
    s = connect(served.path)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(req * 40)     # answers of ~130 KB each, and nobody reads them
        assert wait_for(lambda: _tasks(served) == 1, 5)
        # the host gives up writing after its write timeout and closes the connection
        assert wait_for(lambda: _tasks(served) == 0, 30)
    finally:
        s.close()
    assert ask(served.path, b'{"op": "ps"}\n')["ok"]


def test_socket_file_swapped_for_a_symlink_is_not_followed(runtime, monkeypatch):
    """Between the bind and the chmod/chown of host.sock the kernel swaps in a symlink to a host file."""
    folder = Path(tempfile.mkdtemp(prefix="jc-hc3-", dir="/tmp"))
    canary = Path(tempfile.mkdtemp(prefix="jc-canary-", dir="/tmp")) / "canary"
    canary.write_text("host file")
    os.chmod(canary, 0o644)
    before = canary.stat()
    os.chown(folder, 12345, 12345)   # a kernel folder of a mapped user: the host would chown the socket
    real = asyncio.start_unix_server

    async def swapping(*a, **kw):
        server = await real(*a, **kw)
        path = Path(kw["path"])
        os.rename(path, path.with_name("bound"))
        os.symlink(canary, path)
        return server

    monkeypatch.setattr(asyncio, "start_unix_server", swapping)
    ch = HostChannel(KernelContext(kernel_id="k-swap", runtime=runtime, container=lambda: None),
                     channel.socket_path(folder))
    try:
        with pytest.raises(OSError, match="not a socket|symbolic"):
            ch.start_thread()
    finally:
        ch.close()
    after = canary.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    assert canary.read_text() == "host file"
    shutil.rmtree(folder)
    shutil.rmtree(canary.parent)


def test_the_event_loop_stays_responsive_under_a_hammering(served, capsys):
    """Every hostile pattern at once, for a few seconds; the loop serving the channel never stalls."""
    fill(served.ctx.container().upper, 10000)
    probe = LagProbe(served._loop)
    stop = threading.Event()
    answers: dict[str, int] = {}
    lock = threading.Lock()

    def count(key: str) -> None:
        with lock:
            answers[key] = answers.get(key, 0) + 1

    def loop(fn):
        def run() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError, ValueError):
                    fn()
        return run

    def bomb() -> None:
        count(ask(served.path, b"[" * 60000 + b"\n", timeout=10)["error"][:20])

    def big() -> None:
        count(ask(served.path, b'"' + b"a" * (channel.MAX_LINE + 100) + b'\n', timeout=10)["error"][:20])

    def idler() -> None:
        with connect(served.path, timeout=10) as s:
            closed_by_host(s)
            count("idle dropped")

    def differ() -> None:
        r = ask(served.path, b'{"op": "diff", "limit": 1000}\n', timeout=60)
        count("diff ok" if r["ok"] else r["error"][:30])

    def chatter() -> None:
        with connect(served.path, timeout=10) as s:
            s.sendall(b'{"op": "images"}\n{"op": "ps"}\n{"op": "nope"}\n' * 5)
            for _ in range(15):
                read_answer(s)
            count("chatter")

    workers = [loop(f) for f in (bomb, big, differ, differ, chatter, *[idler] * 4)]
    threads = [threading.Thread(target=w) for w in workers]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(60)
    took = time.monotonic() - t0
    median, p99, worst = probe.finish()
    with capsys.disabled():
        print(f"\nloop lag under the hammering ({took:.1f} s): median {median * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms; answers {answers}")
    assert answers.get("diff ok", 0) >= 1 and answers.get("malformed request: n", 0) >= 5
    assert answers.get("request too long (at", 0) >= 5 and answers.get("chatter", 0) >= 1
    assert answers.get("a diff of this kernel is alrea", 0) >= 1   # one walk at a time per kernel
    assert_responsive(p99, worst)
    assert wait_for(lambda: _tasks(served) == 0, 10)
    assert ask(served.path, b'{"op": "ps"}\n')["ok"]


# --- attacks from inside a real kernel -------------------------------------------------------------

from kernel_fixtures import *  # noqa: E402,F401,F403 - the session kernel image and kernelspecs
from kernel_fixtures import IMAGE, KERNEL_NAME, make_spec, run_cell  # noqa: E402
from test_rootless import HERE, subid_user  # noqa: E402,F401 - the rootless user fixture

READY = 120


class Kernel:
    def __init__(self, ksm, name: str = KERNEL_NAME) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(READY)
        except BaseException:
            self.close()
            raise

    def run(self, code: str, *, timeout: float = 120) -> dict:
        r = run_cell(self.kc, code, timeout=timeout)
        assert r["reply"]["content"]["status"] == "ok", (r["error"], r["stdout"], r["stderr"])
        return r

    def ask(self, op: str, **fields) -> dict:
        """``request(op, **fields)`` from inside the kernel: the answer, or {"refused": message}."""
        code = ("import json\nfrom jupyter_contain_guest.channel import request, HostError\n"
                f"try:\n    a = request({op!r}, _timeout=120, **json.loads({json.dumps(json.dumps(fields))}))\n"
                "except HostError as e:\n    a = {'refused': str(e)}\n"
                "print('ANSWER' + json.dumps(a))\n")
        out = self.run(code)["stdout"]
        return json.loads(out.split("ANSWER", 1)[1])

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def kernel(ksm, kernel_env, kernel_runtime):
    k = Kernel(ksm)
    yield k
    k.close()


def host_view(kernel_env, ksm) -> dict:
    """What the host shows: image names, what short names resolve to, kernelspecs (with file hashes)."""
    store = kernel_env.store
    resolved = {}
    for short in ("debian", "debian:bookworm", "debian:latest", "python:3.12-slim", "busybox"):
        try:
            rec = store.resolve(short)
            resolved[short] = (rec.name, rec.digest)
        except errors.ImageNotFound:
            resolved[short] = None
    specs = {}
    for name, d in ksm.find_kernel_specs().items():
        f = Path(d) / "kernel.json"
        if f.exists():   # (jupyter_client also lists the native ipykernel spec, without a file)
            specs[name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return {"images": sorted(r.name for r in store.images()), "resolved": resolved, "kernelspecs": specs}


def _remove_snapshots(store) -> None:
    for rec in store.images():
        if rec.name.startswith("localhost/kernel-snapshot/"):
            with contextlib.suppress(errors.ContainError):
                store.untag(rec.name)


SWAP = r'''
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("/w/d", exist_ok=True)
for i in range(40):
    open("/w/d/mine-%d" % i, "w").write("m")
if not os.path.islink("/w/l"):
    os.symlink(SECRET_DIR, "/w/l")
stop = threading.Event()
swaps = [0]
def swapper():
    fd = os.open("/w", os.O_RDONLY | os.O_DIRECTORY)
    while not stop.is_set():
        if libc.renameat2(fd, b"d", fd, b"l", 2) == 0:   # RENAME_EXCHANGE
            swaps[0] += 1
    os.close(fd)
t = threading.Thread(target=swapper, daemon=True)
t.start()
'''


@pytest.mark.slow
def test_diff_race_from_inside_the_kernel_sees_no_host_file(kernel, tmp_path):
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    for i in range(30):
        (secret / f"SECRET-{i}").write_bytes(b"s" * (4096 + i))
    kernel.run(SWAP.replace("SECRET_DIR", repr(str(secret))))
    r = kernel.run(
        "import json, time\nfrom jupyter_contain_guest.channel import request\n"
        "paths = set(); n = 0; t0 = time.time()\n"
        "while time.time() - t0 < 3 or n < 5:\n"
        "    a = request('diff', limit=1000, _timeout=60); n += 1\n"
        "    paths.update(c['path'] for c in a['changes'])\n"
        "stop.set(); t.join()\n"
        "print(json.dumps({'n': n, 'swaps': swaps[0], 'paths': sorted(paths)}))\n")
    got = json.loads(r["stdout"].strip().splitlines()[-1])
    assert got["n"] >= 5 and got["swaps"] > 100, got
    assert not [p for p in got["paths"] if "SECRET" in p], got["paths"][:20]
    assert any("mine-" in p for p in got["paths"])


@pytest.mark.slow
def test_snapshots_cannot_take_over_image_names(kernel, kernel_env, ksm):
    store = kernel_env.store
    before = host_view(kernel_env, ksm)
    try:
        made = {}
        for tag in ("debian:bookworm", "debian:latest", "python:3.12-slim", "debian"):
            a = kernel.ask("snapshot", tag=tag)
            assert a.get("ok"), a
            made[tag] = a["name"]
        assert made == {"debian:bookworm": "localhost/kernel-snapshot/debian:bookworm",
                        "debian:latest": "localhost/kernel-snapshot/debian:latest",
                        "python:3.12-slim": "localhost/kernel-snapshot/python:3.12-slim",
                        "debian": "localhost/kernel-snapshot/debian:latest"}
        after = host_view(kernel_env, ksm)
        # short names resolve as before (`jupyter contain run debian`, a kernelspec for python:3.12-slim)
        assert after["resolved"] == before["resolved"] and after["kernelspecs"] == before["kernelspecs"]
        assert set(after["images"]) - set(before["images"]) == set(made.values())
        # a tag in the namespace that this kernel did not make (another kernel's, the user's) stays
        base = store.resolve(IMAGE)
        store.tag("localhost/kernel-snapshot/taken:1", base.descriptor)
        a = kernel.ask("snapshot", tag="taken:1")
        assert "already exists and was not made by this kernel" in a["refused"], a
        assert store.resolve("localhost/kernel-snapshot/taken:1").digest == base.digest
        # a tag a kernelspec starts from, even with its image removed, is never re-made from inside
        spec_dir = kernel_env.kernels_dir / "snapshot-gone-v1"
        spec_dir.mkdir()
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": ["true"], "display_name": "gone", "language": "python",
            "metadata": {"kernel_provisioner": {"provisioner_name": "jupyter-contain",
                                                "config": {"image": "localhost/kernel-snapshot/gone:v1"}}}}))
        try:
            a = kernel.ask("snapshot", tag="gone:v1")
            assert "kernelspec snapshot-gone-v1 starts from" in a["refused"], a
            assert "localhost/kernel-snapshot/gone:v1" not in {r.name for r in store.images()}
        finally:
            shutil.rmtree(spec_dir)
        # registries, digests, paths: refused as before
        for tag, why in (("docker.io/library/debian:latest", "no registry"), ("localhost/debian:x", "no registry"),
                         ("../../etc:x", "invalid tag")):
            assert why in kernel.ask("snapshot", tag=tag)["refused"]
    finally:
        _remove_snapshots(store)
    assert host_view(kernel_env, ksm) == before


@pytest.mark.slow
def test_install_kernelspec_only_creates_and_always_says_snapshot(kernel, kernel_env, ksm):
    store = kernel_env.store
    before = host_view(kernel_env, ksm)
    made = []
    try:
        assert kernel.ask("snapshot", tag="mine:v1").get("ok")
        # a tile that would pass for the normal kernel: the suffix is not the kernel's to choose
        a = kernel.ask("install_kernelspec", image="localhost/kernel-snapshot/mine:v1",
                       display_name="Python 3 (ipykernel)")
        assert a.get("ok"), a
        made.append(a["kernel_name"])
        assert a["kernel_name"] == "snapshot-mine-v1"
        assert a["display_name"] == "Python 3 (ipykernel) (snapshot of Contained Python (debian))"
        spec_file = kernel_env.kernels_dir / "snapshot-mine-v1" / "kernel.json"
        spec = json.loads(spec_file.read_text())
        assert spec["display_name"] == a["display_name"]
        assert spec["metadata"]["kernel_provisioner"]["config"]["image"] == "localhost/kernel-snapshot/mine:v1"
        digest = hashlib.sha256(spec_file.read_bytes()).hexdigest()
        # never again over an existing one (not even its own)
        a = kernel.ask("install_kernelspec", image="mine:v1", display_name="Other")
        assert "exists already" in a["refused"], a
        assert hashlib.sha256(spec_file.read_bytes()).hexdigest() == digest
        # the user's kernelspec of that name, for another image: untouched
        user_spec = kernel_env.kernels_dir / "snapshot-other-v1"
        make_spec(kernel_env, "snapshot-other-v1")
        made.append("snapshot-other-v1")
        user_digest = hashlib.sha256((user_spec / "kernel.json").read_bytes()).hexdigest()
        assert kernel.ask("snapshot", tag="other:v1").get("ok")
        a = kernel.ask("install_kernelspec", image="other:v1")
        assert "exists already" in a["refused"], a
        assert hashlib.sha256((user_spec / "kernel.json").read_bytes()).hexdigest() == user_digest
        # only images this kernel made
        for image in ("debian:bookworm", IMAGE, "localhost/kernel-snapshot/nope:1", "/etc/passwd"):
            a = kernel.ask("install_kernelspec", image=image)
            assert "refused" in a, (image, a)
        # control characters, over-long names: refused
        for display in ("x\nInjected", "x" * 500, ""):
            assert "refused" in kernel.ask("install_kernelspec", image="mine:v1", display_name=display)
        after = host_view(kernel_env, ksm)
        assert set(after["kernelspecs"]) - set(before["kernelspecs"]) == {"snapshot-mine-v1", "snapshot-other-v1"}
        assert {k: v for k, v in after["kernelspecs"].items() if k in before["kernelspecs"]} == before["kernelspecs"]
    finally:
        for name in made:
            shutil.rmtree(kernel_env.kernels_dir / name, ignore_errors=True)
        _remove_snapshots(store)
    assert host_view(kernel_env, ksm) == before


@pytest.mark.slow
def test_run_cell_and_images_see_only_what_the_policy_allows(ksm, kernel_env, kernel_runtime):
    store = kernel_env.store
    base = store.resolve(IMAGE)
    store.tag("localhost/private:1", base.descriptor)   # an unrelated image of the store
    name = None
    try:
        k = Kernel(ksm)
        try:
            a = k.ask("images")
            assert a["images"] == ["localhost/debian:bookworm"], a
            refused = k.ask("run_cell", code="print(1)", image="private:1")["refused"]
            assert "'private:1' is not one this kernel may use" in refused
            assert "this kernel's own image and its snapshots" in refused
            # the same answer for an image that does not exist: no oracle for the store's content
            missing = k.ask("run_cell", code="print(1)", image="absent:1")["refused"]
            assert missing.replace("absent:1", "private:1") == refused
            for text in ("localhost/private:1", base.digest, base.id.removeprefix("sha256:")[:12] + "x"):
                assert "refused" in k.ask("run_cell", code="print(1)", image=text)
            # its own image, by the name it knows
            a = k.ask("run_cell", code="print(6 * 7)", image="debian:bookworm")
            assert a.get("ok") and a["exit"]["code"] == 0, a
            # its own snapshots too, by their short tag
            assert k.ask("snapshot", tag="cellsnap:1").get("ok")
            assert k.ask("images")["images"] == ["localhost/debian:bookworm", "localhost/kernel-snapshot/cellsnap:1"]
            assert k.ask("run_cell", code="print(1)", image="cellsnap:1").get("ok")
        finally:
            k.close()
        # a kernelspec's allowed_images widens it
        name = make_spec(kernel_env, "t-hostile-allowed", allowed_images=["localhost/private:*"])
        k = Kernel(ksm, name)
        try:
            assert "localhost/private:1" in k.ask("images")["images"]
            a = k.ask("run_cell", code="print(1)", image="private:1")
            assert a.get("ok") and a["exit"]["code"] == 0, a
            assert "refused" in k.ask("run_cell", code="print(1)", image="absent:1")
        finally:
            k.close()
    finally:
        if name:
            shutil.rmtree(kernel_env.kernels_dir / name, ignore_errors=True)
        store.untag("localhost/private:1")
        _remove_snapshots(store)


def test_a_bad_allowed_images_option_is_a_clear_error():
    from jupyter_contain.kernel.containers import KernelOptions

    assert KernelOptions.from_config({"allowed_images": ["python:*", "debian"]}).allowed_images == ("python:*",
                                                                                                      "debian")
    for bad, why in ((5, "a list of image names"), (["a b"], "not an image name"), (["UPPER:1"], "lowercase"),
                     ([""], "not an image name")):
        with pytest.raises(errors.InvalidSpec, match=f"option allowed_images: .*{why}"):
            KernelOptions.from_config({"allowed_images": bad})


@pytest.mark.slow
def test_hostile_requests_from_inside_do_not_stall_the_server(ksm, kernel_env, kernel_runtime, capsys):
    """The channel on the server's own event loop (an async kernel manager); the kernel hammers it."""
    from jupyter_client.manager import AsyncKernelManager

    hammer = r'''
import json, os, socket, threading, time
from jupyter_contain_guest.channel import socket_path, request
os.makedirs("/big", exist_ok=True)
for i in range(20000):
    open("/big/f%05d" % i, "w").close()
path = socket_path()
out = {"deep": 0, "long": 0, "refused_conn": 0, "diffs": 0}
def conn():
    s = socket.socket(socket.AF_UNIX); s.settimeout(60); s.connect(path); return s
def answer(s):
    buf = b""
    while b"\n" not in buf:
        c = s.recv(65536)
        if not c: return None
        buf += c
    return json.loads(buf.split(b"\n")[0])
idle = [conn() for _ in range(8)]
time.sleep(0.5)
s = conn(); a = answer(s); s.close()
out["refused_conn"] = int("too many connections" in a["error"])
for s in idle: s.close()
time.sleep(0.5)
t0 = time.time()
def diffs():
    while time.time() - t0 < 4:
        request("diff", limit=1000, _timeout=60); out["diffs"] += 1
th = threading.Thread(target=diffs); th.start()
while time.time() - t0 < 4:
    s = conn(); s.sendall(b"[" * 60000 + b"\n"); a = answer(s); s.close()
    out["deep"] += "nested deeper" in a["error"]
    s = conn(); s.sendall(b"x" * 70000 + b"\n"); a = answer(s); s.close()
    out["long"] += "too long" in a["error"]
th.join()
print("RESULT" + json.dumps(out))
'''

    async def main() -> tuple[dict, float, float]:
        km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(READY)
            assert km.provisioner._channel._thread is None   # on this loop
            lags: list[float] = []
            done = False

            async def probe() -> None:
                loop = asyncio.get_running_loop()
                while not done:
                    t0 = loop.time()
                    await asyncio.sleep(0.01)
                    lags.append(loop.time() - t0 - 0.01)
            out = {"stdout": ""}

            def hook(msg: dict) -> None:
                if msg["msg_type"] == "stream":
                    out["stdout"] += msg["content"]["text"]
            task = asyncio.ensure_future(probe())
            await kc.execute_interactive(hammer, timeout=120, output_hook=hook)
            done = True
            await task
            result = json.loads(out["stdout"].split("RESULT", 1)[1])
            return result, lags
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    result, lags = asyncio.run(main())
    median, p99, worst = lag_figures(lags)
    with capsys.disabled():
        print(f"\nserver loop lag while a kernel hammers its channel: median {median * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms; top {[round(x * 1000) for x in sorted(lags)[-5:]]}"
              f" ms; {result}")
    assert result["refused_conn"] == 1 and result["deep"] >= 3 and result["long"] >= 3 and result["diffs"] >= 1
    assert_responsive(p99, worst)


ROOTLESS_ATTACKS = r"""
import json, time
from jupyter_contain_guest.channel import request, HostError
def ask(op, **kw):
    try:
        return request(op, _timeout=120, **kw)
    except HostError as e:
        return {"refused": str(e)}
paths = set(); n = 0; t0 = time.time()
while time.time() - t0 < 2 or n < 3:
    a = ask("diff", limit=1000); n += 1
    paths.update(c["path"] for c in a.get("changes", []))
stop.set(); t.join()
out = {"leaked": sorted(p for p in paths if "SECRET" in p), "mine": any("mine-" in p for p in paths),
       "n": n, "swaps": swaps[0]}
out["snap"] = ask("snapshot", tag="debian:rootless")
out["images"] = ask("images")
out["cell"] = ask("run_cell", code="print(1)", image="busybox:latest")
out["spec"] = ask("install_kernelspec", image="debian:rootless", display_name="Python 3 (ipykernel)")
out["again"] = ask("install_kernelspec", image="debian:rootless")
out["deep"] = ask("stats", x=[[[[[[1]]]]]])
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_a_rootless_servers_kernel_gets_the_same_refusals(subid_user):
    """The same attacks from a kernel of a server that is not root (its own store, its own ids)."""
    import subprocess

    from jupyter_contain.runtime.images import bootstrap

    secret = subid_user.home / "secret"   # what the server's user may read, the kernel may not
    secret.mkdir(mode=0o700)
    for i in range(20):
        (secret / f"SECRET-{i}").write_text("s")
    for p in (secret, *secret.iterdir()):
        os.chown(p, subid_user.uid, subid_user.gid)
    code = SWAP.replace("SECRET_DIR", repr(str(secret))) + ROOTLESS_ATTACKS
    req = {"image_tar": str(bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL)),
           "config": dict(bootstrap.DEBIAN_KERNEL.config), "code": code}
    res = subprocess.run(subid_user.argv(subid_user.path(HERE / "rootless_kernel_driver.py"), json.dumps(req)),
                         env=subid_user.env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    driver = json.loads(res.stdout.strip().splitlines()[-1])
    assert driver["error"] is None and driver["left"] == 0, driver
    out = json.loads(driver["stdout"].split("RESULT", 1)[1])
    assert out["leaked"] == [] and out["mine"] and out["n"] >= 3 and out["swaps"] > 100, out
    assert out["snap"]["name"] == "localhost/kernel-snapshot/debian:rootless", out
    assert out["images"]["images"] == ["localhost/debian:rootless", "localhost/kernel-snapshot/debian:rootless"]
    assert "is not one this kernel may use" in out["cell"]["refused"]
    assert out["spec"]["display_name"] == "Python 3 (ipykernel) (snapshot of Contained Python (debian:rootless))"
    assert "exists already" in out["again"]["refused"]
    assert "nested deeper" in out["deep"]["refused"]
