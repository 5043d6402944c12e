"""Shared output helpers for CLI verbs: tables, sizes, JSON, progress lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = "   ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers).rstrip())
    for r in cells:
        print(fmt.format(*r).rstrip())


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def shown(text: str) -> str:
    """``text`` safe for a terminal: control characters (escape sequences, newlines) as ``\\xNN``.

    For names a container chose (paths in its writable layer): printed raw, a
    name could hold escape sequences that rewrite the user's terminal, or a
    newline that forges another line of output.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def print_containers(rows: Sequence[dict[str, Any]], *, as_json: bool, quiet: bool) -> None:
    """``ps`` output (local and remote alike) for containers' ``info()`` records."""
    if as_json:
        emit_json(list(rows))
    elif quiet:
        for r in rows:
            print(r["id"][:12])
    else:
        table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAME"], [
            (r["id"][:12], short(r["image"]), short(" ".join(r["command"]), 30), r["created"][:19].replace("T", " "),
             r["status"] if r["status"] != "exited" or not r["reason"] else f"exited: {r['reason']}", r["name"])
            for r in rows
        ])


def print_stats(rows: Sequence[dict[str, Any]], *, as_json: bool) -> None:
    """``stats`` output (local and remote alike) for rows of a container's id, name and cgroup figures."""
    if as_json:
        emit_json(list(rows))
        return
    table(["CONTAINER ID", "NAME", "MEM USAGE / LIMIT", "MEM PEAK", "CPU TIME", "PIDS"], [
        (r["id"][:12], r["name"],
         f"{human_size(r['memory_current'] or 0)} / {human_size(r['memory_limit']) if r['memory_limit'] else '-'}",
         human_size(r["memory_peak"] or 0), f"{(r['cpu_usage_ns'] or 0) / 1e9:.2f}s",
         f"{r['pids_current']}" + (f" / {r['pids_limit']}" if r["pids_limit"] else ""))
        for r in rows
    ])
