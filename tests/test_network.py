"""Container networks (none / bridge / host) with real namespaces, veths, nftables and traffic.

Every bridge in these tests lives in a network namespace the suite makes for
itself (held by an ``unshare -n sleep`` process), never in the machine's own:
``Settings.host_netns`` points the network module at it. A second private
namespace, "outside", is linked to it by a veth (198.51.100.0/24, a
documentation range) and stands for the rest of the world, so masquerade
and published ports can be checked end to end. Traffic goes only to servers
inside these namespaces. Killing the holders at the end removes every
interface, address and nftables rule with them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from jupyter_contain import errors
from jupyter_contain.runtime.containers import network
from jupyter_contain.runtime.containers.container import ContainerSpec, Runtime

SUBNET = "10.89.0.0/24"
GATEWAY = "10.89.0.1"
BRIDGE = "jctest0"
HOST_SIDE, OUTSIDE_SIDE = "198.51.100.1", "198.51.100.2"

pytestmark = pytest.mark.skipif(not any(Path(d, "libnftables.so.1").exists() for d in
                                        ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")),
                                reason="libnftables is not installed")


# --- namespaces ------------------------------------------------------------------------------


def _holder() -> subprocess.Popen:
    proc = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
    deadline = time.monotonic() + 5
    me = os.readlink("/proc/self/ns/net")
    while os.readlink(f"/proc/{proc.pid}/ns/net") == me:   # unshare has not exec'ed sleep yet
        assert time.monotonic() < deadline, "unshare did not make a namespace"
        time.sleep(0.005)
    return proc


def _ipr_do(netns: str, fn):
    def body():
        with network._ipr() as ipr:
            return fn(ipr)
    return network.run_in_netns(netns, body)


@pytest.fixture(scope="session")
def namespaces():
    """(test netns path, outside netns path), linked by a veth pair; gone at the end."""
    host, outside = _holder(), _holder()
    host_ns, out_ns = f"/proc/{host.pid}/ns/net", f"/proc/{outside.pid}/ns/net"
    try:
        def host_side(ipr):
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname="jtout0", kind="veth", peer={"ifname": "jtout1", "net_ns_pid": outside.pid})
            idx = ipr.link_lookup(ifname="jtout0")[0]
            ipr.addr("add", index=idx, address=HOST_SIDE, prefixlen=24)
            ipr.link("set", index=idx, state="up")

        def outside_side(ipr):
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            idx = ipr.link_lookup(ifname="jtout1")[0]
            ipr.addr("add", index=idx, address=OUTSIDE_SIDE, prefixlen=24)
            ipr.link("set", index=idx, state="up")

        _ipr_do(host_ns, host_side)
        _ipr_do(out_ns, outside_side)
        yield host_ns, out_ns
    finally:
        network.wait_pending()
        for p in (host, outside):
            p.kill()
            p.wait()


@pytest.fixture
def settings(namespaces, tmp_path) -> network.Settings:
    return network.Settings(state_dir=tmp_path / "net", bridge=BRIDGE, subnet=SUBNET, host_netns=namespaces[0])


def _links(netns: str) -> set[str]:
    return set(_ipr_do(netns, lambda ipr: [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]))


def _rules(netns: str) -> list[dict]:
    return network.run_in_netns(netns, lambda: network._nft_table()[1])


def _tagged(netns: str) -> list[str]:
    return [r["comment"] for r in _rules(netns) if (r.get("comment") or "").startswith("jc:")]


def _assert_clean(s: network.Settings) -> None:
    network.wait_pending()
    assert not [n for n in _links(s.host_netns) if n.startswith("jc") and n != BRIDGE]
    assert _tagged(s.host_netns) == []
    assert network.leases(s) == {}


@pytest.fixture
def rt(image_store, settings):
    """A runtime whose bridge lives in the test namespace; checks that nothing of the network is left."""
    r = Runtime(image_store, network=settings)
    before = {c.id for c in r.containers()}
    yield r
    for c in r.containers():
        if c.id not in before:
            c.remove(force=True)
    _assert_clean(settings)


# --- servers inside the namespaces ------------------------------------------------------------


class Server:
    """A tiny HTTP server listening inside a namespace; records the peers it saw."""

    def __init__(self, netns: str, body: bytes, host: str = "0.0.0.0") -> None:
        self.sock = network.run_in_netns(netns, socket.create_server, (host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.body, self.peers = body, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                self.peers.append(peer[0])
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.body), self.body))
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def server(namespaces):
    s = Server(namespaces[0], b"hello from the test netns\n")
    yield s
    s.close()


def fetch(netns: str, addr: str, port: int, timeout: float = 3.0) -> bytes:
    """An HTTP GET from inside ``netns`` (the socket is made there)."""
    sock = network.run_in_netns(netns, socket.socket)
    with sock:
        sock.settimeout(timeout)
        sock.connect((addr, port))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[-1]


# --- helpers ------------------------------------------------------------------------------------


def run_capture(rt: Runtime, tmp_path: Path, cmd: str, **kw) -> tuple[int, str]:
    out = tmp_path / "out"
    with open(out, "wb") as f, open(os.devnull, "rb") as null:
        info = rt.run(ContainerSpec(image="busybox:test", command=("sh", "-c", cmd), **kw),
                      stdio=(null.fileno(), f.fileno(), f.fileno()), remove=True)
    return info.code, out.read_text()


def get(addr: str, port: int) -> str:
    """Shell for an HTTP GET in the container (busybox's wget crashes in its static build here)."""
    return f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {addr} {port}"


HTTPD = "mkdir -p /www && echo {text} > /www/index.html && exec httpd -f -p {port} -h /www"


def start_httpd(rt: Runtime, text: str, port: int = 8000, **kw):
    c = rt.create(ContainerSpec(image="busybox:test", command=("sh", "-c", HTTPD.format(text=text, port=port)),
                                network="bridge", **kw))
    c.start()
    return c


def wait_listening(netns: str, addr: str, port: int) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            fetch(netns, addr, port, timeout=0.5)
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing answers on {addr}:{port}"
            time.sleep(0.05)


# --- pure parts ---------------------------------------------------------------------------------


def test_parse_publish():
    assert network.parse_publish("8080:80") == network.PortMapping(8080, 80, "tcp")
    assert network.parse_publish("127.0.0.1:8080:80/udp") == network.PortMapping(8080, 80, "udp", "127.0.0.1")
    assert str(network.parse_publish("1.2.3.4:1:2")) == "1.2.3.4:1:2/tcp"
    assert network.parse_publish("8080:80").loopback and not network.parse_publish("10.0.0.1:1:2").loopback
    for bad in ("80", "a:b", "0:80", "8080:70000", "8080:80/sctp", "x.y:1:2", "1:2:3:4"):
        with pytest.raises(errors.InvalidSpec):
            network.parse_publish(bad)
    with pytest.raises(errors.InvalidSpec, match="bridge"):
        ContainerSpec(image="x", publish=("8080:80",))
    assert ContainerSpec(image="x", network="bridge", publish=("8080:80",)).publish == ("8080:80/tcp",)


def test_settings(tmp_path):
    s = network.Settings.from_env(tmp_path, environ={})
    assert (s.bridge, s.subnet, s.gateway, s.host_netns) == ("jcbr0", "10.89.0.0/24", "10.89.0.1", None)
    s = network.Settings.from_env(tmp_path, environ={network.ENV_SUBNET: "10.90.0.0/16", network.ENV_BRIDGE: "br7",
                                                     network.ENV_HOST_NETNS: "/run/netns/x"})
    assert (s.bridge, s.gateway, s.host_netns) == ("br7", "10.90.0.1", "/run/netns/x")
    for kw in ({"subnet": "10.89.0.1/24"}, {"subnet": "10.89.0.0/30"}, {"bridge": "x" * 16},
               {"bridge": "jc12345678"}, {"bridge": "a b"}):
        with pytest.raises(errors.InvalidSpec):
            network.Settings(state_dir=tmp_path, **kw)
    with pytest.raises(errors.InvalidSpec):
        network.veth_name("../../x")


def test_resolv_conf(tmp_path):
    systemd, etc = tmp_path / "systemd", tmp_path / "etc"
    etc.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n")
    assert network.resolv_conf(systemd_path=systemd, etc_path=etc) == ""   # only a loopback resolver
    systemd.write_text("# upstream\nnameserver 192.0.2.53\nnameserver ::1\nnameserver 2001:db8::53\nsearch lan\n")
    assert network.resolv_conf(systemd_path=systemd, etc_path=etc) == (
        "nameserver 192.0.2.53\nnameserver 2001:db8::53\nsearch lan\n")
    systemd.unlink()
    etc.write_text("nameserver 127.0.0.1\nnameserver 192.0.2.1\n")
    assert network.resolv_conf(systemd_path=systemd, etc_path=etc) == "nameserver 192.0.2.1\n"


def test_run_in_netns_is_per_thread(namespaces):
    mine = os.readlink("/proc/thread-self/ns/net")
    theirs = network.run_in_netns(namespaces[0], os.readlink, "/proc/thread-self/ns/net")
    assert theirs == os.readlink(namespaces[0]) != mine
    assert os.readlink("/proc/thread-self/ns/net") == mine
    with pytest.raises(errors.NetworkError):
        network.run_in_netns("/nonexistent", lambda: None)


# --- modes ----------------------------------------------------------------------------------------


def test_none_has_only_loopback(rt, tmp_path, server):
    code, out = run_capture(rt, tmp_path, f"ip -o link | cut -d: -f2; echo routes:; ip route; echo end; "
                                          f"{get(GATEWAY, server.port)} || echo unreachable")
    assert code == 0, out
    links, _, rest = out.partition("routes:")
    assert links.split() == ["lo"]
    assert rest.split("end")[0].strip() == ""
    assert "unreachable" in out and "hello" not in out
    assert server.peers == []


def test_bridge_reaches_server_on_gateway(rt, tmp_path, server, settings):
    code, out = run_capture(rt, tmp_path, "ip -o -4 addr show eth0; ip route; echo @@; cat /etc/resolv.conf; echo ==; "
                                          + get(GATEWAY, server.port), network="bridge")
    assert code == 0, out
    assert "hello from the test netns" in out
    assert f"default via {GATEWAY} dev eth0" in out
    addr = out.split("inet ")[1].split()[0]
    assert ipaddress.IPv4Interface(addr).network == ipaddress.IPv4Network(SUBNET) and not addr.startswith(GATEWAY + "/")
    assert server.peers == [addr.split("/")[0]]   # same subnet: not masqueraded
    resolv = out.split("@@\n")[1].split("==")[0]
    assert resolv == network.resolv_conf()
    # the bridge and forwarding are in the test namespace, not in ours
    assert BRIDGE in _links(settings.host_netns) and BRIDGE not in os.listdir("/proc/sys/net/ipv4/conf")
    assert network.run_in_netns(settings.host_netns, lambda: open("/proc/sys/net/ipv4/ip_forward").read()) == "1\n"


def test_masquerade_to_outside(rt, tmp_path, namespaces):
    outside = Server(namespaces[1], b"hello from outside\n")
    try:
        code, out = run_capture(rt, tmp_path, get(OUTSIDE_SIDE, outside.port),
                                network="bridge")
    finally:
        outside.close()
    assert code == 0 and "hello from outside" in out, out
    assert outside.peers == [HOST_SIDE]   # rewritten to the host's address: the outside has no route back


def test_host_network_shares_namespace(rt, tmp_path):
    code, out = run_capture(rt, tmp_path, "readlink /proc/self/ns/net", network="host")
    assert code == 0 and out.strip() == os.readlink("/proc/self/ns/net")


def test_two_containers_reach_each_other(rt, tmp_path, settings):
    a = start_httpd(rt, "hi-from-a")
    try:
        addr = a.info()["address"]
        assert addr and addr in {lease["address"] for lease in network.leases(settings).values()}
        wait_listening(settings.host_netns, addr, 8000)
        code, out = run_capture(rt, tmp_path, get(addr, 8000), network="bridge")
        assert code == 0 and "hi-from-a" in out, out
    finally:
        a.remove(force=True)


def test_concurrent_starts_get_distinct_addresses(rt, settings):
    containers = [rt.create(ContainerSpec(image="busybox:test", command=("sleep", "30"), network="bridge"))
                  for _ in range(20)]
    errors_seen: list[BaseException] = []
    barrier = threading.Barrier(len(containers))

    def start(c):
        barrier.wait()
        try:
            c.start()
        except BaseException as exc:  # reported below
            errors_seen.append(exc)

    threads = [threading.Thread(target=start, args=(c,)) for c in containers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors_seen == []
        addrs = [c.info()["address"] for c in containers]
        assert len(set(addrs)) == 20 and None not in addrs
        assert all(ipaddress.IPv4Address(a) in ipaddress.IPv4Network(SUBNET) and a != GATEWAY for a in addrs)
        held = network.leases(settings)
        assert sorted(lease["address"] for lease in held.values()) == sorted(addrs)
        links = _links(settings.host_netns)
        assert {network.veth_name(c.id) for c in containers} <= links
        assert sorted(_tagged(settings.host_netns)) == sorted(f"jc:{c.id}" for c in containers)
    finally:
        for c in containers:
            c.remove(force=True)
    _assert_clean(settings)


def test_teardown_and_restart(rt, settings, tmp_path):
    # alive long enough to look: when a container's netns dies the kernel removes its veth pair
    c = rt.create(ContainerSpec(image="busybox:test", command=("sleep", "2"), network="bridge",
                                publish=("18081:80",)))
    for _ in range(2):   # a restart in place attaches again after the first teardown
        c.start()
        assert network.veth_name(c.id) in _links(settings.host_netns)
        assert _tagged(settings.host_netns).count(f"jc:{c.id}") == 4   # masquerade, dnat x2, loopback masq
        assert list(network.leases(settings)) == [c.id]
        assert c.wait(10).code == 0
    _assert_clean(settings)
    assert network.detach(settings, container_id=c.id) is False   # idempotent
    c.remove()


def test_publish(rt, settings, namespaces):
    c = start_httpd(rt, "published", publish=("18080:8000", f"{HOST_SIDE}:18082:8000"))
    try:
        wait_listening(settings.host_netns, c.info()["address"], 8000)
        # from the host namespace itself: output dnat, on the gateway and on loopback (route_localnet)
        assert fetch(settings.host_netns, GATEWAY, 18080) == b"published\n"
        assert fetch(settings.host_netns, "127.0.0.1", 18080) == b"published\n"
        # from another machine: prerouting dnat, on both the any-address and the address-bound mapping
        assert fetch(namespaces[1], HOST_SIDE, 18080) == b"published\n"
        assert fetch(namespaces[1], HOST_SIDE, 18082) == b"published\n"
        with pytest.raises(OSError):
            fetch(namespaces[1], HOST_SIDE, 18083, timeout=1)   # not published
        with pytest.raises(errors.NetworkError, match="already published"):
            start_httpd(rt, "twice", publish=("18080:8000",))
    finally:
        c.remove(force=True)


def test_gc_after_crash(settings):
    """A process died with containers on the bridge: leases, rules and veths stay behind until gc."""
    live, dead = _holder(), _holder()
    live_id, dead_id, stray_id = "a1" * 32, "d0" * 32, "5e" * 32
    try:
        network.attach(settings, container_id=live_id, pid=live.pid)
        network.attach(settings, container_id=dead_id, pid=dead.pid, publish=[network.parse_publish("18090:80")])
        # a crash before the lease was written: a veth and a rule nobody knows
        _ipr_do(settings.host_netns, lambda ipr: ipr.link("add", ifname=network.veth_name(stray_id), kind="veth",
                                                           peer={"ifname": "jtstray"}))
        network.run_in_netns(settings.host_netns, network._nft,
                             f'add rule ip {network.NFT_TABLE} postrouting ip saddr 10.89.0.250 masquerade '
                             f'comment "jc:{stray_id}"')
        dead.kill()
        dead.wait()
        assert set(network.leases(settings)) == {live_id, dead_id}
        assert f"jc:{dead_id}" in _tagged(settings.host_netns)

        removed = network.gc(settings, [live_id], sweep_unknown=False)
        assert f"lease:{dead_id}" in removed
        assert set(network.leases(settings)) == {live_id}
        assert set(_tagged(settings.host_netns)) == {f"jc:{live_id}", f"jc:{stray_id}"}
        assert network.veth_name(stray_id) in _links(settings.host_netns)

        removed = network.gc(settings, [live_id])
        assert f"veth:{network.veth_name(stray_id)}" in removed
        assert set(_tagged(settings.host_netns)) == {f"jc:{live_id}"}
        assert network.veth_name(live_id) in _links(settings.host_netns)
        assert not {network.veth_name(stray_id), network.veth_name(dead_id)} & _links(settings.host_netns)
        assert network.gc(settings, [live_id]) == []
    finally:
        network.detach(settings, container_id=live_id)
        for p in (live, dead):
            p.kill()
            p.wait()
    _assert_clean(settings)


def test_runtime_gc_cleans_network_of_dead_container(rt, settings):
    c = rt.create(ContainerSpec(image="busybox:test", command=("sleep", "30"), network="bridge"))
    c.start()
    # as if the starting process had died: the init goes, nobody records the exit
    os.kill(c.pid, 9)
    c._proc.wait(5)
    c._proc.close()
    c._proc = None
    assert list(network.leases(settings)) == [c.id]
    rt.gc(sweep_unknown_network=False)
    network.wait_pending()
    assert network.leases(settings) == {}
    assert f"jc:{c.id}" not in _tagged(settings.host_netns)


def test_two_stores_share_one_lease_table(image_store, settings, tmp_path, busybox_tar):
    """Two stores on one bridge: distinct addresses, and each one's gc frees only its own leases."""
    import dataclasses

    from jupyter_contain.runtime import Store
    from jupyter_contain.runtime.images import archive

    other = Store(tmp_path / "other-store")
    archive.import_rootfs(other, busybox_tar, "busybox:test", cmd=["/bin/sh"])
    a = Runtime(image_store, network=dataclasses.replace(settings, owner="store-a"))
    b = Runtime(other, network=dataclasses.replace(settings, owner="store-b"))
    ca = a.create(ContainerSpec(image="busybox:test", command=("sleep", "30"), network="bridge"))
    cb = b.create(ContainerSpec(image="busybox:test", command=("sleep", "30"), network="bridge"))
    try:
        ca.start()
        cb.start()
        held = network.leases(settings)
        assert held[ca.id]["owner"] == "store-a" and held[cb.id]["owner"] == "store-b"
        assert held[ca.id]["address"] != held[cb.id]["address"]
        # store a's gc knows none of b's containers: b's lease, veth and rules stay
        a.gc()
        assert set(network.leases(settings)) == {ca.id, cb.id}
        assert network.veth_name(cb.id) in _links(settings.host_netns)
        assert f"jc:{cb.id}" in _tagged(settings.host_netns)
    finally:
        ca.remove(force=True)
        cb.remove(force=True)
    _assert_clean(settings)
