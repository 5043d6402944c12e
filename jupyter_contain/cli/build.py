"""``jupyter contain build``: an image from a Containerfile (Dockerfile), with the layer cache.

Owns the verb's options (``docker build``/``podman build``'s names), the step
lines (``--progress plain|tty``, ``-q``), ``--iidfile`` and ``--kernelspec``.
Must not hold build logic: :func:`jupyter_contain.runtime.build.build` does
the work and this module prints what it reports.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ..errors import BuildError, BuildStepFailed

if TYPE_CHECKING:
    from ..runtime.spec import Descriptor


def _reporter(progress: str, quiet: bool, out: TextIO) -> object:
    from ..runtime.build import Reporter

    class Lines(Reporter):
        """One line per step, its result after it; RUN output as it comes (``plain``); ``tty``
        rewrites the step line in place and shows the output of a step only while it runs."""

        def __init__(self) -> None:
            self.current = ""
            self.tty = progress == "tty"

        def step(self, n: int, total: int, stage: str, text: str) -> None:
            self.current = f"STEP {n}/{total}: {text}"
            if not quiet:
                out.write(("\r\033[K" if self.tty else "") + self.current + ("" if self.tty else "\n"))
                out.flush()

        def done(self, *, cached: bool, seconds: float, layer: Descriptor | None) -> None:
            if quiet:
                return
            what = "Using cache" if cached else f"{seconds:.2f} s"
            if layer is not None:
                what += f" {layer.digest[7:19]}"
            if self.tty:
                out.write(f"\r\033[K{self.current} --> {what}\n")
            else:
                out.write(f"--> {what}\n")
            out.flush()

        def output(self, data: bytes) -> None:
            if quiet:
                return
            if self.tty:
                out.write("\r\033[K")
            out.write(data.decode("utf-8", "replace"))
            out.flush()

        def note(self, text: str) -> None:
            if not quiet:
                out.write(text + "\n")
                out.flush()

    return Lines()


def _key_values(items: list[str], what: str, *, env_fallback: bool = False) -> dict[str, str]:
    out = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not k:
            raise BuildError(f"invalid {what} {item!r} (KEY=VALUE)")
        if not eq:
            if not env_fallback:
                raise BuildError(f"invalid {what} {item!r} (KEY=VALUE)")
            if k not in os.environ:
                continue   # as docker build: --build-arg NAME takes the value from the environment, if any
            v = os.environ[k]
        out[k] = v
    return out


def cmd_build(args: argparse.Namespace) -> int:
    from .. import runtime
    from ..runtime.build import BuildOptions, build

    if args.pull not in ("missing", "always", "never"):
        if args.context is not None:
            raise BuildError(f"--pull {args.pull!r}: missing, always or never")
        # `build --pull CONTEXT`, docker build's boolean --pull: the word was the context
        args.context, args.pull = args.pull, "always"
    if args.context is None:
        raise BuildError("give the build context folder (CONTEXT)")
    context = Path(args.context)
    text = None
    cf = None
    if args.file == "-":
        text = sys.stdin.buffer.read(8 << 20)
    elif args.file:
        cf = Path(args.file)
    progress = args.progress
    if progress == "auto":
        progress = "tty" if sys.stdout.isatty() else "plain"
    opts = BuildOptions(
        context=context, containerfile=cf, containerfile_text=text, tags=tuple(args.tag or ()),
        build_args=_key_values(args.build_arg or [], "--build-arg", env_fallback=True), target=args.target,
        network=args.network, no_cache=args.no_cache, pull=args.pull, platform=args.platform,
        labels=_key_values(args.label or [], "--label"))
    store = runtime.Store(args.root)   # the container runtime loads only if a RUN step must run
    out = sys.stderr if args.quiet else sys.stdout
    try:
        result = build(store, opts, reporter=_reporter(progress, args.quiet, out))  # type: ignore[arg-type]
    except BuildStepFailed as e:
        if args.quiet and e.output:
            sys.stderr.write(e.output if e.output.endswith("\n") else e.output + "\n")
        raise
    if args.iidfile:
        Path(args.iidfile).write_text(result.image_id)
    if args.quiet:
        print(result.image_id)
    else:
        print(f"--> {result.image_id[7:19]} ({result.steps} steps, {result.cached} cached, "
              f"{result.seconds:.2f} s)")
        for n in result.names:
            print(f"Successfully tagged {n}")
        print(result.image_id)
    if args.kernelspec is not None:
        if not result.names:
            raise BuildError("--kernelspec needs a tag (-t NAME) for the kernel to start from")
        from ..kernel import kernelspec

        name, path = kernelspec.install(store=store, image_name=result.names[0], name=args.kernelspec or None)
        print(f"installed kernelspec {name} in {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build", help="build an image from a Containerfile (Dockerfile)",
        description="Build an image from the Containerfile (or Dockerfile) in CONTEXT, with Docker's "
                    "instructions and a layer cache: a rebuild with nothing changed runs nothing. Each RUN "
                    "runs in a sandboxed container (network none unless --network); COPY/ADD read only CONTEXT "
                    "(less what .containerignore or .dockerignore exclude). Names without a registry go under "
                    "localhost/.")
    p.add_argument("context", metavar="CONTEXT", nargs="?",
                   help="the build context folder (with --url: a folder on the server, inside the root it allows)")
    p.add_argument("-t", "--tag", action="append", metavar="NAME[:TAG]", help="name the image (repeatable)")
    p.add_argument("-f", "--file", metavar="FILE", help="the Containerfile (default: CONTEXT/Containerfile or "
                                                        "CONTEXT/Dockerfile; - reads standard input; with --url: relative to "
                                                        "CONTEXT on the server)")
    p.add_argument("--build-arg", action="append", metavar="KEY[=VALUE]",
                   help="set a build arg (KEY alone takes the value from the environment)")
    p.add_argument("--target", metavar="STAGE", help="build up to this stage")
    p.add_argument("--network", choices=["none", "bridge", "host"], default="none",
                   help="network of RUN steps (default none)")
    p.add_argument("--no-cache", action="store_true", help="run every step (the results still fill the cache)")
    p.add_argument("--pull", default="missing", nargs="?", const="always", metavar="missing|always|never",
                   help="pull base images: missing (default), always (--pull alone, as docker build --pull), never")
    p.add_argument("--platform", metavar="OS/ARCH", help="only this machine's platform can be built")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label on the image (repeatable)")
    p.add_argument("--iidfile", metavar="FILE", help="write the image id to FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image id")
    p.add_argument("--progress", choices=["auto", "plain", "tty"], default="auto",
                   help="step output: plain (every line), tty (steps in place), auto (tty on a terminal)")
    p.add_argument("--kernelspec", nargs="?", const="", metavar="NAME",
                   help="install a 'Contained Python (IMAGE)' kernelspec for the result (its name: NAME or "
                        "derived from the image)")
    p.set_defaults(func=cmd_build)
