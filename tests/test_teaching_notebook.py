"""notebooks/teaching.ipynb, executed: the teacher's side and the class's side end to end (issue #18).

The teacher's side: start from the base image, install a package from a local wheel, snapshot
(the runtime state left out), push to a registry on 127.0.0.1, install a pinned kernelspec. The
class's side: student kernels started concurrently from the pushed image in a fresh store (pulled
by digest): each has the same digest and the package, and none sees another's files. The
teacher's notebook runs in a local ipykernel and drives the contained kernels (jupyter_client and
the ``jupyter contain`` CLI), as a teacher's own Jupyter would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
from kernel_fixtures import *  # noqa: F403
from kernel_fixtures import IMAGE
from registry_fixture import start_registry

from jupyter_contain.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent


#: student kernels started at once in the test (the benchmark starts 30; 2 cores here)
STUDENTS = int(os.environ.get("JUPYTER_CONTAIN_TEST_STUDENTS", "6"))


def test_teaching_notebook(kernel_env, kernel_runtime, tmp_path):
    from nbclient import NotebookClient

    work = tmp_path / "work"
    work.mkdir()
    with start_registry(tmp_path / "reg") as reg:
        env = {
            "TEACHING_REGISTRY": reg.address,
            "TEACHING_BASE_STORE": str(kernel_env.store.root),
            "TEACHING_BASE_IMAGE": IMAGE,
            "TEACHING_WORKDIR": str(work),
            "TEACHING_STUDENTS": str(STUDENTS),
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            nb = nbformat.read(REPO / "notebooks/teaching.ipynb", as_version=4)
            # the teacher's own notebook runs in a local ipykernel: it drives contained kernels
            client = NotebookClient(nb, timeout=600, startup_timeout=120, kernel_name="python3",
                                    resources={"metadata": {"path": str(work)}})
            client.execute()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def text(tag: str) -> str:
        cell = next(c for c in nb.cells if tag in c.get("metadata", {}).get("tags", []))
        errs = [o for o in cell.outputs if o.output_type == "error"]
        assert not errs, f"cell {tag}: {errs[0]['ename']}: {errs[0]['evalue']}"
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    result = json.loads(text("class-result").strip().splitlines()[-1])
    assert result["students"] == STUDENTS
    assert len(set(result["digests"])) == 1 and result["digests"][0] == result["pinned_digest"]
    assert all(v == "0.1.0" for v in result["package_versions"])
    assert result["saw_others"] == [[] for _ in range(STUDENTS)], result["saw_others"]
    assert "left out" in text("teacher-snapshot") and "history.sqlite" in text("teacher-snapshot")
    # every container and the students' store are cleaned up by the notebook itself
    assert Runtime(kernel_env.store).containers() == []
