"""Helpers for the course notebooks: the data sets shipped in the course image.

Pure Python (the standard library only), so the image needs no package from PyPI.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

HOME = Path(os.environ.get("COURSE_HOME", Path(__file__).resolve().parent))


def datasets() -> list[str]:
    """Names of the data sets in the image."""
    return sorted(p.stem for p in (HOME / "data").glob("*.csv"))


def load(name: str) -> list[dict[str, str]]:
    """A data set as a list of rows (dicts keyed by the header)."""
    with open(HOME / "data" / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def check() -> None:
    """What the image build runs: every data set loads and has rows."""
    for name in datasets():
        rows = load(name)
        assert rows, f"data set {name} is empty"
        print(f"{name}: {len(rows)} rows")
