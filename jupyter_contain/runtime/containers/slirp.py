"""Rootless egress: ``slirp4netns`` gives a rootless container's network namespace a user-mode NAT.

The ``bridge`` mode needs root (a veth pair, nftables); a user's containers
get the same thing, egress through NAT, from ``slirp4netns``: a tap device
``tap0`` (10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3) inside the
container's namespace, its packets turned into the user's own sockets.

Owns: whether it can run here (:func:`unavailable_reason`), starting it for a
container between spawn and release (:func:`start`: it joins the
container's user and network namespaces, configures ``tap0`` and says when
it is ready), and the container's ``resolv.conf``. Its life: it exits when
the read end of a pipe it watches (``--exit-fd``) reaches EOF; the write end
is held by the container's init (``SpawnConfig.hold_fd``), so the network
lives exactly as long as the container, whoever started it.

Must not: run for root (root's containers use ``network.py``), or let a
container reach the host's loopback unless asked (``--disable-host-loopback``
unless ``$JUPYTER_CONTAIN_SLIRP_HOST_LOOPBACK`` is 1).
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

from ... import errors

log = logging.getLogger(__name__)

__all__ = ["GATEWAY", "RESOLV_CONF", "Slirp", "start", "unavailable_reason"]

TUN = "/dev/net/tun"
ADDRESS = "10.0.2.100"
GATEWAY = "10.0.2.2"
RESOLV_CONF = "nameserver 10.0.2.3\n"
ENV_HOST_LOOPBACK = "JUPYTER_CONTAIN_SLIRP_HOST_LOOPBACK"


def unavailable_reason() -> str | None:
    """Why a rootless container cannot have egress here (None: it can)."""
    if shutil.which("slirp4netns") is None:
        return "slirp4netns is not installed (Debian: apt-get install slirp4netns)"
    if not os.access(TUN, os.R_OK | os.W_OK):
        try:
            mode = f"mode {os.stat(TUN).st_mode & 0o777:o}"
        except OSError:
            mode = "missing"
        return (f"{TUN} is not usable by uid {os.geteuid()} ({mode}; distributions make it 0666, e.g. "
                "udev's default rule)")
    return None


class Slirp:
    """A running slirp4netns for one container (reaped in the background when it ends)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        # our child: wait for it in a thread so that it never stays a zombie
        threading.Thread(target=proc.wait, name=f"jc-slirp-{proc.pid}", daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()


def start(pid: int, *, exit_fd: int, userns_fd: int, netns_fd: int, log_path: Path,
          timeout: float = 10.0) -> Slirp:
    """slirp4netns for the container whose init is ``pid``; returns once ``tap0`` is configured.

    ``exit_fd``: the read end of the pipe whose write end the container's
    init holds (passed to slirp4netns; the caller closes its copy after).
    ``userns_fd``/``netns_fd``: the container's namespaces, opened while its
    init was still dumpable (its /proc/PID/ns is root's now). ``log_path``:
    where its output goes (appended).
    """
    reason = unavailable_reason()
    if reason:
        raise errors.NetworkError(f"no rootless network: {reason}")
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    # the namespaces as the fds slirp4netns inherits (same numbers: pass_fds)
    argv = ["slirp4netns", "--configure", "--mtu=65520", f"--exit-fd={exit_fd}", f"--ready-fd={ready_w}",
            f"--userns-path=/proc/self/fd/{userns_fd}", "--netns-type=path"]
    if os.environ.get(ENV_HOST_LOOPBACK) != "1":
        argv.append("--disable-host-loopback")
    argv += [f"/proc/self/fd/{netns_fd}", "tap0"]
    try:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, pass_fds=(exit_fd, ready_w, userns_fd, netns_fd), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True)
    except OSError as exc:
        os.close(ready_r)
        os.close(ready_w)
        raise errors.NetworkError(f"cannot start slirp4netns: {exc}") from None
    os.close(ready_w)
    try:
        deadline = time.monotonic() + timeout
        got = b""
        while not got:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ready_r], [], [], left)[0]:
                proc.kill()
                raise errors.NetworkError(f"slirp4netns for container pid {pid} was not ready in {timeout:g} s")
            got = os.read(ready_r, 1)
            if not got:   # it exited before it was ready
                proc.wait()
                err = log_path.read_bytes()[-500:].decode(errors="replace").strip()
                raise errors.NetworkError(f"slirp4netns failed (exit {proc.returncode}): {err}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        os.close(ready_r)
    log.debug("slirp4netns %d serves container pid %d", proc.pid, pid)
    return Slirp(proc)
