"""Real builds: Containerfiles built into a real store, RUN steps in real containers."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import stat
import tarfile
import threading
from pathlib import Path

import pytest

from jupyter_contain.errors import BuildError, BuildStepFailed
from jupyter_contain.runtime.build.builder import BuildOptions, Reporter, build
from jupyter_contain.runtime.build.context import ImageTree
from jupyter_contain.runtime.containers.container import Runtime
from jupyter_contain.runtime.images import archive
from jupyter_contain.runtime.images.store import Store


@pytest.fixture(scope="module")
def bstore(tmp_path_factory, busybox_tar) -> Store:
    s = Store(tmp_path_factory.mktemp("build-store"))
    archive.import_rootfs(s, busybox_tar, "busybox:test", cmd=["/bin/sh"])
    return s


@pytest.fixture
def rt(bstore):
    r = Runtime(bstore)
    before = {c.id for c in r.containers()}
    yield r
    left = [c for c in r.containers() if c.id not in before]
    for c in left:
        c.remove(force=True)
    assert not left, "a build left containers behind"


class Log(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.out = b""
        self.hits = 0
        self.misses = 0

    def step(self, n, total, stage, text):
        self.lines.append(f"STEP {n}/{total}: {text}")

    def done(self, *, cached, seconds, layer):
        if cached:
            self.hits += 1
        else:
            self.misses += 1

    def output(self, data):
        self.out += data


class CountingRuntime(Runtime):
    """The real runtime, counting the containers a build creates."""

    created = 0

    def create(self, spec, *, image=None):
        CountingRuntime.created += 1
        return super().create(spec, image=image)


def _ctx(tmp_path: Path, containerfile: str, files: dict[str, bytes | str] | None = None) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir(parents=True)
    (ctx / "Containerfile").write_text(containerfile)
    for name, data in (files or {}).items():
        p = ctx / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return ctx


def _tree(store: Store, name: str) -> tuple[ImageTree, dict]:
    rec = store.resolve(name)
    return ImageTree(store.ensure_unpacked(rec)), dict(rec.config.raw)


def _read(tree: ImageTree, rel: str) -> bytes:
    w = tree.where(tree.resolve(rel))
    assert w is not None, rel
    return Path(w[0]).read_bytes()


MULTI = """\
# syntax=docker/dockerfile:1
ARG BASE=busybox:test
FROM ${BASE} AS builder
ARG WHO=world
ENV GREETING="hello ${WHO}" APP=/app
WORKDIR $APP
COPY --chown=1000:1001 --chmod=0640 data.txt sub ./
RUN echo "$GREETING from $(id -u)" > /app/made && rm /bin/ls && rm -r /etc/mydir 2>/dev/null; \\
    test ! -e /bin/ls
RUN <<EOF
echo "heredoc $APP" > /app/hd
EOF
FROM busybox:test
LABEL org.example.name="multi stage" version=1
EXPOSE 8080 53/udp
COPY --from=builder /app /srv/
USER 1000:1001
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat /srv/made"]
"""


def test_multistage_build_with_args_env_whiteouts_and_chown(rt, bstore, tmp_path):
    ctx = _ctx(tmp_path, MULTI, {"data.txt": "data\n", "sub/inner": "inner\n"})
    log = Log()
    res = build(rt, BuildOptions(context=ctx, tags=("multi:1",), build_args={"WHO": "tests"}), reporter=log)
    assert res.names == ("localhost/multi:1",)
    assert log.lines[0] == "STEP 1/14: FROM ${BASE} AS builder"
    tree, cfg = _tree(bstore, "multi:1")
    assert _read(tree, "srv/made") == b"hello tests from 0\n"
    assert _read(tree, "srv/hd") == b"heredoc /app\n"
    st = tree.lstat("srv/data.txt")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o640)
    assert _read(tree, "srv/inner") == b"inner\n"     # a folder source copies its contents
    c = cfg["config"]
    assert c["User"] == "1000:1001"
    assert c["Entrypoint"] == ["/bin/sh", "-c"] and c["Cmd"] == ["cat /srv/made"]
    assert c["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert c["Labels"]["org.example.name"] == "multi stage"
    assert c["Labels"]["io.jupyter-contain.build.args"] == json.dumps({"WHO": "tests"})
    assert c["Labels"]["io.jupyter-contain.build.containerfile.digest"] == \
        "sha256:" + hashlib.sha256(MULTI.encode()).hexdigest()
    assert not any(e.startswith("GREETING=") for e in c["Env"])   # the builder stage's ENV stays there
    # the builder stage: the RUN's deletion is a whiteout over the base's /bin/ls
    b_tree = ImageTree(bstore.ensure_unpacked(bstore.resolve("busybox:test")))
    assert b_tree.lstat("bin/ls") is not None
    hist = [h["created_by"] for h in cfg["history"]]
    assert hist[-1] == 'CMD ["cat /srv/made"]'
    # the image runs: its entrypoint, user and files
    from jupyter_contain.runtime.containers.container import ContainerSpec
    r, w = os.pipe()
    try:
        info = rt.run(ContainerSpec(image="multi:1"), stdio=(0, w, w), remove=True)
        os.close(w)
        w = -1
        assert info.code == 0
        assert os.read(r, 1000) == b"hello tests from 0\n"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_run_deleting_base_files_makes_whiteouts(rt, bstore, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:test\nRUN rm /bin/ls && mkdir -p /opt/x && rm -r /opt\n")
    build(rt, BuildOptions(context=ctx, tags=("wh:1",)))
    tree, cfg = _tree(bstore, "wh:1")
    assert tree.lstat("bin/ls") is None
    assert tree.lstat("bin/sh") is not None
    top = Path(bstore.layer_dir(cfg["rootfs"]["diff_ids"][-1]))
    wh = os.lstat(top / "bin" / "ls")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0   # overlay whiteout in the unpacked layer
    rec = bstore.resolve("wh:1")
    with bstore.open_blob(rec.manifest.layers[-1].digest) as f, tarfile.open(fileobj=f) as t:
        assert "bin/.wh.ls" in t.getnames()
        assert not any(n.startswith("opt") for n in t.getnames())


def test_cache_hit_miss_after_a_change_and_no_cache(bstore, tmp_path):
    cf = ("FROM busybox:test\nENV A=1\nCOPY one.txt /one\nRUN echo ran > /ran\nCOPY two.txt /two\n"
          "RUN cat /one /two > /both\nCMD [\"sh\"]\n")
    ctx = _ctx(tmp_path, cf, {"one.txt": "1\n", "two.txt": "2\n"})
    rt = CountingRuntime(bstore)
    first = build(rt, BuildOptions(context=ctx, tags=("cache:1",)))
    assert CountingRuntime.created == 2
    # nothing changed: every step from the cache, no container, same image
    CountingRuntime.created = 0
    log = Log()
    again = build(rt, BuildOptions(context=ctx, tags=("cache:1",)), reporter=log)
    assert CountingRuntime.created == 0
    assert (log.hits, again.cached) == (6, 6)
    assert again.image_id == first.image_id
    assert again.seconds < 1.0
    # one copied file changed: its step and those after it run, those before stay cached
    (ctx / "two.txt").write_text("changed\n")
    log = Log()
    third = build(rt, BuildOptions(context=ctx, tags=("cache:1",)), reporter=log)
    assert CountingRuntime.created == 1 and log.hits == 3 and log.misses == 1 + 3
    tree, _ = _tree(bstore, "cache:1")
    assert _read(tree, "both") == b"1\nchanged\n"
    assert third.image_id != first.image_id
    # --no-cache: everything runs again
    CountingRuntime.created = 0
    log = Log()
    build(rt, BuildOptions(context=ctx, tags=("cache:1",), no_cache=True), reporter=log)
    assert CountingRuntime.created == 2 and log.hits == 0
    for c in rt.containers():
        pytest.fail(f"container {c.id} left behind")


def test_same_inputs_give_the_same_diffids(rt, bstore, tmp_path):
    cf = "FROM busybox:test\nWORKDIR /w\nCOPY . /w/\nCOPY --chmod=0700 a /b\n"
    ctx = _ctx(tmp_path, cf, {"a": "a\n", "d/e": "e\n"})
    os.utime(ctx / "a", (1_700_000_000, 1_700_000_000))
    one = build(rt, BuildOptions(context=ctx, tags=("det:1",), no_cache=True))
    two = build(rt, BuildOptions(context=ctx, tags=("det:2",), no_cache=True))
    assert one.record.config.diff_ids == two.record.config.diff_ids
    assert one.record.manifest.layers == two.record.manifest.layers


def test_failing_run_leaves_no_tag_container_or_cache_entry(rt, bstore, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:test\nRUN echo about to fail && echo oops >&2 && exit 7\n")
    cache_dir = bstore.root / "build-cache"
    before = set(os.listdir(cache_dir)) if cache_dir.exists() else set()
    log = Log()
    with pytest.raises(BuildStepFailed) as ei:
        build(rt, BuildOptions(context=ctx, tags=("fails:1",)), reporter=log)
    e = ei.value
    assert e.code == 7 and e.line == 2 and e.instruction == "RUN"
    assert "about to fail" in e.output and "oops" in e.output
    assert b"about to fail" in log.out            # live output came through as it ran
    assert "returned a non-zero code: 7" in str(e)
    assert not any(r.name.endswith("/fails:1") for r in bstore.images())
    after = set(os.listdir(cache_dir)) if cache_dir.exists() else set()
    assert after == before   # FROM makes no entry; the failed RUN must not either
    assert not list(bstore.tmp_dir.glob("build-*"))


def test_syntax_error_fails_before_anything_runs(bstore, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:test\nRUN echo never\nCOPY --nope a b\n")
    rt = CountingRuntime(bstore)
    CountingRuntime.created = 0
    with pytest.raises(BuildError, match=r"Containerfile:3: COPY: unknown flag: --nope"):
        build(rt, BuildOptions(context=ctx, tags=("syntax:1",)))
    assert CountingRuntime.created == 0


@pytest.mark.parametrize("cf,files,message", [
    ("COPY ../outside /x\n", {}, "outside the build context"),
    ("COPY link /x\n", {"@link": "/etc/passwd"}, "leads outside the build context"),
    ("COPY rel /x\n", {"@rel": "../../../../../etc/passwd"}, "leads outside the build context"),
    ("COPY secret.txt /x\n", {"secret.txt": "s", ".dockerignore": "secret.txt\n"}, "excluded by .dockerignore"),
    ("COPY missing /x\n", {}, "not found"),
    ("COPY a b /x\n", {"a": "1", "b": "2"}, "must be a directory"),
])
def test_copy_refuses_bad_sources(rt, bstore, tmp_path, cf, files, message):
    ctx = _ctx(tmp_path, "FROM busybox:test\n" + cf)
    for name, data in files.items():
        if name.startswith("@"):
            os.symlink(data, ctx / name[1:])
        else:
            (ctx / name).write_text(data)
    n = len(bstore.images())
    with pytest.raises(BuildError, match=message):
        build(rt, BuildOptions(context=ctx, tags=("bad:1",)))
    assert len(bstore.images()) == n


def test_symlinks_inside_the_context_are_copied_as_links_and_followed_when_named(rt, bstore, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:test\nCOPY d /d/\nCOPY named /named\n", {"d/real": "r\n", "target": "t\n"})
    os.symlink("real", ctx / "d" / "link")
    os.symlink("target", ctx / "named")
    build(rt, BuildOptions(context=ctx, tags=("links:1",)))
    tree, _ = _tree(bstore, "links:1")
    assert stat.S_ISLNK(tree.lstat("d/link").st_mode) and tree.readlink("d/link") == "real"
    assert stat.S_ISREG(tree.lstat("named").st_mode) and _read(tree, "named") == b"t\n"


def test_add_extracts_a_local_tar_keeping_owners(rt, bstore, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("pkg/file.txt")
        data = b"from the tar\n"
        info.size, info.uid, info.gid, info.mode = len(data), 42, 43, 0o604
        t.addfile(info, io.BytesIO(data))
    ctx = _ctx(tmp_path, "FROM busybox:test\nADD pkg.tar.gz /opt/\nADD plain.txt /opt/plain\n",
               {"pkg.tar.gz": buf.getvalue(), "plain.txt": "plain\n"})
    build(rt, BuildOptions(context=ctx, tags=("addtar:1",)))
    tree, _ = _tree(bstore, "addtar:1")
    st = tree.lstat("opt/pkg/file.txt")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (42, 43, 0o604)
    assert _read(tree, "opt/pkg/file.txt") == b"from the tar\n"
    assert _read(tree, "opt/plain") == b"plain\n"
    assert tree.lstat("opt/pkg.tar.gz") is None


def test_add_extracts_a_zstd_tar(rt, bstore, tmp_path):
    import zstandard

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("z.txt")
        info.size = 3
        t.addfile(info, io.BytesIO(b"zz\n"))
    ctx = _ctx(tmp_path, "FROM busybox:test\nADD a.tar.zst /z/\n",
               {"a.tar.zst": zstandard.ZstdCompressor().compress(buf.getvalue())})
    build(rt, BuildOptions(context=ctx, tags=("zst:1",)))
    tree, _ = _tree(bstore, "zst:1")
    assert _read(tree, "z/z.txt") == b"zz\n"


def test_add_refuses_a_tar_with_a_device_node(rt, bstore, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("dev/sda")
        info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
        t.addfile(info)
    ctx = _ctx(tmp_path, "FROM busybox:test\nADD evil.tar /\n", {"evil.tar": buf.getvalue()})
    with pytest.raises(BuildError, match="device nodes are not extracted"):
        build(rt, BuildOptions(context=ctx, tags=("evil:1",)))


@pytest.fixture
def http_server(tmp_path):
    body = b"downloaded bytes\n"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Last-Modified", "Wed, 01 Jan 2025 00:00:00 GMT")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", body
    srv.shutdown()
    srv.server_close()
    th.join()


def test_add_of_a_url_on_loopback_with_checksum(rt, bstore, tmp_path, http_server, monkeypatch):
    base, body = http_server
    for k in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    ctx = _ctx(tmp_path, f"FROM busybox:test\nADD --checksum={digest} {base}/files/data.bin /dl/\n"
                         f"ADD {base}/other /dl/renamed\n")
    build(rt, BuildOptions(context=ctx, tags=("url:1",)))
    tree, _ = _tree(bstore, "url:1")
    assert _read(tree, "dl/data.bin") == body
    st = tree.lstat("dl/data.bin")
    assert stat.S_IMODE(st.st_mode) == 0o600 and int(st.st_mtime) == 1735689600
    assert _read(tree, "dl/renamed") == body
    bad = _ctx(tmp_path / "b", f"FROM busybox:test\nADD --checksum=sha256:{'0' * 64} {base}/x /x\n")
    with pytest.raises(BuildError, match="checksum mismatch"):
        build(rt, BuildOptions(context=bad, tags=("url:2",)))


def test_run_cache_mount_survives_builds_and_stays_out_of_the_layer(rt, bstore, tmp_path):
    cf = ("FROM busybox:test\nRUN --mount=type=cache,target=/root/.cache/pip "
          "cat /root/.cache/pip/count 2>/dev/null | wc -c > /seen; echo x >> /root/.cache/pip/count\n")
    ctx = _ctx(tmp_path, cf)
    build(rt, BuildOptions(context=ctx, tags=("cm:1",), no_cache=True))
    build(rt, BuildOptions(context=ctx, tags=("cm:2",), no_cache=True))
    tree1, _ = _tree(bstore, "cm:1")
    tree2, _ = _tree(bstore, "cm:2")
    assert int(_read(tree2, "seen")) == int(_read(tree1, "seen")) + 2
    assert tree2.lstat("root/.cache/pip/count") is None


def test_onbuild_triggers_run_in_the_child_build(rt, bstore, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:test\nONBUILD RUN echo triggered > /trig\n")
    build(rt, BuildOptions(context=ctx, tags=("parent:1",)))
    _, cfg = _tree(bstore, "parent:1")
    assert cfg["config"]["OnBuild"] == ["RUN echo triggered > /trig"]
    child = _ctx(tmp_path / "c", "FROM parent:1\nRUN cat /trig\n")
    build(rt, BuildOptions(context=child, tags=("child:1",)))
    tree, cfg = _tree(bstore, "child:1")
    assert _read(tree, "trig") == b"triggered\n"
    assert not cfg["config"].get("OnBuild")



# --- interop with podman build -----------------------------------------------------------------------

RUN_PEER = Path("/work/shared/tools/run-peer")
PODMAN_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "none"
"""

#: (no heredocs: Debian 12's podman 4.3 does not know them; test_multistage_... covers ours)
INTEROP = {
    "metadata-and-files": """\
FROM {base}
ARG V=1.2
ENV APP=/opt/app PATH=/opt/app/bin:$PATH VERSION=$V
WORKDIR $APP
COPY --chown=1000:100 --chmod=0755 tool.sh bin/
COPY data/ ./data/
COPY a.txt b.txt ./
ADD pkg.tar /opt/
RUN mkdir -p /var/lib/x && echo "$VERSION" > /var/lib/x/version && rm /bin/ls && \\
    ln -s /opt/app/bin/tool.sh /usr/bin/tool
RUN echo from a step > /opt/app/hd && chmod 0600 /opt/app/hd
USER 1000:100
LABEL org.example.kind="interop test" version=$V
EXPOSE 8888 9000-9001/udp
VOLUME /data
STOPSIGNAL SIGINT
ENTRYPOINT ["/bin/sh"]
CMD ["-c", "tool"]
""",
    "multi-stage": """\
FROM {base} AS build
RUN mkdir /out && echo built > /out/artifact && echo gone > /out/tmp && rm /out/tmp
FROM {base}
COPY --from=build /out /srv/
WORKDIR /srv
CMD echo $HOME
""",
}


def _sh(cmd: list[str], env: dict) -> str:
    import subprocess

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{cmd[1:4] + cmd[8:10]} failed: {proc.stderr[-2000:]}"
    return proc.stdout


def _podman(work: Path) -> list[str]:
    return [str(RUN_PEER), "podman", "--root", str(work / "root"), "--runroot", str(work / "run"),
            "--storage-driver", "overlay"]


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory, bstore):
    import shutil
    import subprocess

    if not shutil.which("podman") or not RUN_PEER.exists():
        pytest.skip("podman or run-peer is not installed")
    work = tmp_path_factory.mktemp("podman")
    (work / "containers.conf").write_text(PODMAN_CONF)
    env = dict(os.environ, CONTAINERS_CONF=str(work / "containers.conf"))
    cmd = _podman(work)
    out = subprocess.run(cmd + ["pull", "-q", f"oci:{bstore.root}:localhost/busybox:test"], env=env,
                         capture_output=True, text=True, check=True)
    yield cmd, env, out.stdout.split()[-1], work
    subprocess.run(cmd + ["system", "reset", "-f"], env=env, capture_output=True, check=False)


def _listing(tree: ImageTree) -> dict[str, tuple]:
    out = {}
    for e in tree.walk(""):
        if not e.rel:
            continue
        digest = ""
        if e.kind == "file":
            fd = tree.open_file(e)
            try:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:16]
            finally:
                os.close(fd)
        out[e.rel] = (e.kind, oct(e.mode), e.uid, e.gid, e.size, digest, e.link)
    return out


@pytest.mark.parametrize("name", sorted(INTEROP))
def test_same_rootfs_and_config_as_podman_build(rt, bstore, tmp_path, podman_env, name):
    import subprocess

    from jupyter_contain.runtime.images.archive import import_oci_archive

    cmd, env, base_id, _work = podman_env
    ctx = _ctx(tmp_path, INTEROP[name].format(base="busybox:test"),
               {"tool.sh": "#!/bin/sh\necho tool\n", "data/one": "1\n", "data/sub/two": "2\n", "a.txt": "a\n",
                "b.txt": "b\n"})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for n, data in (("pkg/", b""), ("pkg/lib.txt", b"lib\n")):
            info = tarfile.TarInfo(n.rstrip("/"))
            if n.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.size, info.mode, info.uid = len(data), 0o644, 7
            t.addfile(info, io.BytesIO(data) if data else None)
    (ctx / "pkg.tar").write_bytes(buf.getvalue())
    (ctx / "Containerfile.podman").write_text(INTEROP[name].format(base=base_id))
    (ctx / ".dockerignore").write_text("Containerfile.podman\n")
    ours = build(rt, BuildOptions(context=ctx, tags=(f"interop-{name}:ours",)))
    tag = f"localhost/interop-{name}:podman"
    _sh(cmd + ["build", "-q", "--network", "none", "-f", str(ctx / "Containerfile.podman"), "-t", tag, str(ctx)], env)
    oci = tmp_path / "podman.tar"
    subprocess.run(cmd + ["save", "--format", "oci-archive", "-o", str(oci), tag], env=env, capture_output=True,
                   check=True)
    theirs = import_oci_archive(bstore, oci, name=f"interop-{name}:podman")
    ours_tree = ImageTree(bstore.ensure_unpacked(ours.record))
    theirs_tree = ImageTree(bstore.ensure_unpacked(theirs))
    a, b = _listing(ours_tree), _listing(theirs_tree)
    if "run" not in a and b.get("run", ("dir",))[0] == "dir":
        b.pop("run", None)   # buildah leaves the mount point it makes for /run/.containerenv in the image
    diffs = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    assert not diffs, f"rootfs differs from podman's (ours, podman): {diffs}"
    keys = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Volumes", "StopSignal")
    ca, cb = ours.record.config.raw["config"], theirs.config.raw["config"]
    # Env as a mapping: an ENV that sets PATH keeps it in place here, as Docker does; buildah moves it last
    assert dict(e.split("=", 1) for e in ca["Env"]) == dict(e.split("=", 1) for e in cb["Env"])
    keys = keys[1:]
    # a port range: Docker (and this builder) expose each port, podman 4.3 keeps the range as one key
    cb = dict(cb, ExposedPorts={f"{p}/{proto}": {} for k in cb.get("ExposedPorts") or {}
                                for port, proto in [k.split("/")]
                                for p in range(int(port.split("-")[0]), int(port.split("-")[-1]) + 1)})
    assert {k: ca.get(k) or None for k in keys} == {k: cb.get(k) or None for k in keys}, (ca, cb)
    own = ("io.jupyter-contain.", "io.buildah.")
    assert {k: v for k, v in (ca.get("Labels") or {}).items() if not k.startswith(own)} == \
        {k: v for k, v in (cb.get("Labels") or {}).items() if not k.startswith(own)}
    # our image runs under podman, as podman's own does
    ours_id = _sh(cmd + ["pull", "-q", f"oci:{bstore.root}:{ours.names[0]}"], env).split()[-1]
    run = subprocess.run(cmd + ["run", "--rm", "--network", "none", ours_id], env=env, capture_output=True,
                         text=True, check=False)
    assert run.returncode != 125, run.stderr
    want = subprocess.run(cmd + ["run", "--rm", "--network", "none", tag], env=env, capture_output=True, text=True,
                          check=False)
    assert (run.returncode, run.stdout) == (want.returncode, want.stdout)


# --- the course image (notebooks/Containerfile) and the %%containerfile magic ------------------------

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_notebooks_containerfile_builds_the_course_image_from_the_debian_image(tmp_path):
    from jupyter_contain.runtime.containers.container import ContainerSpec
    from jupyter_contain.runtime.images import bootstrap

    store = Store(tmp_path / "store")
    cfg = bootstrap.DEBIAN_KERNEL.config
    archive.import_rootfs(store, bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL), "localhost/debian:bookworm",
                          env=cfg.get("Env", ()), cmd=cfg.get("Cmd", ()), workdir=cfg.get("WorkingDir", ""))
    log = Log()
    res = build(store, BuildOptions(context=NOTEBOOKS, tags=("course:test",)), reporter=log)
    assert b"planets: 8 rows" in log.out   # the build's own check ran, its output streamed
    tree, config = _tree(store, "course:test")
    assert tree.lstat("srv/course/coursetools.py") is not None
    assert tree.lstat("srv/course/tour.ipynb") is None   # .containerignore keeps notebooks out
    assert config["config"]["WorkingDir"] == "/root"
    rt = Runtime(store)
    r, w = os.pipe()
    try:
        info = rt.run(ContainerSpec(image=res.names[0], command=(
            "python3", "-c", "import coursetools; print(coursetools.datasets(), len(coursetools.load('planets')))")),
            stdio=(0, w, w), remove=True)
        os.close(w)
        w = -1
        assert (info.code, os.read(r, 4096)) == (0, b"['planets'] 8\n")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_containerfile_magic_builds_the_cell(bstore, tmp_path, monkeypatch, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    from jupyter_contain.kernel.build_magics import BuildMagics

    monkeypatch.setenv("JUPYTER_CONTAIN_ROOT", str(bstore.root))
    (tmp_path / "hello.txt").write_text("hello from the notebook's folder\n")
    monkeypatch.chdir(tmp_path)
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    cfg = Config()
    cfg.HistoryManager.enabled = False   # no sqlite file held open past the test
    ip = InteractiveShell.instance(config=cfg)
    try:
        ip.register_magics(BuildMagics)
        ip.run_cell_magic("containerfile", "magic:1 --build-arg WHO=cell",
                          "FROM busybox:test\nARG WHO\nCOPY hello.txt /\nRUN echo built by $WHO > /who\n")
        out = capsys.readouterr().out
        assert "STEP 4/4: RUN echo built by $WHO > /who" in out
        assert "localhost/magic:1 sha256:" in out
        tree, _ = _tree(bstore, "magic:1")
        assert _read(tree, "who") == b"built by cell\n"
        assert _read(tree, "hello.txt") == b"hello from the notebook's folder\n"
        with pytest.raises(BuildError, match="unknown instruction"):
            ip.run_cell_magic("containerfile", "magic:2", "FROM busybox:test\nNOPE\n")
    finally:
        InteractiveShell.clear_instance()


def test_platform_args_and_from_platform(rt, bstore, tmp_path):
    from jupyter_contain.runtime.spec import Platform

    host = Platform.host()
    ctx = _ctx(tmp_path, "FROM --platform=$BUILDPLATFORM busybox:test\nARG TARGETARCH\n"
                         "RUN echo $TARGETARCH > /arch\n")
    build(rt, BuildOptions(context=ctx, tags=("plat:1",)))
    tree, _ = _tree(bstore, "plat:1")
    assert _read(tree, "arch") == f"{host.architecture}\n".encode()
    other = "arm64" if host.architecture != "arm64" else "amd64"
    bad = _ctx(tmp_path / "b", f"FROM --platform=linux/{other} busybox:test\n")
    with pytest.raises(BuildError, match="no emulation"):
        build(rt, BuildOptions(context=bad, tags=("plat:2",)))


def test_run_bind_mount_of_the_context_is_read_only_and_keyed_on_its_content(rt, bstore, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:test\nRUN --mount=type=bind,source=src,target=/src "
                         "cat /src/in > /out && ! touch /src/new 2>/dev/null\n", {"src/in": "one\n"})
    build(rt, BuildOptions(context=ctx, tags=("bind:1",)))
    tree, _ = _tree(bstore, "bind:1")
    assert _read(tree, "out") == b"one\n"
    assert tree.lstat("src") is None   # the mount point the runtime made is not in the layer
    (ctx / "src" / "in").write_text("two\n")
    log = Log()
    build(rt, BuildOptions(context=ctx, tags=("bind:1",)), reporter=log)
    assert log.hits == 0
    tree, _ = _tree(bstore, "bind:1")
    assert _read(tree, "out") == b"two\n"


def test_cli_build_quiet_iidfile_stdin_and_errors(bstore, tmp_path, monkeypatch, capsys):
    import io as _io

    from jupyter_contain.cli import main

    ctx = _ctx(tmp_path, "FROM busybox:test\nCOPY f /f\nLABEL x=y\n", {"f": "f\n"})
    root = ["--root", str(bstore.root)]
    assert main([*root, "build", "-q", "-t", "cli:1", "-t", "cli:alias", "--iidfile", str(tmp_path / "iid"),
                 str(ctx)]) == 0
    out = capsys.readouterr().out
    iid = (tmp_path / "iid").read_text()
    assert out == iid + "\n" and iid.startswith("sha256:")
    assert bstore.resolve("cli:alias").id == iid == bstore.resolve("cli:1").id
    # plain progress: a line per step and its result; the Containerfile from standard input
    monkeypatch.setattr("sys.stdin", _io.TextIOWrapper(_io.BytesIO(b"FROM busybox:test\nENV A=1\n")))
    assert main([*root, "build", "--progress", "plain", "-f", "-", "-t", "cli:2", str(ctx)]) == 0
    out = capsys.readouterr().out
    assert "STEP 1/2: FROM busybox:test\n" in out and "STEP 2/2: ENV A=1\n" in out
    assert "Successfully tagged localhost/cli:2" in out
    # a failing step: exit code 1, one error line naming the file, line and instruction
    (ctx / "Containerfile").write_text("FROM busybox:test\nRUN exit 3\n")
    assert main([*root, "build", "-t", "cli:3", str(ctx)]) == 1
    err = capsys.readouterr().err
    assert "Containerfile:2: RUN: the command" in err and "non-zero code: 3" in err


def test_run_heredoc_with_a_shebang_runs_as_a_script_and_leaves_no_trace(rt, bstore, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:test\nRUN <<EOF\n#!/bin/sh -e\necho \"script args: $#\" > /script-ran\nEOF\n"
                         "RUN cat <<A <<-B > /two\nfirst\nA\n\tsecond\n\tB\n")
    build(rt, BuildOptions(context=ctx, tags=("shebang:1",)))
    tree, _ = _tree(bstore, "shebang:1")
    assert _read(tree, "script-ran") == b"script args: 0\n"
    assert _read(tree, "two") == b"second\n"   # the shell's own heredocs: the last one is cat's stdin
    assert tree.lstat(".jupyter-contain") is None


def test_special_files_in_the_context_are_left_out_never_opened(rt, bstore, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox:test\nCOPY . /ctx/\n", {"plain": "p\n"})
    os.mkfifo(ctx / "fifo")   # opening it would block the build forever
    build(rt, BuildOptions(context=ctx, tags=("special:1",)))
    tree, _ = _tree(bstore, "special:1")
    assert _read(tree, "ctx/plain") == b"p\n"
    assert tree.lstat("ctx/fifo") is None


@pytest.mark.parametrize("order", ["dir-then-link", "link-then-dir"])
def test_a_symlink_in_one_source_cannot_carry_another_source_s_files_out(rt, bstore, tmp_path, order):
    outside = tmp_path / "outside"
    outside.mkdir()
    ctx = _ctx(tmp_path, "", {"withdir/x/evil": "evil\n"})
    (ctx / "withlink").mkdir()
    os.symlink(str(outside), ctx / "withlink" / "x")   # absolute, to a host folder
    srcs = "withdir/ withlink/" if order == "dir-then-link" else "withlink/ withdir/"
    (ctx / "Containerfile").write_text(f"FROM busybox:test\nCOPY {srcs} /dst/\n")
    build(rt, BuildOptions(context=ctx, tags=(f"escape:{order}",)))
    assert list(outside.iterdir()) == []   # nothing written through the link
    tree, _ = _tree(bstore, f"escape:{order}")
    x = tree.lstat("dst/x")
    if order == "dir-then-link":   # the later source wins, as in Docker
        assert stat.S_ISLNK(x.st_mode) and tree.readlink("dst/x") == str(outside)
    else:
        assert stat.S_ISDIR(x.st_mode) and _read(tree, "dst/x/evil") == b"evil\n"
