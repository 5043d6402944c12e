"""``jupyter contain`` verbs about snapshots: diff (what a container changed) and commit (make it an image)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .. import runtime   # lazy: diff, snapshot, summarize, Runtime, Store load on first use
from .output import emit_json, human_size, shown

if TYPE_CHECKING:
    from ..runtime import Change, Runtime


def _runtime(args: argparse.Namespace) -> Runtime:
    return runtime.Runtime(runtime.Store(args.root))


def _summary_line(changes: list[Change]) -> str:
    counts = {k: sum(1 for c in changes if c.kind == k) for k in "ACD"}
    total = sum(c.size for c in changes)
    folders = ", ".join(f"{shown(f.folder)} {f.count} ({human_size(f.bytes)})" for f in runtime.summarize(changes))
    return (f"{len(changes)} changes: {counts['A']} added, {counts['C']} changed, {counts['D']} deleted, "
            f"{human_size(total)}" + (f"; {folders}" if folders else ""))


def cmd_diff(args: argparse.Namespace) -> int:
    from ..kernel import snapshots   # what a snapshot leaves out: the kernel room knows

    rt = _runtime(args)
    changes = snapshots.diff(rt.get(args.container))
    if args.json:
        emit_json({"changes": [c.to_json() for c in changes],
                   "summary": [f.to_json() for f in runtime.summarize(changes)]})
        return 0
    for c in changes:
        print(f"{c.kind} {shown(c.path)}")   # names the container chose
    # the summary goes to stderr: stdout stays what `docker diff` prints, for scripts
    print(_summary_line(changes), file=sys.stderr)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    from ..kernel import snapshots   # labels and what a snapshot leaves out: the kernel room knows

    rt = _runtime(args)
    rec = snapshots.snapshot(rt, args.container, args.tag, message=args.message or "", compress=args.compress)
    if args.json:
        emit_json({"name": rec.name, "digest": rec.digest, "id": rec.id, "size": rec.size,
                   "diff_ids": list(rec.config.diff_ids)})
    else:
        print(f"{rec.familiar} {rec.digest}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="list what a container changed in its writable layer (A/C/D)")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--json", action="store_true", help="machine-readable output, with a per-folder summary")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("commit", help="make a new image of a container's writable layer (a snapshot)",
                       description="Freeze the container (if it runs), turn its writable layer into a new layer "
                                   "on top of its image, and tag the result (names without a registry go "
                                   "under localhost/).")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("tag", metavar="NAME[:TAG]")
    p.add_argument("-m", "--message", help="commit message (the history entry's comment)")
    p.add_argument("--compress", choices=["gzip", "zstd"], default="gzip", help="layer compression (default gzip)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_commit)
