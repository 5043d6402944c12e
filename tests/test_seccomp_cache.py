"""The on-disk cache of compiled seccomp programs: used only when every check holds.

A cached program decides what every container may do, so a file in the cache
that is stale, corrupt or not the host's own must never be loaded: the program
is compiled again and the file replaced. Each hostile case below plants a file
that is *well-formed* (right magic, header, key and checksum) but holds a
different program, an allow-everything one, so that loading it would show.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_contain.runtime.containers import seccomp

REPO = Path(__file__).resolve().parent.parent

#: a one-instruction program: return SECCOMP_RET_ALLOW (what an attacker would plant)
ALLOW_ALL = struct.pack("=HBBI", 0x06, 0, 0, 0x7FFF0000)


@pytest.fixture(scope="module")
def section() -> dict:
    return seccomp.oci_section("default")


@pytest.fixture(scope="module")
def fresh(section) -> bytes:
    return seccomp.compile_profile(section)


def _entry(cache: Path, section: dict) -> Path:
    return cache / (seccomp._cache_key(section) + ".bpf")


def _plant(path: Path, section: dict, prog: bytes, **header_changes) -> None:
    """A well-formed cache file holding ``prog`` (header fields overridable)."""
    header = {"format": seccomp._CACHE_FORMAT, "key": seccomp._cache_key(section), "size": len(prog),
              "sha256": hashlib.sha256(prog).hexdigest(), "lib": seccomp._lib_identity()}
    header.update(header_changes)
    path.write_bytes(seccomp._CACHE_MAGIC + json.dumps(header).encode() + b"\n" + prog)
    path.chmod(0o600)


@pytest.fixture
def cache(tmp_path) -> Path:
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    return d


def test_a_miss_compiles_and_writes_a_private_file_the_next_process_loads(cache, section, fresh):
    assert seccomp.cached_program(section, directory=cache) == fresh
    entry = _entry(cache, section)
    st = entry.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    assert [p.name for p in cache.iterdir()] == [entry.name]     # no temporary file left
    # a new process gets the same program from the file, without loading libseccomp
    probe = ("import sys; from jupyter_contain.runtime.containers import seccomp as s; "
             "p = s.default_filter(); sys.stdout.buffer.write(p); "
             "assert b'libseccomp' not in open('/proc/self/maps', 'rb').read(), 'compiled'")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JUPYTER_CONTAIN_SECCOMP_CACHE": str(cache)}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == fresh


def test_the_planted_program_is_loaded_when_every_check_holds(cache, section):
    # the control for the cases below: a well-formed file in a private folder is used as is
    _plant(_entry(cache, section), section, ALLOW_ALL)
    assert seccomp.cached_program(section, directory=cache) == ALLOW_ALL


@pytest.mark.parametrize("case", [
    "other key", "other format", "bad checksum", "wrong size", "truncated", "no magic", "garbage header",
    "other libseccomp", "no libseccomp named", "not whole instructions", "empty program",
])
def test_a_stale_or_corrupt_file_is_recompiled_and_replaced(cache, section, fresh, case):
    entry = _entry(cache, section)
    if case == "other key":
        _plant(entry, section, ALLOW_ALL, key="0" * 64)
    elif case == "other format":
        _plant(entry, section, ALLOW_ALL, format=seccomp._CACHE_FORMAT + 1)
    elif case == "bad checksum":
        _plant(entry, section, ALLOW_ALL, sha256=hashlib.sha256(b"x").hexdigest())
    elif case == "wrong size":
        _plant(entry, section, ALLOW_ALL, size=16)
    elif case == "truncated":
        _plant(entry, section, fresh)
        entry.write_bytes(entry.read_bytes()[:-3])
    elif case == "no magic":
        _plant(entry, section, ALLOW_ALL)
        entry.write_bytes(entry.read_bytes()[1:])
    elif case == "garbage header":
        entry.write_bytes(seccomp._CACHE_MAGIC + b"{not json\n" + ALLOW_ALL)
    elif case == "other libseccomp":
        lib = dict(seccomp._lib_identity() or {})
        lib["ino"] = -1
        _plant(entry, section, ALLOW_ALL, lib=lib)
    elif case == "no libseccomp named":
        _plant(entry, section, ALLOW_ALL, lib=None)
    elif case == "not whole instructions":
        _plant(entry, section, ALLOW_ALL + b"\0")
    elif case == "empty program":
        _plant(entry, section, b"")
    entry.chmod(0o600)
    assert seccomp.cached_program(section, directory=cache) == fresh
    # replaced by the good program, which the next lookup uses
    assert seccomp.cached_program(section, directory=cache) == fresh
    assert entry.read_bytes().endswith(b"\n" + fresh)


@pytest.mark.parametrize("case", ["symlink", "group-writable", "other-writable", "foreign owner", "fifo",
                                  "directory"])
def test_a_hostile_file_is_never_loaded(cache, section, fresh, tmp_path, case):
    entry = _entry(cache, section)
    elsewhere = tmp_path / "planted.bpf"
    if case == "symlink":
        _plant(elsewhere, section, ALLOW_ALL)
        entry.symlink_to(elsewhere)
    elif case in ("group-writable", "other-writable", "foreign owner"):
        _plant(entry, section, ALLOW_ALL)
        if case == "foreign owner":
            os.chown(entry, 65534, 65534)
        else:
            entry.chmod(0o620 if case == "group-writable" else 0o602)
    elif case == "fifo":
        os.mkfifo(entry, 0o600)     # opened O_NONBLOCK: no hang, and not a regular file
    elif case == "directory":
        entry.mkdir(mode=0o700)
    assert seccomp.cached_program(section, directory=cache) == fresh
    if case == "symlink":
        # the link itself was replaced; what it pointed to is untouched
        assert not entry.is_symlink() and elsewhere.read_bytes().endswith(ALLOW_ALL)
    if case != "directory":
        assert entry.read_bytes().endswith(b"\n" + fresh)


@pytest.mark.parametrize("case", ["group-writable folder", "foreign folder", "folder is a symlink"])
def test_a_folder_others_can_write_is_not_used_at_all(tmp_path, section, fresh, case):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    _plant(_entry(real, section), section, ALLOW_ALL)
    cache = real
    if case == "group-writable folder":
        real.chmod(0o770)
    elif case == "foreign folder":
        os.chown(real, 65534, 65534)
    else:
        cache = tmp_path / "link"
        cache.symlink_to(real)
    before = sorted(p.name for p in real.iterdir())
    assert seccomp.cached_program(section, directory=cache) == fresh
    assert sorted(p.name for p in real.iterdir()) == before      # nothing written there either


def test_no_cache_folder_compiles_in_process(section, fresh, monkeypatch):
    monkeypatch.setenv("JUPYTER_CONTAIN_SECCOMP_CACHE", "")
    assert seccomp.cache_dir() is None
    assert seccomp.cached_program(section, directory=None) == fresh


def test_the_key_changes_with_what_the_program_depends_on(section):
    key = seccomp._cache_key(section)
    assert key == seccomp._cache_key(json.loads(json.dumps(section)))      # stable
    more = seccomp.resolve_profile(seccomp.load_profile(),
                                   capabilities=set(seccomp._DOCKER_DEFAULT_CAPS) | {"CAP_SYS_ADMIN"})
    assert seccomp._cache_key(more) != key
    older = seccomp.resolve_profile(seccomp.load_profile(), capabilities=seccomp._DOCKER_DEFAULT_CAPS,
                                    kernel=(4, 0))
    assert seccomp._cache_key(older) != key
    assert seccomp._cache_key(seccomp._guard_section()) != key


def test_native_arch_from_uname_agrees_with_libseccomp():
    assert seccomp._native_arch() == seccomp._libseccomp_native_arch()
