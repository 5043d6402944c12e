"""``jupyter contain`` verbs that talk to registries: pull, push, login, logout.

Parses options and prints results; the work is in ``runtime.images.registry``.
Progress goes to stderr: bars on a terminal, plain lines otherwise.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from .. import runtime  # lazy: a name loads its module when a verb first uses it
from ..errors import AuthenticationError

if TYPE_CHECKING:   # the verbs import it when they run
    from ..runtime.images.progress import ProgressCallback


def _registry() -> ModuleType:
    # the registry client (and requests under it) only for the verb that runs
    from ..runtime.images import registry
    return registry


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _progress(args: argparse.Namespace) -> ProgressCallback | None:
    from ..runtime.images.progress import renderer_for
    return None if args.quiet else renderer_for(sys.stderr)


def cmd_pull(args: argparse.Namespace) -> int:
    store = runtime.Store(args.root)
    platform = runtime.Platform.parse(args.platform) if args.platform else None
    rec = _registry().pull(store, args.image, platform=platform, progress=_progress(args), tls_verify=args.tls_verify)
    print(f"{rec.familiar} {rec.digest}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    store = runtime.Store(args.root)
    res = _registry().push(store, args.image, args.dest, progress=_progress(args), tls_verify=args.tls_verify)
    print(f"{res.reference} {res.digest} (uploaded {len(res.uploaded)}, mounted {len(res.mounted)}, "
          f"already there {len(res.existing)})")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    server = args.server or "docker.io"
    username = args.username or input(f"Username for {server}: ")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif args.password is not None:
        password = args.password
    else:
        password = getpass.getpass(f"Password for {username}@{server}: ")
    if not username or not password:
        raise AuthenticationError("login needs a username and a password")
    where = _registry().login(server, username, password, tls_verify=args.tls_verify)
    print(f"Login succeeded (credentials saved in {where})")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    server = args.server or "docker.io"
    if _registry().logout(server):
        print(f"Removed login credentials for {server}")
    else:
        print(f"Not logged in to {server}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tls-verify", type=_bool, nargs="?", const=True, default=True, metavar="BOOL",
                       help="verify TLS certificates; false also allows plain HTTP (default true)")

    p = sub.add_parser("pull", help="pull an image from a registry")
    p.add_argument("image", metavar="NAME[:TAG|@DIGEST]")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="platform to pick from an index (default: this host)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    common(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("push", help="push an image to a registry")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("dest", nargs="?", metavar="REGISTRY/NAME[:TAG]", help="destination (default: the image's name)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    common(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("login", help="log in to a registry (saves credentials like docker login)")
    p.add_argument("server", nargs="?", metavar="REGISTRY", help="default: docker.io")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password", help="(unsafe: visible to other users) prefer --password-stdin")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    common(p)
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("logout", help="remove saved credentials of a registry")
    p.add_argument("server", nargs="?", metavar="REGISTRY", help="default: docker.io")
    p.set_defaults(func=cmd_logout)


__all__ = ["register"]
