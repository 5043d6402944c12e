"""Hardening defaults, probed from inside real containers (issue #20).

- io_uring_setup/enter/register are refused by the default seccomp filter (Docker blocks them
  since 25: a frequent source of kernel exploits) with ENOSYS, as if the kernel had no io_uring
  (programs fall back to plain syscalls), and reach the kernel with seccomp=unconfined;
- CAP_NET_RAW is not in the default set: a packet socket is refused (EPERM), ``cap_add``
  (``--cap-add NET_RAW``) gives it back, ``cap_drop`` takes others away;
- ping still works without it: ICMP echo sockets through ``net.ipv4.ping_group_range``,
  which a start sets in the container's own network namespace (never the host's).

The probe is a small static C program bound in read-only, so the busybox image needs nothing.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from jupyter_contain import errors
from jupyter_contain.runtime.containers import spawn
from jupyter_contain.runtime.containers.container import ContainerSpec, parse_bind

PROBE_C = r"""
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <netinet/ip_icmp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

static void report(const char *what, long r) {
    if (r < 0) printf("%s=%s\n", what, strerror(errno));
    else printf("%s=ok\n", what);
}

int main(void) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    long fd = syscall(SYS_io_uring_setup, 1, &p);
    report("io_uring_setup", fd);
    if (fd >= 0) close((int)fd);
    report("io_uring_enter", syscall(SYS_io_uring_enter, -1, 0, 0, 0, NULL, 0));
    report("io_uring_register", syscall(SYS_io_uring_register, -1, 0, NULL, 0));
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    report("packet", s);
    if (s >= 0) close(s);
    s = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
    report("raw_icmp", s);
    if (s >= 0) close(s);
    /* ping as unprivileged tools do: an ICMP echo socket */
    s = socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP);
    if (s < 0) { report("ping", -1); return 0; }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct icmphdr h = {.type = ICMP_ECHO};
    h.un.echo.sequence = htons(1);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (sendto(s, &h, sizeof h, 0, (struct sockaddr *)&to, sizeof to) < 0) { report("ping", -1); return 0; }
    char buf[128];
    ssize_t n = recv(s, buf, sizeof buf, 0);
    if (n >= (ssize_t)sizeof h && ((struct icmphdr *)buf)->type == ICMP_ECHOREPLY) printf("ping=ok\n");
    else report("ping", -1);
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe_dir():
    d = Path(tempfile.mkdtemp(prefix="jc-hardening-", dir="/tmp"))
    try:
        (d / "probe.c").write_text(PROBE_C)
        res = subprocess.run(["gcc", "-static", "-O1", "-o", str(d / "probe"), str(d / "probe.c")],
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr[-2000:]
        (d / "probe.c").unlink()
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def run_probe(runtime, tmp_path: Path, probe_dir: Path, **kw) -> dict[str, str]:
    out = tmp_path / "out"
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        info = runtime.run(ContainerSpec(image="busybox:test", command=("/probe/probe",),
                                         binds=(parse_bind(f"{probe_dir}:/probe:ro"),), **kw),
                           stdio=(null.fileno(), f.fileno(), f.fileno()), remove=True)
    text = out.read_text()
    assert info.code == 0, text
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_default_container_has_no_io_uring_no_raw_sockets_and_still_pings(runtime, tmp_path, probe_dir):
    r = run_probe(runtime, tmp_path, probe_dir)
    for call in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        assert r[call] == "Function not implemented", r     # the filter's answer (see the next tests)
    assert r["packet"] == "Operation not permitted" and r["raw_icmp"] == "Operation not permitted", r
    assert r["ping"] == "ok", r


def test_cap_add_net_raw_gives_raw_sockets_back(runtime, tmp_path, probe_dir):
    r = run_probe(runtime, tmp_path, probe_dir, cap_add=("NET_RAW",))
    assert r["packet"] == "ok" and r["raw_icmp"] == "ok" and r["ping"] == "ok", r
    assert r["io_uring_setup"] == "Function not implemented", r   # capabilities do not open io_uring


def test_unconfined_seccomp_leaves_io_uring_to_the_kernel(runtime, tmp_path, probe_dir):
    r = run_probe(runtime, tmp_path, probe_dir, seccomp="unconfined")
    # the kernel answers now: a ring is made; the bad fd is the kernel's complaint, not ENOSYS
    if Path("/proc/sys/kernel/io_uring_disabled").exists() and \
            Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() != "0":
        pytest.skip("io_uring is disabled on this machine")
    assert r["io_uring_setup"] == "ok" and r["io_uring_enter"] == "Bad file descriptor", r
    assert r["io_uring_register"] != "Function not implemented", r


def test_ping_group_range_is_set_in_the_container_not_on_the_host(runtime, tmp_path):
    host = Path("/proc/sys/net/ipv4/ping_group_range").read_text()
    out = tmp_path / "out"
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        info = runtime.run(ContainerSpec(image="busybox:test",
                                         command=("cat", "/proc/sys/net/ipv4/ping_group_range")),
                           stdio=(null.fileno(), f.fileno(), f.fileno()), remove=True)
    assert info.code == 0
    assert out.read_text().split() == ["0", "2147483647"]
    assert Path("/proc/sys/net/ipv4/ping_group_range").read_text() == host


def test_capability_set_follows_dockers_rules():
    default = spawn.DEFAULT_CAPABILITIES
    assert "CAP_NET_RAW" not in default and "CAP_CHOWN" in default
    assert spawn.capability_set(add=["net_raw"]) == default | {"CAP_NET_RAW"}
    assert spawn.capability_set(drop=["CAP_CHOWN", "kill"]) == default - {"CAP_CHOWN", "CAP_KILL"}
    assert spawn.capability_set(drop=["ALL"], add=["NET_BIND_SERVICE"]) == {"CAP_NET_BIND_SERVICE"}
    assert "CAP_SYS_ADMIN" in spawn.capability_set(add=["ALL"], drop=["SYS_MODULE"])
    assert "CAP_SYS_MODULE" not in spawn.capability_set(add=["ALL"], drop=["SYS_MODULE"])
    with pytest.raises(errors.InvalidSpec, match="unknown capability 'NET_RAWR'"):
        ContainerSpec(image="busybox:test", cap_add=("NET_RAWR",))


def test_capabilities_are_recorded_and_kept_by_exec(runtime, tmp_path):
    c = runtime.create(ContainerSpec(image="busybox:test", command=("sleep", "30"), cap_add=("NET_RAW",),
                                     cap_drop=("CHOWN",)))
    try:
        want = spawn.DEFAULT_CAPABILITIES - {"CAP_CHOWN"} | {"CAP_NET_RAW"}
        assert c.state.process.capabilities == want
        assert runtime.get(c.id).state.process.capabilities == want      # read back from state.json
        c.start()
        out = tmp_path / "caps"
        with open(out, "wb") as f, open(os.devnull, "rb") as null:
            proc = c.exec(["grep", "CapEff", "/proc/self/status"], stdio=(null.fileno(), f.fileno(), f.fileno()))
            assert proc.wait(10) == 0
            proc.close()
        eff = int(out.read_text().split()[1], 16)
        from jupyter_contain import native
        assert eff & (1 << native.CAPABILITIES["CAP_NET_RAW"])
        assert not eff & (1 << native.CAPABILITIES["CAP_CHOWN"])
    finally:
        c.remove(force=True)
