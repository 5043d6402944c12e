"""The argv fallback: start a contained kernel for clients that ignore provisioners.

``python -m jupyter_contain.kernel.launcher -f CONNECTION_FILE --config JSON``
is the ``argv`` of every contained kernelspec. A client that launches argv
(VS Code, old jupyter_client, nbclient with a custom manager) gets the same
container the provisioner would make: this process reads the client's (tcp)
connection file, starts the kernel in its container on ipc sockets in its
socket tmpfs (reached through pinned fds, :mod:`jupyter_contain.kernel.folder`),
and bridges each channel with ZMQ proxies (ROUTER<->DEALER
for shell, control, stdin and heartbeat; XPUB<->XSUB for iopub). Messages pass
through unchanged, so the HMAC key is the client's. SIGINT and SIGTERM go to
the kernel; the launcher exits when the kernel does, removing the container.
The kernel's host channel (``host.sock`` in its folder, for the ``%container``
magics) is served by this process on a thread of its own, as the provisioner
does for a blocking kernel manager; ``reset`` is not offered (a restart by
such a client is a new container anyway).

Owns only the bridge and this process's life; the container is made by
:mod:`jupyter_contain.kernel.containers` (shared with the provisioner). A
restart by such a client is a new launcher and so a new container: restart in
place needs the provisioner.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from .. import errors
from ..runtime import Container, Runtime
from . import containers
from .channel import HostChannel, socket_path
from .folder import KernelFolder, SocketPins, write_connection_file

log = logging.getLogger("jupyter_contain.kernel.launcher")

#: channel -> (socket type facing the client, socket type facing the kernel)
_BRIDGES = {
    "shell": (zmq.ROUTER, zmq.DEALER),
    "control": (zmq.ROUTER, zmq.DEALER),
    "stdin": (zmq.ROUTER, zmq.DEALER),
    "hb": (zmq.ROUTER, zmq.DEALER),     # REQ/REP pings pass through: the kernel itself answers
    "iopub": (zmq.XPUB, zmq.XSUB),
}


def _client_url(info: dict[str, Any], channel: str) -> str:
    port = info[f"{channel}_port"]
    if info.get("transport", "tcp") == "ipc":
        return f"ipc://{info['ip']}-{port}"
    return f"tcp://{info['ip']}:{port}"


class Bridge:
    """One process's worth of channel proxies between a client and a contained kernel."""

    def __init__(self, client_info: dict[str, Any], folder: KernelFolder, *,
                 context: zmq.Context | None = None) -> None:
        self.ctx = context or zmq.Context()
        self.folder = folder
        #: the kernel's connection info (its own socket folder); the bridge connects to the pinned links
        self.kernel_info = {
            "transport": "ipc", "ip": folder.kernel_ip,
            "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5,
            "key": client_info.get("key", ""), "signature_scheme": client_info.get("signature_scheme", "hmac-sha256"),
            "kernel_name": client_info.get("kernel_name", ""),
        }
        self.pairs: list[tuple[zmq.Socket, zmq.Socket]] = []
        for channel, (front_type, back_type) in _BRIDGES.items():
            front = self.ctx.socket(front_type)
            back = self.ctx.socket(back_type)
            for s in (front, back):
                s.linger = 0
            if front_type == zmq.XPUB:
                # a late subscriber still gets ipykernel's welcome message: pass every (un)subscribe
                front.setsockopt(zmq.XPUB_VERBOSE, 1)
            if front_type == zmq.ROUTER:
                front.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a reconnecting client keeps its identity
            front.bind(_client_url(client_info, channel))
            back.connect(_client_url({**self.kernel_info, "ip": folder.host_ip}, channel))
            self.pairs.append((front, back))
        self.poller = zmq.Poller()
        self.peer: dict[zmq.Socket, zmq.Socket] = {}
        for front, back in self.pairs:
            self.poller.register(front, zmq.POLLIN)
            self.poller.register(back, zmq.POLLIN)
            self.peer[front], self.peer[back] = back, front

    @property
    def ports(self) -> list[int]:
        return [int(self.kernel_info[f"{ch}_port"]) for ch in _BRIDGES]

    def pump(self, timeout_ms: int) -> None:
        """Forward whatever is ready, waiting up to ``timeout_ms`` for something."""
        for sock, _ in self.poller.poll(timeout_ms):
            dest = self.peer[sock]
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                dest.send_multipart(frames, copy=False)

    def close(self) -> None:
        for front, back in self.pairs:
            front.close(0)
            back.close(0)
        self.pairs = []
        self.ctx.term()


def _start_channel(options: containers.KernelOptions, *, kernel_id: str, rt: Runtime,
                   container: list[Container], folder: KernelFolder,
                   kernelspec_dir: Path | None) -> HostChannel | None:
    """Serve the kernel's host channel on a thread; None (and a warning) when it cannot start."""
    ctx = containers.kernel_context(options, kernel_id=kernel_id, runtime=rt,
                                    container=lambda: container[0] if container else None,
                                    kernelspec_dir=kernelspec_dir)
    ch = HostChannel(ctx, socket_path(folder.channel_dir))
    try:
        ch.start_thread()
    except OSError as exc:
        # the kernel works without it; only the %container magics and widgets say they cannot reach it
        log.warning("kernel %s: no host channel: %s", kernel_id, exc)
        ch.close()
        return None
    return ch


def run(connection_file: str, config: dict[str, Any], *, extra: Sequence[str] = (),
        kernelspec_dir: Path | None = None) -> int:
    """Start the kernel container, bridge until the kernel ends; returns the kernel's exit code."""
    options = containers.KernelOptions.from_config(config, where="launcher --config")
    client_info = json.loads(Path(connection_file).read_text())
    kernel_id = str(uuid.uuid4())
    rt = containers.runtime_for(options)
    containers.gc_once(rt)
    folder = KernelFolder.make(kernel_id)
    bridge: Bridge | None = None
    pins: SocketPins | None = None
    c = None
    made: list[Container] = []
    ch: HostChannel | None = None
    got: list[int] = []
    # signals only set a flag here; the bridge loop acts on them (no work in a handler)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, _f: got.append(n))
    try:
        bridge = Bridge(client_info, folder)
        pins = SocketPins(folder.links_dir, bridge.ports)
        cmd = containers.kernel_command(options, folder.connection_file_inside, extra)
        env = containers.kernel_env(options, kernel_id=kernel_id, folder=folder, launch_env=os.environ)
        # before the container exists (host.sock is bound into it at creation): its first cell
        # may already use a %container magic
        ch = _start_channel(options, kernel_id=kernel_id, rt=rt, container=made, folder=folder,
                            kernelspec_dir=kernelspec_dir)
        c = containers.create_container(rt, options, kernel_id=kernel_id, folder=folder, cmd=cmd, env=env,
                                        cwd=os.getcwd(), kernel_name=client_info.get("kernel_name", ""))
        made.append(c)
        kernel_info = bridge.kernel_info
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            c.start(stdio=(null, 1, 2), pin=[folder.sockets_inside],
                    prepare=lambda pinned: write_connection_file(pinned[folder.sockets_inside], kernel_info,
                                                                 owner=c.process_host_ids()))
        finally:
            os.close(null)
        sockets_fd = c.pinned(folder.sockets_inside)
        log.info("kernel %s in container %s", kernel_id, c.id[:12])
        terminating = False
        while (code := c.poll()) is None:
            while got:
                n = got.pop(0)
                c.signal(n if n != signal.SIGHUP else signal.SIGTERM)
                if n != signal.SIGINT and not terminating:
                    terminating = True
                    log.info("kernel %s: terminating", kernel_id)
            if not pins.complete:
                pins.pin(sockets_fd)   # a few syscalls: the kernel binds its sockets ~0.5 s in
            bridge.pump(100 if pins.complete else 10)
        # hand over what the kernel said last (the shutdown reply, the final status)
        bridge.pump(0)
        info = c.wait(5)
        if info is not None and info.code != 0 and not terminating:
            log.warning("kernel %s %s", kernel_id, info.describe())
        return code
    finally:
        if ch is not None:
            try:
                # first: it kills running %%container cells and waits for their containers to go
                ch.close()
            except Exception:   # a channel that fails to stop must not keep the container's removal from running
                log.exception("kernel %s: stopping the host channel", kernel_id)
        if c is not None:
            try:
                c.remove(force=True)
            except errors.ContainError as exc:   # pragma: no cover - best effort at exit
                log.warning("removing container %s: %s", c.id[:12], exc)
        if bridge is not None:
            bridge.close()
        if pins is not None:
            pins.close()
        folder.remove()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jupyter_contain.kernel.launcher",
                                description="Start a contained kernel and bridge a client's connection file to it.")
    p.add_argument("-f", "--connection-file", required=True, help="the client's connection file")
    p.add_argument("--config", default="{}", help="the provisioner options as JSON (as in the kernelspec)")
    p.add_argument("--kernelspec-dir", default=None,
                   help="the kernelspec's own folder ({resource_dir}): kernelspecs for snapshots go beside it")
    args, extra = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="[jupyter-contain launcher] %(message)s")
    try:
        config = json.loads(args.config)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        print(f"jupyter-contain launcher: --config: {exc}", file=sys.stderr)
        return 2
    try:
        code = run(args.connection_file, config, extra=extra,
                   kernelspec_dir=Path(args.kernelspec_dir) if args.kernelspec_dir else None)
    except errors.ContainError as exc:
        print(f"jupyter-contain launcher: {exc}", file=sys.stderr)
        return exc.exit_code
    return code if 0 <= code < 256 else 1


if __name__ == "__main__":
    sys.exit(main())
