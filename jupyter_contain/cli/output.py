"""Shared output helpers for CLI verbs: tables, sizes, JSON, progress lines."""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence


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
