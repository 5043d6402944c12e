"""The contents manager guard: a symlink a kernel planted in the notebook folder never leads the server out.

Jupyter Server's own FileContentsManager, guarded as the extension guards it:
reading and saving through a symlink (the last component, or a folder on the
way) that leaves the root are refused and change nothing outside; a symlink
inside the root keeps working.
"""

from __future__ import annotations

import os

import pytest
from jupyter_server.services.contents.filemanager import FileContentsManager
from tornado.web import HTTPError

from jupyter_contain.server.contents import guard


@pytest.fixture
def cm(tmp_path):
    root = tmp_path / "notebooks"
    outside = tmp_path / "host"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("host secret\n")
    m = FileContentsManager(root_dir=str(root))
    assert guard(m) and guard(m)   # once; a second call changes nothing
    return m, root, outside


def test_reading_or_saving_through_a_symlink_out_of_the_root_is_refused(cm):
    m, root, outside = cm
    os.symlink(outside / "secret.txt", root / "notes.txt")      # the last component
    os.symlink(outside, root / "data")                           # a folder on the way
    for path in ("notes.txt", "data/secret.txt", "data"):
        with pytest.raises(HTTPError) as e:
            m.get(path)
        assert e.value.status_code == 403
    with pytest.raises(HTTPError) as e:
        m.save({"type": "file", "format": "text", "content": "pwned\n"}, "notes.txt")
    assert e.value.status_code == 403
    with pytest.raises(HTTPError):
        m.save({"type": "file", "format": "text", "content": "pwned\n"}, "data/new.txt")
    assert (outside / "secret.txt").read_text() == "host secret\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    # the folder still lists (the planted entries left out): one symlink must not blind the file browser
    (root / "mine.txt").write_text("x")
    assert [e["name"] for e in m.get("")["content"]] == ["mine.txt"]


def test_files_and_symlinks_inside_the_root_keep_working(cm):
    m, root, _ = cm
    m.save({"type": "file", "format": "text", "content": "mine\n"}, "a.txt")
    os.symlink("a.txt", root / "b.txt")
    assert m.get("b.txt")["content"] == "mine\n"
    assert {e["name"] for e in m.get("")["content"]} >= {"a.txt", "b.txt"}
