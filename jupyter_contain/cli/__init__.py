"""The ``jupyter contain`` command line (installed as ``jupyter-contain``).

Owns argument parsing, human and ``--json`` output, and turning errors into one
line and an exit code. Must not hold logic of its own: every verb calls the
runtime (or kernel) API and prints what it returns. Verbs live in sibling
modules, one per noun, each exposing ``register(subparsers)``.

Start-up cost is part of every command (``jupyter contain ps`` is typed by
people, ``run`` is scripted in loops), so this module imports only what every
command needs (argparse and the exception tree), and a command imports only
its own verb's module: :data:`VERBS` says which module registers each verb. A
verb module imports the runtime lazily too (``jupyter_contain.runtime`` loads
a name's module on first use). ``--version`` imports no verb module at all;
``-h`` without a verb, a missing or an unknown verb load every module to list
the verbs. ``tests/test_cli_imports.py`` holds that line: it asserts which
modules ``--version`` and ``ps`` leave in ``sys.modules``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable, Sequence

from .. import __version__
from ..errors import ContainError

#: verb -> the module of this package that registers it (``register(sub)``).
#: Adding a verb: add it to its module's ``register`` and a line here.
VERBS: dict[str, str] = {
    # images
    "images": "images", "inspect": "images", "tag": "images", "rmi": "images", "gc": "images",
    "df": "images", "import": "images", "save": "images",
    # containers
    "run": "containers", "exec": "containers", "ps": "containers", "stop": "containers",
    "kill": "containers", "rm": "containers", "stats": "containers", "logs": "containers",
    "bundle": "containers",
    # registries
    "pull": "registry", "push": "registry", "login": "registry", "logout": "registry",
    # kernels
    "kernelspec": "kernels", "bootstrap": "kernels", "reset": "kernels",
    # snapshots
    "diff": "snapshot", "commit": "snapshot",
    # images from a recipe
    "build": "build",
}

# global options that take a value (the verb is the first word that is not one of them)
_VALUED = ("--root", "--url", "--token")


def _find_verb(argv: Sequence[str]) -> str | None:
    """The verb in ``argv``: its first word that is neither a global option nor an option's value.

    Mirrors how argparse reads the global options below, abbreviations
    included (``--ro DIR``), so only the verb's module needs to be loaded.
    """
    words = iter(argv)
    for word in words:
        if word == "--":
            return next(words, None)
        if not word.startswith("-") or word == "-":
            return word
        if "=" in word:
            continue
        if len(word) > 2 and any(opt.startswith(word) for opt in _VALUED) and not any(
                opt.startswith(word) for opt in ("--debug", "--version", "--help")):
            next(words, None)
    return None


def _module(name: str) -> object | None:
    """The verb module ``name`` (None if it is not part of this installation)."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        return None


def build_parser(verbs: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the verbs of the modules that register ``verbs`` (default: every verb)."""
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
    wanted = VERBS if verbs is None else verbs
    # in the table's order, each module once (it registers all of its verbs)
    for name in dict.fromkeys(VERBS[v] for v in wanted if v in VERBS):
        module = _module(name)
        if module is not None:
            module.register(sub)  # type: ignore[attr-defined]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = _find_verb(argv)
    if verb in VERBS:
        parser = build_parser((verb,))
    elif verb is None and "--version" in argv and not {"-h", "--help"} & set(argv):
        # what argparse's version action prints, without its help formatter (shutil, with
        # zlib, bz2 and lzma: a third of this command's imports)
        print(f"jupyter-contain {__version__}")
        return 0
    else:
        parser = build_parser()     # help, or an error that lists every verb
    args = parser.parse_args(argv)

    import logging  # after parsing: --version and -h never pay for it

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "jupyter-contain: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.url:
            from . import remote  # the remote verbs (and requests) only when a server is named

            rc = remote.run(args)
        else:
            rc = args.func(args)
    except ContainError as exc:
        if args.debug:
            logging.getLogger("jupyter_contain.cli").exception("failed")
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
