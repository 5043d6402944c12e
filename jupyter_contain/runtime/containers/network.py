"""Container networking for the ``bridge`` mode: bridge, veth pairs, address leases, NAT, DNS.

Owns: the bridge (default ``jcbr0`` on ``10.89.0.0/24``, gateway ``.1``), one
veth pair per container (host side ``jc<8 hex of the id>`` enslaved to the
bridge, container side ``eth0`` in the container's network namespace), the
address pool (``<state_dir>/leases.json`` under an ``fcntl`` lock, so
concurrent starts in any number of processes never get the same address;
one table per bridge and network namespace for the whole machine, by
default under ``/run/jupyter-contain/network``, each lease naming the store
that holds it, so two stores on one bridge never share an address and each
one's ``gc`` frees only its own),
the nftables table ``ip jupyter_contain`` (masquerade, published ports) whose
per-container rules carry the comment ``jc:<container id>``, the sysctls this
needs, the container's ``resolv.conf`` content, and the clean-up of what a
crashed process left (:func:`gc`). This is the only module that uses pyroute2.

Must not: fork (the Jupyter server is threaded), touch any interface, route,
sysctl or nftables table other than the ones named above, or know about the
container lifecycle (``container`` calls :func:`attach` between spawn and
release, :func:`detach` when the container ends).

How it reaches other network namespaces without forking: pyroute2 0.9's
``IPRoute(netns=...)`` / ``NetNS`` fork a helper process to open the socket
(``pyroute2.netns.create_socket`` runs a ``ChildProcess``), which a threaded
server must not do and which costs far more than the 20 ms budget. Instead,
every operation runs in a short-lived dedicated thread that calls
``setns(fd, CLONE_NEWNET)``: for network namespaces setns changes only the
calling thread, and a netlink socket (pyroute2's ``IPRoute``), libnftables'
socket and ``/proc/sys/net`` all belong to the namespace of the thread that
opened them. The thread ends when the work is done, so no thread of the
process is ever left in a foreign namespace and nothing needs restoring.
The *host* namespace (where the bridge lives) is ``Settings.host_netns``:
``None`` means the caller's own, tests pass a namespace they made.

nftables is driven in-process through libnftables (``libnftables.so.1``, the
library behind the ``nft`` command) with ctypes: one transaction per
attach/detach, no ``nft`` process per start. Its contexts are not meant to
be used concurrently, so calls are serialised by a process-wide lock.

Published ports (``-p [IP:]HOST:CONTAINER[/tcp|udp]``) are nftables DNAT rules:
``prerouting`` for connections arriving from elsewhere and ``output`` for
connections from the host itself. Connections to ``127.0.0.1:HOST`` need
``route_localnet`` on the bridge (a packet from 127.0.0.1 may then leave on it)
and a masquerade of loopback sources; a userspace proxy (Docker's choice) was
rejected because the runtime has no daemon to host it and a thread in the
server would die with the server while the container lives on. Because
``route_localnet`` would also let a container send packets to the host's
127.0.0.0/8 services, a guard chain drops every such packet arriving on the
bridge that is not part of a DNAT'ed (published) connection (the fix kube-proxy
applied for CVE-2020-8558).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ... import errors
from ..fsutil import file_lock

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_SUBNET",
    "NFT_TABLE",
    "Attachment",
    "PortMapping",
    "Settings",
    "attach",
    "detach",
    "gc",
    "leases",
    "parse_publish",
    "remove_bridge",
    "resolv_conf",
    "run_in_netns",
    "veth_name",
    "wait_pending",
]

DEFAULT_BRIDGE = "jcbr0"
#: podman uses 10.88.0.0/16; a different default so both can live on one host
DEFAULT_SUBNET = "10.89.0.0/24"
NFT_TABLE = "jupyter_contain"
CONTAINER_IFNAME = "eth0"

ENV_BRIDGE = "JUPYTER_CONTAIN_BRIDGE"
ENV_SUBNET = "JUPYTER_CONTAIN_SUBNET"
ENV_HOST_NETNS = "JUPYTER_CONTAIN_HOST_NETNS"
ENV_NET_DIR = "JUPYTER_CONTAIN_NET_DIR"

_CLONE_NEWNET = 0x40000000
_IFNAME_OK = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_CID_OK = re.compile(r"^[0-9a-f]{8,64}$")
_VETH = re.compile(r"^jc[0-9a-f]{8}$")
_COMMENT = re.compile(r"^jc:([0-9a-f]{8,64})$")

T = TypeVar("T")


# --- settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Where the bridge network lives and how it is addressed."""

    #: leases.json and its lock (by default shared by every store that uses the
    #: bridge: :func:`default_state_dir`)
    state_dir: Path
    bridge: str = DEFAULT_BRIDGE
    subnet: str = DEFAULT_SUBNET
    #: path of the network namespace that holds the bridge (``/run/netns/x``,
    #: ``/proc/<pid>/ns/net``); None: the calling process's own
    host_netns: str | None = None
    #: who takes leases (a runtime: its store's tag); :func:`gc` frees only these
    owner: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not _IFNAME_OK.match(self.bridge) or _VETH.match(self.bridge):   # gc would take it for a veth
            raise errors.InvalidSpec(f"invalid bridge name {self.bridge!r} (1-15 of letters, digits, _ . -)")
        try:
            net = ipaddress.IPv4Network(self.subnet, strict=True)
        except ValueError as exc:
            raise errors.InvalidSpec(f"invalid bridge subnet {self.subnet!r}: {exc}") from None
        if net.prefixlen > 29:
            raise errors.InvalidSpec(f"bridge subnet {self.subnet} is too small (at most /29)")
        object.__setattr__(self, "subnet", str(net))

    @classmethod
    def from_env(cls, state_dir: Path | str | None = None, *, owner: str = "",
                 environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``JUPYTER_CONTAIN_BRIDGE`` / ``_SUBNET`` / ``_HOST_NETNS`` (defaults otherwise).

        ``state_dir`` None: the machine-wide table of that bridge (:func:`default_state_dir`).
        """
        env = os.environ if environ is None else environ
        bridge = env.get(ENV_BRIDGE) or DEFAULT_BRIDGE
        host_netns = env.get(ENV_HOST_NETNS) or None
        if state_dir is None:
            state_dir = default_state_dir(bridge, host_netns, environ=env)
        return cls(state_dir=Path(state_dir), bridge=bridge, subnet=env.get(ENV_SUBNET) or DEFAULT_SUBNET,
                   host_netns=host_netns, owner=owner)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        """The bridge's own address: the first host of the subnet."""
        return str(self.network.network_address + 1)


def default_state_dir(bridge: str, host_netns: str | None = None, *,
                      environ: Mapping[str, str] | None = None) -> Path:
    """The lease table every store on ``bridge`` (in that network namespace) shares.

    ``$JUPYTER_CONTAIN_NET_DIR`` (default ``/run/jupyter-contain/network``,
    a tmpfs: leases end with the boot, as the bridge does) ``/ns<inode>-<bridge>``,
    the inode naming the network namespace that holds the bridge.
    """
    env = os.environ if environ is None else environ
    try:
        key = f"ns{os.stat(host_netns or '/proc/self/ns/net').st_ino}"
    except OSError as exc:
        # a runtime that never uses the bridge must still construct: the error comes at attach
        log.debug("cannot identify network namespace %s: %s", host_netns or "of this process", exc)
        key = "ns-unknown"
    return Path(env.get(ENV_NET_DIR) or "/run/jupyter-contain/network") / f"{key}-{bridge}"


@dataclass(frozen=True)
class PortMapping:
    """``-p [HOST_IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp]``."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    #: None: every local address of the host namespace (loopback included)
    host_ip: str | None = None

    def __post_init__(self) -> None:
        for p in (self.host_port, self.container_port):
            if not isinstance(p, int) or not 0 < p < 65536:
                raise errors.InvalidSpec(f"invalid port {p!r} (1-65535)")
        if self.protocol not in ("tcp", "udp"):
            raise errors.InvalidSpec(f"invalid protocol {self.protocol!r} (tcp or udp)")
        if self.host_ip is not None:
            try:
                object.__setattr__(self, "host_ip", str(ipaddress.IPv4Address(self.host_ip)))
            except ValueError:
                raise errors.InvalidSpec(f"invalid host address {self.host_ip!r} (an IPv4 address)") from None

    def __str__(self) -> str:
        ip = f"{self.host_ip}:" if self.host_ip else ""
        return f"{ip}{self.host_port}:{self.container_port}/{self.protocol}"

    @property
    def loopback(self) -> bool:
        """Reachable on 127.0.0.1 (needs route_localnet and a loopback masquerade)."""
        return self.host_ip is None or ipaddress.IPv4Address(self.host_ip).is_loopback


def parse_publish(text: str) -> PortMapping:
    """Parse Docker's ``-p`` form: ``[IP:]HOST:CONTAINER[/tcp|/udp]``."""
    spec, _, proto = text.partition("/")
    parts = spec.split(":")
    try:
        if len(parts) == 2:
            return PortMapping(int(parts[0]), int(parts[1]), proto or "tcp")
        if len(parts) == 3:
            return PortMapping(int(parts[1]), int(parts[2]), proto or "tcp", host_ip=parts[0] or None)
    except ValueError:
        pass
    raise errors.InvalidSpec(f"invalid port mapping {text!r} (expected [IP:]HOST:CONTAINER[/tcp|udp])")


@dataclass(frozen=True)
class Attachment:
    """A container's place on the bridge (what :func:`attach` set up)."""

    container_id: str
    address: str
    prefixlen: int
    gateway: str
    bridge: str
    veth: str
    publish: tuple[PortMapping, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "prefixlen": self.prefixlen, "gateway": self.gateway,
                "bridge": self.bridge, "veth": self.veth, "publish": [str(p) for p in self.publish]}


def veth_name(container_id: str) -> str:
    """The host-side interface of a container: ``jc`` + 8 hex digits of its id."""
    return "jc" + _check_cid(container_id)[:8]


def _check_cid(cid: str) -> str:
    # the id goes into interface names and nft comments: hex only, no injection
    if not isinstance(cid, str) or not _CID_OK.match(cid):
        raise errors.InvalidSpec(f"invalid container id {cid!r}")
    return cid


# --- namespaces -------------------------------------------------------------------------------

_libc: Any = None


def _setns(path: str) -> None:
    """Move the *calling thread* into the network namespace at ``path``."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.NetworkError(f"cannot open network namespace {path}: {exc.strerror}") from None
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise errors.NetworkError(f"cannot enter network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(netns: str | None, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a fresh thread inside ``netns`` (None: the caller's namespace).

    Sockets ``fn`` creates stay bound to ``netns`` and may be returned and
    used from any thread. The thread ends afterwards, taking its namespace
    with it.
    """
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            if netns is not None:
                _setns(netns)
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=body, name="jc-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


#: every group may open ICMP echo sockets (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``): ping
#: without CAP_NET_RAW, as Docker and Podman set it in a container's own network namespace
PING_GROUP_RANGE = "0 2147483647"


def allow_ping(pid: int) -> None:
    """Set ``net.ipv4.ping_group_range`` in process ``pid``'s network namespace (one thread, ~0.1 ms)."""
    run_in_netns(f"/proc/{pid}/ns/net", _sysctl, "net.ipv4.ping_group_range", PING_GROUP_RANGE)


def _sysctl(key: str, value: str) -> None:
    """Write ``/proc/sys/<key>`` as seen by the calling thread's network namespace (only if different)."""
    path = "/proc/sys/" + key.replace(".", "/")
    with open(path, "r+") as f:
        if f.read().strip() != value:
            f.seek(0)
            f.write(value)


# --- leases ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(settings: Settings) -> Iterator[dict[str, Any]]:
    """The lease table, locked against every other process and thread; written back on success.

    ``file_lock``, not ``flock``: a container child cloned meanwhile must not inherit it.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with file_lock(settings.state_dir / "lock"):
        yield from _locked_table(settings)


def _locked_table(settings: Settings) -> Iterator[dict[str, Any]]:
    path = settings.state_dir / "leases.json"
    try:
        table = json.loads(path.read_bytes())
    except FileNotFoundError:
        table = {}
    except ValueError:
        log.warning("%s is unreadable: starting a new lease table", path)
        table = {}
    table.setdefault("leases", {})
    before = json.dumps(table, sort_keys=True)
    yield table
    after = json.dumps(table, sort_keys=True)
    if after != before:
        tmp = path.with_name(f".leases.{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=2, sort_keys=True))
        os.replace(tmp, path)


def leases(settings: Settings) -> dict[str, dict[str, Any]]:
    """Container id -> lease (``address``, ``bridge``, ``publish``) as recorded now."""
    with _locked(settings) as table:
        return dict(table["leases"])


def _allocate(settings: Settings, cid: str, publish: tuple[PortMapping, ...]) -> str:
    net = settings.network
    with _locked(settings) as table:
        held = table["leases"]
        if cid in held:
            raise errors.NetworkError(f"container {cid[:12]} is already attached to {held[cid]['bridge']}")
        used = {lease["address"] for lease in held.values()}
        taken_ports = {(p, lease["bridge"]) for lease in held.values() for p in lease.get("ports", ())}
        for p in publish:
            if (f"{p.protocol}/{p.host_port}", settings.bridge) in taken_ports:
                raise errors.NetworkError(f"host port {p.host_port}/{p.protocol} is already published")
        gateway = settings.gateway
        for host in net.hosts():
            addr = str(host)
            if addr != gateway and addr not in used:
                held[cid] = {"address": addr, "bridge": settings.bridge, "subnet": settings.subnet,
                             "owner": settings.owner,
                             "publish": [str(p) for p in publish],
                             "ports": [f"{p.protocol}/{p.host_port}" for p in publish]}
                return addr
    raise errors.NetworkError(f"no free address left in {settings.subnet} on {settings.bridge}")


# --- nftables ---------------------------------------------------------------------------------

_NFT_OUTPUT_JSON = 1 << 4
_nft_lib: Any = None
_nft_lock = threading.Lock()


def _nft_library() -> Any:
    global _nft_lib
    if _nft_lib is None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            raise errors.NetworkError("bridge networking needs nftables (libnftables.so.1, Debian package "
                                      "libnftables1)") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        _nft_lib = lib
    return _nft_lib


def _nft(commands: str, *, json_output: bool = False) -> str:
    """Run an nft script as one transaction in the calling thread's namespace; its output."""
    lib = _nft_library()
    with _nft_lock:
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise errors.NetworkError("nftables: cannot create a context")
        try:
            if json_output:
                lib.nft_ctx_output_set_flags(ctx, _NFT_OUTPUT_JSON)
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
        finally:
            lib.nft_ctx_free(ctx)
    if rc != 0:
        raise errors.NetworkError(f"nftables refused the rules: {err.strip() or 'unknown error'}")
    return out


def _nft_base() -> list[str]:
    # "add" is idempotent for tables and chains: every attach can send these
    t = f"ip {NFT_TABLE}"
    return [
        f"add table {t}",
        f"add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}",
        f"add chain {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}",
        f"add chain {t} output {{ type nat hook output priority -100; policy accept; }}",
    ]


def _guard_chain(bridge: str) -> str:
    return "guard_" + bridge.replace(".", "_").replace("-", "_")


def _nft_guard(bridge: str) -> list[str]:
    """Drop what route_localnet would let through from the bridge to the host's 127.0.0.0/8."""
    t, chain = f"ip {NFT_TABLE}", _guard_chain(bridge)
    return [
        f"add chain {t} {chain} {{ type filter hook input priority filter; policy accept; }}",
        f"flush chain {t} {chain}",   # re-filled whole: idempotent
        f'add rule {t} {chain} iifname "{bridge}" ip daddr 127.0.0.0/8 ct status dnat accept',
        f'add rule {t} {chain} iifname "{bridge}" ip daddr 127.0.0.0/8 drop',
    ]


def _nft_container(settings: Settings, cid: str, address: str, publish: Iterable[PortMapping]) -> list[str]:
    t, tag = f"ip {NFT_TABLE}", f'comment "jc:{cid}"'
    rules = [f"add rule {t} postrouting ip saddr {address} ip daddr != {settings.subnet} masquerade {tag}"]
    loopback = False
    for p in publish:
        match = f"ip daddr {p.host_ip}" if p.host_ip else "fib daddr type local"
        target = f"{p.protocol} dport {p.host_port} dnat to {address}:{p.container_port}"
        rules.append(f"add rule {t} prerouting {match} {target} {tag}")
        rules.append(f"add rule {t} output {match} {target} {tag}")
        loopback = loopback or p.loopback
    if loopback:
        # the host's own connections to 127.0.0.1:PORT leave with a loopback source: rewrite it
        rules.append(f"add rule {t} postrouting ip saddr 127.0.0.0/8 ip daddr {address} masquerade {tag}")
    return rules


def _nft_table() -> tuple[set[str], list[dict[str, Any]]]:
    """Chain names and rules (chain, handle, comment) of our table; empty when it does not exist."""
    try:
        out = _nft(f"list table ip {NFT_TABLE}", json_output=True)
    except errors.NetworkError as exc:
        if "No such file or directory" in str(exc):
            return set(), []
        raise
    items = json.loads(out or "{}").get("nftables", [])
    return {i["chain"]["name"] for i in items if "chain" in i}, [i["rule"] for i in items if "rule" in i]


def _nft_delete_tagged(wanted: Callable[[str], bool]) -> list[dict[str, Any]]:
    """Delete every rule whose ``jc:<id>`` comment names an id ``wanted`` accepts; the rules deleted.

    Idempotent under concurrency: a rule another process deleted between the
    listing and the deletion makes the transaction fail, so list again.
    """
    for attempt in range(3):
        doomed = [r for r in _nft_table()[1] if (cid := _comment_cid(r)) and wanted(cid)]
        cmds = [f"delete rule ip {NFT_TABLE} {r['chain']} handle {int(r['handle'])}" for r in doomed]
        if not cmds:
            return []
        try:
            _nft("\n".join(cmds))
            return doomed
        except errors.NetworkError:
            if attempt == 2:
                raise
    return []


def _comment_cid(rule: Mapping[str, Any]) -> str | None:
    m = _COMMENT.match(rule.get("comment") or "")
    return m.group(1) if m else None


# --- links ------------------------------------------------------------------------------------


def _ipr() -> Any:
    from pyroute2 import IPRoute  # lazy: only bridge mode pays the import

    return IPRoute()


def _link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _ensure_bridge(ipr: Any, settings: Settings) -> int:
    from pyroute2 import NetlinkError

    idx = _link_index(ipr, settings.bridge)
    if idx is None:
        try:
            ipr.link("add", ifname=settings.bridge, kind="bridge")
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:   # a concurrent start made it first: fine
                raise
        idx = _link_index(ipr, settings.bridge)
        assert idx is not None
        try:
            ipr.addr("add", index=idx, address=settings.gateway, prefixlen=settings.network.prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        ipr.link("set", index=idx, state="up")
        log.info("created bridge %s (%s, gateway %s)", settings.bridge, settings.subnet, settings.gateway)
    return idx


def _delete_link(ipr: Any, name: str) -> bool:
    from pyroute2 import NetlinkError

    idx = _link_index(ipr, name)
    if idx is None:
        return False
    try:
        ipr.link("del", index=idx)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:   # gone meanwhile (its container's namespace went)
            raise
        return False
    return True


# --- attach / detach -------------------------------------------------------------------------


def attach(settings: Settings, *, container_id: str, pid: int,
           publish: Iterable[PortMapping] = ()) -> Attachment:
    """Put the network namespace of ``pid`` on the bridge.

    Leases an address, creates the bridge if needed, a veth pair whose
    container end is ``eth0`` in the namespace of ``pid`` (address, up,
    default route via the bridge), enables forwarding and adds the NAT and
    published-port rules. On failure everything done so far is undone.
    """
    cid = _check_cid(container_id)
    ports = tuple(publish)
    _join_pending(cid)   # a restart right after the exit: the old teardown first
    address = _allocate(settings, cid, ports)
    att = Attachment(container_id=cid, address=address, prefixlen=settings.network.prefixlen,
                     gateway=settings.gateway, bridge=settings.bridge, veth=veth_name(cid), publish=ports)
    try:
        run_in_netns(None, _attach_worker, settings, att, pid)
    except BaseException:
        with contextlib.suppress(Exception):
            detach(settings, container_id=cid)
        raise
    log.info("container %s on %s as %s", cid[:12], settings.bridge, address)
    return att


def _attach_worker(settings: Settings, att: Attachment, pid: int) -> None:
    """Runs in its own thread: host side in ``settings.host_netns``, then the container side."""
    from pyroute2 import NetlinkError

    if settings.host_netns is not None:
        _setns(settings.host_netns)
    try:
        with _ipr() as ipr:
            bridge = _ensure_bridge(ipr, settings)
            # the peer is created directly in the container's namespace, already
            # named eth0; the host end enslaved and up in the same request
            veth = {"ifname": att.veth, "kind": "veth", "master": bridge, "state": "up",
                    "peer": {"ifname": CONTAINER_IFNAME, "net_ns_pid": pid}}
            try:
                ipr.link("add", **veth)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
                _delete_link(ipr, att.veth)   # a leftover of a crash with the same id prefix
                ipr.link("add", **veth)
        _sysctl("net.ipv4.ip_forward", "1")
        loopback = any(p.loopback for p in att.publish)
        # re-adding an existing base chain costs a kernel hook update (~13 ms
        # here), a listing ~0.3 ms: send the chains only when they are missing
        chains = _nft_table()[0]
        nft = [] if {"postrouting", "prerouting", "output"} <= chains else _nft_base()
        if loopback and _guard_chain(settings.bridge) not in chains:
            nft += _nft_guard(settings.bridge)
        _nft("\n".join(nft + _nft_container(settings, att.container_id, att.address, att.publish)))
        if loopback:
            _sysctl(f"net/ipv4/conf/{settings.bridge}/route_localnet", "1")
        _setns(f"/proc/{pid}/ns/net")
        with _ipr() as ipr:
            idx = _link_index(ipr, CONTAINER_IFNAME)
            if idx is None:
                raise errors.NetworkError(f"eth0 did not appear in the namespace of pid {pid}")
            ipr.addr("add", index=idx, address=att.address, prefixlen=att.prefixlen)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=att.gateway)
    except NetlinkError as exc:
        raise errors.NetworkError(f"network setup of container {att.container_id[:12]} failed: "
                                  f"{os.strerror(exc.code) if exc.code else exc}") from exc


# Detaching pays a kernel RCU grace period twice (deleting a netdev and any
# nftables deletion: 8-20 ms each on this machine), so a container's exit can
# hand it to a background thread; the lease is released only when the
# interface and rules are gone, so nothing can reuse the address or host
# port meanwhile. A process that dies mid-way leaves the lease: gc finishes.
_pending: dict[str, threading.Thread] = {}
_pending_lock = threading.Lock()


def _join_pending(cid: str | None = None, timeout: float | None = None) -> None:
    with _pending_lock:
        threads = [t for c, t in _pending.items() if cid is None or c == cid]
    for t in threads:
        t.join(timeout)


def wait_pending(timeout: float | None = None) -> None:
    """Wait for every background :func:`detach` of this process to finish."""
    _join_pending(None, timeout)


def detach(settings: Settings, *, container_id: str, background: bool = False) -> bool:
    """Undo :func:`attach` (veth, nft rules, then the lease); idempotent.

    Returns True if anything was removed (always True with ``background``,
    which returns at once and finishes in a thread; see :func:`wait_pending`).
    """
    cid = _check_cid(container_id)
    if not background:
        _join_pending(cid)
        return _detach_now(settings, cid)

    def body() -> None:
        try:
            _detach_now(settings, cid)
        except Exception:
            log.exception("network teardown of container %s failed (gc will retry)", cid[:12])
        finally:
            with _pending_lock:
                if _pending.get(cid) is threading.current_thread():
                    del _pending[cid]

    with _pending_lock:
        previous = _pending.get(cid)
        if previous is not None and previous.is_alive():
            return True
        t = _pending[cid] = threading.Thread(target=body, name=f"jc-net-detach-{cid[:8]}", daemon=True)
        t.start()
    return True


def _detach_now(settings: Settings, cid: str) -> bool:
    removed = run_in_netns(settings.host_netns, _detach_worker, cid)
    with _locked(settings) as table:
        had_lease = table["leases"].pop(cid, None) is not None
    return had_lease or removed


def _detach_worker(cid: str) -> bool:
    with _ipr() as ipr:
        removed = _delete_link(ipr, veth_name(cid))
    return bool(_nft_delete_tagged(lambda c: c == cid)) or removed


def gc(settings: Settings, live_container_ids: Iterable[str], *, sweep_unknown: bool = True) -> list[str]:
    """Remove what dead containers left: host-side veths, tagged nft rules, leases.

    ``live_container_ids``: this owner's containers that may still use the
    network; leases of other owners (stores sharing the bridge) are theirs to
    free. ``sweep_unknown``: also remove ``jc<hex>`` veths and ``jc:<id>``
    rules that no lease names (a crash before the lease was written).
    Returns what it removed.
    """
    live = {_check_cid(c) for c in live_container_ids}
    wait_pending()
    held = leases(settings)
    dead = {cid for cid, lease in held.items() if cid not in live and lease.get("owner", "") == settings.owner}
    known = live | set(held)
    removed = run_in_netns(settings.host_netns, _gc_worker, dead, known, sweep_unknown)
    with _locked(settings) as table:
        for cid in dead:
            if table["leases"].pop(cid, None) is not None:
                removed.append(f"lease:{cid}")
    return removed


def _gc_worker(dead: set[str], known: set[str], sweep_unknown: bool) -> list[str]:
    removed: list[str] = []
    known_prefixes = {c[:8] for c in known}
    dead_prefixes = {c[:8] for c in dead}
    with _ipr() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            if not _VETH.match(name) or link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") not in (None, "veth"):
                continue
            prefix = name[2:]
            if prefix in dead_prefixes or (sweep_unknown and prefix not in known_prefixes):
                if _delete_link(ipr, name):
                    removed.append(f"veth:{name}")
    doomed = _nft_delete_tagged(lambda c: c in dead or (sweep_unknown and c not in known))
    removed += [f"nft:{r['chain']}/{r['handle']}:{r.get('comment')}" for r in doomed]
    return removed


def remove_bridge(settings: Settings) -> bool:
    """Remove the bridge and our nftables table once no container holds a lease on it."""
    wait_pending()
    with _locked(settings) as table:
        if any(lease.get("bridge") == settings.bridge for lease in table["leases"].values()):
            raise errors.NetworkError(f"bridge {settings.bridge} is still in use")

        def work() -> bool:
            with _ipr() as ipr:
                gone = _delete_link(ipr, settings.bridge)
            with contextlib.suppress(errors.NetworkError):   # absent already
                _nft(f"delete table ip {NFT_TABLE}")
            return gone

        return run_in_netns(settings.host_netns, work)


# --- DNS ----------------------------------------------------------------------------------------

SYSTEMD_RESOLV = "/run/systemd/resolve/resolv.conf"


def resolv_conf(*, systemd_path: str | os.PathLike[str] = SYSTEMD_RESOLV,
                etc_path: str | os.PathLike[str] = "/etc/resolv.conf") -> str:
    """``resolv.conf`` for a bridged container.

    A loopback resolver of the host (systemd-resolved's 127.0.0.53, a local
    dnsmasq) is unreachable from the container's namespace, so: the upstream
    servers systemd-resolved uses if it runs, else the non-loopback servers of
    ``/etc/resolv.conf``, else none. ``search``/``options`` lines are kept.
    """
    for path in (systemd_path, etc_path):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        servers, other = [], []
        for line in text.splitlines():
            words = line.split()
            if not words or words[0].startswith(("#", ";")):
                continue
            if words[0] == "nameserver" and len(words) > 1:
                try:
                    ip = ipaddress.ip_address(words[1].split("%")[0])
                except ValueError:
                    continue
                if not ip.is_loopback:
                    servers.append(words[1])
            elif words[0] in ("search", "domain", "options"):
                other.append(" ".join(words))
        if servers:
            return "".join(f"nameserver {s}\n" for s in servers[:3]) + "".join(f"{o}\n" for o in other)
    return ""
