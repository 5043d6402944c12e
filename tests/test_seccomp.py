"""Docker's default seccomp profile: the compiled program, and what it denies in real containers.

The program is checked twice: by a small classic-BPF interpreter here (every
architecture branch, argument filters, the ENOSYS stub, with no kernel in the
way), and by the kernel, in busybox containers running a static C probe that
issues each syscall and prints the errno it got. Each denial is compared with
the same probe run unconfined, so a test fails if something else (a missing
capability, a missing kernel feature) is what refused the call.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from probes import PROBE_C

from jupyter_contain import errors
from jupyter_contain.runtime.containers import seccomp, spawn
from jupyter_contain.runtime.containers.container import ContainerSpec, Runtime, parse_bind

REPO = Path(__file__).resolve().parent.parent
EPERM, ENOSYS, EINVAL = 1, 38, 22
X86_64 = os.uname().machine == "x86_64"

# --- the program, interpreted ---------------------------------------------------------

AUDIT_ARCH_X86_64, AUDIT_ARCH_I386, AUDIT_ARCH_AARCH64 = 0xC000003E, 0x40000003, 0xC00000B7
RET_ALLOW, RET_ERRNO, RET_KILL_THREAD = 0x7FFF0000, 0x00050000, 0


def run_bpf(prog: bytes, *, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """Evaluate a seccomp classic-BPF program on one ``struct seccomp_data``."""
    a6 = (list(args) + [0] * 6)[:6]
    data = struct.pack("=iIQ6Q", nr, arch, 0, *a6)   # nr, arch, instruction_pointer, args[6]
    insns = [struct.unpack_from("=HBBI", prog, off) for off in range(0, len(prog), 8)]
    acc = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if code == 0x20:                       # ld [k]
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x00:                     # ld #k
            acc = k
        elif code == 0x01:                     # ldx #k
            x = k
        elif code == 0x60:                     # ld M[k]
            acc = mem[k]
        elif code == 0x61:                     # ldx M[k]
            x = mem[k]
        elif code == 0x02:                     # st M[k]
            mem[k] = acc
        elif code == 0x03:                     # stx M[k]
            mem[k] = x
        elif code == 0x54:                     # and #k
            acc &= k
        elif code == 0x87:                     # txa
            acc = x
        elif code == 0x07:                     # tax
            x = acc
        elif code == 0x05:                     # ja
            pc += k
        elif cls == 0x05:                      # conditional jumps (K or X source)
            op, src = code & 0xF0, (x if code & 0x08 else k)
            taken = {0x10: acc == src, 0x20: acc > src, 0x30: acc >= src, 0x40: bool(acc & src)}[op]
            pc += jt if taken else jf
        elif code == 0x06:                     # ret #k
            return k
        elif code == 0x16:                     # ret a
            return acc
        else:
            raise AssertionError(f"opcode {code:#x} at {pc - 1} not in this interpreter")


@pytest.fixture(scope="module")
def prog() -> bytes:
    return seccomp.default_filter()


def test_program_shape_and_cache(prog):
    assert prog and len(prog) % 8 == 0 and len(prog) // 8 <= 4096
    again = seccomp.default_filter()
    assert again is prog                                   # the cache: compiled once per process
    assert seccomp.default_filter(spawn.DEFAULT_CAPABILITIES) is prog
    # a fresh compile gives the same bytes (deterministic), it is just not redone
    assert seccomp.compile_profile(seccomp.resolve_profile(
        seccomp.load_profile(), capabilities=spawn.DEFAULT_CAPABILITIES)) == prog
    # many threads asking at once for a set not compiled yet get one object
    caps = spawn.DEFAULT_CAPABILITIES | {"CAP_SYS_PTRACE"}
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(seccomp.default_filter(caps))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(g is got[0] for g in got) and got[0] != prog


def test_docker_default_caps_kept_in_step():
    assert seccomp._DOCKER_DEFAULT_CAPS == spawn.DEFAULT_CAPABILITIES


@pytest.mark.skipif(not X86_64, reason="syscall numbers below are x86_64's")
def test_program_decisions_x86_64(prog):
    run = lambda nr, arch=AUDIT_ARCH_X86_64, *args: run_bpf(prog, nr=nr, arch=arch, args=args)
    assert run(0) == RET_ALLOW                              # read
    assert run(39) == RET_ALLOW                             # getpid
    assert run(165) == RET_ERRNO | EPERM                    # mount
    assert run(250) == RET_ERRNO | EPERM                    # keyctl (old, not listed: the default action)
    assert run(321) == RET_ERRNO | EPERM                    # bpf
    assert run(298) == RET_ERRNO | EPERM                    # perf_event_open
    assert run(161) == RET_ALLOW                            # chroot: CAP_SYS_CHROOT is a default cap
    assert run(435) == RET_ERRNO | ENOSYS                   # clone3: ENOSYS so libc falls back to clone
    assert run(458) == RET_ERRNO | ENOSYS                   # listmount: newer than the profile
    assert run(100000) == RET_ERRNO | ENOSYS
    # clone: allowed without namespace flags only
    assert run(56, AUDIT_ARCH_X86_64, 0x11) == RET_ALLOW                    # SIGCHLD (fork)
    assert run(56, AUDIT_ARCH_X86_64, 0x3D0F00) == RET_ALLOW                # pthread_create's flags
    assert run(56, AUDIT_ARCH_X86_64, 0x10000000 | 0x11) == RET_ERRNO | EPERM   # CLONE_NEWUSER
    assert run(56, AUDIT_ARCH_X86_64, 0x00020000) == RET_ERRNO | EPERM         # CLONE_NEWNS
    # personality: only the listed personas
    assert run(135, AUDIT_ARCH_X86_64, 0xFFFFFFFF) == RET_ALLOW
    assert run(135, AUDIT_ARCH_X86_64, 8) == RET_ALLOW
    assert run(135, AUDIT_ARCH_X86_64, 0x0040000) == RET_ERRNO | EPERM
    # socket: everything but AF_VSOCK
    assert run(41, AUDIT_ARCH_X86_64, 2, 1) == RET_ALLOW
    assert run(41, AUDIT_ARCH_X86_64, 40, 1) == RET_ERRNO | EPERM
    # the 32-bit ABI (int 0x80) and x32 have their own branches
    assert run(20, AUDIT_ARCH_I386) == RET_ALLOW           # i386 getpid
    assert run(21, AUDIT_ARCH_I386) == RET_ERRNO | EPERM   # i386 mount
    assert run(999, AUDIT_ARCH_I386) == RET_ERRNO | ENOSYS
    assert run(0x40000000 | 39) == RET_ALLOW               # x32 getpid
    assert run(0x40000000 | 165) == RET_ERRNO | EPERM      # x32 mount
    # an architecture the filter does not know is killed (libseccomp's default, as Docker)
    assert run(0, AUDIT_ARCH_AARCH64) == RET_KILL_THREAD


@pytest.mark.skipif(not X86_64, reason="syscall numbers below are x86_64's")
def test_host_file_guard_decisions_x86_64(prog):
    """No setuid/setgid file, device node or xattr from inside (see seccomp.HOST_FILE_GUARD)."""
    run = lambda nr, *args, arch=AUDIT_ARCH_X86_64: run_bpf(prog, nr=nr, arch=arch, args=args)
    EOPNOTSUPP, O_CREAT, O_TMPFILE = 95, 0o100, 0o20200000
    junk = 0xFFFFFFFF_00000000
    for nr, idx in ((90, 1), (91, 1), (85, 1), (268, 2), (452, 2)):     # chmod fchmod creat fchmodat fchmodat2
        args = [3, 0x1000, 0, 0]
        for mode, want in ((0o755, RET_ALLOW), (0o1777, RET_ALLOW), (junk | 0o644, RET_ALLOW),
                           (0o4755, RET_ERRNO | EPERM), (0o2755, RET_ERRNO | EPERM), (junk | 0o6000, RET_ERRNO | EPERM)):
            args[idx] = mode
            assert run(nr, *args) == want, (nr, oct(mode))
    for nr, flags in ((2, 1), (257, 2)):                                   # open(path, flags, mode), openat
        def call(fl: int, mode: int, nr: int = nr, flags: int = flags) -> int:
            args = [3, 0x1000, 0, 0]
            args[flags], args[flags + 1] = fl, mode
            return run(nr, *args)
        assert call(0, 0o4755) == RET_ALLOW                  # not creating: the mode register is junk
        assert call(O_CREAT, 0o644) == RET_ALLOW and call(O_TMPFILE, 0o600) == RET_ALLOW
        assert call(O_CREAT | 1, 0o4755) == RET_ERRNO | EPERM and call(O_CREAT, 0o2700) == RET_ERRNO | EPERM
        assert call(O_TMPFILE | 1, 0o4755) == RET_ERRNO | EPERM
    for nr, idx in ((133, 1), (259, 2)):                                   # mknod, mknodat
        args = [3, 0x1000, 0, 0]
        for mode, want in ((0o100644, RET_ALLOW), (0o010644, RET_ALLOW), (0o140755, RET_ALLOW), (0o644, RET_ALLOW),
                           (0o020666, RET_ERRNO | EPERM), (0o060666, RET_ERRNO | EPERM),
                           (0o104755, RET_ERRNO | EPERM), (0o012644, RET_ERRNO | EPERM)):
            args[idx] = mode
            assert run(nr, *args) == want, (nr, oct(mode))
    assert run(437) == RET_ERRNO | ENOSYS                                  # openat2: its mode is out of reach
    assert {run(n) for n in (425, 426, 427)} == {RET_ERRNO | ENOSYS}       # io_uring
    assert {run(n) for n in (188, 189, 190)} == {RET_ERRNO | EOPNOTSUPP}   # setxattr lsetxattr fsetxattr
    assert run(193) == RET_ALLOW                                           # getxattr is fine
    # the 32-bit entry points get the same: i386 chmod(15), open(5), mknod(14)
    assert run(15, 0x1000, 0o4755, arch=AUDIT_ARCH_I386) == RET_ERRNO | EPERM
    assert run(15, 0x1000, 0o755, arch=AUDIT_ARCH_I386) == RET_ALLOW
    assert run(5, 0x1000, O_CREAT, 0o4755, arch=AUDIT_ARCH_I386) == RET_ERRNO | EPERM
    assert run(14, 0x1000, 0o020666, arch=AUDIT_ARCH_I386) == RET_ERRNO | EPERM


def test_host_file_guard_in_the_oci_section():
    """runc/crun get the same guard: the names leave Docker's unconditional allow list."""
    sec = seccomp.oci_section("default", capabilities=spawn.DEFAULT_CAPABILITIES)
    assert sec is not None
    unconditional = {n for r in sec["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
                     for n in r["names"]}
    assert {"chmod", "open", "openat", "mknod", "setxattr", "openat2", "io_uring_setup"} <= seccomp.HOST_FILE_GUARD
    assert not unconditional & seccomp.HOST_FILE_GUARD
    chmod = [r for r in sec["syscalls"] if "chmod" in r["names"]]
    assert chmod == [{"names": ["chmod", "fchmod", "creat"], "action": "SCMP_ACT_ALLOW",
                      "args": [{"index": 1, "value": 0o6000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}]
    with pytest.raises(errors.InvalidSpec, match="refuse by default"):
        seccomp.resolve_profile({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []},
                                capabilities=spawn.DEFAULT_CAPABILITIES, arch="SCMP_ARCH_X86_64")


def test_resolution_follows_capabilities():
    profile = seccomp.load_profile()

    def rules(caps, arch="SCMP_ARCH_X86_64"):
        r = seccomp.resolve_profile(profile, capabilities=caps, arch=arch, kernel=(6, 1))
        return r, {(n, r_["action"], json.dumps(r_.get("args"))) for r_ in r["syscalls"] for n in r_["names"]}

    base, flat = rules(spawn.DEFAULT_CAPABILITIES)
    names = {n for n, action, _ in flat if action == "SCMP_ACT_ALLOW"}
    assert base["defaultAction"] == "SCMP_ACT_ERRNO" and base["defaultErrnoRet"] == EPERM
    assert base["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert {"read", "execve", "chroot", "arch_prctl", "modify_ldt", "ptrace"} <= names
    assert not names & {"mount", "unshare", "setns", "bpf", "perf_event_open", "reboot", "init_module",
                        "kexec_load", "keyctl", "open_by_handle_at", "kcmp", "acct", "syslog"}
    assert ("clone3", "SCMP_ACT_ERRNO", "null") in flat
    assert any(n == "clone" and a != "null" for n, _, a in flat)   # clone only with its flag check
    assert not any(n == "clone" and a == "null" for n, _, a in flat)

    _, aflat = rules(spawn.DEFAULT_CAPABILITIES | {"CAP_SYS_ADMIN"})
    anames = {n for n, action, _ in aflat if action == "SCMP_ACT_ALLOW"}
    assert {"mount", "unshare", "setns", "clone3", "bpf"} <= anames
    assert not any(n == "clone3" and action == "SCMP_ACT_ERRNO" for n, action, _ in aflat)
    assert ("clone", "SCMP_ACT_ALLOW", "null") in aflat

    _, pflat = rules(spawn.DEFAULT_CAPABILITIES | {"CAP_SYS_PTRACE"})
    assert ("kcmp", "SCMP_ACT_ALLOW", "null") in pflat
    _, nochroot = rules(spawn.DEFAULT_CAPABILITIES - {"CAP_SYS_CHROOT"})
    assert not any(n == "chroot" for n, _, _ in nochroot)
    arm, armflat = rules(spawn.DEFAULT_CAPABILITIES, arch="SCMP_ARCH_AARCH64")
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    armnames = {n for n, _, _ in armflat}
    assert "set_tls" in armnames and "arch_prctl" not in armnames
    assert ("ptrace", "SCMP_ACT_ALLOW", "null") in flat        # minKernel 4.8 holds on 6.1
    r = seccomp.resolve_profile(profile, capabilities=spawn.DEFAULT_CAPABILITIES, arch="SCMP_ARCH_X86_64",
                                kernel=(4, 4))
    assert not any("ptrace" in x["names"] for x in r["syscalls"])


def test_modes():
    assert seccomp.filter_for("unconfined") == b""
    assert seccomp.filter_for("default") is seccomp.default_filter()
    with pytest.raises(errors.InvalidSpec, match="seccomp"):
        seccomp.filter_for("strict")
    with pytest.raises(errors.InvalidSpec, match="seccomp"):
        ContainerSpec(image="busybox:test", seccomp="bogus")


# --- in real containers -----------------------------------------------------------------



@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> Path:
    """A directory holding ``probe``, a static binary (the busybox image has no libc)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the syscall probe")
    d = tmp_path_factory.mktemp("seccomp-probe")
    (d / "probe.c").write_text(PROBE_C)
    res = subprocess.run([gcc, "-static", "-O1", "-o", str(d / "probe"), str(d / "probe.c")],
                         check=False, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot build a static probe: {res.stderr[-500:]}")
    (d / "probe.c").unlink()
    return d


def run_capture(rt: Runtime, tmp_path: Path, cmd: str, **kw) -> tuple[int, str]:
    out = tmp_path / "out"
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        info = rt.run(ContainerSpec(image="busybox:test", command=("sh", "-c", cmd), **kw),
                      stdio=(null.fileno(), f.fileno(), f.fileno()), remove=True)
    return info.code, out.read_text()


def run_probe(rt: Runtime, tmp_path: Path, probe_dir: Path, mode: str) -> dict[str, int]:
    code, out = run_capture(rt, tmp_path, "/probe/probe", seccomp=mode,
                            binds=(parse_bind(f"{probe_dir}:/probe:ro"),))
    assert code == 0, out
    return {k: int(v) for k, v in (line.split("=") for line in out.split())}


def test_status_default_and_unconfined(runtime, tmp_path, caplog):
    code, out = run_capture(runtime, tmp_path, "grep -E '^(Seccomp|Seccomp_filters|NoNewPrivs):' /proc/self/status")
    assert code == 0
    assert "Seccomp:\t2" in out and "Seccomp_filters:\t1" in out and "NoNewPrivs:\t1" in out
    with caplog.at_level(logging.WARNING, logger="jupyter_contain.runtime.containers.seccomp"):
        code, out = run_capture(runtime, tmp_path, "grep -E '^Seccomp:' /proc/self/status", seccomp="unconfined")
    assert code == 0 and "Seccomp:\t0" in out
    assert any("seccomp=unconfined" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_probe_denials(runtime, tmp_path, probe_dir):
    confined = run_probe(runtime, tmp_path, probe_dir, "default")
    free = run_probe(runtime, tmp_path, probe_dir, "unconfined")
    denied = ["keyctl", "add_key", "bpf", "perf_event_open", "kexec_load", "reboot", "init_module",
              "open_by_handle_at", "mount", "umount2", "setns", "unshare_user", "clone_newuser",
              "personality_addr_no_randomize", "socket_vsock"]
    if X86_64:
        denied.append("i386_unshare_user")
    assert {k: confined[k] for k in denied} == {k: EPERM for k in denied}
    assert confined["clone3"] == ENOSYS and confined["listmount"] == ENOSYS
    allowed = ["getpid", "personality_query", "clone_fork", "socket_inet"] + (["i386_getpid"] if X86_64 else [])
    assert {k: confined[k] for k in allowed} == {k: 0 for k in allowed}
    assert {k: free[k] for k in allowed} == {k: 0 for k in allowed}
    # without the filter the same calls get past the syscall entry: the filter is what refused them
    assert free["unshare_user"] == 0 and free["clone_newuser"] == 0
    assert free["personality_addr_no_randomize"] == 0
    # (reboot, kexec_load and init_module check their capability first on most kernels, and so
    # does open_by_handle_at before 6.9 (CAP_DAC_READ_SEARCH; seen on 6.1 in the VM lane): for
    # those, test_program_decisions_x86_64 shows the program refuses them)
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    first = ("reboot", "kexec_load", "init_module") + (("open_by_handle_at",) if release < (6, 9) else ())
    passed = {k: free[k] for k in denied if k not in first}
    assert EPERM not in passed.values(), passed
    assert free["clone3"] == EINVAL
    # listmount is new in 6.8: before, the kernel itself has none
    assert free["listmount"] not in (EPERM, ENOSYS) if release >= (6, 8) else free["listmount"] == ENOSYS


def test_busybox_denied_and_allowed(runtime, tmp_path):
    code, out = run_capture(runtime, tmp_path,
                            "mount -t tmpfs none /mnt; echo mount=$?; "
                            "unshare -U true; echo unshare=$?; "
                            "(echo forked) | cat; ls / | grep -c bin; echo $((6*7)); "
                            "grep -c . /proc/self/status >/dev/null && echo status-ok")
    assert code == 0, out
    assert "mount=0" not in out and "mount=" in out
    assert "unshare=0" not in out and "Operation not permitted" in out
    assert "forked" in out and "42" in out and "status-ok" in out
    code, out = run_capture(runtime, tmp_path, "unshare -U true; echo unshare=$?", seccomp="unconfined")
    assert "unshare=0" in out, out     # the denial above is the filter's


def test_exec_gets_the_filter(runtime, tmp_path):
    for mode, expect in (("default", "Seccomp:\t2"), ("unconfined", "Seccomp:\t0")):
        c = runtime.create(ContainerSpec(image="busybox:test", command=("sleep", "30"), seccomp=mode))
        try:
            c.start()
            out = tmp_path / f"exec-{mode}"
            with open(out, "wb") as f, open(os.devnull, "rb") as null:
                proc = c.exec(["grep", "^Seccomp:", "/proc/self/status"], stdio=(null.fileno(), f.fileno(), f.fileno()))
                assert proc.wait(10) == 0
                proc.close()
            assert expect in out.read_text()
            assert c.state.seccomp == mode
            config = json.loads((c.dir / "config.json").read_text())
            if mode == "default":
                sec = config["linux"]["seccomp"]
                assert sec["defaultAction"] == "SCMP_ACT_ERRNO" and sec["defaultErrnoRet"] == EPERM
                assert any("execve" in r["names"] for r in sec["syscalls"])
            else:
                assert config["linux"].get("seccomp") is None
        finally:
            c.remove(force=True)


def cli(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "jupyter_contain.cli", "--root", str(root), *args],
                          check=False, capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_security_opt(image_store):
    root = image_store.root
    res = cli(root, "run", "--rm", "busybox:test", "grep", "^Seccomp:", "/proc/self/status")
    assert res.returncode == 0 and "Seccomp:\t2" in res.stdout, res.stderr
    res = cli(root, "run", "--rm", "--security-opt", "seccomp=unconfined", "busybox:test",
              "grep", "^Seccomp:", "/proc/self/status")
    assert res.returncode == 0 and "Seccomp:\t0" in res.stdout, res.stderr
    res = cli(root, "run", "--rm", "--security-opt", "seccomp=/some/profile.json", "busybox:test", "true")
    assert res.returncode != 0 and "seccomp" in res.stderr


def test_guard_mode_keeps_only_the_host_file_guard(runtime, tmp_path, caplog):
    """"guard" (what a kernel asking for seccomp=unconfined gets): Docker's profile is off, the
    refusals that keep setuid/setgid files, device nodes and xattrs out of host folders stay."""
    assert seccomp.filter_for("guard") is seccomp.guard_filter()
    with caplog.at_level(logging.WARNING, logger="jupyter_contain.runtime.containers.seccomp"):
        code, out = run_capture(runtime, tmp_path, "grep -E '^Seccomp:' /proc/self/status; cd /tmp; touch f; "
                                "chmod 4755 f; echo suid=$?; chmod 2755 f; echo sgid=$?; chmod 755 f; echo plain=$?; "
                                "mknod c0 c 1 3; echo chr=$?; mknod p0 p; echo fifo=$?; "
                                "unshare -U true; echo unshare=$?; stat -c %a f", seccomp="guard")
    assert code == 0, out
    res = dict(line.split("=") for line in out.split() if "=" in line)
    assert "Seccomp:\t2" in out
    assert res["suid"] != "0" and res["sgid"] != "0" and res["chr"] != "0", out
    assert res["plain"] == "0" and res["fifo"] == "0", out
    assert res["unshare"] == "0", out          # Docker's profile refuses this one: it is off here
    assert out.split()[-1] == "755"
    assert any("host-file guard" in r.getMessage() for r in caplog.records)
    section = seccomp.oci_section("guard")
    assert section["defaultAction"] == "SCMP_ACT_ALLOW" and any("chmod" in r["names"] for r in section["syscalls"])
