"""Clean snapshots: a kernel's runtime state stays out of every snapshot, and SQLite files are whole.

Specification (issue #18, "Clean snapshots"): a snapshot of a kernel leaves out
IPython's history (``history.sqlite`` and its journal), IPython/ipykernel
caches and the other per-kernel state of ``kernel.snapshots.RUNTIME_STATE``,
by default and at every entry point; the diff summary says what it left out;
``include_runtime_state`` / ``exclude`` / ``include`` override the list. The
runtime's commit knows only path patterns (``runtime.commit`` takes a
generic exclude list). A snapshot of a running container is taken frozen, so
a SQLite database written all the while is never captured half-written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from kernel_fixtures import *  # noqa: F403
from kernel_fixtures import IMAGE, make_spec, run_cell
from test_snapshot import layer_members, run_in

from jupyter_contain import errors
from jupyter_contain.kernel import snapshots as ksnap
from jupyter_contain.runtime import ContainerSpec, Runtime, commit
from jupyter_contain.runtime.images.snapshot import PathPatterns

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: what a kernel leaves in its layer (as IPython and friends lay it out), and what the user made
RUNTIME_FILES = (
    "root/.ipython/profile_default/history.sqlite",
    "root/.ipython/profile_default/history.sqlite-journal",
    "root/.ipython/profile_default/history.sqlite-wal",
    "root/.ipython/profile_default/db/dhist",
    "root/.ipython/profile_default/startup/README",
    "root/.ipython/profile_default/security/kernel-1.json",
    "root/.local/share/jupyter/runtime/kernel-1.json",
    "root/.cache/pip/http/a/b",
    "home/student/.ipython/profile_default/history.sqlite",
    "tmp/ipykernel_42/123.py",
)
USER_FILES = (
    "root/.ipython/profile_default/startup/00-course.py",   # a startup script the teacher wrote: kept
    "root/.ipython/profile_default/ipython_config.py",
    "opt/course/data.sqlite",                              # the user's own SQLite: kept
    "opt/course/data.sqlite-journal",
    "root/notes.txt",
)


def _fill_script() -> str:
    """Made inside the container, so the overlay copies up the image's folders as a kernel's writes would."""
    lines = [f"mkdir -p /{os.path.dirname(rel)} && echo 'content of {rel}' > /{rel}" for rel in (*RUNTIME_FILES, *USER_FILES)]
    return "; ".join([*lines, "mkdir /opt/empty-new-dir"])


def _names(rec, store) -> set[str]:
    return {m.name.rstrip("/") for m in layer_members(store, rec)}


@pytest.fixture
def filled(runtime):
    return run_in(runtime, _fill_script())


# --- the patterns ------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,path,hit", [
    ("/**/.ipython/profile_*/history.sqlite*", "root/.ipython/profile_default/history.sqlite", True),
    ("/**/.ipython/profile_*/history.sqlite*", "root/.ipython/profile_default/history.sqlite-journal", True),
    ("/**/.ipython/profile_*/history.sqlite*", ".ipython/profile_x/history.sqlite", True),
    ("/**/.ipython/profile_*/history.sqlite*", "root/.ipython/profile_default/sub/history.sqlite", False),
    ("/**/.ipython/profile_*/history.sqlite*", "root/.ipython/history.sqlite", False),
    ("/tmp/ipykernel_*", "tmp/ipykernel_42", True),
    ("/tmp/ipykernel_*", "tmp/x/ipykernel_42", False),
    ("/opt/*.db", "opt/a.db", True),
    ("/opt/*.db", "opt/a/b.db", False),
    ("/opt/**", "opt/a/b.db", True),
    ("/opt/file?.[ch]", "opt/file1.c", True),
    ("/opt/file?.[!ch]", "opt/file1.c", False),
    ("/opt/a+b(c)", "opt/a+b(c)", True),        # regex characters are literal
])
def test_path_patterns(pattern, path, hit):
    assert PathPatterns((pattern,)).leaves_out(path) is hit


def test_include_wins_over_exclude():
    p = PathPatterns(("/**/*.sqlite",), ("/opt/keep.sqlite",))
    assert p.leaves_out("opt/drop.sqlite") and not p.leaves_out("opt/keep.sqlite")


@pytest.mark.parametrize("bad", ["relative/path", "/", "/a/../b", "/a/./b", "/a\nb", "/" + "x" * 300])
def test_bad_patterns_are_refused(bad):
    with pytest.raises(errors.InvalidSpec):
        PathPatterns((bad,))
    with pytest.raises(errors.InvalidSpec):
        PathPatterns((), (bad,))


def test_too_many_patterns_are_refused():
    with pytest.raises(errors.InvalidSpec, match="at most"):
        PathPatterns(tuple(f"/p{i}" for i in range(100)))


# --- the runtime: a generic exclude list --------------------------------------------------------


def test_runtime_commit_keeps_everything_without_a_list(runtime, filled):
    """The runtime knows no Jupyter: without patterns, the history is an ordinary file."""
    rec = commit.snapshot(runtime, filled, "clean-none:1")
    names = _names(rec, runtime.store)
    assert {*RUNTIME_FILES, *USER_FILES} <= names


def test_kernel_snapshot_leaves_runtime_state_out(runtime, filled):
    left: list = []
    rec = ksnap.snapshot(runtime, filled, "clean-default:1", left_out=left)
    names = _names(rec, runtime.store)
    assert not names & set(RUNTIME_FILES), names & set(RUNTIME_FILES)
    assert set(USER_FILES) <= names
    assert "opt/empty-new-dir" in names
    # folders that held only runtime state are not left behind empty; the profile with user files is kept
    assert "home" not in names and "home/student" not in names and "tmp" not in names
    assert "root/.local" not in names and "root/.cache" not in names
    assert "root/.ipython/profile_default/startup" in names
    assert "root/.ipython/profile_default/db" not in names
    # what was left out is told: the top of each left-out tree, sorted, with sizes of files
    paths = [ch.path for ch in left]
    assert paths == sorted(paths)
    assert "/root/.ipython/profile_default/history.sqlite" in paths
    assert "/root/.ipython/profile_default/db" in paths and "/root/.ipython/profile_default/db/dhist" not in paths
    assert "/tmp/ipykernel_42" in paths
    hist = next(ch for ch in left if ch.path == "/root/.ipython/profile_default/history.sqlite")
    assert hist.kind == "A" and hist.size == len("content of root/.ipython/profile_default/history.sqlite\n")


def test_diff_shows_what_is_left_out(runtime, filled):
    left: list = []
    changes = ksnap.diff(filled, left_out=left)
    shown = {ch.path for ch in changes}
    assert "/root/notes.txt" in shown and "/root/.ipython/profile_default/history.sqlite" not in shown
    assert "/home" not in shown
    assert {"/root/.ipython/profile_default/history.sqlite", "/home/student/.ipython/profile_default/history.sqlite",
            "/root/.cache/pip"} <= {ch.path for ch in left}
    s = ksnap.diff_summary(filled, limit=5)
    assert s.total == len(changes) and s.left_out_total == len(left)
    assert [ch.path for ch in s.left_out] == [ch.path for ch in left]
    assert s.left_out_bytes == sum(ch.size for ch in left) > 0


def test_include_runtime_state_and_lists_override(runtime, filled):
    rec = ksnap.snapshot(runtime, filled, "clean-all:1", include_runtime_state=True)
    assert set(RUNTIME_FILES) <= _names(rec, runtime.store)

    rec = ksnap.snapshot(runtime, filled, "clean-lists:1", exclude=["/root/notes.txt", "/opt/course/*.sqlite*"],
                         include=["/root/.ipython/profile_default/history.sqlite"])
    names = _names(rec, runtime.store)
    assert "root/.ipython/profile_default/history.sqlite" in names            # kept on request
    assert "root/.ipython/profile_default/history.sqlite-journal" not in names
    assert "root/notes.txt" not in names and "opt/course/data.sqlite" not in names
    assert "root/.ipython/profile_default/startup/00-course.py" in names


def test_bad_lists_change_nothing(runtime, filled):
    store = runtime.store
    index = (store.root / "index.json").read_bytes()
    blobs = set(os.listdir(store.blobs_dir))
    for kw in ({"exclude": ["relative"]}, {"include": ["/a/../../etc"]}, {"exclude": "/root"}):
        with pytest.raises(errors.InvalidSpec):
            ksnap.snapshot(runtime, filled, "clean-bad:1", **kw)
    assert (store.root / "index.json").read_bytes() == index and set(os.listdir(store.blobs_dir)) == blobs


def test_a_left_out_file_in_the_image_shows_as_changed_and_its_deletion_stays_out(runtime, filled):
    """A base that carries history (made with include_runtime_state): the kernel's new history is left out,
    and so is the kernel deleting it (the base's stays as it was, never half-changed)."""
    base = ksnap.snapshot(runtime, filled, "clean-base:1", include_runtime_state=True)
    c = runtime.create(ContainerSpec(image=base.name, command=("sh", "-c",
                       "echo again >> /root/.ipython/profile_default/history.sqlite; "
                       "rm /home/student/.ipython/profile_default/history.sqlite")))
    try:
        c.start()
        assert c.wait(10).code == 0
        left: list = []
        ksnap.diff(c, left_out=left)
        kinds = {ch.path: ch.kind for ch in left}
        assert kinds["/root/.ipython/profile_default/history.sqlite"] == "C"
        assert kinds["/home/student/.ipython/profile_default/history.sqlite"] == "D"
        rec = ksnap.snapshot(runtime, c, "clean-on-base:1")
        assert not any("history.sqlite" in n for n in _names(rec, runtime.store))
    finally:
        c.remove(force=True)


# --- a real kernel -----------------------------------------------------------------------------


@pytest.fixture
def jupyter_path(kernel_env, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_env.data_dir))


def _kernel_container(rt: Runtime, kid: str):
    return next(c for c in rt.containers() if ksnap.kernel_id_of(c) == kid)


def test_kernel_snapshot_by_magic_and_cli_leave_history_out(jupyter_path, kernel_env, kernel_runtime, ksm, tmp_path):
    """A real kernel writes its history; %container diff says it is left out; the magic's and the
    CLI's snapshots hold the kernel's files but no history; --include-runtime-state keeps it."""
    from jupyter_client.manager import KernelManager

    name = make_spec(kernel_env, "t-clean")
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    tag = f"clean-kernel-{os.getpid()}:1"
    try:
        kc.wait_for_ready(timeout=60)
        out = run_cell(kc, "open('/opt/made-by-kernel.txt', 'w').write('x'); print('wrote')")
        assert "wrote" in out["stdout"], out
        # IPython writes the history database at start and the cells from a cache: flush it
        run_cell(kc, "get_ipython().history_manager.writeout_cache()")
        c = _kernel_container(kernel_runtime, km.kernel_id)
        assert (c.upper / "root/.ipython/profile_default/history.sqlite").exists()

        out = run_cell(kc, "%container diff")
        assert not out["error"], out
        assert "/opt/made-by-kernel.txt" in out["stdout"]
        assert "left out" in out["stdout"] and "history.sqlite" in out["stdout"], out["stdout"]

        out = run_cell(kc, f"%container snapshot {tag}", timeout=120)
        assert not out["error"], out
        made = kernel_env.store.resolve(f"localhost/kernel-snapshot/{tag}")
        names = _names(made, kernel_env.store)
        assert "opt/made-by-kernel.txt" in names
        assert not any("history.sqlite" in n or "/security" in n for n in names), names

        # the widget: its summary says what is left out; "Keep runtime state" keeps it
        out = run_cell(kc, "from jupyter_contain_guest import snapshot_widget\n"
                           "w = snapshot_widget()\n"
                           "print('Left out' in w.summary.value, 'history.sqlite' in w.summary.value)\n"
                           f"w.tag.value = 'clean-widget-{os.getpid()}:1'\n"
                           "w.keep_state.value = True\n"
                           "w.button._click_handlers(w.button)\n"
                           "print(w.progress.bar_style, w.image)\n", timeout=120)
        assert out["stdout"].splitlines()[:2] == [
            "True True", f"success localhost/kernel-snapshot/clean-widget-{os.getpid()}:1"], out
        kept = kernel_env.store.resolve(f"localhost/kernel-snapshot/clean-widget-{os.getpid()}:1")
        assert "root/.ipython/profile_default/history.sqlite" in _names(kept, kernel_env.store)

        env = {**os.environ, "JUPYTER_CONTAIN_ROOT": str(kernel_env.store.root)}
        cli = [sys.executable, "-m", "jupyter_contain.cli"]
        r = subprocess.run([*cli, "diff", c.id], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "history.sqlite" not in r.stdout and "left out" in r.stderr and "history.sqlite" in r.stderr
        r = subprocess.run([*cli, "commit", "--json", c.id, f"clean-cli-{os.getpid()}:1"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert any(p["path"].endswith("history.sqlite") for p in got["left_out"]), got
        assert not any("history.sqlite" in n for n in _names(kernel_env.store.resolve(got["name"]), kernel_env.store))
        r = subprocess.run([*cli, "commit", "--include-runtime-state", c.id, f"clean-cli-all-{os.getpid()}:1"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        rec = kernel_env.store.resolve(f"clean-cli-all-{os.getpid()}:1")
        assert "root/.ipython/profile_default/history.sqlite" in _names(rec, kernel_env.store)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        for ref in (f"localhost/kernel-snapshot/{tag}", f"localhost/kernel-snapshot/clean-widget-{os.getpid()}:1",
                    f"clean-cli-{os.getpid()}:1",
                    f"clean-cli-all-{os.getpid()}:1"):
            try:
                kernel_env.store.rmi(ref)
            except errors.ContainError:
                pass


# --- SQLite written while the snapshot runs ------------------------------------------------------

#: a writer that commits transactions of 50 rows as fast as it can, in rollback-journal and WAL databases
WRITER = textwrap.dedent("""
    import sqlite3, sys
    dbs = []
    for name, mode in (("/opt/j.sqlite", "DELETE"), ("/opt/w.sqlite", "WAL")):
        db = sqlite3.connect(name, isolation_level=None)
        db.execute("PRAGMA journal_mode=" + mode)
        db.execute("PRAGMA synchronous=OFF")
        db.execute("CREATE TABLE IF NOT EXISTS t (batch INTEGER, i INTEGER, pad TEXT)")
        dbs.append(db)
    open("/opt/ready", "w").write("1")
    batch = 0
    while True:
        batch += 1
        for db in dbs:
            db.execute("BEGIN")
            for i in range(50):
                db.execute("INSERT INTO t VALUES (?, ?, ?)", (batch, i, "x" * 200))
            db.execute("COMMIT")
""")

CHECK = textwrap.dedent("""
    import sqlite3
    for name in ("/opt/j.sqlite", "/opt/w.sqlite"):
        db = sqlite3.connect(name)
        ok = db.execute("PRAGMA integrity_check").fetchone()[0]
        n, batches = db.execute("SELECT count(*), count(DISTINCT batch) FROM t").fetchone()
        torn = db.execute("SELECT count(*) FROM (SELECT batch FROM t GROUP BY batch HAVING count(*) != 50)").fetchone()[0]
        print(name, ok, n, batches, torn)
""")


def test_sqlite_written_during_snapshots_is_whole(kernel_env, kernel_runtime):
    """Frozen while archived: every snapshot of a busy SQLite writer opens clean (integrity ok,
    only whole transactions), in rollback-journal and WAL mode alike."""
    rt = kernel_runtime
    writer = rt.create(ContainerSpec(image=IMAGE, command=("python3", "-c", WRITER)))
    made: list[str] = []
    try:
        writer.start()
        deadline = time.monotonic() + 30
        while not (writer.upper / "opt/ready").exists():
            assert time.monotonic() < deadline and writer.poll() is None, (writer.dir / "log").read_text()
            time.sleep(0.05)
        time.sleep(0.3)
        results = []
        for i in range(4):
            tag = f"sqlite-busy-{os.getpid()}:{i}"
            rec = ksnap.snapshot(rt, writer, tag)
            made.append(rec.name)
            assert writer.poll() is None, "the writer died during the snapshot"
            with tempfile.TemporaryFile() as out, open(os.devnull, "rb") as null:
                r = rt.run(ContainerSpec(image=rec.name, command=("python3", "-c", CHECK)),
                           stdio=(null.fileno(), out.fileno(), out.fileno()), remove=True)
                out.seek(0)
                text = out.read().decode()
            assert r.code == 0, text
            results.append(text)
            time.sleep(0.1)
        for text in results:
            lines = text.split("\n")
            for line in filter(None, lines):
                name, ok, n, batches, torn = line.split()
                assert ok == "ok" and torn == "0" and int(n) == 50 * int(batches), text
        assert any(int(line.split()[3]) > 0 for text in results for line in filter(None, text.split("\n")))
    finally:
        writer.remove(force=True)
        for name in made:
            kernel_env.store.rmi(name)
