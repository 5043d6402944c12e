"""Host-side ``%container`` magics: ``%load_ext jupyter_contain`` in an ordinary IPython kernel.

Owns the command lines of the host form of the magics, which call the runtime
directly (``jupyter_contain.runtime``'s public names, the default store root
or ``$JUPYTER_CONTAIN_ROOT``): ``%container images | ps [-a] | pull IMAGE |
stats CONTAINER...`` and ``%%container IMAGE [--memory M] [--cpus C]
[--network none|host|bridge] [--shell]``, which runs the cell in a fresh
container and streams its output into the cell. Must not do anything at
import beyond defining these; the contained kernels' own magics are the
guest module's (:mod:`jupyter_contain.kernel.guest`), not these.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from .. import errors
from ..runtime import ContainerSpec, Limits, Runtime, Store, parse_cpus, parse_memory
from .channel import run_code

USAGE = """\
%container images                 images in the store
%container ps [-a]                running containers (-a: all)
%container pull IMAGE             pull an image into the store
%container stats CONTAINER...     memory, CPU and processes of running containers
%%container IMAGE [--memory M] [--cpus C] [--network none|host|bridge] [--shell] [--python CMD]
                                  run the cell (Python, or sh with --shell) in a fresh container"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: {message}\n{USAGE}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise UsageError(message or USAGE)


def _line_parser() -> _Parser:
    p = _Parser(prog="%container", add_help=False)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("images", add_help=False)
    sub.add_parser("help", add_help=False)
    ps = sub.add_parser("ps", add_help=False)
    ps.add_argument("-a", "--all", action="store_true")
    pull = sub.add_parser("pull", add_help=False)
    pull.add_argument("image")
    st = sub.add_parser("stats", add_help=False)
    st.add_argument("containers", nargs="+")
    for sp in sub.choices.values():
        sp.error = p.error   # type: ignore[method-assign]
        sp.exit = p.exit     # type: ignore[method-assign]
    return p


def _cell_parser() -> _Parser:
    p = _Parser(prog="%%container", add_help=False)
    p.add_argument("image")
    p.add_argument("--memory")
    p.add_argument("--cpus")
    p.add_argument("--network", default="none", choices=("none", "host", "bridge"))
    p.add_argument("--shell", action="store_true")
    p.add_argument("--python", default="python3")
    return p


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "?"


@magics_class
class HostContainerMagics(Magics):
    """``%container`` / ``%%container`` over the host's store (default root)."""

    _runtime: Runtime | None = None

    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = Runtime(Store())
        return self._runtime

    @line_cell_magic
    def container(self, line: str, cell: str | None = None) -> None:
        """Manage images and containers of the store, or run a cell in a fresh container (%container help)."""
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%container: {exc}") from None
        if cell is not None:
            return self._run_cell(_cell_parser().parse_args(argv), cell)
        args = _line_parser().parse_args(argv)
        cmd = args.cmd or "help"
        rt = self.runtime()
        if cmd == "help":
            print(USAGE)
        elif cmd == "images":
            for rec in sorted(rt.store.images(), key=lambda r: r.name):
                print(f"{rec.familiar:40} {rec.id.removeprefix('sha256:')[:12]}  {_size(rec.size)}")
        elif cmd == "ps":
            for c in rt.containers():
                info = c.info()
                if args.all or info["status"] == "running":
                    print(f"{c.id[:12]}  {info['name']:20} {info['image']:36} {info['status']}"
                          + (f"  ({info['reason']})" if info.get("reason") else ""))
        elif cmd == "pull":
            from ..runtime.images.registry import pull

            rec = pull(rt.store, args.image)
            print(f"{rec.familiar} {rec.digest}")
        elif cmd == "stats":
            for ref in args.containers:
                c = rt.get(ref)
                s = c.stats()
                lim = s.get("memory_limit")
                print(f"{c.id[:12]}  memory {_size(s.get('memory_current'))} of "
                      f"{_size(lim) if lim else 'no limit'} (peak {_size(s.get('memory_peak'))})  "
                      f"cpu {(s.get('cpu_usage_ns') or 0) / 1e9:.2f} s  "
                      f"pids {s.get('pids_current')} of {s.get('pids_limit') or 'no limit'}")
        return None

    def _run_cell(self, args: argparse.Namespace, cell: str) -> None:
        rt = self.runtime()
        image = rt.store.resolve(args.image)
        try:
            limits = Limits(memory=parse_memory(args.memory) if args.memory else None,
                            cpus=parse_cpus(args.cpus) if args.cpus else None)
        except errors.InvalidSpec as exc:
            raise UsageError(f"%%container: {exc}") from None
        argv = ("/bin/sh", "-c", cell) if args.shell else (*shlex.split(args.python), "-c", cell)
        spec = ContainerSpec(image=image.name, command=argv, entrypoint=(), limits=limits, network=args.network)

        def on_output(stream: str, text: str) -> None:
            out = sys.stderr if stream == "stderr" else sys.stdout
            out.write(text)
            out.flush()

        # an interrupt (KeyboardInterrupt here) ends run_code, which kills and removes the container
        info = run_code(rt, spec, on_output=on_output, image=image)
        if info.code != 0:
            raise errors.ContainerError(f"the cell's container {info.describe()}")


def load_ipython_extension(ip: Any) -> None:
    ip.register_magics(HostContainerMagics)
    from .build_magics import BuildMagics  # %%containerfile (#17)

    ip.register_magics(BuildMagics)


def unload_ipython_extension(ip: Any) -> None:
    pass
