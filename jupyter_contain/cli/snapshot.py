"""``jupyter contain`` verbs about snapshots: diff (what a container changed) and commit (make it an image).

Both go through the kernel room's ``snapshots`` (the Jupyter labels, and the
per-kernel runtime state a snapshot leaves out by default), so the CLI, the
notebook magics and the REST API leave out the same things.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from .. import runtime  # lazy: diff, snapshot, summarize, Runtime, Store load on first use
from .output import emit_json, human_size, shown

if TYPE_CHECKING:
    from ..runtime import Change, Runtime

#: left-out entries the human summary names one by one (``--json`` lists them all)
_SHOW_LEFT_OUT = 8


def _runtime(args: argparse.Namespace) -> Runtime:
    return runtime.Runtime(runtime.Store(args.root))


def _summary_line(changes: list[Change]) -> str:
    counts = {k: sum(1 for c in changes if c.kind == k) for k in "ACD"}
    total = sum(c.size for c in changes)
    folders = ", ".join(f"{shown(f.folder)} {f.count} ({human_size(f.bytes)})" for f in runtime.summarize(changes))
    return (f"{len(changes)} changes: {counts['A']} added, {counts['C']} changed, {counts['D']} deleted, "
            f"{human_size(total)}" + (f"; {folders}" if folders else ""))


def _left_out_line(left: list[Change]) -> str:
    names = ", ".join(shown(c.path) for c in left[:_SHOW_LEFT_OUT])
    more = f", ... ({len(left) - _SHOW_LEFT_OUT} more)" if len(left) > _SHOW_LEFT_OUT else ""
    return (f"left out (kernel runtime state; --include-runtime-state keeps it): {len(left)} entries, "
            f"{human_size(sum(c.size for c in left))}: {names}{more}")


def _leave_out(args: argparse.Namespace) -> dict[str, Any]:
    return {"include_runtime_state": args.include_runtime_state, "exclude": args.exclude or [],
            "include": args.include or []}


def cmd_diff(args: argparse.Namespace) -> int:
    from ..kernel import snapshots  # what a snapshot leaves out: the kernel room knows

    rt = _runtime(args)
    left: list[Change] = []
    changes = snapshots.diff(rt.get(args.container), left_out=left, **_leave_out(args))
    if args.json:
        emit_json({"changes": [c.to_json() for c in changes],
                   "summary": [f.to_json() for f in runtime.summarize(changes)],
                   "left_out": [c.to_json() for c in left]})
        return 0
    for c in changes:
        print(f"{c.kind} {shown(c.path)}")   # names the container chose
    # the summary goes to stderr: stdout stays what `docker diff` prints, for scripts
    print(_summary_line(changes), file=sys.stderr)
    if left:
        print(_left_out_line(left), file=sys.stderr)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    from ..kernel import snapshots  # labels and what a snapshot leaves out: the kernel room knows

    rt = _runtime(args)
    left: list[Change] = []
    rec = snapshots.snapshot(rt, args.container, args.tag, message=args.message or "", compress=args.compress,
                             left_out=left, **_leave_out(args))
    if args.json:
        emit_json({"name": rec.name, "digest": rec.digest, "id": rec.id, "size": rec.size,
                   "diff_ids": list(rec.config.diff_ids), "left_out": [c.to_json() for c in left]})
    else:
        print(f"{rec.familiar} {rec.digest}")
        if left:
            print(_left_out_line(left), file=sys.stderr)
    return 0


def _leave_out_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-runtime-state", action="store_true",
                   help="keep the kernel's runtime state (IPython history, caches, Jupyter runtime files), "
                        "which is left out by default")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="also leave out paths matching PATTERN (an absolute container path; * ? [] within a "
                        "name, ** for any folders; repeatable)")
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="keep paths matching PATTERN although they would be left out (repeatable)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="list what a container changed in its writable layer (A/C/D)")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--json", action="store_true", help="machine-readable output, with a per-folder summary")
    _leave_out_options(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("commit", help="make a new image of a container's writable layer (a snapshot)",
                       description="Freeze the container (if it runs), turn its writable layer into a new layer "
                                   "on top of its image, and tag the result (names without a registry go "
                                   "under localhost/). A kernel's runtime state (IPython history, caches, "
                                   "Jupyter runtime files) is left out unless --include-runtime-state.")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("tag", metavar="NAME[:TAG]")
    p.add_argument("-m", "--message", help="commit message (the history entry's comment)")
    p.add_argument("--compress", choices=["gzip", "zstd"], default="gzip", help="layer compression (default gzip)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _leave_out_options(p)
    p.set_defaults(func=cmd_commit)
