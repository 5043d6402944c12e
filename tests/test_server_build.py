"""``POST /jupyter-contain/api/v1/builds``: builds as operations of a live Jupyter Server, and the remote CLI.

One server per module over the session's kernel store (``localhost/debian:bookworm``
is the base: no pull). A build streams one progress item per step, tags its
image, installs a kernelspec when asked; a rebuild is all cache; a bad body is a
400 that changes nothing; a failing RUN fails the operation with the step's
error and no tag; a cancel stops at the next step boundary and leaves no tag;
``jupyter contain --url URL build`` prints the step lines as they stream.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kernel_fixtures import *  # noqa: F403
from kernel_fixtures import KERNEL_NAME
from test_server import ApiServer, store_state

from jupyter_contain.errors import ImageNotFound
from jupyter_contain.runtime import Runtime

pytest.importorskip("jupyter_server")
pytestmark = pytest.mark.slow

BASE = "localhost/debian:bookworm"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, kernel_env):
    s = ApiServer(tmp_path_factory.mktemp("build-srv"), kernel_env, store=kernel_env.store)
    yield s
    s.stop()


@pytest.fixture
def tags(kernel_env):
    """Names a test builds; removed after it (the store is the session's)."""
    names: list[str] = []
    yield names
    for n in names:
        try:
            kernel_env.store.rmi(n)
        except ImageNotFound:
            pass


def _ctx(srv: ApiServer, containerfile: str, files: dict[str, str] | None = None) -> str:
    """A context folder inside the server's root; its name relative to the root."""
    name = f"ctx-{uuid.uuid4().hex[:8]}"
    d = srv.root / name
    d.mkdir()
    (d / "Containerfile").write_text(containerfile)
    for k, v in (files or {}).items():
        (d / k).write_text(v)
    return name


def _build(srv: ApiServer, body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Start a build and follow its event stream; (final snapshot, every snapshot)."""
    _, started = srv.api("POST", "builds", body, ok=(202,))
    op = started["operation"]
    assert op["kind"] == "build" and op["state"] == "running"
    snaps = list(srv.events(op["id"]))
    return snaps[-1], snaps


def _build_containers(kernel_env: Any) -> list[Any]:
    return [c for c in Runtime(kernel_env.store).containers() if c.state.labels.get("io.jupyter-contain.build")]


def test_build_streams_its_steps_tags_the_image_and_a_rebuild_is_all_cached(srv, kernel_env, tags):
    token = uuid.uuid4().hex
    ctx = _ctx(srv, f"FROM {BASE}\nRUN echo {token} > /built.txt\nCOPY hello.txt /hello.txt\n",
               {"hello.txt": "hello\n"})
    tags.append("localhost/srvbuild:1")
    final, snaps = _build(srv, {"context": ctx, "tags": ["srvbuild:1"], "pull": "never",
                                "kernelspec": "srvbuild-ks"})
    assert final["state"] == "succeeded", final["error"]
    steps = {i["index"]: i for i in final["progress"]["items"]}
    assert sorted(steps) == [1, 2, 3] and all(i["total"] == 3 and i["state"] == "done" for i in steps.values())
    assert steps[1]["text"] == f"FROM {BASE}"
    assert steps[2]["text"] == f"RUN echo {token} > /built.txt" and steps[2]["status"] == "ran"
    assert steps[3]["text"] == "COPY hello.txt /hello.txt" and steps[3]["status"] == "ran"
    assert all(isinstance(i["seconds"], float) for i in steps.values())
    assert len(snaps) >= 2 and snaps[0]["state"] == "running"   # streamed, not only the end

    res = final["result"]
    rec = kernel_env.store.resolve("srvbuild:1")
    assert res["names"] == ["localhost/srvbuild:1"] and res["image"]["digest"] == rec.digest
    assert res["image_id"] == rec.id and res["steps"] == 2 and res["cached"] == 0
    base = kernel_env.store.resolve(BASE)
    assert len(rec.manifest.layers) == len(base.manifest.layers) + 2
    _, detail = srv.api("GET", "images/srvbuild:1", ok=(200,))
    history = [h.get("created_by", "") for h in detail["image"]["history"]]
    assert any(token in h for h in history) and any("COPY" in h and "/hello.txt" in h for h in history)
    # the kernelspec, as the CLI's --kernelspec installs it, in the server's list
    assert res["kernelspec"] == "srvbuild-ks"
    _, specs = srv.api("GET", "kernelspecs", ok=(200,))
    spec = {s["name"]: s for s in specs["kernelspecs"]}["srvbuild-ks"]
    assert spec["image"] == "localhost/srvbuild:1"
    srv.api("DELETE", "kernelspecs/srvbuild-ks", ok=(204,))

    # nothing changed: every step from the cache, the same image
    again, _ = _build(srv, {"context": ctx, "file": "Containerfile", "tags": ["srvbuild:1"], "pull": "never"})
    assert again["state"] == "succeeded", again["error"]
    assert [i["status"] for i in sorted(again["progress"]["items"], key=lambda i: i["index"])][1:] == \
        ["cached", "cached"]
    assert again["result"]["cached"] == again["result"]["steps"] == 2
    assert again["result"]["image"]["digest"] == rec.digest and again["result"]["kernelspec"] is None
    assert not _build_containers(kernel_env)


def test_bad_build_bodies_are_refused_before_any_work(srv, kernel_env, tmp_path):
    ctx = _ctx(srv, f"FROM {BASE}\nRUN true\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "Containerfile").write_text(f"FROM {BASE}\n")
    (srv.root / "link-out").symlink_to(outside)
    # a Containerfile (the default one, or one named) that leads out of the root through a symlink
    sneaky = _ctx(srv, "")
    (srv.root / sneaky / "Containerfile").unlink()
    (srv.root / sneaky / "Containerfile").symlink_to(outside / "Containerfile")
    (srv.root / sneaky / "other").symlink_to(outside / "Containerfile")
    empty = _ctx(srv, "")
    (srv.root / empty / "Containerfile").unlink()
    _, ops = srv.api("GET", "operations", ok=(200,))
    before = (store_state(kernel_env.store), len(ops["operations"]))
    bad = [
        ({"context": str(outside)}, "path_outside_root"),
        ({"context": "link-out"}, "path_outside_root"),
        ({"context": "../"}, "path_outside_root"),
        ({"context": "no-such-folder"}, "path_not_found"),
        ({"context": f"{ctx}/Containerfile"}, "invalid_path"),
        ({}, "missing_field"),
        ({"context": ctx, "dockerfile": "x"}, "unknown_field"),
        ({"context": ctx, "tags": ["Bad Tag!"]}, "invalid_reference"),
        ({"context": ctx, "tags": ["x@sha256:" + "0" * 64]}, "invalid_reference"),
        ({"context": ctx, "tags": "one"}, "invalid_field"),
        ({"context": ctx, "network": "host"}, "limit_exceeded"),
        ({"context": ctx, "network": "wifi"}, "invalid_field"),
        ({"context": ctx, "file": "Containerfile", "containerfile": "FROM scratch\n"}, "invalid_field"),
        ({"context": ctx, "file": "../../etc/passwd"}, "path_outside_root"),
        ({"context": ctx, "file": "/etc/passwd"}, "invalid_path"),
        ({"context": ctx, "containerfile": "x" * (64 << 10) + "\n"}, "invalid_field"),
        ({"context": ctx, "build_args": {"A B": "1"}}, "invalid_field"),
        ({"context": ctx, "build_args": {"A": 1}}, "invalid_field"),
        ({"context": ctx, "pull": "sometimes"}, "invalid_field"),
        ({"context": ctx, "no_cache": "yes"}, "invalid_field"),
        ({"context": ctx, "target": "-x"}, "invalid_field"),
        ({"context": ctx, "kernelspec": "Bad Name"}, "invalid_kernel_name"),
        ({"context": ctx, "kernelspec": True}, "missing_field"),   # a kernelspec needs a tag
        ({"context": sneaky}, "path_outside_root"),
        ({"context": sneaky, "file": "other"}, "path_outside_root"),
        ({"context": empty}, "path_not_found"),
    ]
    for body, code in bad:
        status, answer = srv.api("POST", "builds", body)
        assert status == 400 and answer["error"]["code"] == code, (body if len(str(body)) < 200 else code, answer)
    # a kernelspec of that name exists already: a conflict, before any work
    status, answer = srv.api("POST", "builds", {"context": ctx, "tags": ["srvbuild-x:1"], "kernelspec": KERNEL_NAME})
    assert status == 409 and answer["error"]["code"] == "kernelspec_exists", answer
    _, ops = srv.api("GET", "operations", ok=(200,))
    assert (store_state(kernel_env.store), len(ops["operations"])) == before
    (srv.root / "link-out").unlink()


def test_failing_run_fails_the_operation_with_the_step_error_and_no_tag(srv, kernel_env, tags):
    ctx = _ctx(srv, "")
    tags.append("localhost/srvbuild-fail:1")
    final, _ = _build(srv, {"context": ctx, "tags": ["srvbuild-fail:1"], "pull": "never",
                            "containerfile": f"FROM {BASE}\nRUN echo oops-{ctx} && exit 3\nRUN echo never\n"})
    assert final["state"] == "failed"
    err = final["error"]
    assert err["code"] == "build_step_failed" and err["exit_code"] == 3, err
    assert err["line"] == 2 and err["instruction"] == "RUN" and f"oops-{ctx}" in err["output"], err
    assert "non-zero code: 3" in err["message"]
    assert [i["index"] for i in final["progress"]["items"]] == [1, 2]   # the third step never began
    with pytest.raises(ImageNotFound):
        kernel_env.store.resolve("srvbuild-fail:1")
    assert not _build_containers(kernel_env)


def test_cancel_stops_at_the_next_step_boundary_and_leaves_no_tag(srv, kernel_env, tags):
    token = uuid.uuid4().hex
    ctx = _ctx(srv, f"FROM {BASE}\nRUN sleep 2 && echo {token}\nRUN echo after-{token}\n")
    tags.append("localhost/srvbuild-cancel:1")
    _, started = srv.api("POST", "builds", {"context": ctx, "tags": ["srvbuild-cancel:1"], "pull": "never"},
                         ok=(202,))
    op_id = started["operation"]["id"]
    deadline = time.monotonic() + 60
    while True:   # cancel while the sleeping RUN runs
        _, got = srv.api("GET", f"operations/{op_id}", ok=(200,))
        items = {i["index"]: i for i in got["operation"]["progress"]["items"]}
        if 2 in items:
            break
        assert got["operation"]["state"] == "running" and time.monotonic() < deadline, got
        time.sleep(0.05)
    srv.api("DELETE", f"operations/{op_id}", ok=(202,))
    final = srv.wait_operation(op_id)
    assert final["state"] == "cancelled" and final["error"]["code"] == "cancelled", final
    # the running step finished (a RUN is not killed midway), the next one never began
    assert sorted(i["index"] for i in final["progress"]["items"]) == [1, 2]
    with pytest.raises(ImageNotFound):
        kernel_env.store.resolve("srvbuild-cancel:1")
    assert not _build_containers(kernel_env)


def test_remote_cli_build_prints_the_step_lines(srv, kernel_env, tags):
    token = uuid.uuid4().hex
    ctx = _ctx(srv, f"FROM {BASE}\nRUN echo {token} > /r.txt\n")
    tags.append("localhost/srvbuild-remote:1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_CONTAIN_")}
    r = subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--url", srv.url, "--token", srv.token,
                        "build", "-t", "srvbuild-remote:1", "--pull", "never", ctx],
                       env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    rec = kernel_env.store.resolve("srvbuild-remote:1")   # in the server's store
    lines = r.stdout.splitlines()
    assert lines[0] == f"STEP 1/2: FROM {BASE}" and lines[1].startswith("--> ") and lines[1].endswith(" s")
    assert lines[2] == f"STEP 2/2: RUN echo {token} > /r.txt" and lines[3].endswith(" s")
    assert "Successfully tagged localhost/srvbuild-remote:1" in lines and lines[-1] == rec.id
    # the same again, the Containerfile from the local standard input: the cache, by the server's word
    r = subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--url", srv.url, "--token", srv.token,
                        "build", "-t", "srvbuild-remote:1", "--pull", "never", "-f", "-", ctx],
                       env=env, capture_output=True, text=True, timeout=120,
                       input=(Path(srv.root / ctx / "Containerfile")).read_text())
    assert r.returncode == 0, r.stderr
    assert "--> Using cache" in r.stdout.splitlines() and r.stdout.splitlines()[-1] == rec.id
    # a failing RUN: the server's error and the end of the step's output, exit code 1, no tag
    fail = _ctx(srv, f"FROM {BASE}\nRUN echo remote-oops-{token} && exit 5\n")
    r = subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--url", srv.url, "--token", srv.token,
                        "build", "-t", "srvbuild-remote:2", "--pull", "never", fail], env=env,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and f"remote-oops-{token}" in r.stderr and "non-zero code: 5" in r.stderr, \
        (r.stdout, r.stderr)
    with pytest.raises(ImageNotFound):
        kernel_env.store.resolve("srvbuild-remote:2")
    # a context outside the server's root: the server's error, exit code non-zero, nothing built
    r = subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--url", srv.url, "--token", srv.token,
                        "build", "/etc"], env=env, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "outside the allowed root" in r.stderr, (r.stdout, r.stderr)
