"""The ``jupyter contain`` command line (installed as ``jupyter-contain``).

Owns argument parsing, human and ``--json`` output, and turning errors into one
line and an exit code. Must not hold logic of its own: every verb calls the
runtime (or kernel) API and prints what it returns. Verbs live in sibling
modules, one per noun, each exposing ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from .. import __version__
from ..errors import ContainError

log = logging.getLogger("jupyter_contain.cli")


def build_parser() -> argparse.ArgumentParser:
    from . import containers, images, kernels, registry, snapshot

    parser = argparse.ArgumentParser(
        prog="jupyter contain",
        description="Run Jupyter kernels in sandboxed containers built from OCI images.",
    )
    parser.add_argument("--version", action="version", version=f"jupyter-contain {__version__}")
    parser.add_argument("--root", metavar="DIR",
                        help="image and container store (default: $JUPYTER_CONTAIN_ROOT, "
                             "/var/lib/jupyter-contain for root, else $XDG_DATA_HOME/jupyter-contain)")
    parser.add_argument("--debug", action="store_true", help="log everything and show tracebacks")
    parser.add_argument("--url", default=os.environ.get("JUPYTER_CONTAIN_URL") or None, metavar="URL",
                        help="talk to a Jupyter Server's jupyter-contain API at URL instead of the local store "
                             "(default: $JUPYTER_CONTAIN_URL), like docker -H")
    parser.add_argument("--token", default=os.environ.get("JUPYTER_CONTAIN_TOKEN") or None, metavar="TOKEN",
                        help="that server's token (default: $JUPYTER_CONTAIN_TOKEN)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for module in (images, containers, registry, kernels, snapshot):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "jupyter-contain: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.url:
            from . import remote   # the remote verbs (and requests) only when a server is named

            rc = remote.run(args)
        else:
            rc = args.func(args)
    except ContainError as exc:
        if args.debug:
            log.exception("failed")
        print(f"jupyter-contain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("jupyter-contain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
