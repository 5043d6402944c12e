"""Host-side ``%%containerfile`` magic: build the cell as a Containerfile, the notebook's folder as context.

Owns the magic's command line (``%%containerfile NAME[:TAG] [--context DIR]
[--build-arg K=V]... [--target STAGE] [--network none|bridge|host]
[--no-cache] [--pull missing|always|never] [--kernelspec [NAME]] [-q]``) and
streaming the build's steps and RUN output into the cell's output. Must not
hold build logic (``jupyter_contain.runtime.build`` does the work) or do
anything at import beyond defining the magic. Loaded with the host magics
(``%load_ext jupyter_contain``) in an ordinary IPython kernel on the host,
where the image store is; a contained kernel has no store to build into.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, magics_class

USAGE = """\
%%containerfile NAME[:TAG] [--context DIR] [--build-arg K=V]... [--target STAGE]
                [--network none|bridge|host] [--no-cache] [--pull missing|always|never]
                [--kernelspec [KERNEL]] [-q]
    build the cell (a Containerfile) with the notebook's folder (or DIR) as the context;
    --kernelspec installs "Contained Python (NAME)" from the result"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(f"%%containerfile: {message}\n{USAGE}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise UsageError(message or USAGE)


def _parser() -> _Parser:
    p = _Parser(prog="%%containerfile", add_help=False)
    p.add_argument("tag")
    p.add_argument("--context", default=".")
    p.add_argument("--build-arg", action="append", default=[])
    p.add_argument("--target")
    p.add_argument("--network", choices=["none", "bridge", "host"], default="none")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--pull", choices=["missing", "always", "never"], default="missing")
    p.add_argument("--kernelspec", nargs="?", const="")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


@magics_class
class BuildMagics(Magics):
    """``%%containerfile``: the cell is the Containerfile."""

    @cell_magic
    def containerfile(self, line: str, cell: str) -> None:
        """Build the cell as a Containerfile and tag the image (see %%containerfile with no arguments)."""
        from ..runtime import Runtime, Store
        from ..runtime.build import BuildOptions, Reporter, build

        try:
            args = _parser().parse_args(shlex.split(line))
        except ValueError as exc:
            raise UsageError(f"%%containerfile: {exc}") from None
        build_args = {}
        for kv in args.build_arg:
            k, eq, v = kv.partition("=")
            if not eq:
                raise UsageError(f"%%containerfile: --build-arg {kv!r}: KEY=VALUE")
            build_args[k] = v
        quiet = args.quiet

        class Cell(Reporter):
            def step(self, n: int, total: int, stage: str, text: str) -> None:
                if not quiet:
                    print(f"STEP {n}/{total}: {text}", flush=True)

            def done(self, *, cached: bool, seconds: float, layer: Any) -> None:
                if not quiet:
                    print("--> Using cache" if cached else f"--> {seconds:.2f} s", flush=True)

            def output(self, data: bytes) -> None:
                if not quiet:
                    sys.stdout.write(data.decode("utf-8", "replace"))
                    sys.stdout.flush()

            def note(self, text: str) -> None:
                if not quiet:
                    print(text, flush=True)

        store = Store()
        opts = BuildOptions(context=Path(os.path.abspath(args.context)), containerfile_text=cell.encode(),
                            tags=(args.tag,), build_args=build_args, target=args.target, network=args.network,
                            no_cache=args.no_cache, pull=args.pull)
        result = build(Runtime(store), opts, reporter=Cell())
        print(f"{result.names[0]} {result.image_id} ({result.steps} steps, {result.cached} cached, "
              f"{result.seconds:.2f} s)")
        if args.kernelspec is not None:
            from . import kernelspec

            name, path = kernelspec.install(store=store, image_name=result.names[0], name=args.kernelspec or None,
                                            user=True)
            print(f"installed kernelspec {name} in {path}")


def load_ipython_extension(ip: Any) -> None:
    ip.register_magics(BuildMagics)
