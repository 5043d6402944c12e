"""``jupyter contain`` verbs about containers: run, exec, ps, stop, kill, rm, stats, logs, bundle."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .. import runtime  # lazy: a name loads its module when a verb first uses it
from ..errors import ContainerNotFound, ContainError, InvalidSpec
from .output import print_containers, print_stats

if TYPE_CHECKING:
    from ..runtime import Container, Limits, Runtime

#: the runtime's test hook (``container.FAULT_ENV``), also at this verb's own steps:
#: "run:created" (created, not started) and "run:started" (started, id not yet printed)
_FAULT_ENV = "JUPYTER_CONTAIN_FAULT"

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _fault(step: str) -> None:
    if os.environ.get(_FAULT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _runtime(args: argparse.Namespace) -> Runtime:
    return runtime.Runtime(runtime.Store(args.root))


def _env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not k:
            raise InvalidSpec(f"invalid environment variable {item!r} (expected K=V)")
        env[k] = v if sep else os.environ.get(k, "")
    return env


def _limits(args: argparse.Namespace) -> Limits:
    pids = args.pids_limit
    if pids is not None and pids <= 0:
        pids = None   # Docker: 0 or -1 means unlimited
    return runtime.Limits(
        memory=runtime.parse_memory(args.memory) if args.memory else None,
        cpus=runtime.parse_cpus(args.cpus) if args.cpus else None,
        **({"pids": pids} if args.pids_limit is not None else {}),
    )


@contextlib.contextmanager
def _forward_signals(send: Callable[[int], None]) -> Iterator[None]:
    """While running in the foreground, pass our signals on to the container (Docker's sig-proxy)."""
    old = {}
    for sig in _FORWARDED:
        old[sig] = signal.signal(sig, lambda s, _f: send(s))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _copy_pty(master: int, done: Callable[[], bool]) -> None:
    """Shuttle bytes between our terminal and the container's pty until it is closed."""
    stdin_fd = sys.stdin.fileno() if sys.stdin and sys.stdin.isatty() else None
    saved = termios.tcgetattr(stdin_fd) if stdin_fd is not None else None

    def resize(*_: object) -> None:
        if stdin_fd is not None:
            size = fcntl.ioctl(stdin_fd, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(master, termios.TIOCSWINSZ, size)

    old_winch = signal.signal(signal.SIGWINCH, resize)
    try:
        if stdin_fd is not None:
            resize()
            tty.setraw(stdin_fd)
        fds = [master] + ([stdin_fd] if stdin_fd is not None else [])
        while True:
            try:
                ready, _, _ = select.select(fds, [], [], 0.2)
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    data = b""
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if stdin_fd is not None and stdin_fd in ready:
                data = os.read(stdin_fd, 65536)
                if not data:
                    fds.remove(stdin_fd)
                else:
                    os.write(master, data)
            if not ready and done():
                break
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        if saved is not None and stdin_fd is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)


def seccomp_mode(opts: list[str] | None) -> str:
    """The seccomp mode from Docker-style ``--security-opt`` values."""
    mode = "default"
    for opt in opts or ():
        key, sep, value = opt.partition("=")
        if not sep:
            key, sep, value = opt.partition(":")   # Docker's older KEY:VALUE form
        if key == "seccomp" and value in ("unconfined", "default"):
            mode = value
        elif key == "seccomp":
            raise InvalidSpec(f"--security-opt {opt}: only seccomp=unconfined or seccomp=default is supported")
        elif key == "no-new-privileges" and value in ("", "true"):
            pass   # always on
        else:
            raise InvalidSpec(f"unsupported --security-opt {opt!r}")
    return mode


def cmd_run(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    if args.detach and args.rm:
        raise InvalidSpec("--rm and -d cannot be combined yet (nothing would wait to remove it)")
    spec = runtime.ContainerSpec(
        image=args.image,
        command=tuple(args.command) if args.command else None,
        entrypoint=(tuple([args.entrypoint]) if args.entrypoint else None),
        env=_env(args.env), workdir=args.workdir, user=args.user, hostname=args.hostname,
        binds=tuple(runtime.parse_bind(v) for v in args.volume or ()), limits=_limits(args),
        network=args.network, name=args.name, tty=args.tty, readonly_rootfs=args.read_only,
        publish=tuple(args.publish or ()),
        seccomp=seccomp_mode(args.security_opt), userns=args.userns,
        cap_add=tuple(args.cap_add or ()), cap_drop=tuple(args.cap_drop or ()),
        # a foreground container belongs to this command: if it is killed, gc removes the container
        owner_pid=None if args.detach else os.getpid(),
    )
    c = rt.create(spec)
    try:
        _fault("run:created")
        return _start_attached(c, args)
    finally:
        if args.rm:
            with contextlib.suppress(ContainError):
                c.remove(force=True)


def _start_attached(c: Container, args: argparse.Namespace) -> int:
    if args.detach:
        try:
            c.start()
        except BaseException:
            c.remove(force=True)
            raise
        _fault("run:started")
        print(c.id)
        return 0
    with contextlib.ExitStack() as stack:
        # with -t the container makes its own pty (the payload's stdio; our
        # stdio is then only a placeholder) and hands us the master
        if args.interactive or args.tty:
            stdin = sys.stdin.fileno()
        else:
            stdin = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            stack.callback(os.close, stdin)
        stdio = (stdin, sys.stdout.fileno(), sys.stderr.fileno())
        try:
            c.start(stdio=stdio)
        except BaseException:
            if not args.rm:
                c.remove(force=True)   # a failed start leaves nothing behind
            raise
        master = c.pty_master   # owned by the container handle, closed by wait()
        with _forward_signals(lambda s: _signal_quietly(c, s)):
            if master is not None:
                _copy_pty(master, lambda: c.refresh_status() != "running")
            info = c.wait()
    assert info is not None
    if info.oom_killed or info.signal:
        print(f"jupyter-contain: container {c.name} {info.describe()}", file=sys.stderr)
    return info.code


def _signal_quietly(c: Container, sig: int) -> None:
    with contextlib.suppress(ContainError):
        c.signal(sig)


def cmd_exec(args: argparse.Namespace) -> int:
    c = _runtime(args).get(args.container)
    with contextlib.ExitStack() as stack:
        interactive = args.interactive or args.tty
        stdin = sys.stdin.fileno() if interactive else os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        if not interactive:
            stack.callback(os.close, stdin)
        stdio = (stdin, sys.stdout.fileno(), sys.stderr.fileno())
        proc = c.exec(args.command, stdio=stdio, env=_env(args.env), workdir=args.workdir, user=args.user,
                      tty=args.tty)
        stack.callback(proc.close)   # closes the pty master too
        master = proc.pty_master     # -t: the container's own pty
        with _forward_signals(proc.send_signal):
            if master is not None:
                _copy_pty(master, lambda: proc.poll() is not None)
            code = proc.wait()
    return int(code or 0)


def cmd_ps(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    rows = []
    for c in rt.containers():
        try:
            info = c.info()
        except ContainerNotFound:
            continue   # removed meanwhile
        except ContainError as exc:
            # a record this version cannot read (a newer jupyter-contain's): said, not shown
            print(f"jupyter-contain: {exc}", file=sys.stderr)
            continue
        if not args.all and info["status"] != "running":
            continue
        rows.append(info)
    print_containers(rows, as_json=args.json, quiet=args.quiet)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    for ref in args.containers:
        rt.get(ref).stop(timeout=args.time)
        print(ref)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    sig = _signal_number(args.signal)
    for ref in args.containers:
        c = rt.get(ref)
        if sig == signal.SIGKILL:
            c.kill()
        else:
            c.signal(sig)
        print(ref)
    return 0


def _signal_number(text: str) -> int:
    t = text.upper()
    if t.isdigit():
        return int(t)
    try:
        return int(signal.Signals[t if t.startswith("SIG") else "SIG" + t])
    except (KeyError, ValueError):
        raise InvalidSpec(f"unknown signal {text!r}") from None


def cmd_rm(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    for ref in args.containers:
        rt.get(ref).remove(force=args.force)
        print(ref)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    targets = [rt.get(r) for r in args.containers] or [c for c in rt.containers() if c.refresh_status() == "running"]
    rows = []
    for c in targets:
        s = c.stats()
        rows.append({"id": c.id, "name": c.name, **s})
    print_stats(rows, as_json=args.json)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    c = _runtime(args).get(args.container)
    path = c.dir / "log"
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                continue
            if not args.follow or c.refresh_status() != "running":
                break
            time.sleep(0.2)
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    from ..runtime.containers import bundle as bundle_mod  # only this verb needs it

    store = runtime.Store(args.root)
    bundle_mod.write_bundle(store, store.resolve(args.image), Path(args.dir),
                            command=tuple(args.command) if args.command else None)
    print(f"wrote OCI runtime bundle to {args.dir} (run it with: runc run -b {args.dir} ID)")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="container name")
    p.add_argument("-e", "--env", action="append", metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("-v", "--volume", action="append", metavar="SRC:DST[:ro]", help="bind mount (repeatable)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside the container")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user (name or uid) to run as")
    p.add_argument("--hostname", help="container host name")
    p.add_argument("--entrypoint", help="override the image's entrypoint")
    p.add_argument("-m", "--memory", metavar="SIZE", help="memory limit, e.g. 512m, 2g (no swap beyond it)")
    p.add_argument("--cpus", metavar="N", help="CPU quota in cores, e.g. 1.5")
    p.add_argument("--pids-limit", type=int, metavar="N", help="process limit (default 512; 0 or -1: none)")
    p.add_argument("-p", "--publish", action="append", metavar="[IP:]HOST:CONTAINER[/tcp]",
                   help="publish a container port on the host (needs --network bridge; repeatable)")
    p.add_argument("--network", choices=["none", "host", "bridge"], default="none",
                   help="none: own namespace with loopback only (default); host: share the host's; "
                        "bridge: own namespace on the jcbr0 bridge with NAT")
    p.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    p.add_argument("--security-opt", action="append", metavar="OPT",
                   help="seccomp=unconfined: no seccomp filter (default: Docker's default profile)")
    p.add_argument("--userns", choices=["host", "auto"], default="host",
                   help="auto: a user namespace with its own subordinate host ids (container root is not "
                        "host root); host: container ids are host ids (default)")
    p.add_argument("--cap-add", action="append", metavar="CAP",
                   help="add a capability to the default set (e.g. NET_RAW for raw sockets; ALL); repeatable")
    p.add_argument("--cap-drop", action="append", metavar="CAP",
                   help="drop a capability from the default set (ALL: start from none); repeatable")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a command in a new container",
                       description="Create and start a container from IMAGE and attach to it.")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background, print the id")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin attached")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    _add_run_options(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD ...")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("exec", help="run a command in a running container")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin attached")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    p.add_argument("-e", "--env", action="append", metavar="K=V")
    p.add_argument("-w", "--workdir", metavar="DIR")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD ...")
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("ps", help="list containers")
    p.add_argument("-a", "--all", action="store_true", help="also stopped containers (with why they ended)")
    p.add_argument("-q", "--quiet", action="store_true", help="only ids")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("stop", help="stop containers (SIGTERM, then SIGKILL after a timeout)")
    p.add_argument("-t", "--time", type=float, default=10.0, help="seconds before SIGKILL (default 10)")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("kill", help="send a signal to containers (default SIGKILL to every process)")
    p.add_argument("-s", "--signal", default="KILL")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_kill)

    p = sub.add_parser("rm", help="remove containers")
    p.add_argument("-f", "--force", action="store_true", help="kill running containers first")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("stats", help="memory, CPU and process use of running containers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("containers", nargs="*", metavar="CONTAINER")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("logs", help="output of a detached container")
    p.add_argument("-f", "--follow", action="store_true", help="keep following while it runs")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("bundle", help="write an OCI runtime bundle (config.json + rootfs) for runc/crun")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD ...")
    p.set_defaults(func=cmd_bundle)


